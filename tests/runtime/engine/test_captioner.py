"""The captioner's structure on a tiny random BLIP saved with save_pretrained and loaded for real.

Its captions are gibberish but depend on the image, so ordering, suggestions, prompts and
confidences are all checked against the model itself (teacher forcing), not against mocks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from captionfleet.runtime.engine.captioner import Captioner, load_captioner, normalise_caption
from captionfleet.runtime.engine.errors import InvalidOptions, ModelLoadError
from captionfleet.runtime.engine.loading import pick_dtype, resolve_source
from captionfleet.runtime.engine.options import resolve_options
from captionfleet.runtime.engine.testing import check_ranked_suggestions, save_tiny_blip
from captionfleet.runtime.engine.types import Caption, GenerationOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return load_captioner(str(tiny_model_dir))


def test_loads_on_cpu_in_fp32_and_eval_mode(captioner: Captioner, tiny_model_dir: Path) -> None:
    assert captioner.device == torch.device("cpu")
    assert captioner.dtype == torch.float32
    assert not captioner.model.training
    assert all(not parameter.requires_grad for parameter in captioner.model.parameters())
    assert captioner.model_name == "tiny-blip"
    assert (captioner.preprocessor.height, captioner.preprocessor.width) == (32, 32)
    info = captioner.info()
    assert info["version"] == captioner.version
    assert info["dtype"] == "float32"


def test_version_is_the_dir_name_and_a_content_hash_that_follows_the_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = load_captioner(str(tiny_model_dir)).version
    assert first.startswith("tiny-blip-")
    assert len(first) == len("tiny-blip-") + 12
    assert load_captioner(f"file://{tiny_model_dir}").version == first  # same weights, same version
    retrained = save_tiny_blip(tmp_path / "tiny-blip", seed=1)
    assert load_captioner(str(retrained)).version not in (first, "")


def test_manifest_and_argument_set_the_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "captionfleet.json").write_text(json.dumps({"name": "scenes", "version": "scenes-v3"}))
    loaded = load_captioner(str(copy))
    assert (loaded.model_name, loaded.version) == ("scenes", "scenes-v3")
    assert load_captioner(str(copy), version="canary-7").version == "canary-7"


def test_explicit_dtype_is_honoured(tiny_model_dir: Path) -> None:
    loaded = load_captioner(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    caption = loaded.caption_pixels(torch.zeros(1, 3, 32, 32), GenerationOptions(max_new_tokens=3))[0]
    assert 0 < caption.confidence <= 1
    assert pick_dtype(None, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/model/dir", "does not exist"),
        ("./relative/missing", "does not exist"),
        ("file:///no/such/dir", "does not exist"),
        ("not a model id!", "does not exist"),
    ],
)
def test_bad_sources_are_clear_errors(source: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_source(source)


def test_a_directory_without_a_model_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_captioner(str(tmp_path))


def test_bad_device_and_dtype_are_load_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        load_captioner(str(tiny_model_dir), dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            load_captioner(str(tiny_model_dir), device="cuda")


def test_a_hub_id_without_a_reachable_hub_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_source("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelLoadError, match="Hugging Face Hub"):
        load_captioner("captionfleet-tests/no-such-model")


def test_one_caption_per_image_in_input_order(captioner: Captioner, photos: list[Image.Image]) -> None:
    options = GenerationOptions(num_beams=2, max_new_tokens=8)
    alone = [captioner.caption_images([image], options)[0] for image in photos]
    assert len({caption.text for caption in alone}) > 1, "the tiny model should tell these photos apart"
    batch = captioner.caption_images(photos, options)
    reversed_batch = captioner.caption_images(photos[::-1], options)
    assert [c.text for c in batch] == [c.text for c in alone]
    assert [c.text for c in reversed_batch] == [c.text for c in alone[::-1]]
    for together, single in zip(batch, alone, strict=True):
        assert together.confidence == pytest.approx(single.confidence, rel=1e-4)


def test_empty_batch_and_bad_shapes(captioner: Captioner) -> None:
    assert captioner.caption_pixels(torch.zeros(0, 3, 32, 32), GenerationOptions()) == []
    for shape in [(3, 32, 32), (1, 3, 64, 64), (1, 1, 32, 32)]:
        with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
            captioner.caption_pixels(torch.zeros(shape), GenerationOptions())


def check_suggestions(caption: Caption, wanted: int) -> None:
    check_ranked_suggestions(caption, wanted)
    assert caption.suggestions[0].confidence == caption.confidence


def test_suggestions_are_distinct_and_sorted_by_confidence(
    captioner: Captioner, photos: list[Image.Image]
) -> None:
    options = resolve_options(suggestions=3, num_beams=5, max_new_tokens=8)
    captions = captioner.caption_images(photos, options)
    for caption in captions:
        check_suggestions(caption, 3)
    assert max(len(c.suggestions) for c in captions) == 3
    single = captioner.caption_images(photos[:1], resolve_options(num_beams=1, max_new_tokens=8))[0]
    assert len(single.suggestions) == 1


def test_near_duplicates_are_one_suggestion() -> None:
    assert normalise_caption("A dog,  on the  GRASS.") == normalise_caption("a dog on the grass")
    assert normalise_caption("a dog") != normalise_caption("a dogs")


def test_a_prompt_starts_every_caption_as_the_user_wrote_it(
    captioner: Captioner, photos: list[Image.Image]
) -> None:
    options = resolve_options(prompt="A Picture of", suggestions=2, max_new_tokens=6)
    for caption in captioner.caption_images(photos, options):
        for suggestion in caption.suggestions:
            assert suggestion.text.startswith("A Picture of")
    style = resolve_options(style="photo", max_new_tokens=6)
    assert captioner.caption_images(photos[:1], style)[0].text.startswith("a photography of")


def test_a_prompt_spelling_special_tokens_is_invalid(captioner: Captioner) -> None:
    for prompt in ("a picture [SEP] of", "[CLS] a", "a [PAD]"):
        with pytest.raises(InvalidOptions, match="special tokens"):
            captioner.caption_pixels(torch.zeros(1, 3, 32, 32), GenerationOptions(prompt=prompt))
    unknown = captioner.caption_pixels(torch.zeros(1, 3, 32, 32), GenerationOptions(prompt="a zebra of"))
    assert unknown[0].text.startswith("a zebra of")


def test_a_prompt_too_long_for_the_model_is_invalid(captioner: Captioner) -> None:
    options = GenerationOptions(prompt=" ".join(["a picture of"] * 15), max_new_tokens=30)
    with pytest.raises(InvalidOptions, match="positions"):
        captioner.caption_pixels(torch.zeros(1, 3, 32, 32), options)


def teacher_forced_confidence(
    captioner: Captioner, pixels: torch.Tensor, options: GenerationOptions
) -> dict[str, float]:
    """The model's own exp(mean log p) of each returned sequence, scored again by a forward pass."""
    model = captioner.model
    prompt = captioner.tokenizer(options.prompt or "")["input_ids"]
    prompt_len = len(prompt) - 1
    returned = options.num_beams if options.suggestions > 1 else 1
    ids = torch.tensor([prompt] * pixels.shape[0])
    with torch.inference_mode():
        sequences = model.generate(
            pixel_values=pixels,
            input_ids=ids,
            num_beams=options.num_beams,
            num_return_sequences=returned,
            max_new_tokens=options.max_new_tokens,
            length_penalty=options.length_penalty,
            do_sample=False,
        )
        images = model.vision_model(pixel_values=pixels)[0].repeat_interleave(returned, dim=0)
        logits = model.text_decoder(input_ids=sequences, encoder_hidden_states=images).logits
    log_probs = logits.log_softmax(-1)[:, :-1].gather(2, sequences[:, 1:, None])[..., 0][:, prompt_len - 1 :]
    sep = model.config.text_config.sep_token_id
    result = {}
    for row, scores in zip(sequences[:, prompt_len:], log_probs, strict=True):
        ends = (row == sep).nonzero()
        length = int(ends[0]) + 1 if len(ends) else len(row)
        text = captioner.tokenizer.decode(row[:length], skip_special_tokens=True).strip()
        result.setdefault(text, math.exp(scores[:length].mean().item()))
    return result


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(num_beams=1, max_new_tokens=12),
        GenerationOptions(num_beams=4, suggestions=3, max_new_tokens=12),
        GenerationOptions(num_beams=3, suggestions=2, max_new_tokens=12, length_penalty=1.5),
        GenerationOptions(num_beams=3, suggestions=2, max_new_tokens=8, prompt="a picture of"),
    ],
    ids=["greedy", "beams", "length-penalty", "prompt"],
)
def test_confidence_is_the_mean_token_probability_without_the_prompt(
    captioner: Captioner, photos: list[Image.Image], options: GenerationOptions
) -> None:
    # The model's own distribution: with n-gram bans the confidence is renormalised over the tokens
    # left (as transformers scores it; the decoder agreement tests hold both to that).
    options = dataclasses.replace(options, no_repeat_ngram_size=0, ood_no_repeat_ngram_size=0)
    pixels = captioner.preprocessor.batch(photos[:2])
    captions = captioner.caption_pixels(pixels, options)
    for index, caption in enumerate(captions):
        expected = teacher_forced_confidence(captioner, pixels[index : index + 1], options)
        for suggestion in caption.suggestions:
            text = suggestion.text
            if options.prompt:
                text = text.removeprefix(options.prompt).strip()
                expected = {k.removeprefix(options.prompt).strip(): v for k, v in expected.items()}
            assert suggestion.confidence == pytest.approx(expected[text], rel=1e-4)


def test_mixed_modes_and_sizes_caption_together(captioner: Captioner) -> None:
    images = [
        Image.new("L", (50, 20), 128),
        Image.new("RGBA", (10, 90), (0, 255, 0, 100)),
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (33, 47, 3), dtype=np.uint8)),
    ]
    assert len(captioner.caption_images(images, GenerationOptions(max_new_tokens=4))) == 3


def test_warmup_runs(captioner: Captioner) -> None:
    captioner.warmup()
