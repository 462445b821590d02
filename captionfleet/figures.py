"""The figures a router writes in ``GET /v1/router/stats`` and the operator reads: defined once for both.

A router counts the copies it sends to a version in its shadow phase (``runtime/router/shadow.py``); the
operator adds those counts up over every router pod (``operator/figures.py``). Both hold them in
:class:`ShadowCounts`, which also spells their JSON fields, so a count renamed on one side cannot go
unread on the other. Latency histograms of both are read with :func:`quantile` (linear within a bucket,
as Prometheus' ``histogram_quantile``), so the router's p99 and the operator's are the same estimate.
No dependencies: the operator image has no runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SUMMED = ("copies", "errors", "dropped", "compared", "exact", "overlap_sum")
"""The fields of :class:`ShadowCounts` that add up over time and over routers."""
JSON_NAMES = {name: name for name in SUMMED} | {"exact": "exact_matches", "overlap_sum": "token_overlap_sum"}


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile from a histogram (``counts`` has one more slot than ``bounds``: above the last);
    None without samples."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = bounds[index - 1] if index > 0 else 0.0
            if index == len(bounds):  # above the last bound: its lower edge is all we know
                return float(lower)
            return float(lower + (bounds[index] - lower) * (rank - seen) / count)
        seen += count
    return float(bounds[-1])


def _ratio(part: float, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(slots=True)
class ShadowCounts:
    """The copies sent to one version in its shadow phase (never part of its live figures)."""

    copies: int = 0  # copies answered (or failed); dropped ones are not copies
    errors: int = 0
    dropped: int = 0
    compared: int = 0  # copies with an answer to compare (errors are not)
    exact: int = 0  # compared copies whose caption was the primary's (after normalisation)
    overlap_sum: float = 0.0  # token overlap (word F1) of the compared copies, summed

    @property
    def agreement(self) -> float | None:
        """Share of the compared copies whose caption was the primary's."""
        return _ratio(self.exact, self.compared)

    @property
    def token_overlap(self) -> float | None:
        return _ratio(self.overlap_sum, self.compared)

    def add_counts(self, other: ShadowCounts) -> None:
        for name in SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def add_json(self, body: Mapping[str, Any]) -> None:
        """Add the counts of a router's ``shadow`` body (:meth:`counts_json`); missing ones count 0."""
        for name, key in JSON_NAMES.items():
            kind = type(getattr(self, name))
            setattr(self, name, getattr(self, name) + kind(body.get(key) or 0))

    def counts_json(self) -> dict[str, Any]:
        """The counts and the rates derived from them, as the stats body shows them."""

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 6)

        counts = {key: getattr(self, name) for name, key in JSON_NAMES.items()}
        counts["token_overlap_sum"] = rounded(self.overlap_sum)
        return counts | {
            "error_rate": rounded(_ratio(self.errors, self.copies)),
            "agreement": rounded(self.agreement),
            "token_overlap": rounded(self.token_overlap),
        }
