"""The cache-hit path: one photo, captioned once, then asked for again and again by many clients.

What a hit costs in ``captionfleet serve``: reading the body, a draft-mode decode and the perceptual key
(in the preprocessing pool), the in-memory lookup and the JSON answer. The model is never called.
"""

from __future__ import annotations

from captionfleet.bench.loadgen import LoadResult, Payload, run_load
from captionfleet.bench.serving import CAPTION_PATH


async def measure_cache_hits(url: str, payload: Payload, *, requests: int, concurrency: int) -> LoadResult:
    """Prime the cache with one request, then measure ``requests`` hits from ``concurrency`` clients."""
    target = url + CAPTION_PATH
    primed = await run_load(target, [payload], concurrency=1, count=1)
    if primed.ok != 1:
        raise RuntimeError(f"priming the cache failed: statuses {dict(primed.statuses)}")
    return await run_load(target, [payload], concurrency=concurrency, count=requests)
