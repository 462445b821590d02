"""The router's fixed latency histogram: bounds, the bucket of one latency, and quantiles from counts.

Shared by the per-version figures (``stats.py``) and the shadow figures (``shadow.py``): both must use
the Prometheus histogram's bounds, so that figures of several router pods add up and the operator
estimates the same p99 from either source.
"""

from __future__ import annotations

from typing import Any

from captionfleet import figures
from captionfleet.names import LATENCY_BUCKETS_S

# Upper bounds in milliseconds, the Prometheus histogram's (so both estimate the same p99); the
# histogram has one more count for everything above the last. The body names them
# (``latency_buckets_ms``), so the operator adds up only histograms with equal bounds.
LATENCY_BUCKETS_MS: tuple[float, ...] = tuple(round(bound * 1000, 6) for bound in LATENCY_BUCKETS_S)
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def empty_counts() -> list[int]:
    return [0] * (len(LATENCY_BUCKETS_MS) + 1)


def bucket_index(latency_ms: float) -> int:
    for index, bound in enumerate(LATENCY_BUCKETS_MS):
        if latency_ms <= bound:
            return index
    return len(LATENCY_BUCKETS_MS)


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms estimated from histogram counts; None without samples."""
    return figures.quantile(LATENCY_BUCKETS_MS, counts, q)


def latency_json(sum_ms: float, counts: list[int]) -> dict[str, Any]:
    """``{sum, counts, p50, p90, p99}`` of one histogram, as the stats body shows it."""
    latency: dict[str, Any] = {"sum": round(sum_ms, 3), "counts": list(counts)}
    for name, q in QUANTILES:
        value = quantile(counts, q)
        latency[name] = None if value is None else round(value, 3)
    return latency
