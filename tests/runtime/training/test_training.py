"""Synthetic scenes, `captionfleet train` and the bundled model's files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from captionfleet.cli import main
from captionfleet.runtime.engine.captioner import load_captioner
from captionfleet.runtime.engine.loading import bundled_model_dir
from captionfleet.runtime.engine.types import GenerationOptions
from captionfleet.runtime.training.bundle import OutputDirError, cpu_seconds
from captionfleet.runtime.training.model import build_tokenizer
from captionfleet.runtime.training.scenes import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    PROMPTS,
    RELATIONS,
    SCENE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    caption_vocabulary,
    scene_at,
    scenes,
)
from captionfleet.runtime.training.settings import TrainSettings
from captionfleet.runtime.training.train import IGNORE, train
from captionfleet.settings import option_name

# One tiny architecture, as an object and as the options of `captionfleet train` that give it.
TINY_SIZES = {
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
}
TINY = replace(TrainSettings(**TINY_SIZES, mlp_ratio=2).architecture(), max_positions=40)
TINY_OPTIONS = [word for name, size in TINY_SIZES.items() for word in (option_name(name), str(size))]

OBJECT = (
    rf"a (?P<size{{i}}>{'|'.join(SIZES)}) (?P<colour{{i}}>{'|'.join(OBJECT_COLOURS)}) "
    rf"(?P<shape{{i}}>{'|'.join(SHAPES)})"
)
CAPTION = re.compile(
    "^"
    + OBJECT.format(i=0)
    + rf"(?: (?P<relation>{'|'.join(RELATIONS.values())}) "
    + OBJECT.format(i=1)
    + rf")? on a (?P<background>{'|'.join(BACKGROUND_COLOURS)}) background$"
)


@pytest.fixture(autouse=True)
def two_threads() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def test_scenes_follow_from_seed_and_index_alone() -> None:
    first = list(scenes(seed=5, count=30))
    assert first == list(scenes(seed=5, count=30))
    assert first[10:] == list(scenes(seed=5, count=20, start=10))
    assert scene_at(5, 17) == first[17]
    assert first[:10] != list(scenes(seed=6, count=10))
    assert first[3].render().tobytes() == scene_at(5, 3).render().tobytes()


def test_captions_vary_in_every_attribute() -> None:
    parsed = [CAPTION.match(scene.caption) for scene in scenes(seed=0, count=400)]
    assert all(parsed), [s.caption for s, m in zip(scenes(0, 400), parsed, strict=True) if not m][:3]
    groups = [m.groupdict() for m in parsed if m]
    for name, values in (
        ("size0", SIZES),
        ("colour0", OBJECT_COLOURS),
        ("shape0", SHAPES),
        ("relation", RELATIONS.values()),
        ("shape1", SHAPES),
        ("background", BACKGROUND_COLOURS),
    ):
        assert {g[name] for g in groups} >= set(values), name
    assert any(g["relation"] is None for g in groups)  # single shapes too


def _pixel(image: np.ndarray, x: float, y: float) -> np.ndarray:
    side = image.shape[0]
    return image[min(side - 1, int(y * side)), min(side - 1, int(x * side))].astype(int)


@pytest.mark.parametrize("index", range(60))
def test_caption_attributes_match_the_picture(index: int) -> None:
    scene = scene_at(11, index)
    match = CAPTION.match(scene.caption)
    assert match, scene.caption
    image = np.asarray(scene.render(SCENE_SIZE))
    assert image.shape == (SCENE_SIZE, SCENE_SIZE, 3)
    assert scene.background_rgb == pytest.approx(BACKGROUND_COLOURS[match["background"]], abs=6)
    for corner in ((0.01, 0.01), (0.99, 0.01), (0.01, 0.99), (0.99, 0.99)):
        assert np.abs(_pixel(image, *corner) - scene.background_rgb).max() <= 1
    for i, obj in enumerate(scene.objects):
        assert (obj.size, obj.colour, obj.shape) == (
            match[f"size{i}"],
            match[f"colour{i}"],
            match[f"shape{i}"],
        )
        low, high = SIZES[obj.size]
        assert low <= obj.radius <= high
        # The shape's colour is drawn at its centre, close to the named colour and far from the others.
        drawn = _pixel(image, obj.x, obj.y)
        assert np.abs(drawn - obj.rgb).max() <= 2
        distances = {name: np.abs(drawn - rgb).sum() for name, rgb in OBJECT_COLOURS.items()}
        assert min(distances, key=distances.__getitem__) == obj.colour
    if scene.relation is None:
        assert len(scene.objects) == 1 and match["relation"] is None
        return
    first, second = scene.objects
    assert match["relation"] == RELATIONS[scene.relation]
    along, across = ("y", "x") if scene.relation == "above" else ("x", "y")
    # The first shape named is clearly the upper (left) one; the other axis barely differs.
    assert getattr(second, along) - getattr(first, along) >= 0.42
    assert abs(getattr(second, across) - getattr(first, across)) <= 0.14 + 1e-9


def test_a_large_shape_covers_clearly_more_than_a_small_one() -> None:
    def area(scene: Scene) -> int:
        image = np.asarray(scene.render()).astype(int)
        return int((np.abs(image - scene.background_rgb).max(axis=2) > 30).sum())

    singles = [s for s in scenes(seed=3, count=300) if s.relation is None]
    for shape in SHAPES:
        small = [area(s) for s in singles if s.objects[0].shape == shape and s.objects[0].size == "small"]
        large = [area(s) for s in singles if s.objects[0].shape == shape and s.objects[0].size == "large"]
        assert small and large, shape
        # Radii 0.18-0.20 against 0.11-0.125: areas at least 2x apart, so the two sizes never overlap.
        assert min(large) > 1.8 * max(small), shape


def test_the_tokenizer_knows_every_caption_word() -> None:
    tokenizer = build_tokenizer(64)
    for text in [scene.caption for scene in scenes(seed=0, count=200)] + list(PROMPTS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert len(ids) == len(text.split())  # word-level: one token per word
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) == len(caption_vocabulary()) + 6
    assert tokenizer.convert_ids_to_tokens(tokenizer.bos_token_id) == "[DEC]"


def test_training_lowers_the_loss_and_is_repeatable() -> None:
    def run() -> tuple[list[float], dict[str, torch.Tensor]]:
        settings = TrainSettings(seed=3, train_scenes=48, steps=30, batch_size=16, learning_rate=3e-3)
        # No auxiliary head, no progress bar (train()'s defaults when it took keywords).
        settings = replace(settings, warmup_steps=3, prompt_fraction=0.25, patch_loss_weight=0)
        result = train(replace(settings, progress=False), architecture=TINY)
        return result.losses, {k: v.clone() for k, v in result.model.state_dict().items()}

    losses, weights = run()
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    again, weights_again = run()
    assert again == losses
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


def test_train_command_saves_a_model_the_engine_and_transformers_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    output = tmp_path / "tiny-scenes"
    argv = ["train", "--output-dir", str(output), "--name", "tiny-scenes", "--train-scenes", "64"]
    argv += ["--steps", "12", "--batch-size", "16", "--eval-scenes", "8", "--progress", "false"]
    assert main([*argv, "--reference-scenes", "60", *TINY_OPTIONS]) == 0
    printed = capsys.readouterr().out
    assert "saved tiny-scenes" in printed and "held-out: exact match" in printed

    names = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "preprocessor_config.json", "captionfleet.json", "README.md"} <= names
    assert "ood_reference.safetensors" in names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    manifest = json.loads((output / "captionfleet.json").read_text())
    assert manifest["name"] == "tiny-scenes"
    assert manifest["training"]["settings"]["steps"] == 12
    assert manifest["training"]["command"].startswith(f"captionfleet train --output-dir {output}")
    assert manifest["evaluation"]["n"] == 8
    # This process's CPU time, the run's included: what the time budget is checked against
    # (recorded to a tenth of a second, so it may round up past the clock read after it by 0.05).
    assert 0 < manifest["training"]["cpu_seconds"] <= cpu_seconds() + 0.05
    card = (output / "README.md").read_text()
    assert manifest["training"]["command"] in card and "exact match" in card
    assert f"({manifest['training']['cpu_seconds']:.0f} CPU seconds)" in card

    preprocessor = json.loads((output / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 32, "width": 32}
    assert preprocessor["resample"] == 3  # bicubic
    assert preprocessor["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    config = json.loads((output / "config.json").read_text())
    sep = config["text_config"]["sep_token_id"]
    assert config["text_config"]["eos_token_id"] == sep
    assert json.loads((output / "generation_config.json").read_text())["eos_token_id"] == sep

    model = BlipForConditionalGeneration.from_pretrained(output)
    processor = BlipProcessor.from_pretrained(output)
    assert processor.tokenizer.sep_token_id == sep
    assert processor.tokenizer.convert_ids_to_tokens(config["text_config"]["bos_token_id"]) == "[DEC]"
    assert processor.image_processor.size["height"] == 32
    assert model.config.vision_config.hidden_size == 32

    captioner = load_captioner(str(output))
    assert captioner.model_name == "tiny-scenes"
    assert captioner.version == manifest["version"]
    (caption,) = captioner.caption_images([scene_at(0, 0).render()], GenerationOptions())
    assert 0 < caption.confidence <= 1
    assert captioner.reference is not None and captioner.reference.metadata["calibration"] == 20
    assert caption.ood_score is not None and 0 <= caption.ood_score <= 1


def test_train_command_replaces_its_own_model_but_never_foreign_files(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    argv = ["train", "--train-scenes", "16", "--steps", "2", "--batch-size", "8", "--eval-scenes", "0"]
    argv += ["--reference-scenes", "0", "--progress", "false", *TINY_OPTIONS]
    with pytest.raises(SystemExit, match="not empty"):
        main([*argv, "--output-dir", str(foreign)])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    ours = tmp_path / "ours"
    assert main([*argv, "--output-dir", str(ours)]) == 0
    (ours / "stale.bin").write_text("left over")
    assert main([*argv, "--output-dir", str(ours), "--seed", "4"]) == 0
    assert not (ours / "stale.bin").exists()
    assert json.loads((ours / "captionfleet.json").read_text())["training"]["settings"]["seed"] == 4
    with pytest.raises(OutputDirError):
        from captionfleet.runtime.training.bundle import check_output_dir

        check_output_dir(foreign)


def test_training_labels_skip_padding_and_prompts() -> None:
    from captionfleet.runtime.engine.preprocess import ImagePreprocessor
    from captionfleet.runtime.training.model import build_image_processor
    from captionfleet.runtime.training.train import prepare_data

    tokenizer = build_tokenizer(64)
    preprocessor = ImagePreprocessor.from_config(build_image_processor(32).to_dict())
    data = prepare_data(2, 40, preprocessor, tokenizer, prompt_fraction=0.5)
    assert data.pixels.shape == (40, 3, 32, 32) and data.pixels.dtype == torch.uint8
    prompted = 0
    for row in range(40):
        ids = data.input_ids[row][data.attention_mask[row] == 1].tolist()
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.sep_token_id
        targets = data.labels[row][data.labels[row] != IGNORE].tolist()
        caption_ids = tokenizer(data.captions[row], add_special_tokens=False)["input_ids"]
        assert targets == [*caption_ids, tokenizer.sep_token_id]  # the caption and its end, nothing else
        prompted += len(ids) > len(caption_ids) + 2
    assert 5 < prompted < 35


def test_the_bundled_model_is_small_and_loads_offline_with_plain_transformers() -> None:
    directory = bundled_model_dir()
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    assert size < 10 * 1024 * 1024
    assert list(directory.glob("*.safetensors"))
    manifest = json.loads((directory / "captionfleet.json").read_text())
    assert manifest["evaluation"]["exact_match"] >= 0.95
    # A fresh interpreter, offline: only the transformers API and the files in the folder.
    script = f"""
import sys, torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from captionfleet.runtime.training.scenes import scene_at
torch.set_num_threads(1)
model = BlipForConditionalGeneration.from_pretrained({str(directory)!r})
processor = BlipProcessor.from_pretrained({str(directory)!r})
scenes = [scene_at(424242, i) for i in range(4)]
inputs = processor(images=[s.render() for s in scenes], return_tensors="pt")
out = model.generate(**inputs, num_beams=3, max_new_tokens=30)
got = [processor.decode(ids, skip_special_tokens=True) for ids in out]
print(sum(g == s.caption for g, s in zip(got, scenes)), got)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    correct = int(done.stdout.split()[0])
    assert correct >= 3, done.stdout
