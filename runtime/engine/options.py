"""Request options -> validated :class:`GenerationOptions`, and the named style presets.

A style is a named bundle of a prompt (BLIP's conditional caption prefix) and generation tweaks.
Explicit request fields win over the style's: ``style=photo&prompt=a drawing of`` uses the prompt
given, keeping the style's other tweaks. ``num_beams``, when not given, grows to the number of
suggestions asked for (a beam search returns at most ``num_beams`` sequences); given explicitly and
smaller, it is an error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from captionfleet.runtime.engine.errors import InvalidOptions
from captionfleet.runtime.engine.types import GenerationOptions

MAX_BEAMS = 10
MAX_NEW_TOKENS = 100
MAX_SUGGESTIONS = 5
MAX_PROMPT_CHARS = 200
MAX_NGRAM = 10


@dataclass(frozen=True)
class StylePreset:
    """What a named style changes; ``None`` leaves the request's (or the default) value."""

    prompt: str | None = None
    max_new_tokens: int | None = None
    length_penalty: float | None = None
    description: str = ""


STYLES: dict[str, StylePreset] = {
    "descriptive": StylePreset(
        max_new_tokens=40, length_penalty=1.5, description="longer captions with more detail"
    ),
    "concise": StylePreset(max_new_tokens=16, length_penalty=0.6, description="short captions"),
    "photo": StylePreset(prompt="a photography of", description='captions that start "a photography of"'),
    "picture": StylePreset(prompt="a picture of", description='captions that start "a picture of"'),
}
"""The named styles with everything they change."""

STYLE_PRESETS: dict[str, str | None] = {name: preset.prompt for name, preset in STYLES.items()}
"""Style name -> the prompt it implies (``None``: unconditional captioning)."""


def resolve_options(
    num_beams: int | str | None = None,
    max_new_tokens: int | str | None = None,
    suggestions: int | str | None = None,
    style: str | None = None,
    prompt: str | None = None,
    defaults: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, so sharing it is safe
) -> GenerationOptions:
    """Validate request options (ints may come as decimal strings from a query) over ``defaults``.

    Raises :class:`InvalidOptions` with a message naming the field.
    """
    resolved = defaults
    if style is not None:
        if not isinstance(style, str) or style.strip().lower() not in STYLES:
            raise InvalidOptions(f"unknown style {style!r}; known styles: {', '.join(sorted(STYLES))}")
        preset = STYLES[style.strip().lower()]
        changes: dict[str, Any] = {
            "prompt": preset.prompt,
            "max_new_tokens": preset.max_new_tokens,
            "length_penalty": preset.length_penalty,
        }
        resolved = dataclasses.replace(resolved, **{k: v for k, v in changes.items() if v is not None})
    if prompt is not None:
        resolved = dataclasses.replace(resolved, prompt=_prompt(prompt))
    if max_new_tokens is not None:
        resolved = dataclasses.replace(
            resolved, max_new_tokens=_integer("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        )
    if suggestions is not None:
        resolved = dataclasses.replace(
            resolved, suggestions=_integer("suggestions", suggestions, 1, MAX_SUGGESTIONS)
        )
    if num_beams is not None:
        beams = _integer("num_beams", num_beams, 1, MAX_BEAMS)
        if beams < resolved.suggestions:
            raise InvalidOptions(
                f"num_beams ({beams}) must be at least the number of suggestions ({resolved.suggestions})"
            )
        resolved = dataclasses.replace(resolved, num_beams=beams)
    elif resolved.num_beams < resolved.suggestions:
        resolved = dataclasses.replace(resolved, num_beams=resolved.suggestions)
    check_options(resolved)
    return resolved


def check_options(options: GenerationOptions) -> None:
    """Raise :class:`InvalidOptions` unless ``options`` is within the engine's limits."""
    _integer("num_beams", options.num_beams, 1, MAX_BEAMS)
    _integer("max_new_tokens", options.max_new_tokens, 1, MAX_NEW_TOKENS)
    _integer("suggestions", options.suggestions, 1, MAX_SUGGESTIONS)
    if options.num_beams < options.suggestions:
        raise InvalidOptions(
            f"num_beams ({options.num_beams}) must be at least "
            f"the number of suggestions ({options.suggestions})"
        )
    if options.prompt is not None and _prompt(options.prompt) != options.prompt:
        raise InvalidOptions("prompt must be non-empty, trimmed text with single spaces")
    _integer("no_repeat_ngram_size", options.no_repeat_ngram_size, 0, MAX_NGRAM)
    _integer("ood_no_repeat_ngram_size", options.ood_no_repeat_ngram_size, 0, MAX_NGRAM)
    if not 0.0 < options.length_penalty <= 5.0:
        raise InvalidOptions(f"length_penalty must be in (0, 5], got {options.length_penalty}")


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise InvalidOptions(f"{name} must be an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only (str.isdecimal and int() also take "３" and other scripts' digits), and few of
        # them: int() refuses over 4300 digits, and no option is anywhere near 10 digits.
        if not _DIGITS.fullmatch(text):
            raise InvalidOptions(f"{name} must be an integer, got {_shown(value)}")
        value = int(text)
    if not isinstance(value, int):
        raise InvalidOptions(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidOptions(f"{name} must be between {low} and {high}, got {_shown(value)}")
    return value


_DIGITS = re.compile(r"[0-9]{1,9}")


def _shown(value: object, most: int = 40) -> str:
    """A value for an error message, cut short (a client may send megabytes of digits)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number too large to show"  # str() refuses ints of over 4300 digits
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _prompt(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidOptions(f"prompt must be a string, got {type(value).__name__}")
    text = " ".join(value.split())
    if not text:
        raise InvalidOptions("prompt must not be empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidOptions(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}")
    if not text.isprintable():
        raise InvalidOptions("prompt must not contain control characters")
    return text
