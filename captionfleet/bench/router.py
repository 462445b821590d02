"""Router overhead: the latency the ``captionfleet router`` hop adds in front of a runtime.

One client, one request at a time, the same cached photo (so the runtime's own time is short and
steady), alternating blocks sent directly and through the router over kept-alive connections. The
overhead is the difference of the two medians.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from captionfleet.bench.loadgen import LoadResult, Payload, run_load
from captionfleet.bench.serving import CAPTION_PATH

BLOCK = 25
"""Requests per block before switching between direct and routed."""


@dataclass(frozen=True)
class RouterResult:
    direct: LoadResult
    routed: LoadResult

    def overhead_ms(self, percentile: float) -> float:
        """What the router hop adds to that percentile of the latency."""
        return self.routed.percentile_ms(percentile) - self.direct.percentile_ms(percentile)

    def summary(self) -> dict[str, Any]:
        return {
            "direct": self.direct.summary(),
            "routed": self.routed.summary(),
            "overhead_ms_p50": round(self.overhead_ms(50), 3),
            "overhead_ms_p99": round(self.overhead_ms(99), 3),
        }


async def measure_router_overhead(
    runtime_url: str, router_url: str, payload: Payload, *, requests: int
) -> RouterResult:
    """``requests`` each way, in alternating blocks of :data:`BLOCK`."""
    targets = {"direct": runtime_url + CAPTION_PATH, "routed": router_url + CAPTION_PATH}
    totals = {name: LoadResult(concurrency=1) for name in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
        for url in targets.values():  # prime: the cache entry, connections, the router's table
            primed = await run_load(url, [payload], concurrency=1, count=2, session=session)
            if primed.ok != 2:
                raise RuntimeError(f"priming {url} failed: statuses {dict(primed.statuses)}")
        left = requests
        while left > 0:
            block = min(BLOCK, left)
            for name, url in targets.items():
                part = await run_load(url, [payload], concurrency=1, count=block, session=session)
                totals[name].add(part)
            left -= block
    return RouterResult(totals["direct"], totals["routed"])
