"""Drift of a runtime's inputs: are recent requests still like the model's reference images?

Method: the share of out-of-distribution requests in a sliding window of the last ``window`` scored
requests, against the share the reference itself has beyond the threshold (``1 - ood_threshold``,
1 % by default, since the threshold is a quantile of the reference's own scores), with an exact
one-sided binomial test. Why this and not a two-sample test on the features (MMD, with a
permutation p-value): the per-request score is already there, so the window is a deque of booleans
(O(1) per request, no features kept, no kernel matrices, no permutations), the p-value is exact,
and the number reads plainly: "how much more of the traffic is unusual than the reference's".

``drift`` (the gauge ``captionfleet_feature_drift``) is the excess share, ``(share - expected) /
(1 - expected)`` in [0, 1], when the binomial test rejects "like the reference" at ``significance``
(default 0.01), else 0: 0 is "like the reference", 1 is "every request unusual". Alert above
:data:`DRIFT_ALERT_THRESHOLD` (0.2: a fifth of the traffic unusual beyond what the reference has).
The window also keeps the mean confidence of the same requests (``captionfleet_confidence_window_mean``).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from captionfleet.runtime.engine.types import Caption

DRIFT_ALERT_THRESHOLD = 0.2
"""``captionfleet_feature_drift`` above this is drift worth an alert (the chart's CaptionFeatureDrift)."""


def binomial_tail(successes: int, trials: int, probability: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, probability), exactly (log-space terms)."""
    if successes <= 0:
        return 1.0
    if probability <= 0.0:
        return 0.0
    if probability >= 1.0:
        return 1.0
    log_p, log_q = math.log(probability), math.log1p(-probability)
    total = 0.0
    for count in range(successes, trials + 1):
        log_term = (
            math.lgamma(trials + 1)
            - math.lgamma(count + 1)
            - math.lgamma(trials - count + 1)
            + count * log_p
            + (trials - count) * log_q
        )
        total += math.exp(log_term)
    return min(1.0, total)


@dataclass(frozen=True)
class DriftState:
    """The window now: what ``GET /v1/models`` shows and the gauges export."""

    requests: int
    """Scored requests in the window."""
    out_of_distribution: int
    share: float
    expected_share: float
    p_value: float
    drift: float
    confidence_mean: float | None
    """Mean confidence of the window's requests (``None`` before the first)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "method": "out-of-distribution share, one-sided exact binomial test",
            "window": self.requests,
            "out_of_distribution": self.out_of_distribution,
            "share": self.share,
            "expected_share": self.expected_share,
            "p_value": self.p_value,
            "drift": self.drift,
            "alert_threshold": DRIFT_ALERT_THRESHOLD,
            "confidence_mean": self.confidence_mean,
        }


class DriftMonitor:
    """The sliding window of recent answers. ``observe`` is called on the event loop, ``state`` also
    from the metrics exposition, hence the lock."""

    def __init__(self, window: int, expected_share: float, significance: float) -> None:
        if window < 1 or not 0.0 <= expected_share < 1.0 or not 0.0 < significance < 1.0:
            raise ValueError("window must be >= 1, expected_share in [0, 1), significance in (0, 1)")
        self.expected_share = expected_share
        self.significance = significance
        self._flags: deque[bool] = deque(maxlen=window)
        self._confidences: deque[float] = deque(maxlen=window)
        self._outside = 0
        self._confidence_sum = 0.0
        self._lock = threading.Lock()

    def observe(self, caption: Caption) -> None:
        """Count one answered request (cached ones too: the drift is of the inputs the fleet gets)."""
        with self._lock:
            if len(self._confidences) == self._confidences.maxlen:
                self._confidence_sum -= self._confidences[0]
            self._confidences.append(caption.confidence)
            self._confidence_sum += caption.confidence
            if caption.in_distribution is None:  # no reference yet: nothing to compare
                return
            if len(self._flags) == self._flags.maxlen and not self._flags[0]:
                self._outside -= 1
            self._flags.append(caption.in_distribution)
            self._outside += 0 if caption.in_distribution else 1

    def state(self) -> DriftState:
        with self._lock:
            requests, outside = len(self._flags), self._outside
            confidences = len(self._confidences)
            mean = self._confidence_sum / confidences if confidences else None
        share = outside / requests if requests else 0.0
        p_value = binomial_tail(outside, requests, self.expected_share) if requests else 1.0
        excess = max(0.0, (share - self.expected_share) / (1.0 - self.expected_share))
        drift = excess if p_value < self.significance else 0.0
        return DriftState(requests, outside, share, self.expected_share, p_value, drift, mean)
