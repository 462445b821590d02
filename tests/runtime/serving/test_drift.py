"""The drift window: the exact binomial tail, the excess share, the confidence mean."""

from __future__ import annotations

import math

import pytest

from captionfleet.runtime.engine.types import Caption
from captionfleet.runtime.serving.drift import DRIFT_ALERT_THRESHOLD, DriftMonitor, binomial_tail


def caption(in_distribution: bool | None, confidence: float = 0.9) -> Caption:
    score = None if in_distribution is None else (0.5 if in_distribution else 0.999)
    return Caption("a caption", confidence, (), ood_score=score, in_distribution=in_distribution)


@pytest.mark.parametrize(
    ("k", "n", "p"), [(0, 10, 0.3), (3, 10, 0.3), (10, 10, 0.3), (6, 200, 0.01), (1, 1, 0.5)]
)
def test_binomial_tail_is_the_sum_of_the_pmf(k: int, n: int, p: float) -> None:
    exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9)


def test_like_the_reference_is_no_drift() -> None:
    monitor = DriftMonitor(window=200, expected_share=0.01, significance=0.01)
    for index in range(200):
        monitor.observe(caption(in_distribution=index % 100 != 0))  # 2 of 200: the reference's share
    state = monitor.state()
    assert state.requests == 200 and state.out_of_distribution == 2 and state.drift == 0.0
    assert state.p_value > 0.3


def test_unusual_traffic_is_drift_and_the_window_slides() -> None:
    monitor = DriftMonitor(window=100, expected_share=0.01, significance=0.01)
    for _ in range(100):
        monitor.observe(caption(in_distribution=True, confidence=0.95))
    for _ in range(60):
        monitor.observe(caption(in_distribution=False, confidence=0.5))
    state = monitor.state()
    assert state.requests == 100 and state.out_of_distribution == 60
    assert state.drift == pytest.approx((0.6 - 0.01) / 0.99) and state.drift > DRIFT_ALERT_THRESHOLD
    assert state.confidence_mean == pytest.approx(0.4 * 0.95 + 0.6 * 0.5)
    assert state.p_value < 1e-50


def test_a_small_excess_that_is_not_significant_reads_zero() -> None:
    monitor = DriftMonitor(window=200, expected_share=0.01, significance=0.01)
    for index in range(10):
        monitor.observe(caption(in_distribution=index != 0))  # 1 of 10 is 10 %, but p = 0.096
    assert monitor.state().drift == 0.0


def test_unscored_answers_count_for_confidence_only() -> None:
    monitor = DriftMonitor(window=10, expected_share=0.01, significance=0.01)
    monitor.observe(caption(in_distribution=None, confidence=0.2))
    state = monitor.state()
    assert state.requests == 0 and state.drift == 0.0 and state.confidence_mean == pytest.approx(0.2)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DriftMonitor(window=0, expected_share=0.01, significance=0.01)
    with pytest.raises(ValueError):
        DriftMonitor(window=10, expected_share=1.0, significance=0.01)
