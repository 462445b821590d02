"""The router's fixed latency histogram: bounds, the bucket of one latency, and quantiles from counts.

Shared by the per-version figures (``stats.py``) and the shadow figures (``shadow.py``): both must use
the Prometheus histogram's bounds, so that figures of several router pods add up and the operator
estimates the same p99 from either source.
"""

from __future__ import annotations

from typing import Any

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
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = LATENCY_BUCKETS_MS[index - 1] if index > 0 else 0.0
            if index == len(LATENCY_BUCKETS_MS):  # above the last bound: its lower edge is all we know
                return float(lower)
            upper = LATENCY_BUCKETS_MS[index]
            return float(lower + (upper - lower) * (rank - seen) / count)
        seen += count
    return float(LATENCY_BUCKETS_MS[-1])


def latency_json(sum_ms: float, counts: list[int]) -> dict[str, Any]:
    """``{sum, counts, p50, p90, p99}`` of one histogram, as the stats body shows it."""
    latency: dict[str, Any] = {"sum": round(sum_ms, 3), "counts": list(counts)}
    for name, q in QUANTILES:
        value = quantile(counts, q)
        latency[name] = None if value is None else round(value, 3)
    return latency
