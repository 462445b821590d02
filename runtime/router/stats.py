"""Per-version request figures over a recent window, for ``GET /v1/router/stats``.

The operator's rollout analysis reads every router pod's figures over its ``window`` and adds them up,
so each version keeps:

- a ring of slots covering ``max_window_s`` (a slot is reused when its time comes round again), from
  which any window up to that length is summed on demand. A slot is one second wide while the window
  needs at most ``max_slots`` of them (``stats_max_slots``), else ``ceil(max_window_s / max_slots)``
  seconds, so memory does not grow with the window (a ``window: 10000h`` once cost 288 MB per ring).
  Slots are allocated when first counted into, so an idle version costs nothing. A window is answered
  in whole slots, rounded up; the answer's ``window_s`` is the effective window and ``slot_s`` the width;
- cumulative totals since the process started, with the process's ``instance`` id and ``started_at``,
  so a reader may also diff two reads and notice a restart.

Counts are per request routed to the version, by its final outcome (after the retry): ``errors`` is the
sum of ``status_5xx`` (a runtime's 5xx answer relayed), ``timeouts`` (the budget ran out),
``connect_failures`` (no runtime of the version could be reached) and ``bad_responses`` (an answer that
could not be relayed). 4xx answers are the client's, not errors. ``retries`` counts second attempts
(which may have succeeded), ``fallbacks`` requests meant for the version that went elsewhere because it
had no endpoints. Bulk requests (``X-Priority: bulk`` captions and the job API's calls) are counted in
``bulk`` and nowhere else: neither their volume, their errors nor their latency (a job's results stream
for as long as they are long) may pass for the interactive traffic the analysis judges. ``cold_starts``
counts holds that began while none of the version's requests was held (``coldstart.py``),
``cold_start_rejections`` its 503 ``cold_start`` answers; beside the figures each version shows
``held`` (requests held now) and ``last_request_at`` (Unix seconds of the last request routed to it,
held or sent, any priority; null before the first): what the operator's scale to zero reads. Latency is the
router's view, arrival to answer, in a fixed histogram so figures of
several pods add up; percentiles are estimated from it (linear within a bucket, as Prometheus does).

``confidence`` sums the ``confidence`` of the 200 ``POST /v1/caption`` answers relayed (interactive
ones), for ``rollout.analysis.maxConfidenceDrop``: the router sees every answer of every version over
exactly the analysis window, so the canary's and the stable's means are comparable (the runtimes'
``captionfleet_confidence_window_mean`` covers their last requests instead, whatever the window).
``shadow`` holds the copies sent to a version in its shadow phase (``shadow.py``), apart from
everything above.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from captionfleet.runtime.router.histogram import (
    LATENCY_BUCKETS_MS,
    bucket_index,
    empty_counts,
    latency_json,
)
from captionfleet.runtime.router.histogram import (
    quantile as quantile,
)
from captionfleet.runtime.router.shadow import CopyOutcome, ShadowFigures
from captionfleet.settings.router import RouterSettings

DEFAULT_MAX_SLOTS = RouterSettings().stats_max_slots
ERROR_KINDS = ("status_5xx", "timeouts", "connect_failures", "bad_responses")
COUNTED_APART = ("retries", "fallbacks", "bulk", "cold_starts", "cold_start_rejections")
"""Counts beside the requests: each event counted under its own name and nowhere else. ``bulk``: bulk
requests, never in requests, errors or latency; ``cold_starts``: holds that began while none of the
version's requests was held; ``cold_start_rejections``: 503 cold_start (too many held, too many bytes,
held too long)."""


@dataclass(slots=True)  # one per slot per version: no __dict__
class Figures:
    """Counts of one version over some span of time."""

    counts: Counter[str] = field(default_factory=Counter)  # requests, ERROR_KINDS, COUNTED_APART by name
    latency_sum_ms: float = 0.0
    latency_counts: list[int] = field(default_factory=empty_counts)
    confidence_sum: float = 0.0  # of the 200 caption answers relayed (maxConfidenceDrop)
    confidences: int = 0
    shadow: ShadowFigures | None = None  # copies sent to this version (shadow.py); None: none yet

    @property
    def requests(self) -> int:
        return self.counts["requests"]

    @property
    def errors(self) -> int:
        return sum(self.counts[name] for name in ERROR_KINDS)

    def record(self, error: str | None, latency_ms: float, retries: int) -> None:
        self.counts["requests"] += 1
        if error is not None:
            self.counts[error] += 1
        if retries:
            self.counts["retries"] += retries
        self.latency_sum_ms += latency_ms
        self.latency_counts[bucket_index(latency_ms)] += 1

    def add(self, other: Figures) -> None:
        self.counts.update(other.counts)
        self.latency_sum_ms += other.latency_sum_ms
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)]
        self.confidence_sum += other.confidence_sum
        self.confidences += other.confidences
        if other.shadow is not None:
            self.shadowing().add(other.shadow)

    def shadowing(self) -> ShadowFigures:
        """The shadow figures, allocated on first use (a version never shadowed costs nothing)."""
        if self.shadow is None:
            self.shadow = ShadowFigures()
        return self.shadow

    def as_json(self) -> dict[str, Any]:
        mean = self.confidence_sum / self.confidences if self.confidences else None
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            **{name: self.counts[name] for name in (*ERROR_KINDS, *COUNTED_APART)},
            "latency_ms": latency_json(self.latency_sum_ms, self.latency_counts),
            "confidence": {
                "count": self.confidences,
                "sum": round(self.confidence_sum, 6),
                "mean": None if mean is None else round(mean, 6),
            },
            "shadow": (self.shadow or ShadowFigures()).as_json(),
        }


@dataclass(slots=True)
class _Slot:
    number: int  # seconds since the epoch // the slot width
    figures: Figures = field(default_factory=Figures)


class VersionFigures:
    """One version's ring of slots (allocated on first use) and its totals."""

    def __init__(self, slots: int, slot_s: int = 1) -> None:
        self._size = slots
        self._slot_s = slot_s
        self._ring: dict[int, _Slot] = {}  # ring index -> slot; at most ``slots`` entries
        self.total = Figures()
        self.last_request_at: float | None = None  # Unix seconds

    def _slot(self, second: int) -> _Slot:
        number = second // self._slot_s
        index = number % self._size
        slot = self._ring.get(index)
        if slot is None or slot.number != number:
            slot = self._ring[index] = _Slot(number)
        return slot

    def record(self, second: int, error: str | None, latency_ms: float, retries: int) -> None:
        self._slot(second).figures.record(error, latency_ms, retries)
        self.total.record(error, latency_ms, retries)

    def record_confidence(self, second: int, confidence: float) -> None:
        for figures in (self._slot(second).figures, self.total):
            figures.confidence_sum += confidence
            figures.confidences += 1

    def record_shadow(self, second: int, outcome: CopyOutcome | None) -> None:
        """One copy's outcome; None: a copy dropped."""
        for figures in (self._slot(second).figures.shadowing(), self.total.shadowing()):
            if outcome is None:
                figures.dropped += 1
            else:
                figures.record(outcome)

    def count(self, second: int, name: str) -> None:
        """One more of ``name`` (one of COUNTED_APART but retries)."""
        self._slot(second).figures.counts[name] += 1
        self.total.counts[name] += 1

    def slots(self, first: int, last: int) -> Iterable[_Slot]:
        """Slots numbered first..last, oldest first."""
        found = [s for s in self._ring.values() if first <= s.number <= last]
        return sorted(found, key=lambda s: s.number)

    def window(self, first: int, last: int) -> Figures:
        summed = Figures()
        for slot in self.slots(first, last):
            summed.add(slot.figures)
        return summed


class RouterStats:
    """Every version's figures; ``clock`` returns Unix seconds (tests pass their own)."""

    def __init__(
        self, max_window_s: int, clock: Callable[[], float] = time.time, max_slots: int = DEFAULT_MAX_SLOTS
    ) -> None:
        if max_window_s <= 0 or max_slots <= 0:
            raise ValueError("max_window_s and max_slots must be > 0")
        self.max_window_s = max_window_s
        self.slot_s = math.ceil(max_window_s / max_slots)
        self.slots = math.ceil(max_window_s / self.slot_s)
        self._clock = clock
        self.instance = uuid.uuid4().hex
        self.started_at = clock()
        self._versions: dict[str, VersionFigures] = {}
        self.unrouted = VersionFigures(self.slots, self.slot_s)

    def _figures(self, version: str) -> VersionFigures:
        figures = self._versions.get(version)
        if figures is None:
            figures = self._versions[version] = VersionFigures(self.slots, self.slot_s)
        return figures

    def record(self, version: str, *, error: str | None, latency_ms: float, retries: int = 0) -> None:
        """One request routed to ``version`` is answered; ``error`` is one of ERROR_KINDS or None."""
        if error is not None and error not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {error!r}")
        self._figures(version).record(int(self._clock()), error, latency_ms, retries)

    def record_fallback(self, meant_for: str) -> None:
        """A request meant for ``meant_for`` went to another version: it had no endpoints."""
        self._figures(meant_for).count(int(self._clock()), "fallbacks")

    def record_bulk(self, version: str) -> None:
        """A bulk request (``X-Priority: bulk``, or the job API) routed to ``version`` was answered:
        counted in ``bulk`` only, so bulk work never reads as the version's interactive traffic."""
        self._figures(version).count(int(self._clock()), "bulk")

    def record_cold_start(self, version: str) -> None:
        """A hold began on ``version`` while none of its requests was held: a cold start."""
        self._figures(version).count(int(self._clock()), "cold_starts")

    def record_cold_start_rejection(self, version: str) -> None:
        """A request for ``version`` got 503 cold_start (not held, or held in vain)."""
        self._figures(version).count(int(self._clock()), "cold_start_rejections")

    def touch(self, version: str) -> None:
        """A request was routed to ``version`` (any priority; held or sent): its last request is now."""
        self._figures(version).last_request_at = self._clock()

    def record_confidence(self, version: str, confidence: float) -> None:
        """The confidence of a 200 caption answer of ``version`` (interactive only)."""
        self._figures(version).record_confidence(int(self._clock()), confidence)

    def record_copy(self, outcome: CopyOutcome) -> None:
        """A shadow copy to ``outcome.version`` ended: in its shadow figures, never its live ones."""
        self._figures(outcome.version).record_shadow(int(self._clock()), outcome)

    def record_copy_dropped(self, version: str) -> None:
        """A shadow copy to ``version`` was not sent: the router had its most copies in flight."""
        self._figures(version).record_shadow(int(self._clock()), None)

    def record_unrouted(self, latency_ms: float) -> None:
        """A request no version could take (503 no_route)."""
        self.unrouted.record(int(self._clock()), None, latency_ms, 0)

    def snapshot(
        self,
        window_s: int,
        *,
        versions: Iterable[str] = (),
        per_second: bool = False,
        held: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """The JSON of GET /v1/router/stats: each version's figures over the last ``window_s`` seconds
        (at most ``max_window_s``, rounded up to whole slots; the current, partial slot included) and
        since start. ``versions`` are listed even when idle. ``per_second`` adds the slots (named so
        when slots were seconds; ``t`` is each slot's first second, ``slot_s`` its width). ``held``:
        the requests held now per version."""
        held = held or {}
        count = math.ceil(max(1, min(window_s, self.max_window_s)) / self.slot_s)
        now = self._clock()
        last = int(now) // self.slot_s
        first = last - count + 1
        body: dict[str, Any] = {}
        for name in sorted(set(versions) | set(self._versions)):
            figures = self._versions.get(name) or VersionFigures(1)
            entry: dict[str, Any] = {
                "window": figures.window(first, last).as_json(),
                "total": figures.total.as_json(),
                "held": held.get(name, 0),
                "last_request_at": None
                if figures.last_request_at is None
                else round(figures.last_request_at, 3),
            }
            if per_second:
                entry["seconds"] = [
                    {
                        "t": slot.number * self.slot_s,
                        "requests": slot.figures.requests,
                        "errors": slot.figures.errors,
                        "latency_ms_sum": round(slot.figures.latency_sum_ms, 3),
                    }
                    for slot in figures.slots(first, last)
                ]
            body[name] = entry
        return {
            "instance": self.instance,
            "started_at": round(self.started_at, 3),
            "now": round(now, 3),
            "window_s": count * self.slot_s,
            "slot_s": self.slot_s,
            "max_window_s": self.max_window_s,
            "latency_buckets_ms": list(LATENCY_BUCKETS_MS),
            "versions": body,
            "unrouted": {
                "window": self.unrouted.window(first, last).requests,
                "total": self.unrouted.total.requests,
            },
        }
