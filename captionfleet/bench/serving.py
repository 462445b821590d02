"""Serving: ``captionfleet serve`` vs the naive baseline server, same model, same photos, same clients.

Both servers run as subprocesses and are measured one after the other at each concurrency (the order
alternates between levels, so that neither always runs on a warmer machine), each run after one
uncounted wave of its clients (``warm_wave``): the steady state at that concurrency, not the
connections being opened and the batches of the level before. The result cache of ours
is off: the baseline has none, and each photo is sent many times.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from captionfleet.bench.loadgen import LoadResult, Payload, run_load
from captionfleet.bench.settings import BenchSettings

CAPTION_PATH = "/v1/caption"


@dataclass(frozen=True)
class ServingRow:
    model: str
    concurrency: int
    ours: LoadResult
    naive: LoadResult

    @property
    def ratio(self) -> float:
        """Our throughput over the baseline's (``nan`` when the baseline answered nothing)."""
        return self.ours.throughput / self.naive.throughput if self.naive.throughput > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "concurrency": self.concurrency,
            "ours": self.ours.summary(),
            "naive": self.naive.summary(),
            "ratio": round(self.ratio, 2),
        }


def requests_at(settings: BenchSettings, concurrency: int) -> int:
    """Requests per run: the setting, but at least twice the concurrency (a steady state, not one wave)."""
    return max(settings.requests, 2 * concurrency)


async def compare_serving(
    model: str, ours_url: str, naive_url: str, payloads: list[Payload], settings: BenchSettings
) -> list[ServingRow]:
    """Warm both servers up, then measure each at every concurrency level."""
    targets = {"ours": ours_url + CAPTION_PATH, "naive": naive_url + CAPTION_PATH}
    if settings.warmup_requests:
        for url in targets.values():
            warm = await run_load(
                url, payloads, concurrency=min(4, settings.warmup_requests), count=settings.warmup_requests
            )
            _check(warm, url)
    rows = []
    for index, level in enumerate(settings.concurrency_levels()):
        order = ["ours", "naive"] if index % 2 == 0 else ["naive", "ours"]
        results: dict[str, LoadResult] = {}
        for name in order:
            progress(f"serving {model}: {name} at concurrency {level}")
            results[name] = await run_load(
                targets[name],
                payloads,
                concurrency=level,
                count=requests_at(settings, level),
                max_seconds=settings.run_seconds,
                warm_wave=True,
            )
        rows.append(ServingRow(model, level, results["ours"], results["naive"]))
    return rows


def _check(result: LoadResult, url: str) -> None:
    """A server that answers no 200 at all is broken, not slow: stop with what it did answer."""
    if result.ok == 0:
        raise RuntimeError(
            f"{url} answered none of {result.sent} requests with 200: "
            f"statuses {dict(result.statuses)}, failures {dict(result.failures)}"
        )


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
