"""The native path's vision encoder (fused attention) against transformers' own, on real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captionfleet.runtime.engine.captioner import bundled_model_dir, load_captioner
from captionfleet.runtime.engine.loading import quantize_int8
from captionfleet.runtime.engine.types import FAST_MODEL
from captionfleet.runtime.engine.vision import encode_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "model_dir", [bundled_model_dir(), bundled_model_dir(FAST_MODEL)], ids=["tiny", "fast"]
)
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_states_are_transformers_vision_states(model_dir: Path, int8: bool) -> None:
    captioner = load_captioner(str(model_dir), decoder="native")
    model = quantize_int8(captioner.model) if int8 else captioner.model
    side = captioner.preprocessor.height, captioner.preprocessor.width
    pixels = torch.randn(5, 3, *side, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = encode_images(model.vision_model, pixels)
        theirs = model.vision_model(pixel_values=pixels)[0]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_batch_is_its_images_encoded_alone() -> None:
    """No state leaks across the images of a batch (the attention is per image)."""
    captioner = load_captioner(str(bundled_model_dir()), decoder="native")
    side = captioner.preprocessor.height, captioner.preprocessor.width
    pixels = torch.randn(3, 3, *side, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        together = encode_images(captioner.model.vision_model, pixels)
        alone = torch.cat([encode_images(captioner.model.vision_model, pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
