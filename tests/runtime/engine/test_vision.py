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
        exact = captioner.model.vision_model(pixel_values=pixels)[0] if int8 else theirs
    assert ours.shape == theirs.shape
    if not int8:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        return
    # int8 quantises each linear layer's input by its own range: the fused attention's last-bit
    # differences from the eager one (none on some CPUs, ~2e-6 on others) can move an activation by a
    # rounding step there. So ours must be transformers' up to such steps: far closer to it than int8
    # is to fp32, and no further from fp32 than transformers' int8 states are.
    int8_error = (theirs - exact).abs()
    assert (ours - theirs).abs().mean() <= 0.1 * int8_error.mean()
    assert (ours - theirs).abs().max() <= int8_error.max()
    ours_error = (ours - exact).abs().mean()
    assert abs(ours_error - int8_error.mean()) <= 0.05 * int8_error.mean()


def test_a_batch_is_its_images_encoded_alone() -> None:
    """No state leaks across the images of a batch (the attention is per image)."""
    captioner = load_captioner(str(bundled_model_dir()), decoder="native")
    side = captioner.preprocessor.height, captioner.preprocessor.width
    pixels = torch.randn(3, 3, *side, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        together = encode_images(captioner.model.vision_model, pixels)
        alone = torch.cat([encode_images(captioner.model.vision_model, pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
