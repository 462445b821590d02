"""A cascade's calibration (``calibration.json`` in the fast model's folder), read by runtime and operator.

``captionfleet eval --cascade FAST QUALITY --write-calibration`` writes it; ``captionfleet serve``
shows it as ``"calibration"`` in ``GET /v1/models``; the cascade turns a ``targetEscalationRate`` into
a threshold with :func:`threshold_for_rate`. Pure Python (the operator image has no numpy).

The file::

    {"signal": "confidence", "scenes": N, "seed": S,
     "confidence_quantiles": [101 floats, q = 0.00 .. 1.00],
     "rows": [{"threshold", "escalation_rate", "exact_match", "bleu4", "cider"}, ...]}

With ``"signal": "confidence"`` a request is escalated when the fast model's confidence is *below* the
threshold, and the threshold for a rate ``r`` is the ``r``-quantile of the fast model's confidence on
the held-out set. With ``"signal": "ood"`` it is escalated when the OOD score is *above* the
threshold, the ``(1 - r)``-quantile of ``ood_quantiles``.
"""

from __future__ import annotations

from collections.abc import Sequence

CALIBRATION_FILE = "calibration.json"
SIGNALS = ("confidence", "ood")
"""The signals a cascade can escalate on: the fast model's confidence (low: escalate) or its
out-of-distribution score (high: escalate)."""
QUANTILES = 101
"""Quantiles stored per signal: q = 0.00, 0.01, ... 1.00."""


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ascending ``sorted_values``, interpolated linearly between neighbours
    (numpy's default, ``method="linear"``)."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def quantiles(values: Sequence[float]) -> list[float]:
    """The :data:`QUANTILES` evenly spaced quantiles of ``values``, q = 0 to 1."""
    ordered = sorted(values)
    return [quantile(ordered, index / (QUANTILES - 1)) for index in range(QUANTILES)]


def threshold_for_rate(stored: Sequence[float], rate: float, signal: str = "confidence") -> float:
    """The threshold that escalates a share ``rate`` of the held-out set, from a calibration's stored
    quantiles of ``signal`` (interpolated between them)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    return quantile(list(stored), rate if signal == "confidence" else 1.0 - rate)


def escalates(value: float, threshold: float, signal: str = "confidence") -> bool:
    """Whether a fast answer with this signal ``value`` goes on to the quality model."""
    return value < threshold if signal == "confidence" else value > threshold
