"""Request options to GenerationOptions: validation, style presets and their precedence."""

from __future__ import annotations

import pytest

from captionfleet.runtime.engine.errors import InvalidOptions
from captionfleet.runtime.engine.options import (
    MAX_BEAMS,
    MAX_PROMPT_CHARS,
    STYLE_PRESETS,
    STYLES,
    check_options,
    resolve_options,
)
from captionfleet.runtime.engine.types import GenerationOptions
from captionfleet.runtime.training.settings import EvalSettings
from captionfleet.settings import overlay
from captionfleet.settings.generation import GenerationSettings
from captionfleet.settings.serve import ServeSettings


def test_the_commands_generation_defaults_are_the_engines() -> None:
    for settings in (GenerationSettings(), ServeSettings(), EvalSettings()):
        assert overlay(GenerationOptions(), settings) == GenerationOptions(), type(settings).__name__
    chosen = overlay(GenerationOptions(), ServeSettings(num_beams=5, ood_no_repeat_ngram_size=0))
    assert (chosen.num_beams, chosen.ood_no_repeat_ngram_size, chosen.max_new_tokens) == (5, 0, 30)


def test_no_options_give_the_defaults() -> None:
    assert resolve_options() == GenerationOptions()
    custom = GenerationOptions(num_beams=5, max_new_tokens=12)
    assert resolve_options(defaults=custom) == custom


def test_query_strings_are_accepted_for_integers() -> None:
    options = resolve_options(num_beams="4", max_new_tokens=" 20 ", suggestions="2")
    assert (options.num_beams, options.max_new_tokens, options.suggestions) == (4, 20, 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_beams", 0),
        ("num_beams", MAX_BEAMS + 1),
        ("num_beams", "three"),
        ("num_beams", 2.5),
        ("num_beams", True),
        ("num_beams", "-1"),
        ("suggestions", 0),
        ("suggestions", 6),
        ("max_new_tokens", 0),
        ("max_new_tokens", 10_000),
    ],
)
def test_out_of_range_or_non_integer_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidOptions, match=field) as caught:
        resolve_options(**{field: value})  # type: ignore[arg-type]
    assert caught.value.code == "invalid_options"


def test_beams_grow_to_the_suggestions_unless_given_explicitly() -> None:
    assert resolve_options(suggestions=5).num_beams == 5
    assert resolve_options(suggestions=2).num_beams == GenerationOptions().num_beams  # already enough
    with pytest.raises(InvalidOptions, match="num_beams"):
        resolve_options(suggestions=4, num_beams=2)


def test_every_style_preset_resolves_and_presets_name_their_prompts() -> None:
    assert {"descriptive", "concise"} <= set(STYLES)
    assert set(STYLE_PRESETS) == set(STYLES)
    for name, prompt in STYLE_PRESETS.items():
        options = resolve_options(style=name)
        assert options.prompt == prompt
        check_options(options)


def test_style_tweaks_generation_and_explicit_fields_win() -> None:
    concise, descriptive = resolve_options(style="concise"), resolve_options(style="descriptive")
    assert concise.max_new_tokens < descriptive.max_new_tokens
    assert concise.length_penalty < 1 < descriptive.length_penalty
    assert resolve_options(style="concise", max_new_tokens=25).max_new_tokens == 25
    assert resolve_options(style="photo").prompt == "a photography of"
    assert resolve_options(style="photo", prompt="a drawing of").prompt == "a drawing of"
    assert resolve_options(style=" Concise ") == concise


def test_unknown_style_lists_the_known_ones() -> None:
    with pytest.raises(InvalidOptions, match="concise"):
        resolve_options(style="baroque")


def test_prompts_are_trimmed_and_checked() -> None:
    assert resolve_options(prompt="  a   picture of ").prompt == "a picture of"
    for bad in ("", "   ", "a\x00b", "x" * (MAX_PROMPT_CHARS + 1)):
        with pytest.raises(InvalidOptions, match="prompt"):
            resolve_options(prompt=bad)
    with pytest.raises(InvalidOptions, match="prompt"):
        resolve_options(prompt=42)  # type: ignore[arg-type]


def test_check_options_rejects_hand_built_bad_options() -> None:
    for bad in (
        GenerationOptions(num_beams=1, suggestions=3),
        GenerationOptions(num_beams=0),
        GenerationOptions(prompt=" untrimmed"),
        GenerationOptions(length_penalty=0.0),
    ):
        with pytest.raises(InvalidOptions):
            check_options(bad)
