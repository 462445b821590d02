"""The cascade against the quality model alone, on the same CPUs: served throughput and exact match.

Two runtimes for the cascade (the fast model, the quality model: the bundled ``scenes-blip-fast``
and ``scenes-blip-tiny``, one torch thread each, as the tiers share the CPUs), one for quality-only
(the quality model with every thread) and two routers: one cascading
(``--cascade-fast/--cascade-quality``, the threshold the fast model's ``calibration.json`` gives for
``cascade_target_rate``, else that quantile of its confidences on the scenes sent, said in the row)
and one routing everything to the quality-only
runtime. Both get the same held-out scenes from ``cascade_clients`` clients, in alternating rounds
(quality-only, cascade, ...) so that a machine that gets busier mid-run weighs on both; throughputs
are summed per side. Exact match is the served captions' against the scenes' references.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

from captionfleet.bench import processes
from captionfleet.bench.loadgen import percentile
from captionfleet.bench.serving import CAPTION_PATH, progress
from captionfleet.bench.settings import BenchSettings
from captionfleet.runtime.server.testing import free_port
from captionfleet.settings.serve import ServeSettings

ROUNDS = 2


class Answer(NamedTuple):
    """One 200 answer of a side."""

    latency_s: float
    exact: bool  # its caption is the scene's reference (case and outer spaces ignored)
    escalated: bool  # the cascade sent it on to the quality tier


@dataclass
class PathFigures:
    """One side's answers over its rounds."""

    answers: list[Answer] = field(default_factory=list)
    failed: int = 0
    elapsed_s: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.answers)

    @property
    def exact(self) -> int:
        return sum(answer.exact for answer in self.answers)

    @property
    def escalated(self) -> int:
        return sum(answer.escalated for answer in self.answers)

    @property
    def throughput(self) -> float:
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        answered = max(1, self.answered)
        latencies_s = [answer.latency_s for answer in self.answers]
        return {
            "answered": self.answered,
            "failed": self.failed,
            "throughput_rps": round(self.throughput, 3),
            "p50_ms": round(percentile(latencies_s, 50) * 1000, 1) if latencies_s else None,
            "p99_ms": round(percentile(latencies_s, 99) * 1000, 1) if latencies_s else None,
            "exact_match": round(self.exact / answered, 4),
            "escalation_rate": round(self.escalated / answered, 4),
        }


@dataclass
class CascadeResult:
    clients: int
    threshold: float
    threshold_from: str
    cascade: PathFigures = field(default_factory=PathFigures)
    quality: PathFigures = field(default_factory=PathFigures)

    @property
    def ratio(self) -> float:
        """The cascade's served throughput over the quality model's alone."""
        return self.cascade.throughput / self.quality.throughput if self.quality.throughput else math.nan

    @property
    def exact_match_ratio(self) -> float:
        return self.cascade.exact / self.quality.exact if self.quality.exact else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "threshold": self.threshold,
            "threshold_from": self.threshold_from,
            "cascade": self.cascade.summary(),
            "quality_only": self.quality.summary(),
            "throughput_ratio": round(self.ratio, 3),
            "exact_match_ratio": round(self.exact_match_ratio, 4),
        }


def held_out_scenes(count: int) -> list[tuple[bytes, str]]:
    """PNG bytes and reference caption of the first ``count`` held-out scenes."""
    from captionfleet.runtime.training.scenes import scenes
    from captionfleet.runtime.training.settings import HELD_OUT_SEED

    found = []
    for scene in scenes(HELD_OUT_SEED, count):
        buffer = io.BytesIO()
        scene.render().save(buffer, format="PNG")
        found.append((buffer.getvalue(), scene.caption))
    return found


def calibrated_threshold(fast_dir: Path, rate: float) -> float | None:
    """The threshold the fast model's calibration gives for ``rate``; None without a usable one."""
    from captionfleet.operator.cascade import threshold_from_calibration

    path = fast_dir / "calibration.json"
    try:
        threshold, signal = threshold_from_calibration(json.loads(path.read_text()), rate)
    except (OSError, ValueError):
        return None
    return threshold if signal == "confidence" else None


async def _round(
    url: str, scenes: list[tuple[bytes, str]], clients: int, count: int, into: PathFigures
) -> None:
    """``count`` requests from ``clients`` clients, the scenes in turn; added to ``into``."""
    next_index = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < count:
            image, reference = scenes[next_index % len(scenes)]
            next_index += 1
            began = time.perf_counter()
            try:
                async with http.post(url, data=image, headers={"Content-Type": "image/png"}) as response:
                    body = await response.json(content_type=None)
                    ok = response.status == 200 and isinstance(body, dict)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                ok = False
            if not ok:
                into.failed += 1
                continue
            latency_s = time.perf_counter() - began
            exact = str(body.get("caption", "")).strip().lower() == reference.lower()
            into.answers.append(Answer(latency_s, exact, bool((body.get("cascade") or {}).get("escalated"))))

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    into.elapsed_s += time.perf_counter() - started


async def _fast_confidences(url: str, scenes: list[tuple[bytes, str]]) -> list[float]:
    found = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        for image, _ in scenes:
            async with http.post(url, data=image, headers={"Content-Type": "image/png"}) as response:
                found.append(float((await response.json(content_type=None))["confidence"]))
    return found


def _router(name: str, workdir: Path, routes: list[str], extra: list[str]) -> processes.Subprocess:
    port = free_port()
    argv = [
        "captionfleet", "router", "--host", "127.0.0.1", "--port", str(port), "--drain-grace-s", "0",
        "--request-timeout-ms", "600000", "--routes", ",".join(routes), *extra,
    ]  # fmt: skip
    return processes.Subprocess(name, argv, port, workdir / f"{name}.log")


async def measure_cascade(
    fast_dir: Path, quality_dir: Path, workdir: Path, base: ServeSettings, settings: BenchSettings
) -> CascadeResult:
    """Both sides on one machine: the runtimes and routers started, the rounds run, all stopped."""
    env = settings.environment()
    scenes = held_out_scenes(settings.cascade_scenes)
    # The two tiers share the CPUs, one torch thread each (two processes of two threads on two cores
    # stall each other's parallel regions); quality-only gets its own runtime with every thread.
    tier = dataclasses.replace(base, torch_threads=1)
    fast = processes.start_ours(fast_dir, workdir, cache=False, base=tier, name="cascade-fast", env=env)
    quality = processes.start_ours(
        quality_dir, workdir, cache=False, base=tier, name="cascade-quality", env=env
    )
    solo = processes.start_ours(quality_dir, workdir, cache=False, base=base, name="quality-only", env=env)
    started: list[processes.Server] = [fast, quality, solo]
    try:
        processes.wait_all_ready(list(started))
        threshold = calibrated_threshold(fast_dir, settings.cascade_target_rate)
        threshold_from = "calibration.json"
        if threshold is None:
            confidences = sorted(await _fast_confidences(fast.url + CAPTION_PATH, scenes))
            threshold, threshold_from = (
                percentile(confidences, 100 * settings.cascade_target_rate),
                "measured",
            )
        routes = [f"fast={fast.url}", f"quality={quality.url}"]
        cascade_flags = ["--weights", "fast=50,quality=50", "--cascade-fast", "fast", "--cascade-quality"]
        cascade_flags += ["quality", "--cascade-threshold", str(threshold)]
        cascading = _router("router-cascade", workdir, routes, cascade_flags)
        alone = _router("router-quality", workdir, [f"quality={solo.url}"], [])
        started += [cascading, alone]
        processes.wait_all_ready([cascading, alone])
        result = CascadeResult(settings.cascade_clients, round(threshold, 6), threshold_from)
        count = settings.cascade_requests // ROUNDS
        for url in (alone.url, cascading.url):  # warm both paths: connections, first batches
            await _round(
                url + CAPTION_PATH, scenes, settings.cascade_clients, settings.cascade_clients, PathFigures()
            )
        for index in range(ROUNDS):
            progress(f"cascade vs quality-only, round {index + 1}/{ROUNDS}")
            await _round(alone.url + CAPTION_PATH, scenes, settings.cascade_clients, count, result.quality)
            await _round(
                cascading.url + CAPTION_PATH, scenes, settings.cascade_clients, count, result.cascade
            )
        return result
    finally:
        for server in reversed(started):
            server.stop()
