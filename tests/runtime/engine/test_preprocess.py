"""Our preprocessing against transformers' BlipImageProcessor, on real photos."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import BlipImageProcessorPil

from captionfleet.runtime.engine.errors import ImageTooLarge
from captionfleet.runtime.engine.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    DRAFT_TOLERANCE,
    FAST_RESIZE_TOLERANCE,
    SMALL_INPUT_DRAFT_TOLERANCE,
    ImagePreprocessor,
    Tolerance,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
TWELVE_MP = 12_000_000


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def reference_tensor(processor: BlipImageProcessorPil, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(processor(image, return_tensors="np")["pixel_values"][0])


def within(ours: torch.Tensor, reference: torch.Tensor, tolerance: Tolerance) -> tuple[float, float, float]:
    assert ours.shape == reference.shape
    assert ours.dtype == torch.float32
    difference = (ours - reference).abs().flatten()
    measured = (difference.max().item(), difference.mean().item(), difference.quantile(0.99).item())
    assert measured[0] <= tolerance.max_abs, measured
    assert measured[1] <= tolerance.mean_abs, measured
    assert measured[2] <= tolerance.p99_abs, measured
    return measured


@pytest.fixture(scope="module")
def reference() -> BlipImageProcessorPil:
    return BlipImageProcessorPil()  # BLIP's defaults: 384x384 bicubic, CLIP mean/std


@pytest.fixture(scope="module")
def ours(reference: BlipImageProcessorPil) -> ImagePreprocessor:
    return ImagePreprocessor.from_pretrained(reference)


@pytest.fixture(scope="module")
def exact(ours: ImagePreprocessor) -> ImagePreprocessor:
    return dataclasses.replace(ours, fast_resize=False)


@pytest.mark.parametrize("name", [*PHOTOS, "camera"])
def test_same_image_gives_bit_identical_tensors_with_pil_resize(
    name: str, reference: BlipImageProcessorPil, exact: ImagePreprocessor
) -> None:
    image = photo(name)  # camera is greyscale (mode L): both convert it to RGB first
    tensor = exact(image)
    assert tensor.shape == (3, 384, 384)
    assert torch.equal(tensor, reference_tensor(reference, image))


@pytest.mark.parametrize("scale", [1, 2, 6])
@pytest.mark.parametrize("name", [*PHOTOS, "camera"])
def test_fast_resize_stays_within_two_grey_levels_of_the_reference(
    name: str, scale: int, reference: BlipImageProcessorPil, ours: ImagePreprocessor
) -> None:
    image = photo(name)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    within(ours(image), reference_tensor(reference, image), FAST_RESIZE_TOLERANCE)


def test_fast_resize_is_what_shrinks_by_default(
    reference: BlipImageProcessorPil, ours: ImagePreprocessor
) -> None:
    # The fast path really runs: a silent fallback to PIL would be bit-identical here.
    image = photo("camera").resize((1024, 1024), Image.Resampling.BICUBIC)
    assert ours.fast_resize
    assert not torch.equal(ours(image), reference_tensor(reference, image))


@pytest.mark.parametrize(
    ("size", "resample"),
    [
        ((200, 150), Image.Resampling.BICUBIC),  # enlarging both sides
        ((300, 1000), Image.Resampling.BICUBIC),  # enlarging one side, shrinking the other
        ((1024, 1024), Image.Resampling.NEAREST),  # a filter torch does not reproduce
    ],
)
def test_pil_resizes_what_the_fast_path_would_get_wrong(
    size: tuple[int, int], resample: Image.Resampling, ours: ImagePreprocessor
) -> None:
    image = photo("astronaut").resize(size, Image.Resampling.BICUBIC)
    configured = dataclasses.replace(ours, resample=resample)
    reference = BlipImageProcessorPil(resample=resample)
    assert torch.equal(configured(image), reference_tensor(reference, image))


def test_transparent_images_match_the_reference_too(
    reference: BlipImageProcessorPil, exact: ImagePreprocessor
) -> None:
    rgba = photo("astronaut").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    assert torch.equal(exact(rgba), reference_tensor(reference, rgba))


def test_the_model_uses_clip_statistics_not_imagenet(ours: ImagePreprocessor) -> None:
    assert ours.image_mean == pytest.approx(CLIP_MEAN)
    assert ours.image_std == pytest.approx(CLIP_STD)
    white = ours(Image.new("RGB", (10, 10), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    assert white[:, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)


def big_jpeg(image: Image.Image, pixels: int = TWELVE_MP) -> bytes:
    scale = (pixels / (image.width * image.height)) ** 0.5
    upscaled = image.resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    upscaled.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("name", PHOTOS)
def test_draft_decoded_12_megapixel_jpegs_stay_within_the_documented_tolerance(
    name: str, reference: BlipImageProcessorPil, ours: ImagePreprocessor
) -> None:
    data = big_jpeg(photo(name))
    full = Image.open(io.BytesIO(data))
    assert full.width * full.height >= 0.99 * TWELVE_MP
    expected = reference_tensor(reference, full.convert("RGB"))
    measured = within(ours.decode_and_preprocess(data, max_pixels=50_000_000), expected, DRAFT_TOLERANCE)
    # Draft mode really did change something: the test would not notice a silent full decode otherwise.
    assert measured[0] > 0


def test_jpegs_decode_at_the_smallest_scale_of_at_least_twice_the_input(ours: ImagePreprocessor) -> None:
    assert ours.draft_size == (768, 768)
    decoded = ours.decode(big_jpeg(photo("astronaut")), max_pixels=50_000_000)  # 3464 px square
    assert decoded.size == (866, 866)  # 1/4 scale; 1/8 (433) would be under 768


def test_decode_and_preprocess_of_a_small_png_is_exact_with_pil_resize(
    reference: BlipImageProcessorPil, ours: ImagePreprocessor, exact: ImagePreprocessor
) -> None:
    image = photo("coffee")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    expected = reference_tensor(reference, image)
    assert torch.equal(exact.decode_and_preprocess(buffer.getvalue(), max_pixels=1_000_000), expected)
    fast = ours.decode_and_preprocess(buffer.getvalue(), max_pixels=1_000_000)
    within(fast, expected, FAST_RESIZE_TOLERANCE)


def test_decode_and_preprocess_enforces_the_pixel_limit(ours: ImagePreprocessor) -> None:
    with pytest.raises(ImageTooLarge):
        ours.decode_and_preprocess(big_jpeg(photo("rocket"), 1_000_000), max_pixels=500_000)


def test_from_pretrained_reads_a_model_directory_and_its_config_file(tmp_path: Path) -> None:
    BlipImageProcessorPil(
        size={"height": 48, "width": 64}, image_mean=[0.5, 0.5, 0.5], resample=2
    ).save_pretrained(tmp_path)
    for source in (tmp_path, str(tmp_path / "preprocessor_config.json")):
        loaded = ImagePreprocessor.from_pretrained(source)
        assert (loaded.height, loaded.width) == (48, 64)
        assert loaded.image_mean == (0.5, 0.5, 0.5)
        assert loaded.resample == Image.Resampling.BILINEAR
        assert loaded(photo("chelsea")).shape == (3, 48, 64)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert ImagePreprocessor.from_pretrained(config) == ImagePreprocessor.from_pretrained(tmp_path)


def test_a_non_square_config_matches_the_reference() -> None:
    reference = BlipImageProcessorPil(size={"height": 200, "width": 120})
    ours = ImagePreprocessor.from_pretrained(reference)
    image = photo("rocket")
    expected = reference_tensor(reference, image)
    assert torch.equal(dataclasses.replace(ours, fast_resize=False)(image), expected)
    within(ours(image), expected, FAST_RESIZE_TOLERANCE)


@pytest.mark.parametrize(
    "config",
    [
        {"do_center_crop": True, "crop_size": {"height": 10, "width": 10}},
        {"size": {"shortest_edge": 384}},
        {"image_mean": [0.5, 0.5]},
    ],
)
def test_configs_it_cannot_reproduce_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ImagePreprocessor.from_config(config)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        ImagePreprocessor.from_pretrained(tmp_path)


def test_batch_stacks_in_order(ours: ImagePreprocessor) -> None:
    images = [photo(name) for name in PHOTOS]
    batch = ours.batch(images)
    assert batch.shape == (4, 3, 384, 384)
    for index, image in enumerate(images):
        assert torch.equal(batch[index], ours(image))
    assert ours.batch([]).shape == (0, 3, 384, 384)
    assert np.isfinite(batch.numpy()).all()


@pytest.fixture(scope="module")
def small_model_reference() -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": 96, "width": 96})  # the bundled model's input


@pytest.mark.parametrize("megapixels", [3_000_000, TWELVE_MP])
@pytest.mark.parametrize("name", PHOTOS)
def test_small_inputs_stay_within_their_draft_tolerance(
    name: str, megapixels: int, small_model_reference: BlipImageProcessorPil
) -> None:
    # At 96 px, 1/8 scale would be reachable: libjpeg keeps only block averages there (p99 0.38).
    ours = ImagePreprocessor.from_pretrained(small_model_reference)
    data = big_jpeg(photo(name), megapixels)
    with Image.open(io.BytesIO(data)) as full:
        expected = reference_tensor(small_model_reference, full.convert("RGB"))
    measured = ours.decode_and_preprocess(data, max_pixels=50_000_000)
    within(measured, expected, SMALL_INPUT_DRAFT_TOLERANCE)


def test_jpegs_never_decode_below_a_quarter_of_their_size() -> None:
    ours = ImagePreprocessor(height=96, width=96)
    assert ours.max_draft_reduction == 4
    decoded = ours.decode(big_jpeg(photo("astronaut")), max_pixels=50_000_000)  # 3464 px square
    assert decoded.size == (866, 866)  # 1/8 (433) would be >= 192 px, but is block averages only
