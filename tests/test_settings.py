"""Settings dataclasses become options that read CAPTIONFLEET_<OPTION> from the environment."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from captionfleet.settings import add_options, from_args, overlay, setting


@dataclass(frozen=True)
class ExampleSettings:
    port: int = setting(8080, "TCP port.")
    ratio: float = setting(0.5, "A ratio.")
    name: str | None = setting(None, "An optional name.")
    enabled: bool = setting(False, "A switch.")
    tags: tuple[str, ...] = setting(("a", "b"), "A list.")


def _parse(argv: list[str]) -> ExampleSettings:
    parser = argparse.ArgumentParser()
    add_options(parser, ExampleSettings)
    return from_args(ExampleSettings, parser.parse_args(argv))


def test_defaults_come_from_the_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PORT", "RATIO", "NAME", "ENABLED", "TAGS"):
        monkeypatch.delenv(f"CAPTIONFLEET_{var}", raising=False)
    assert _parse([]) == ExampleSettings()


def test_environment_overrides_defaults_and_the_command_line_overrides_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTIONFLEET_PORT", "9000")
    monkeypatch.setenv("CAPTIONFLEET_ENABLED", "true")
    monkeypatch.setenv("CAPTIONFLEET_TAGS", "x, y")
    assert _parse([]) == ExampleSettings(port=9000, enabled=True, tags=("x", "y"))
    assert _parse(["--port", "7000", "--enabled", "no"]).port == 7000
    assert _parse(["--enabled", "no"]).enabled is False


def test_a_bad_environment_value_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAPTIONFLEET_PORT", "eighty")
    with pytest.raises(SystemExit):
        _parse([])
    assert "--port" in capsys.readouterr().err


@dataclass(frozen=True)
class _Shape:
    width: int = 1
    height: int = 2
    colour: str = "red"


def test_overlay_takes_the_fields_the_settings_have_by_name_and_keeps_the_rest() -> None:
    given = ExampleSettings(port=7)  # has no field of _Shape: nothing taken
    assert overlay(_Shape(width=5), given) == _Shape(width=5)

    @dataclass(frozen=True)
    class Options:
        width: int = setting(10, "w")
        colour: str = setting("blue", "c")
        other: bool = setting(True, "not a field of _Shape")

    assert overlay(_Shape(height=4), Options(width=3)) == _Shape(width=3, height=4, colour="blue")
