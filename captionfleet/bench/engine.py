"""The engine without HTTP, measured in the bench process itself while no server runs.

- ``offline``: the ceiling of the served rows: JPEG bytes -> decode -> preprocess -> batched
  captioning, at the server's batch size and generation options, on the same photos, in one process,
  ``steady_count(SHARE_CLIENTS)`` images (the requests of the served run it is compared with);
- ``engine_bs1_ms``: ``Captioner.caption_pixels`` on one preprocessed image (median), what one client's
  latency cannot go below;
- ``decoder_speedup_bs32`` / ``_bs1``: the native decoder over transformers' ``generate`` on the random
  ``blip-mini-random`` (BLIP's full vocabulary), beam 3, 20 tokens, the two timed alternately;
- ``decoder_agreement``: share of identical captions (and suggestions) of the two decoders on the
  bundled model's held-out scenes at the served options;
- ``int8_speedup``: fp32 over int8 time on ``blip-mini-random`` at batch 8 (native decoder both);
  ``int8_agreement``: share of int8 captions equal to fp32's on the held-out scenes (bundled model).

Every speed ratio is of timings taken side by side in this run: ``speed_rounds`` rounds, the two
calls back to back in each (ABBA order), and the ratio is the median of the rounds' ratios, so that
a burst of load from another process on shared cores either hits both timings of a round or is
outvoted. The offline pipeline and the batch-1 time are best-of (nothing to pair them with).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from captionfleet.bench.loadgen import Payload
from captionfleet.bench.models import BLIP_MINI, BLIP_TINY, build_model, build_tokenizer
from captionfleet.bench.settings import SHARE_CLIENTS, BenchSettings

SPEED_TOKENS = 20
SPEED_BEAMS = 3
INT8_BATCH = 8


@dataclass
class EngineResult:
    offline_rps: float = 0.0
    offline_images: int = 0
    engine_bs1_ms: float = 0.0
    decoder_speedup: dict[int, float] = field(default_factory=dict)
    """Batch size -> native / transformers images per second."""
    decoder_times_s: dict[str, float] = field(default_factory=dict)
    decoder_agreement: float = 0.0
    int8_speedup: float = 0.0
    int8_agreement: float = 0.0
    scenes: int = 0
    speed_model: str = ""
    fast_speedup: float = 0.0
    """The bundled fast model's engine throughput over the quality model's at batch 8 (``tiers.py``)."""

    def summary(self) -> dict[str, Any]:
        return {
            "offline_rps": round(self.offline_rps, 2),
            "offline_images": self.offline_images,
            "engine_bs1_ms": round(self.engine_bs1_ms, 2),
            "decoder_speedup": {str(k): round(v, 2) for k, v in self.decoder_speedup.items()},
            "decoder_times_s": {k: round(v, 4) for k, v in self.decoder_times_s.items()},
            "decoder_agreement": round(self.decoder_agreement, 4),
            "int8_speedup": round(self.int8_speedup, 2),
            "int8_agreement": round(self.int8_agreement, 4),
            "scenes": self.scenes,
            "speed_model": self.speed_model,
            "fast_speedup": round(self.fast_speedup, 2),
        }


def best_time(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def alternating(calls: dict[str, Callable[[], object]], rounds: int) -> list[dict[str, float]]:
    """Each round's time of every call: the calls run back to back, in reversed order every other round
    (ABBA), after one untimed warm-up each (lazy initialisation, allocator)."""
    for call in calls.values():
        call()
    names = list(calls)
    timed = []
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        timed.append({name: best_time(calls[name], 1) for name in order})
    return timed


def median_ratio(rounds: list[dict[str, float]], slower: str, faster: str) -> float:
    """The median over rounds of ``slower``'s time over ``faster``'s in the same round. A burst of load
    from another process hits the two timings of one round alike, and the median drops the rounds
    where it hit only one of them (a best-of or a block of each would keep or make such a skew)."""
    return statistics.median(times[slower] / times[faster] for times in rounds)


def medians(rounds: list[dict[str, float]], suffix: str) -> dict[str, float]:
    return {f"{name}_{suffix}": statistics.median(times[name] for times in rounds) for name in rounds[0]}


def measure_engine(model_dir: Path, payloads: Sequence[Payload], settings: BenchSettings) -> EngineResult:
    import torch

    from captionfleet.runtime.engine.loading import load_captioner
    from captionfleet.runtime.engine.types import GenerationOptions

    result = EngineResult(speed_model=settings.speed_model)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    options = GenerationOptions(num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens)
    captioner = load_captioner(str(model_dir), decoder="native")
    _offline(result, captioner, payloads, options, settings)
    _agreement(result, captioner, options, settings.agreement_scenes)
    _speed(result, settings)
    from captionfleet.bench.tiers import measure_tier_speed
    from captionfleet.runtime.engine.loading import bundled_model_dir
    from captionfleet.runtime.engine.types import FAST_MODEL

    tiers = measure_tier_speed(bundled_model_dir(), bundled_model_dir(FAST_MODEL), settings.speed_rounds)
    result.fast_speedup = tiers.fast_speedup
    return result


def _offline(
    result: EngineResult, captioner: Any, payloads: Sequence[Payload], options: Any, settings: BenchSettings
) -> None:
    """The served pipeline minus HTTP: decode, preprocess, caption in batches of the server's size."""
    from captionfleet.settings.serve import ServeSettings

    max_pixels = ServeSettings().max_pixels
    count = settings.steady_count(SHARE_CLIENTS)
    bodies = [payloads[index % len(payloads)].body for index in range(count)]
    size = settings.max_batch_size

    def pipeline() -> None:
        for start in range(0, count, size):
            chunk = bodies[start : start + size]
            images = [captioner.preprocessor.decode(body, max_pixels=max_pixels) for body in chunk]
            captioner.caption_pixels(captioner.preprocessor.batch(images), options)

    pipeline_s = best_time(pipeline, max(1, settings.engine_rounds - 1))
    result.offline_images = count
    result.offline_rps = count / pipeline_s
    image = captioner.preprocessor.decode(bodies[0], max_pixels=max_pixels)
    one = captioner.preprocessor.batch([image])
    times = [best_time(lambda: captioner.caption_pixels(one, options), 1) for _ in range(10)]
    result.engine_bs1_ms = statistics.median(times) * 1000


def _agreement(result: EngineResult, captioner: Any, options: Any, scenes: int) -> None:
    """Identical captions: native vs transformers, and int8 vs fp32, on the held-out scenes."""
    from captionfleet.runtime.engine.loading import quantize_int8
    from captionfleet.runtime.training.scenes import scene_at
    from captionfleet.runtime.training.settings import HELD_OUT_SEED

    pixels = captioner.preprocessor.batch([scene_at(HELD_OUT_SEED, i).render() for i in range(scenes)])
    reference = captioner.with_decoder("transformers")
    int8 = captioner.with_decoder("native", quantize_int8(captioner.model), precision="int8")  # a copy
    native_texts, reference_texts, int8_texts = [], [], []
    for start in range(0, scenes, 64):
        chunk = pixels[start : start + 64]
        native_texts += [c.text for c in captioner.caption_pixels(chunk, options)]
        reference_texts += [c.text for c in reference.caption_pixels(chunk, options)]
        int8_texts += [c.text for c in int8.caption_pixels(chunk, options)]
    result.scenes = scenes
    result.decoder_agreement = _share(native_texts, reference_texts)
    result.int8_agreement = _share(int8_texts, native_texts)


def _share(ours: list[str], theirs: list[str]) -> float:
    return sum(a == b for a, b in zip(ours, theirs, strict=True)) / max(1, len(ours))


def _speed(result: EngineResult, settings: BenchSettings) -> None:
    """Decoder and int8 speed on the random model with BLIP's vocabulary (built in memory)."""
    import torch

    from captionfleet.runtime.engine.captioner import Captioner
    from captionfleet.runtime.engine.loading import quantize_int8
    from captionfleet.runtime.engine.preprocess import ImagePreprocessor
    from captionfleet.runtime.engine.types import GenerationOptions

    spec = BLIP_MINI if settings.speed_model == BLIP_MINI.name else BLIP_TINY
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = build_tokenizer(spec)
        model = build_model(spec, tokenizer, SPEED_TOKENS)
    model.requires_grad_(False)
    preprocessor = ImagePreprocessor(height=spec.image_size, width=spec.image_size)

    def make(decoder: str, weights: Any) -> Captioner:
        device, dtype = torch.device("cpu"), torch.float32
        return Captioner(
            weights, tokenizer, preprocessor, version="random", model_name=spec.name, device=device,
            dtype=dtype, decoder=decoder,
        )  # fmt: skip

    native, reference = make("native", model), make("transformers", model)
    options = GenerationOptions(num_beams=SPEED_BEAMS, max_new_tokens=SPEED_TOKENS)
    pixels = torch.randn(32, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    for batch in (32, 1):
        chunk = pixels[:batch]
        calls: dict[str, Callable[[], object]] = {
            "native": partial(native.caption_pixels, chunk, options),
            "transformers": partial(reference.caption_pixels, chunk, options),
        }
        rounds = alternating(calls, settings.speed_rounds)
        result.decoder_speedup[batch] = median_ratio(rounds, "transformers", "native")
        result.decoder_times_s.update(medians(rounds, f"bs{batch}"))
    int8 = make("native", quantize_int8(model))
    chunk = pixels[:INT8_BATCH]
    rounds = alternating(
        {
            "fp32": lambda: native.caption_pixels(chunk, options),
            "int8": lambda: int8.caption_pixels(chunk, options),
        },
        settings.speed_rounds,
    )
    result.int8_speedup = median_ratio(rounds, "fp32", "int8")
    result.decoder_times_s.update(medians(rounds, f"bs{INT8_BATCH}"))
