"""Turning images into the model's pixel tensors, the way the model's own image processor does.

:class:`ImagePreprocessor` reads the same ``preprocessor_config.json`` fields as transformers'
``BlipImageProcessor`` (size, resample, rescale factor, mean/std — CLIP's for BLIP, not ImageNet's) and
reproduces its arithmetic: one resize of the 8-bit RGB image with PIL's filter, then rescale and
normalise. The normalisation is a per-channel lookup table built with the reference's own float
arithmetic, so with PIL's resize (``fast_resize=False``) the tensors for the same RGB image are
bit-identical to ``BlipImageProcessor``'s.

The speed comes from two places. Decoding (:meth:`ImagePreprocessor.decode_and_preprocess`): JPEGs
decode in draft mode to the smallest DCT scale that is still at least twice the target size
(``draft_factor``), so a 12 MP photo is decoded at a fraction of the work. That changes pixels
slightly: see :data:`DRAFT_TOLERANCE` for the measured difference, which the tests enforce. Resizing
(``fast_resize``): shrinking with torch's antialiased uint8 kernels, which port PIL's bicubic and
bilinear filters and vectorise them; they round differently, by at most two grey levels
(:data:`FAST_RESIZE_TOLERANCE`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captionfleet.runtime.engine.images import ALLOWED_FORMATS, decode_image, to_rgb

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# BLIP's defaults (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), used when the config omits them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Tolerance:
    """How far our tensors may be from the reference's, in normalised units.

    One normalised unit is std * 255, about 68 grey levels (CLIP's std is ~0.27)."""

    max_abs: float
    mean_abs: float
    p99_abs: float


DRAFT_TOLERANCE = Tolerance(max_abs=0.3, mean_abs=0.01, p99_abs=0.06)
"""Draft-mode JPEG decoding (``draft_factor=2``) vs a full decode through ``BlipImageProcessor``, at
BLIP-base's 384 px input (smaller inputs: :data:`SMALL_INPUT_DRAFT_TOLERANCE`).

Measured on the scikit-image photos (astronaut, coffee, chelsea, rocket) upscaled to ~12 MP and saved
as JPEG quality 90: max 0.06-0.23, mean 0.004-0.0064, 99th percentile 0.015-0.045 (a normalised unit
is ~68 grey levels, so the mean is under half a grey level). The max is a few pixels on sharp edges,
where the DCT's own downscaling differs from a bicubic filter over the full image. With
``draft_factor=1`` the same photos measure max 0.23-0.92, mean 0.007-0.015, p99 0.06-0.19."""

SMALL_INPUT_DRAFT_TOLERANCE = Tolerance(max_abs=0.45, mean_abs=0.025, p99_abs=0.2)
"""Draft-mode decoding for a 96 px input (the bundled model's) vs a full decode, same photos at 3 and
12 MP: max 0.03-0.38, mean 0.003-0.018, p99 0.015-0.16. Larger than at 384 px because the DCT does
more of the shrinking: a 3 MP photo decodes at 1/4 to 531 px, where libjpeg's reduced inverse DCT
(2x2 of each 8x8 block) has dropped detail that bicubic would have weighed in. Without the 1/4 cap
(``max_draft_reduction``), 1/8 scale measured p99 0.38."""

EXACT_TOLERANCE = Tolerance(max_abs=0.0, mean_abs=0.0, p99_abs=0.0)
"""The same RGB image through both preprocessors with ``fast_resize=False``: bit-identical tensors."""

_GREY_LEVEL = 1 / (255 * min(CLIP_STD))
"""One 8-bit level in normalised units with CLIP's std: 0.015."""

FAST_RESIZE_TOLERANCE = Tolerance(max_abs=2 * _GREY_LEVEL + 1e-6, mean_abs=0.001, p99_abs=_GREY_LEVEL + 1e-6)
"""The same RGB image shrunk by torch's kernels (``fast_resize``) vs PIL's: two grey levels at most.

Measured on the scikit-image photos at 1x, 2x and 6x their size -> 384 and 96 px: max two levels
(mild shrinks, 1.3-1.6x), one from 2x on; 98-100 % of values identical, mean under 0.0003. On random
noise (the worst case for rounding), 385-3000 px -> 384 px: max one level."""

_TORCH_FILTERS = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}
"""PIL filters that torch's antialiased ``interpolate`` reproduces (same kernels, ported from PIL)."""


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize + rescale + normalise, configured like the model's ``BlipImageProcessor``."""

    height: int = 384
    width: int = 384
    resample: Image.Resampling = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    reducing_gap: float | None = None
    """PIL's two-step resize (a box reduce first). ``None`` keeps PIL's exact single-pass filter, which
    is what the reference does; draft-mode decoding already removes most of the work for JPEGs."""
    draft_factor: int = 2
    """JPEGs decode at the smallest DCT scale that is at least this many times the model's input size.

    1 is the fastest (the smallest scale >= the input size) but the DCT's own downscaling then does
    most of the reduction, and it is not a bicubic filter. Held-out scenes saved as 1024 px JPEGs,
    captioned after our preprocessing and after BlipImageProcessor's full decode: with 1, 4/200
    captions differed (half-trained model) and 3/300 (trained model); with 2, 0/200 and 1/300 - as
    often as re-encoding the PNG as JPEG changes the reference's own caption (1/300). 2 costs about
    twice the decoding time of 1 and is still 4-9x faster than a full decode."""
    max_draft_reduction: int = 4
    """JPEGs never decode smaller than 1/this of their size. At 1/8 libjpeg keeps only each 8x8 block's
    average (its DC coefficient), a box filter far from bicubic: a 3 MP photo -> 96 px measured p99
    0.38 from the reference (max 0.77) at 1/8, 0.015 at 1/4; 12 MP photos p99 0.09-0.15 at 1/8,
    0.015-0.057 at 1/4, for 1.3-1.5x the decoding time. 384 px inputs only reach 1/8 above 24 MP."""
    fast_resize: bool = True
    """Shrink with torch's antialiased uint8 ``interpolate`` (PIL's bicubic/bilinear filters, vectorised
    with AVX2, single-threaded) instead of PIL's ``resize``. Measured on one core, 2000x1500 -> 384x384:
    3.7 ms vs 46.6 ms, at most two grey levels apart (:data:`FAST_RESIZE_TOLERANCE`). Only when both
    sides shrink: upscaling one side while shrinking the other, the two round and clip in a different
    order (up to 24 levels apart on noise), and enlarging is cheap in PIL anyway. False: PIL always."""

    @classmethod
    def from_pretrained(cls, model_dir_or_processor: Any) -> ImagePreprocessor:
        """Build from a model directory, a ``preprocessor_config.json`` path, a config mapping or an
        image processor object (anything with BlipImageProcessor's attributes)."""
        source = model_dir_or_processor
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                path = path / PREPROCESSOR_CONFIG
            if not path.is_file():
                raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG} at {path}")
            return cls.from_config(json.loads(path.read_text(encoding="utf-8")))
        if isinstance(source, Mapping):
            return cls.from_config(source)
        if hasattr(source, "to_dict"):
            return cls.from_config(source.to_dict())
        raise TypeError(f"cannot build an ImagePreprocessor from {type(source).__name__}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImagePreprocessor:
        """Build from the fields of a ``preprocessor_config.json``; refuses what it cannot reproduce."""
        for flag in ("do_center_crop", "do_pad"):
            if config.get(flag):
                raise ValueError(f"{flag}=true in the image processor config is not supported")
        size = config.get("size") or {"height": 384, "width": 384}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size:
            raise ValueError(f"only a fixed size {{height, width}} is supported, got size={size!r}")
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC))),
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_triple(config.get("image_mean", CLIP_MEAN), "image_mean"),
            image_std=_triple(config.get("image_std", CLIP_STD), "image_std"),
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's order."""
        return (self.width, self.height)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A (3, H, W) float32 tensor for one image (any mode; converted to RGB like the decoder does)."""
        rgb = to_rgb(image)
        if self.do_resize and rgb.size != self.size:
            pixels = self._resized(rgb)
        else:
            pixels = np.asarray(rgb, dtype=np.uint8)
        lut = self.lookup_table()
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        for channel in range(3):
            np.take(lut[channel], pixels[:, :, channel], out=out[channel])
        return torch.from_numpy(out)

    def _resized(self, rgb: Image.Image) -> np.ndarray:
        """(height, width, 3) uint8: ``rgb`` resized with the configured filter."""
        mode = _TORCH_FILTERS.get(self.resample)
        shrinking = rgb.width >= self.width and rgb.height >= self.height
        if not (self.fast_resize and mode and shrinking and self.reducing_gap is None):
            by_pil = rgb.resize(self.size, resample=self.resample, reducing_gap=self.reducing_gap)
            return np.asarray(by_pil, dtype=np.uint8)
        # np.array, not asarray: PIL hands out a read-only buffer, which torch.from_numpy warns about.
        # (1, 3, H, W) over HWC memory is channels-last uint8, the layout torch's fast kernels take.
        source = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
        by_torch = F.interpolate(source, size=(self.height, self.width), mode=mode, antialias=True)
        pixels: np.ndarray = by_torch[0].permute(1, 2, 0).numpy()
        return pixels

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """An (N, 3, H, W) tensor; all images are resized to the configured size."""
        if not self.do_resize and len({image.size for image in images}) > 1:
            raise ValueError("images of different sizes cannot be batched when do_resize is false")
        return (
            torch.stack([self(image) for image in images])
            if images
            else torch.empty(0, 3, self.height, self.width)
        )

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """(width, height) for :func:`decode_image`'s ``draft_size``; ``None`` when not resizing."""
        if not self.do_resize:
            return None
        return (self.width * self.draft_factor, self.height * self.draft_factor)

    def decode(
        self, data: bytes, *, max_pixels: int, allowed_formats: Collection[str] = ALLOWED_FORMATS
    ) -> Image.Image:
        """Decode untrusted bytes to RGB for this model: JPEGs in draft mode (see ``draft_factor``)."""
        return decode_image(
            data,
            max_pixels=max_pixels,
            allowed_formats=allowed_formats,
            draft_size=self.draft_size,
            max_draft_reduction=self.max_draft_reduction,
        )

    def decode_and_preprocess(
        self, data: bytes, *, max_pixels: int, allowed_formats: Collection[str] = ALLOWED_FORMATS
    ) -> torch.Tensor:
        """:meth:`decode` then preprocess: the (3, H, W) tensor for untrusted image bytes."""
        return self(self.decode(data, max_pixels=max_pixels, allowed_formats=allowed_formats))

    def lookup_table(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of each 8-bit level, per channel.

        Computed exactly as transformers does it (uint8 -> float64 * factor -> float32, then
        (x - mean) / std in float32), so the table lookup gives the same bits as the reference."""
        cached: np.ndarray | None = _LUT_CACHE.get(self)
        if cached is not None:
            return cached
        levels = np.arange(256, dtype=np.float64)
        if self.do_rescale:
            levels = levels * self.rescale_factor
        levels32 = np.repeat(levels.astype(np.float32)[None, :], 3, axis=0)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            levels32 = (levels32 - mean) / std
        table = np.ascontiguousarray(levels32, dtype=np.float32)
        _LUT_CACHE[self] = table
        return table


_LUT_CACHE: dict[ImagePreprocessor, np.ndarray] = {}


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {value!r}")
    return (values[0], values[1], values[2])
