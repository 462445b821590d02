"""Does the confidence mean what it says? Expected calibration error and a reliability table.

Confidence is binned into ``bins`` equal-width bins over [0, 1]; per bin, the mean confidence and the
share of captions that were right (exact match). ECE is the bins' |accuracy - confidence| weighted by
their share of the images (Guo et al., 2017). "With the OOD gate": an image scored out of
distribution counts with confidence 0 (its caption is not to be trusted), what a client that reads
``in_distribution`` would do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    mean_confidence: float
    accuracy: float


@dataclass(frozen=True)
class Calibration:
    ece: float
    """Expected calibration error of the confidence as served."""
    ece_with_ood_gate: float | None
    """The same with out-of-distribution images at confidence 0 (``None``: no OOD scores)."""
    out_of_distribution: int
    """Images scored out of distribution."""
    accuracy_out_of_distribution: float | None
    table: list[ReliabilityBin] = field(default_factory=list)


def reliability(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> list[ReliabilityBin]:
    """The reliability table (bins with no image left out)."""
    table = []
    for index in range(bins):
        low, high = index / bins, (index + 1) / bins
        members = [
            (confidence, right)
            for confidence, right in zip(confidences, correct, strict=True)
            if low <= confidence < high or (index == bins - 1 and confidence == 1.0)
        ]
        if members:
            mean = sum(confidence for confidence, _ in members) / len(members)
            accuracy = sum(1 for _, right in members if right) / len(members)
            table.append(ReliabilityBin(low, high, len(members), mean, accuracy))
    return table


def expected_calibration_error(table: Sequence[ReliabilityBin]) -> float:
    total = sum(row.count for row in table)
    if total == 0:
        return 0.0
    return sum(row.count * abs(row.accuracy - row.mean_confidence) for row in table) / total


def calibration(
    confidences: Sequence[float], correct: Sequence[bool], in_distribution: Sequence[bool | None]
) -> Calibration:
    table = reliability(confidences, correct)
    scored = all(flag is not None for flag in in_distribution) and bool(in_distribution)
    gated = [c if flag is not False else 0.0 for c, flag in zip(confidences, in_distribution, strict=True)]
    outside = [right for right, flag in zip(correct, in_distribution, strict=True) if flag is False]
    return Calibration(
        ece=expected_calibration_error(table),
        ece_with_ood_gate=expected_calibration_error(reliability(gated, correct)) if scored else None,
        out_of_distribution=len(outside),
        accuracy_out_of_distribution=sum(outside) / len(outside) if outside else None,
        table=table,
    )
