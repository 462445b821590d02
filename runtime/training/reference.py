"""The out-of-distribution reference of a model directory, from images like those it was trained on.

``captionfleet train`` writes it after training, from the first ``reference_scenes`` scenes of the
training seed (the distribution the model learnt); ``captionfleet eval --write-reference`` writes it
for any BLIP directory, from those scenes or, with ``--images``, from that image folder. The same
images and model give the same file (the features are computed in fp32 on the CPU, in fixed order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from captionfleet.runtime.engine.ood import OodReference, image_features
from captionfleet.runtime.training.scenes import SCENE_SIZE, scene_at

if TYPE_CHECKING:
    from PIL import Image

    from captionfleet.runtime.engine.captioner import Captioner

REFERENCE_SCENES = 3000
"""Scenes per reference: 2000 for the mean and covariance of 192 features, 1000 for the quantiles."""


def scene_images(seed: int, count: int) -> Iterator[Image.Image]:
    for index in range(count):
        yield scene_at(seed, index).render(SCENE_SIZE)


@torch.inference_mode()
def features_of(captioner: Captioner, images: Iterable[Image.Image], batch: int = 64) -> torch.Tensor:
    """(n, D) features of ``images`` from the model's vision encoder, as serving computes them."""
    chunks: list[torch.Tensor] = []
    pending: list[Image.Image] = []

    def flush() -> None:
        pixels = captioner.preprocessor.batch(pending).to(captioner.device, captioner.dtype)
        states = captioner.model.vision_model(pixel_values=pixels)[0]
        chunks.append(image_features(states).cpu())
        pending.clear()

    for image in images:
        pending.append(image)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return torch.cat(chunks) if chunks else torch.empty(0)


def write_reference(
    captioner: Captioner, model_dir: Path, images: Iterable[Image.Image], source: str
) -> Path:
    """Fit the reference on ``images`` and save it into ``model_dir``; the captioner uses it from now."""
    reference = OodReference.fit(features_of(captioner, images), source=source)
    path = reference.save(model_dir)
    captioner.reference = reference.to(captioner.device)
    return path


def write_scene_reference(captioner: Captioner, model_dir: Path, seed: int, count: int) -> Path:
    return write_reference(
        captioner,
        model_dir,
        scene_images(seed, count),
        f"synthetic scenes, seed {seed}, scenes 0-{count - 1}",
    )
