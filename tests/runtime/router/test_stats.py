"""Per-version figures: windows over the per-second ring, totals, and latency quantiles."""

from __future__ import annotations

import tracemalloc

import pytest

from captionfleet.names import LATENCY_BUCKETS_S
from captionfleet.runtime.router.stats import LATENCY_BUCKETS_MS, RouterStats, quantile


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_window_counts_only_recent_seconds_and_totals_count_everything() -> None:
    clock = Clock(1_000.2)
    stats = RouterStats(max_window_s=60, clock=clock)
    stats.record("v1", error=None, latency_ms=12.0)
    stats.record("v2", error="status_5xx", latency_ms=40.0)
    clock.now = 1_030.5
    stats.record("v2", error=None, latency_ms=20.0, retries=1)
    stats.record("v2", error="timeouts", latency_ms=5000.0)
    stats.record_fallback("v2")
    clock.now = 1_040.9

    recent = stats.snapshot(20, versions=["v1", "v2", "v3"])
    v2 = recent["versions"]["v2"]
    assert v2["window"]["requests"] == 2 and v2["window"]["errors"] == 1
    assert v2["window"]["timeouts"] == 1 and v2["window"]["status_5xx"] == 0
    assert v2["window"]["retries"] == 1 and v2["window"]["fallbacks"] == 1
    assert v2["window"]["error_rate"] == 0.5
    assert v2["total"]["requests"] == 3 and v2["total"]["errors"] == 2
    assert recent["versions"]["v1"]["window"]["requests"] == 0
    assert recent["versions"]["v1"]["window"]["error_rate"] is None
    assert recent["versions"]["v3"]["total"]["requests"] == 0  # in the table, never used
    assert recent["window_s"] == 20 and recent["max_window_s"] == 60

    whole = stats.snapshot(60)
    assert whole["versions"]["v1"]["window"]["requests"] == 1
    assert whole["versions"]["v2"]["window"]["requests"] == 3
    assert stats.snapshot(10_000)["window_s"] == 60  # clamped to what the ring holds


def test_ring_slots_are_reused_without_leaking_old_counts() -> None:
    clock = Clock(0.0)
    stats = RouterStats(max_window_s=10, clock=clock)
    for second in range(35):
        clock.now = float(second)
        stats.record("v1", error=None, latency_ms=1.0)
    snap = stats.snapshot(10, per_second=True)
    assert snap["versions"]["v1"]["window"]["requests"] == 10
    assert [s["t"] for s in snap["versions"]["v1"]["seconds"]] == list(range(25, 35))
    assert snap["versions"]["v1"]["total"]["requests"] == 35


def test_latency_histogram_and_quantiles() -> None:
    stats = RouterStats(max_window_s=60, clock=Clock(5.0))
    for latency in [1.0] * 50 + [30.0] * 40 + [700.0] * 9 + [90_000.0]:
        stats.record("v1", error=None, latency_ms=latency)
    window = stats.snapshot(60)["versions"]["v1"]["window"]
    counts = window["latency_ms"]["counts"]
    assert len(counts) == len(LATENCY_BUCKETS_MS) + 1 and sum(counts) == 100
    assert counts[0] == 50 and counts[-1] == 1
    assert window["latency_ms"]["p50"] == pytest.approx(1.0)  # the top of the first bucket
    assert 25 < window["latency_ms"]["p90"] <= 50
    assert 500 < window["latency_ms"]["p99"] <= 1000
    assert window["latency_ms"]["sum"] == pytest.approx(50 + 1200 + 6300 + 90_000)
    assert quantile([0] * len(counts), 0.5) is None


def test_unrouted_and_bad_kinds() -> None:
    stats = RouterStats(max_window_s=60, clock=Clock(5.0))
    stats.record_unrouted(1.0)
    assert stats.snapshot(60)["unrouted"] == {"window": 1, "total": 1}
    with pytest.raises(ValueError, match="unknown error kind"):
        stats.record("v1", error="oops", latency_ms=1.0)


def test_the_bounds_are_the_prometheus_histograms() -> None:
    assert tuple(bound * 1000 for bound in LATENCY_BUCKETS_S) == LATENCY_BUCKETS_MS
    assert RouterStats(60, clock=Clock(0.0)).snapshot(60)["latency_buckets_ms"] == list(LATENCY_BUCKETS_MS)


def test_memory_does_not_grow_with_the_window() -> None:
    """window: 10000h once allocated a 36-million-slot ring per version (288 MB at start)."""
    clock = Clock(1_700_000_000.0)
    tracemalloc.start()
    try:
        stats = RouterStats(max_window_s=36_000_000, clock=clock, max_slots=3600)
        for second in range(0, 200_000, 7):  # a request every 7 s for 55 hours: 20 slots touched
            clock.now = 1_700_000_000.0 + second
            stats.record("v1", error=None, latency_ms=3.0)
            stats.record_unrouted(1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert stats.slot_s == 10_000 and stats.slots == 3600
    snap = stats.snapshot(36_000_000)
    assert snap["window_s"] == snap["max_window_s"] == 36_000_000
    assert snap["versions"]["v1"]["window"]["requests"] == snap["versions"]["v1"]["total"]["requests"]


def test_windows_are_answered_in_whole_slots_rounded_up() -> None:
    clock = Clock(1_000.5)
    stats = RouterStats(max_window_s=7200, clock=clock, max_slots=3600)  # 2-second slots
    assert stats.slot_s == 2
    stats.record("v1", error=None, latency_ms=1.0)  # slot 500 (seconds 1000-1001)
    clock.now = 1_003.4
    stats.record("v1", error="timeouts", latency_ms=1.0)  # slot 501 (seconds 1002-1003)
    one = stats.snapshot(1, per_second=True)
    assert one["window_s"] == 2 and one["slot_s"] == 2  # 1 s rounded up to one slot
    assert one["versions"]["v1"]["window"]["requests"] == 1
    assert [s["t"] for s in one["versions"]["v1"]["seconds"]] == [1002]
    three = stats.snapshot(3, per_second=True)
    assert three["window_s"] == 4 and three["versions"]["v1"]["window"]["requests"] == 2
    assert [s["t"] for s in three["versions"]["v1"]["seconds"]] == [1000, 1002]
    assert stats.snapshot(10**9)["window_s"] == 7200
    # Short windows keep one-second slots (the default: up to 3600 s of them).
    assert RouterStats(max_window_s=900, clock=clock).slot_s == 1


def test_the_ring_reuses_wide_slots_without_leaking_old_counts() -> None:
    clock = Clock(0.0)
    stats = RouterStats(max_window_s=100, clock=clock, max_slots=10)  # 10 slots of 10 s
    for second in range(0, 350, 5):
        clock.now = float(second)
        stats.record("v1", error=None, latency_ms=1.0)
    snap = stats.snapshot(100, per_second=True)
    assert [s["t"] for s in snap["versions"]["v1"]["seconds"]] == list(range(250, 350, 10))
    assert snap["versions"]["v1"]["window"]["requests"] == 20
    assert snap["versions"]["v1"]["total"]["requests"] == 70
