"""`captionfleet train --preset`, the phrase vocabulary, and the bundled fast model's files."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoTokenizer

from captionfleet.cli import build_parser
from captionfleet.runtime.engine.errors import ModelLoadError
from captionfleet.runtime.engine.loading import bundled_model_dir, bundled_model_dirs
from captionfleet.runtime.engine.types import DEFAULT_MODEL, FAST_MODEL
from captionfleet.runtime.training.bundle import command_line
from captionfleet.runtime.training.model import build_tokenizer
from captionfleet.runtime.training.scenes import caption_phrases, scene_at
from captionfleet.runtime.training.settings import TRAIN_PRESETS, TrainSettings
from captionfleet.runtime.training.train_command import settings_from


def _settings(argv: list[str]) -> tuple[TrainSettings | None, list[str]]:
    return settings_from(build_parser(only="train").parse_args(["train", *argv]))


def test_the_default_preset_is_the_tiny_models_settings_unchanged() -> None:
    assert _settings([]) == (TrainSettings(), [])
    assert TRAIN_PRESETS["tiny"] == TrainSettings()


def test_a_preset_gives_its_defaults_and_options_given_override_them(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = TRAIN_PRESETS["fast"]
    assert _settings(["--preset", "fast"]) == (fast, [])
    # Given on the command line, a value wins even where it equals the tiny preset's default.
    chosen, _ = _settings(["--preset", "fast", "--steps", str(TrainSettings().steps), "--seed", "5"])
    assert chosen == dataclasses.replace(fast, steps=TrainSettings().steps, seed=5)
    monkeypatch.setenv("CAPTIONFLEET_STEPS", "9")
    monkeypatch.setenv("CAPTIONFLEET_PRESET", "fast")
    assert _settings([]) == (dataclasses.replace(fast, steps=9), [])


def test_an_unknown_preset_is_refused() -> None:
    settings, problems = _settings(["--preset", "huge"])
    assert settings is None and problems == ["--preset must be one of tiny, fast, got 'huge'"]


def test_the_recorded_command_names_the_preset() -> None:
    fast = dataclasses.replace(TRAIN_PRESETS["fast"], output_dir="out/x")
    assert command_line(fast) == "captionfleet train --preset fast --output-dir out/x"
    assert command_line(dataclasses.replace(fast, steps=7)).endswith("--output-dir out/x --steps 7")
    assert command_line(TrainSettings(output_dir="out/y")) == "captionfleet train --output-dir out/y"


def test_phrase_tokens_make_captions_short_and_decode_to_the_same_text() -> None:
    words, phrases = build_tokenizer(128), build_tokenizer(128, phrases=True)
    assert len(phrases) == len(words) + len(caption_phrases())
    for index in range(40):
        caption = scene_at(7, index).caption
        ids = phrases(caption, add_special_tokens=False)["input_ids"]
        assert phrases.decode(ids) == caption
        two_shapes = " above " in caption or " to the left of " in caption
        assert len(ids) == (4 if two_shapes else 2)
        assert len(words(caption, add_special_tokens=False)["input_ids"]) == len(caption.split())
    # Prompts and other text still tokenize word by word.
    assert phrases.convert_ids_to_tokens(phrases("a picture of", add_special_tokens=False)["input_ids"]) == [
        "a",
        "picture",
        "of",
    ]


def test_both_bundled_models_are_found_by_name() -> None:
    assert [path.name for path in bundled_model_dirs()] == sorted([DEFAULT_MODEL, FAST_MODEL])
    assert bundled_model_dir().name == DEFAULT_MODEL
    with pytest.raises(ModelLoadError, match=r"no bundled model 'nope'.*scenes-blip-fast"):
        bundled_model_dir("nope")


def test_the_bundled_fast_model_is_small_reproducible_and_below_the_quality_model() -> None:
    directory = bundled_model_dir(FAST_MODEL)
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    assert size < 5 * 1024 * 1024
    for name in ("README.md", "captionfleet.json", "ood_reference.safetensors", "calibration.json"):
        assert (directory / name).is_file(), name
    manifest = json.loads((directory / "captionfleet.json").read_text())
    training = manifest["training"]
    assert training["command"] == f"captionfleet train --preset fast --output-dir runtime/models/{FAST_MODEL}"
    recorded = dataclasses.replace(TRAIN_PRESETS["fast"], output_dir=f"runtime/models/{FAST_MODEL}")
    assert training["settings"] == dataclasses.asdict(recorded)
    # The budget, 10 minutes on 2 cores: at most 2 threads, 2 x 600 CPU seconds (which a busy
    # machine inflates less than wall time), and the recorded run's wall time.
    assert training["settings"]["threads"] <= 2 and training["cpu_seconds"] <= 1200
    assert training["total_seconds"] <= 600
    # Clearly below the quality model: at least half as many errors again on the held-out scenes.
    quality = json.loads((bundled_model_dir() / "captionfleet.json").read_text())
    errors, quality_errors = (1 - m["evaluation"]["exact_match"] for m in (manifest, quality))
    assert errors >= 1.5 * quality_errors
    tokenizer = AutoTokenizer.from_pretrained(directory)  # the phrases travel in the folder
    caption = scene_at(11, 0).caption
    assert tokenizer.decode(tokenizer(caption, add_special_tokens=False)["input_ids"]) == caption
