"""The bundled model (runtime/models/<name>/), loaded through the real loading code, on real images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from transformers import BlipImageProcessorPil

from captionfleet.runtime.engine.captioner import (
    Captioner,
    bundled_model_dir,
    load_captioner,
)
from captionfleet.runtime.engine.options import resolve_options
from captionfleet.runtime.engine.preprocess import ImagePreprocessor
from captionfleet.runtime.engine.testing import check_ranked_suggestions
from captionfleet.runtime.engine.types import Caption, GenerationOptions
from captionfleet.runtime.training.scenes import SCENE_SIZE, Scene, scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    return load_captioner(str(bundled_model_dir()))


@pytest.fixture(scope="module")
def reference(bundled: Captioner) -> BlipImageProcessorPil:
    return BlipImageProcessorPil.from_pretrained(bundled_model_dir())


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    """Held-out scenes with pairwise different true captions."""
    chosen: dict[str, Scene] = {}
    index = 0
    while len(chosen) < 12:
        scene = scene_at(HELD_OUT_SEED, index)
        chosen.setdefault(scene.caption, scene)
        index += 1
    return list(chosen.values())


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(image: Image.Image, scale: int) -> bytes:
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def check_caption(caption: Caption, wanted: int = 1) -> None:
    assert caption.text.strip()
    assert 0 < caption.confidence <= 1
    check_ranked_suggestions(caption, wanted)


def test_the_bundled_model_loads_with_its_own_preprocessing(
    bundled: Captioner, reference: BlipImageProcessorPil
) -> None:
    assert bundled.model_name
    assert bundled.version
    assert bundled.preprocessor == ImagePreprocessor.from_pretrained(reference)
    assert bundled.device.type in ("cpu", "cuda")


def test_real_photos_are_captioned(bundled: Captioner, photos: list[Image.Image]) -> None:
    captions = bundled.caption_images(photos, GenerationOptions())
    assert len(captions) == len(photos)
    for caption in captions:
        check_caption(caption)


def test_real_photos_from_bytes_get_the_same_captions_as_with_blip_image_processor(
    bundled: Captioner, photos: list[Image.Image], reference: BlipImageProcessorPil
) -> None:
    # 4x upscaled JPEGs, so our path decodes them in draft mode while the reference decodes fully.
    payloads = [jpeg(photo, 4) for photo in photos]
    ours = torch.stack(
        [bundled.preprocessor.decode_and_preprocess(data, max_pixels=50_000_000) for data in payloads]
    )
    theirs = torch.from_numpy(
        reference([Image.open(io.BytesIO(data)).convert("RGB") for data in payloads], return_tensors="np")[
            "pixel_values"
        ]
    )
    options = GenerationOptions()
    assert [c.text for c in bundled.caption_pixels(ours, options)] == [
        c.text for c in bundled.caption_pixels(theirs, options)
    ]


def test_suggestions_are_distinct_and_sorted(bundled: Captioner, photos: list[Image.Image]) -> None:
    options = resolve_options(suggestions=3)
    for caption in bundled.caption_images(photos, options):
        check_caption(caption, wanted=3)


def test_a_prompt_starts_the_caption(bundled: Captioner, photos: list[Image.Image]) -> None:
    options = resolve_options(prompt="a picture of", suggestions=2)
    for caption in bundled.caption_images(photos, options):
        check_caption(caption, wanted=2)
        assert all(s.text.startswith("a picture of") for s in caption.suggestions)
        assert len(caption.text) > len("a picture of")


def test_distinct_scenes_in_one_batch_each_get_their_own_caption(
    bundled: Captioner, scenes: list[Scene]
) -> None:
    images = [scene.render(SCENE_SIZE) for scene in scenes]
    options = GenerationOptions()
    together = bundled.caption_images(images, options)
    alone = [bundled.caption_images([image], options)[0] for image in images]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.text for c in bundled.caption_images(images[::-1], options)] == [c.text for c in alone[::-1]]
    # Different pictures, different captions: a mix-up inside the batch could not pass this.
    assert len({c.text for c in together}) == len(scenes), [c.text for c in together]
    # Each caption describes its own picture: the background, the relation and every colour in it
    # (what even a half-trained model gets right; exact-match accuracy is the eval's business).
    for caption, scene in zip(together, scenes, strict=True):
        text = caption.text
        assert text.endswith(f"on a {scene.background} background"), (text, scene.caption)
        assert (" above " in text) == (scene.relation == "above"), (text, scene.caption)
        assert (" to the left of " in text) == (scene.relation == "left"), (text, scene.caption)
        assert all(obj.colour in text for obj in scene.objects), (text, scene.caption)


@pytest.mark.parametrize(("fmt", "scale"), [("PNG", 1), ("JPEG", 1), ("JPEG", 8), ("WEBP", 4)])
def test_scenes_from_bytes_get_the_same_captions_as_with_blip_image_processor(
    bundled: Captioner, scenes: list[Scene], reference: BlipImageProcessorPil, fmt: str, scale: int
) -> None:
    # Rendered 8x larger, the JPEGs decode in draft mode on our side and fully on the reference's.
    payloads = [encode(scene.render(SCENE_SIZE * scale), fmt, quality=90) for scene in scenes]
    ours = torch.stack(
        [bundled.preprocessor.decode_and_preprocess(data, max_pixels=50_000_000) for data in payloads]
    )
    full = [Image.open(io.BytesIO(data)).convert("RGB") for data in payloads]
    theirs = torch.from_numpy(reference(full, return_tensors="np")["pixel_values"])
    options = resolve_options(suggestions=2)
    ours_captions = bundled.caption_pixels(ours, options)
    theirs_captions = bundled.caption_pixels(theirs, options)
    assert [c.text for c in ours_captions] == [c.text for c in theirs_captions]
    for mine, other in zip(ours_captions, theirs_captions, strict=True):
        assert mine.confidence == pytest.approx(other.confidence, abs=0.02)


def _transparent_background(scene: Scene) -> bytes:
    """The scene as an RGBA PNG whose background is fully transparent (its colour bytes black): only
    compositing on white, as ``to_rgb`` does, shows the white-background scene it was drawn as."""
    rgb = scene.render()
    pixels = np.array(rgb.convert("RGBA"))
    background = np.all(np.abs(pixels[..., :3].astype(int) - scene.background_rgb) <= 2, axis=-1)
    pixels[background] = (0, 0, 0, 0)
    return encode(Image.fromarray(pixels), "PNG")


def _exif_rotated(scene: Scene) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 270 degrees: stored turned 90
    return encode(scene.render(256).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)


def _noisy(scene: Scene) -> bytes:
    pixels = np.asarray(scene.render(), dtype=np.float64)
    noise = np.random.default_rng(0).normal(0.0, 8.0, pixels.shape)
    return encode(Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)), "PNG")


VARIANTS = {
    "png": lambda scene: encode(scene.render(), "PNG"),
    "1024 px jpeg q90": lambda scene: encode(scene.render(1024), "JPEG", quality=90),
    "256 px jpeg q30": lambda scene: encode(scene.render(256), "JPEG", quality=30),
    "webp q80": lambda scene: encode(scene.render(200), "WEBP", quality=80),
    "palette of 32": lambda scene: encode(scene.render().quantize(32), "PNG"),
    "non-square 192x128": lambda scene: encode(scene.render().resize((192, 128)), "PNG"),
    "blurred": lambda scene: encode(scene.render().filter(ImageFilter.GaussianBlur(1)), "PNG"),
    "noise sigma 8": _noisy,
    "exif-rotated jpeg": _exif_rotated,
}

UNSEEN_SEED = 2000003
"""Neither the training seed nor the held-out one the model card reports."""


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unseen_scenes_in_other_encodings_keep_the_exact_match_level(
    bundled: Captioner, variant: str
) -> None:
    """Measured on 200 scenes of this seed: 0.955-0.975 exact for every variant, the same as their
    PNGs (0.970; the model card: 0.986 on 500 held-out scenes); 48 here, at least 44 exact."""
    chosen = [scene_at(UNSEEN_SEED, index) for index in range(48)]
    pixels = torch.stack(
        [
            bundled.preprocessor.decode_and_preprocess(VARIANTS[variant](s), max_pixels=50_000_000)
            for s in chosen
        ]
    )
    captions = bundled.caption_pixels(pixels, resolve_options())
    exact = sum(caption.text == scene.caption for caption, scene in zip(captions, chosen, strict=True))
    assert exact >= 44, [
        (c.text, s.caption) for c, s in zip(captions, chosen, strict=True) if c.text != s.caption
    ]


def test_a_transparent_background_is_composited_on_white(bundled: Captioner) -> None:
    chosen = [scene for scene in (scene_at(UNSEEN_SEED, i) for i in range(60)) if scene.background == "white"]
    pixels = torch.stack(
        [
            bundled.preprocessor.decode_and_preprocess(_transparent_background(s), max_pixels=10**6)
            for s in chosen
        ]
    )
    captions = bundled.caption_pixels(pixels, resolve_options())
    assert all(caption.text.endswith("on a white background") for caption in captions)
    assert sum(c.text == s.caption for c, s in zip(captions, chosen, strict=True)) >= len(chosen) - 2
