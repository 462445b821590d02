"""Settings dataclasses turned into command-line options that also read ``CAPTIONFLEET_<OPTION>``.

Every component describes its settings once, as a frozen dataclass whose fields carry a default and a
``help`` text in their metadata (the kopf style: one documented default per field). This module turns
such a class into argparse options and back, so the CLI, the environment and the docs never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ENV_PREFIX = "CAPTIONFLEET_"

S = TypeVar("S")
D = TypeVar("D", bound="DataclassInstance")


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a default and the help text shown by ``--help``."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; ``tuple[str, ...]`` -> ``tuple``; plain types unchanged."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is not None:
        return origin
    return annotation


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _converter(annotation: Any) -> Callable[[str], Any]:
    base = _base_type(annotation)
    if base is bool:
        return _parse_bool
    if base in (tuple, list):
        return _parse_list
    if base in (int, float, str):
        return base  # type: ignore[no-any-return]
    raise TypeError(f"unsupported setting type {annotation!r}")


def add_options(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one option per field of the settings dataclass ``cls``.

    The default comes from the environment variable when it is set, else from the field. Values from
    the environment are converted and checked like the command line's, when the options are parsed.
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (each also read from {ENV_PREFIX}<OPTION>)")
    for field in dataclasses.fields(cls):
        convert = _converter(hints[field.name])
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            raise TypeError(f"setting {cls.__name__}.{field.name} has no default")
        env = env_name(field.name)
        if env in os.environ:
            default = os.environ[env]  # argparse converts string defaults with `type`
        shown = ",".join(default) if isinstance(default, (tuple, list)) else default
        help_text = field.metadata.get("help", "")
        group.add_argument(
            option_name(field.name),
            dest=field.name,
            type=convert,
            default=default,
            choices=field.metadata.get("choices"),
            metavar=field.name.upper(),
            help=f"{help_text} [env {env}; default: {shown!r}]".replace("%", "%%"),
        )


def from_args(cls: type[S], args: argparse.Namespace) -> S:
    """Build the settings dataclass from parsed options (fields not in ``args`` keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**values)


def overlay(base: D, settings: object) -> D:
    """``base`` with each of its fields that ``settings`` also has taken from ``settings``, by name: the
    value object some of a command's options make up (a model's architecture, generation options)."""
    names = [f.name for f in dataclasses.fields(base) if hasattr(settings, f.name)]
    return dataclasses.replace(base, **{name: getattr(settings, name) for name in names})


def env_value(value: object) -> str:
    """A value as the option parser reads it back from ``CAPTIONFLEET_<OPTION>``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def env_entries(cls: type[Any], **values: object) -> list[dict[str, str]]:
    """Container environment entries (``{"name", "value"}``) that give ``cls``'s command these values.

    The variable names are derived from the fields, so a field renamed or misspelt here is an error
    (``TypeError``), not a variable the command silently ignores.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(unknown)}")
    return [{"name": env_name(name), "value": env_value(value)} for name, value in values.items()]
