"""Bulk work next to interactive users: what a running job costs the interactive clients, and what
share of the idle machine's bulk throughput a job still gets while they run.

One ``captionfleet serve`` with the job API on a throw-away ``redis-server`` (result cache off, so
every item and request runs the model):

1. interactive alone: ``clients`` closed-loop clients on ``/v1/caption``;
2. bulk alone: a job of ``items`` photos, items per second from its submission to its end;
3. both: a job eight times as large is submitted, and once it runs, the same interactive load is
   measured again; the job's items done during that run give the bulk throughput under load. The
   job is cancelled afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from captionfleet.bench.loadgen import LoadResult, Payload, run_load
from captionfleet.bench.serving import CAPTION_PATH

POLL_S = 0.05
JOB_DEADLINE_S = 900.0
BUSY_JOB_FACTOR = 8


@dataclass(frozen=True)
class BulkResult:
    interactive_idle: LoadResult
    interactive_busy: LoadResult
    bulk_idle_rps: float
    bulk_busy_rps: float
    busy_job_outlasted: bool
    """Whether the job was still running when the interactive run under load ended."""

    @property
    def p99_ratio(self) -> float:
        idle = self.interactive_idle.percentile_ms(99)
        return self.interactive_busy.percentile_ms(99) / idle if idle > 0 else math.nan

    @property
    def bulk_share(self) -> float:
        return self.bulk_busy_rps / self.bulk_idle_rps if self.bulk_idle_rps > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "interactive_idle": self.interactive_idle.summary(),
            "interactive_busy": self.interactive_busy.summary(),
            "p99_ratio": round(self.p99_ratio, 3),
            "bulk_idle_rps": round(self.bulk_idle_rps, 2),
            "bulk_busy_rps": round(self.bulk_busy_rps, 2),
            "bulk_share": round(self.bulk_share, 3),
            "busy_job_outlasted": self.busy_job_outlasted,
        }


async def measure_bulk(
    url: str, payloads: list[Payload], *, clients: int, requests: int, items: int
) -> BulkResult:
    target = url + CAPTION_PATH
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        idle = await run_load(target, payloads, concurrency=clients, count=requests)
        started = time.perf_counter()
        job = await _submit(http, url, payloads, items)
        await _until(
            http, url, job, lambda state: state["status"] != "running" and state["status"] != "queued"
        )
        bulk_idle_rps = items / (time.perf_counter() - started)
        job = await _submit(http, url, payloads, items * BUSY_JOB_FACTOR)
        before = await _until(http, url, job, lambda state: state["counts"]["done"] > 0)
        began = time.perf_counter()
        busy = await run_load(target, payloads, concurrency=clients, count=requests)
        after = await _state(http, url, job)
        bulk_busy_rps = (after["counts"]["done"] - before["counts"]["done"]) / (time.perf_counter() - began)
        async with http.delete(f"{url}/v1/jobs/{job}") as response:
            response.raise_for_status()
    return BulkResult(idle, busy, bulk_idle_rps, bulk_busy_rps, after["status"] == "running")


async def _submit(http: aiohttp.ClientSession, url: str, payloads: list[Payload], count: int) -> str:
    encoded = [base64.b64encode(p.body).decode() for p in payloads]
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
