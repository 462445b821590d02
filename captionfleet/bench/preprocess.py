"""Preprocessing: captionfleet's decode + preprocess vs transformers' ``BlipImageProcessor``.

Both start from the same JPEG bytes and end with the model's normalised pixel tensor, on one core
(``torch.set_num_threads(1)``; PIL and numpy are single-threaded here). The reference decodes with
PIL (``Image.open(...).convert("RGB")``) and calls the processor, the way its documentation does;
ours is :meth:`ImagePreprocessor.decode_and_preprocess`, what ``captionfleet serve`` runs per request.
"""

from __future__ import annotations

import importlib.util
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionfleet.bench.photos import Photo, photos_at

BLIP_BASE_SIDE = 384
"""BLIP-base's input size (``Salesforce/blip-image-captioning-base``)."""


@dataclass(frozen=True)
class PreprocessResult:
    megapixels: float
    side: int
    """The model input's height and width."""
    ours_ips: float
    reference_ips: float
    max_abs_diff: float
    """Largest difference between the two tensors for the first photo (normalised units)."""

    @property
    def ratio(self) -> float:
        return self.ours_ips / self.reference_ips if self.reference_ips > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "megapixels": self.megapixels,
            "side": self.side,
            "ours_images_per_s": round(self.ours_ips, 2),
            "reference_images_per_s": round(self.reference_ips, 2),
            "ratio": round(self.ratio, 2),
            "max_abs_diff": round(self.max_abs_diff, 4),
        }


def reference_processor_class() -> Any:
    """``BlipImageProcessor``; without torchvision transformers 5 falls back to the PIL backend itself,
    which is taken directly here to skip its warning."""
    import transformers

    if importlib.util.find_spec("torchvision") is not None:
        return transformers.BlipImageProcessor
    return transformers.BlipImageProcessorPil


def processors_for(model_dir: Path | None) -> tuple[Any, Any]:
    """(ours, reference) configured from ``model_dir``'s preprocessor_config.json, or BLIP-base's
    defaults (384 px, CLIP mean and std) for ``None``."""
    from captionfleet.runtime.engine.preprocess import ImagePreprocessor

    reference_class = reference_processor_class()
    if model_dir is None:
        return ImagePreprocessor(), reference_class()
    return ImagePreprocessor.from_pretrained(model_dir), reference_class.from_pretrained(model_dir)


def measure_preprocessing(
    megapixels: list[float], rounds: int, model_dirs: list[Path | None]
) -> list[PreprocessResult]:
    """Images per second of both preprocessors at each size, for each model's input configuration."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for size in megapixels:
            photos = photos_at(size)
            for model_dir in model_dirs:
                ours, reference = processors_for(model_dir)
                results.append(_compare(size, photos, ours, reference, rounds))
        return results
    finally:
        torch.set_num_threads(threads)


def _compare(size: float, photos: list[Photo], ours: Any, reference: Any, rounds: int) -> PreprocessResult:
    max_pixels = max(photo.width * photo.height for photo in photos) + 1

    def run_ours(data: bytes) -> Any:
        return ours.decode_and_preprocess(data, max_pixels=max_pixels)

    def run_reference(data: bytes) -> Any:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
        return reference(images=image, return_tensors="pt")["pixel_values"][0]

    first = photos[0].jpeg  # also warms both up: lookup tables, lazy imports
    difference = float((run_ours(first) - run_reference(first)).abs().max())
    ours_s = reference_s = 0.0
    for _ in range(rounds):  # alternating, so that a noisy neighbour slows both alike
        ours_s += _seconds(run_ours, photos)
        reference_s += _seconds(run_reference, photos)
    images = rounds * len(photos)
    return PreprocessResult(size, int(ours.height), images / ours_s, images / reference_s, difference)


def _seconds(function: Callable[[bytes], Any], photos: list[Photo]) -> float:
    started = time.perf_counter()
    for photo in photos:
        function(photo.jpeg)
    return time.perf_counter() - started
