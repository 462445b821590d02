"""Bulk work next to interactive users: what a running job costs the interactive clients, and what
share of the idle machine's bulk throughput a job still gets while they run.

One ``captionfleet serve`` with the job API on a throw-away ``redis-server`` (result cache off, so
every item and request runs the model):

1. bulk alone: a job of ``items`` photos, items per second from its submission to its end;
2. ``rounds`` pairs of interactive runs side by side, ``clients`` closed-loop clients on
   ``/v1/caption``, ``requests`` each after a first unmeasured request per client: one alone, then
   one while a job eight times as large runs (submitted, and measured from its first item done;
   cancelled after the run, and the model left to go quiet before the next run alone). The job's
   items done during the runs give the bulk throughput under load.

Why rounds: a p99 of 48 requests is their slowest one, and a machine's load drifts over a minute; the
headline ratio is the median of the rounds' ratios (each from two runs next to each other), and the
pooled runs of each side are reported too, with how far the p99s of a side's even and odd rounds lie
apart (``p99_spread``: how much two runs of the same side disagree).
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from captionfleet.bench.loadgen import LoadResult, Payload, percentile, run_load
from captionfleet.bench.serving import CAPTION_PATH

POLL_S = 0.05
JOB_DEADLINE_S = 900.0
BUSY_JOB_FACTOR = 8
QUIET_MIN_S = 1.0
QUIET_BATCHES = 5
"""After a cancel, the model counts as quiet once no batch ran for this many mean batch times (at least
``QUIET_MIN_S``): the items the replica held when the job was cancelled still run."""
_BATCHES = re.compile(rb"^captionfleet_inference_seconds_(count|sum)\{[^}]*\} ([0-9.e+-]+)$", re.M)


@dataclass
class BulkResult:
    idle_rounds: list[LoadResult] = field(default_factory=list)
    busy_rounds: list[LoadResult] = field(default_factory=list)
    bulk_idle_rps: float = 0.0
    bulk_busy_items: int = 0
    bulk_busy_s: float = 0.0
    busy_job_outlasted: bool = True
    """Whether the job was still running when each interactive run under load ended."""

    @property
    def interactive(self) -> tuple[LoadResult, LoadResult]:
        """The interactive runs pooled over the rounds: alone, and with a job running."""
        return _pooled(self.idle_rounds), _pooled(self.busy_rounds)

    @property
    def round_ratios(self) -> list[float]:
        return [
            busy.percentile_ms(99) / idle.percentile_ms(99)
            for idle, busy in zip(self.idle_rounds, self.busy_rounds, strict=False)
            if idle.percentile_ms(99) > 0
        ]

    @property
    def p99_ratio(self) -> float:
        """The median of the rounds' ratios of p99 (with a job running / without)."""
        ratios = self.round_ratios
        return statistics.median(ratios) if ratios else math.nan

    @property
    def bulk_busy_rps(self) -> float:
        return self.bulk_busy_items / self.bulk_busy_s if self.bulk_busy_s > 0 else 0.0

    @property
    def bulk_share(self) -> float:
        return self.bulk_busy_rps / self.bulk_idle_rps if self.bulk_idle_rps > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        idle, busy = self.interactive
        return {
            "rounds": len(self.round_ratios),
            "interactive_idle": idle.summary() | {"p99_spread": round(_spread(self.idle_rounds), 3)},
            "interactive_busy": busy.summary() | {"p99_spread": round(_spread(self.busy_rounds), 3)},
            "p99_ratio": round(self.p99_ratio, 3),
            "round_ratios": [round(ratio, 3) for ratio in self.round_ratios],
            "pooled_p99_ratio": round(_ratio(busy.percentile_ms(99), idle.percentile_ms(99)), 3),
            "bulk_idle_rps": round(self.bulk_idle_rps, 2),
            "bulk_busy_rps": round(self.bulk_busy_rps, 2),
            "bulk_share": round(self.bulk_share, 3),
            "busy_job_outlasted": self.busy_job_outlasted,
        }


async def measure_bulk(
    url: str, payloads: list[Payload], *, clients: int, requests: int, items: int, rounds: int
) -> BulkResult:
    target = url + CAPTION_PATH
    result = BulkResult()
    encoded = [base64.b64encode(p.body).decode() for p in payloads]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        started = time.perf_counter()
        job = await _submit(http, url, encoded, items)
        await _until(http, url, job, lambda state: state["status"] not in ("running", "queued"))
        result.bulk_idle_rps = items / (time.perf_counter() - started)
        for _ in range(rounds):
            result.idle_rounds.append(await _steady_run(target, payloads, clients, requests))
            job = await _submit(http, url, encoded, items * BUSY_JOB_FACTOR)
            before = await _until(http, url, job, lambda state: state["counts"]["done"] > 0)
            began = time.perf_counter()
            result.busy_rounds.append(await _steady_run(target, payloads, clients, requests))
            after = await _state(http, url, job)
            result.bulk_busy_s += time.perf_counter() - began
            result.bulk_busy_items += after["counts"]["done"] - before["counts"]["done"]
            result.busy_job_outlasted &= after["status"] == "running"
            async with http.delete(f"{url}/v1/jobs/{job}") as response:
                response.raise_for_status()
            await _quiet(http, url)
    return result


async def _steady_run(target: str, payloads: list[Payload], clients: int, requests: int) -> LoadResult:
    """``requests`` measured after one unmeasured request per client: the first wave meets whatever
    bulk batch the job started on the idle model (a delay of at most that one batch, by design and
    tested in ``test_batcher.py``), and the target is about the steady state; 8 of 48 requests was
    enough to set a run's p99 alone."""
    await run_load(target, payloads, concurrency=clients, count=clients)
    return await run_load(target, payloads, concurrency=clients, count=requests)


def _pooled(runs: list[LoadResult]) -> LoadResult:
    """The runs as one (their counts and latencies together, their times added up)."""
    pooled = LoadResult(concurrency=runs[0].concurrency if runs else 0)
    for run in runs:
        pooled.add(run)
    return pooled


def _spread(runs: list[LoadResult]) -> float:
    """How far the p99 of the even rounds lies from the odd rounds' (relative to their mean)."""
    halves = [[s for run in runs[start::2] for s in run.latencies_s] for start in (0, 1)]
    if not all(halves):
        return math.nan
    even, odd = (percentile(half, 99) for half in halves)
    return abs(even - odd) / ((even + odd) / 2)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


async def _submit(http: aiohttp.ClientSession, url: str, encoded: list[str], count: int) -> str:
    body = {"items": [{"image_base64": encoded[i % len(encoded)]} for i in range(count)]}
    async with http.post(url + "/v1/jobs", json=body) as response:
        if response.status != 202:
            raise RuntimeError(f"submitting a job failed: {response.status} {await response.text()}")
        return str((await response.json())["id"])


async def _state(http: aiohttp.ClientSession, url: str, job: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/jobs/{job}") as response:
        response.raise_for_status()
        return dict(await response.json())


async def _until(http: aiohttp.ClientSession, url: str, job: str, condition: Any) -> dict[str, Any]:
    ends = time.monotonic() + JOB_DEADLINE_S
    while True:
        state = await _state(http, url, job)
        if condition(state):
            return state
        if time.monotonic() > ends:
            raise RuntimeError(f"job {job} did not get there in {JOB_DEADLINE_S:.0f} s: {state}")
        await asyncio.sleep(POLL_S)


async def _quiet(http: aiohttp.ClientSession, url: str) -> None:
    """Return once no batch ran for ``QUIET_BATCHES`` mean batch times (the server's own histogram)."""
    ends = time.monotonic() + JOB_DEADLINE_S
    count, mean_s = await _batches(http, url)
    changed = time.monotonic()
    while time.monotonic() - changed < max(QUIET_MIN_S, QUIET_BATCHES * mean_s):
        if time.monotonic() > ends:
            raise RuntimeError(f"the model was still busy {JOB_DEADLINE_S:.0f} s after a cancel")
        await asyncio.sleep(POLL_S)
        now_count, mean_s = await _batches(http, url)
        if now_count != count:
            count, changed = now_count, time.monotonic()


async def _batches(http: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """Batches the model ran so far, and their mean time in seconds."""
    async with http.get(url + "/metrics") as response:
        response.raise_for_status()
        values = {name.decode(): float(value) for name, value in _BATCHES.findall(await response.read())}
    count = values.get("count", 0.0)
    return count, values.get("sum", 0.0) / count if count else 0.0
