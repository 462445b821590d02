"""The two bundled models side by side: the fast model's engine throughput over the quality model's.

``fast_speedup_bs8``: ``Captioner.caption_pixels`` on the same 8 held-out scenes, each preprocessed by
its model's own preprocessor (the fast model's input is smaller), at the served options (beam 3, at
most 30 new tokens), native decoder both; the two timed alternately (ABBA, ``engine.alternating``) and
the ratio is the median of the rounds' ratios, so a burst of load on shared cores hits both or is
outvoted. Runnable alone: ``python -m captionfleet.bench.tiers [ROUNDS]`` prints the JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from captionfleet.bench.engine import alternating, median_ratio, medians

TIER_BATCH = 8


@dataclass(frozen=True)
class TierSpeed:
    fast_model: str
    quality_model: str
    batch: int
    fast_speedup: float
    """Quality-model time over fast-model time for one batch (median over the rounds)."""
    fast_images_per_s: float
    quality_images_per_s: float
    rounds: int


def measure_tier_speed(quality_dir: Path, fast_dir: Path, rounds: int, batch: int = TIER_BATCH) -> TierSpeed:
    from captionfleet.runtime.engine.loading import load_captioner
    from captionfleet.runtime.engine.types import GenerationOptions
    from captionfleet.runtime.training.scenes import scene_at
    from captionfleet.runtime.training.settings import HELD_OUT_SEED

    options = GenerationOptions()  # the served defaults: beam 3, 30 new tokens
    images = [scene_at(HELD_OUT_SEED, index).render() for index in range(batch)]
    tiers = {"quality": load_captioner(str(quality_dir)), "fast": load_captioner(str(fast_dir))}
    pixels = {name: captioner.preprocessor.batch(images) for name, captioner in tiers.items()}
    calls: dict[str, Callable[[], object]] = {
        name: partial(captioner.caption_pixels, pixels[name], options) for name, captioner in tiers.items()
    }
    timed = alternating(calls, rounds)
    times = medians(timed, "s")
    return TierSpeed(
        fast_model=tiers["fast"].version,
        quality_model=tiers["quality"].version,
        batch=batch,
        fast_speedup=median_ratio(timed, "quality", "fast"),
        fast_images_per_s=batch / times["fast_s"],
        quality_images_per_s=batch / times["quality_s"],
        rounds=rounds,
    )


def main(argv: list[str]) -> int:
    import torch

    from captionfleet.runtime.engine.loading import bundled_model_dir
    from captionfleet.runtime.engine.types import FAST_MODEL

    rounds = int(argv[0]) if argv else 20
    if len(argv) > 1:
        torch.set_num_threads(int(argv[1]))
    speed = measure_tier_speed(bundled_model_dir(), bundled_model_dir(FAST_MODEL), rounds)
    print(json.dumps({**asdict(speed), "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
