"""Out-of-distribution scores of the bundled model against its shipped reference.

The held-out scenes (seed 1000003, never trained on nor in the reference) against five families of
images unlike them (``training/ood_images.py``): AUROC >= 0.95 over all of them, and at most 5 % of
the held-out scenes flagged. Scores come from the engine's own code path (``caption_pixels``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from captionfleet.runtime.engine.errors import ModelLoadError
from captionfleet.runtime.engine.loading import content_hash
from captionfleet.runtime.engine.ood import REFERENCE_FILE, OodReference, ReferenceBuilder, ledoit_wolf
from captionfleet.runtime.engine.types import GenerationOptions
from captionfleet.runtime.training.ood_images import FAMILIES
from captionfleet.runtime.training.reference import features_of, scene_images
from captionfleet.runtime.training.settings import HELD_OUT_SEED

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HELD_OUT = 300
PER_FAMILY = 60
SHORT = GenerationOptions(num_beams=1, max_new_tokens=4)


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    return load_captioner(str(bundled_model_dir()))


def auroc(positives: list[float], negatives: list[float]) -> float:
    """P(score of an OOD image > score of a held-out scene), ties counting half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def served_scores(captioner: Captioner, images: list) -> list[float]:
    scores = []
    for start in range(0, len(images), 64):
        captions = captioner.caption_images(images[start : start + 64], SHORT)
        scores += [caption.ood_score for caption in captions]
    assert all(isinstance(score, float) and 0.0 <= score <= 1.0 for score in scores)
    return scores


def test_scores_separate_held_out_scenes_from_unlike_images(bundled: Captioner) -> None:
    assert bundled.reference is not None, f"the bundled model ships {REFERENCE_FILE}"
    held_out = served_scores(bundled, list(scene_images(HELD_OUT_SEED, HELD_OUT)))
    false_positive_rate = sum(score > bundled.ood_threshold for score in held_out) / len(held_out)
    outside: list[float] = []
    for name, family in FAMILIES.items():
        scores = served_scores(bundled, family(PER_FAMILY, 0))
        print(f"{name}: AUROC {auroc(scores, held_out):.4f}")
        outside += scores
    overall = auroc(outside, held_out)
    print(f"all: AUROC {overall:.4f}, false-positive rate {false_positive_rate:.4f}")
    assert overall >= 0.95
    assert false_positive_rate <= 0.05


def test_captions_carry_the_score_and_the_flag(bundled: Captioner, photos: list) -> None:
    scenes = list(scene_images(HELD_OUT_SEED, 4))
    captions = bundled.caption_images([*scenes, *photos], SHORT)
    for caption in captions:
        assert caption.in_distribution == (caption.ood_score <= bundled.ood_threshold)
    assert [caption.in_distribution for caption in captions[4:]] == [False] * len(photos)
    direct = bundled.reference.scores(features_of(bundled, photos)) if bundled.reference else []
    assert [c.ood_score for c in captions[4:]] == pytest.approx(direct, abs=1e-6)


def test_astronaut_caption_repeats_no_trigram(bundled: Captioner, photos: list) -> None:
    for decoder in ("native", "transformers"):
        caption = bundled.with_decoder(decoder).caption_images(photos[:1], GenerationOptions())[0]
        words = caption.text.split()
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        assert len(trigrams) == len(set(trigrams)), caption.text


def test_ledoit_wolf_shrinks_by_how_far_the_data_is_from_isotropic() -> None:
    generator = torch.Generator().manual_seed(0)
    isotropic = torch.randn(4000, 20, generator=generator, dtype=torch.float64)
    skewed = isotropic * torch.logspace(-2, 1, 20, dtype=torch.float64)
    assert ledoit_wolf(isotropic)[2] > 0.8  # the identity target is the truth: shrink almost fully
    assert ledoit_wolf(skewed)[2] < 0.05  # the sample covariance is far better than any identity
    few = torch.randn(30, 50, generator=generator, dtype=torch.float64)  # fewer samples than dimensions
    mean, covariance, shrinkage = ledoit_wolf(few)
    assert 0 < shrinkage <= 1 and torch.linalg.eigvalsh(covariance).min() > 0
    assert torch.allclose(mean, few.mean(dim=0))


def test_scores_are_quantiles_of_the_calibration_images() -> None:
    generator = torch.Generator().manual_seed(1)
    reference = OodReference.fit(torch.randn(3000, 8, generator=generator))
    fresh = reference.scores(torch.randn(2000, 8, generator=generator))
    assert sum(score > 0.9 for score in fresh) / len(fresh) == pytest.approx(0.1, abs=0.03)
    top = float(reference.calibration[-1])
    unit = torch.eye(8)[:1] / float(reference.distances(reference.mean + torch.eye(8)[:1])[0])
    far = reference.scores(reference.mean + unit * torch.tensor([[top + 0.5], [top + 1.0], [top + 2.0]]))
    calibration = int(reference.calibration.shape[0])
    # Beyond every calibration image, and still ordered.
    assert calibration / (calibration + 1) < far[0] < far[1] < far[2] < 1.0


def test_reference_round_trip_keeps_the_model_version(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), model_dir)
    before = content_hash(model_dir)
    (model_dir / REFERENCE_FILE).unlink()
    assert content_hash(model_dir) == before
    reference = OodReference.fit(torch.randn(90, 4, generator=torch.Generator().manual_seed(2)), source="t")
    reference.save(model_dir)
    loaded = OodReference.load(model_dir)
    assert loaded is not None and loaded.metadata["source"] == "t"
    assert torch.equal(loaded.precision, reference.precision)
    assert content_hash(model_dir) == before
    (model_dir / REFERENCE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=REFERENCE_FILE):
        load_captioner(str(model_dir))


def test_a_model_without_reference_builds_one_from_its_first_requests(tiny_model_dir: Path) -> None:
    captioner = load_captioner(str(tiny_model_dir))
    assert captioner.reference is None and captioner.ood_info()["reference"] == "none"
    captioner.build_reference_from_requests(40)
    captioner.warmup()  # not a request
    assert captioner.ood_info() | {} == {"enabled": True, "threshold": 0.99} | {
        "reference": "building", "collected": 0, "needed": 40
    }  # fmt: skip
    pixels = torch.randn(30, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    first = captioner.caption_pixels(pixels, SHORT)
    assert all(caption.ood_score is None for caption in first)
    captioner.caption_pixels(pixels[:10] + 0.5, SHORT)
    assert captioner.ood_info()["reference"] == "ready" and captioner.ood_info()["reference_images"] == 40
    scored = captioner.caption_pixels(pixels, SHORT)
    assert all(caption.ood_score is not None for caption in scored)


def test_builder_takes_exactly_its_target() -> None:
    builder = ReferenceBuilder(40)
    assert builder.add(torch.randn(30, 4)) is None
    built = builder.add(torch.randn(30, 4))
    assert built is not None and built.metadata["fitted"] + built.metadata["calibration"] == 40
    assert builder.add(torch.randn(5, 4)) is None
