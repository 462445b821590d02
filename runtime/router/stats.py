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
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from captionfleet.names import LATENCY_BUCKETS_S
from captionfleet.settings.router import RouterSettings

# Upper bounds in milliseconds, the Prometheus histogram's (so both estimate the same p99); the
# histogram has one more count for everything above the last. The body names them
# (``latency_buckets_ms``), so the operator adds up only histograms with equal bounds.
LATENCY_BUCKETS_MS: tuple[float, ...] = tuple(round(bound * 1000, 6) for bound in LATENCY_BUCKETS_S)
DEFAULT_MAX_SLOTS = RouterSettings().stats_max_slots
ERROR_KINDS = ("status_5xx", "timeouts", "connect_failures", "bad_responses")
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
COUNTED_APART = ("retries", "fallbacks", "bulk", "cold_starts", "cold_start_rejections")
"""Counts beside the requests: each event counted in its own field and nowhere else."""


def _bucket_index(latency_ms: float) -> int:
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


@dataclass(slots=True)  # one per slot per version: no __dict__
class Figures:
    """Counts of one version over some span of time."""

    requests: int = 0
    status_5xx: int = 0
    timeouts: int = 0
    connect_failures: int = 0
    bad_responses: int = 0
    retries: int = 0
    fallbacks: int = 0
    bulk: int = 0  # bulk requests: counted apart, never in requests, errors or latency
    cold_starts: int = 0  # holds that began while none of the version's requests was held
    cold_start_rejections: int = 0  # 503 cold_start: too many held, too many bytes, held too long
    latency_sum_ms: float = 0.0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    @property
    def errors(self) -> int:
        return self.status_5xx + self.timeouts + self.connect_failures + self.bad_responses

    def record(self, error: str | None, latency_ms: float, retries: int) -> None:
        self.requests += 1
        if error is not None:
            setattr(self, error, getattr(self, error) + 1)
        self.retries += retries
        self.latency_sum_ms += latency_ms
        self.latency_counts[_bucket_index(latency_ms)] += 1

    def add(self, other: Figures) -> None:
        for name in ("requests", *ERROR_KINDS, *COUNTED_APART):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_sum_ms += other.latency_sum_ms
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)]

    def as_json(self) -> dict[str, Any]:
        latency: dict[str, Any] = {"sum": round(self.latency_sum_ms, 3), "counts": list(self.latency_counts)}
        for name, q in QUANTILES:
            value = quantile(self.latency_counts, q)
            latency[name] = None if value is None else round(value, 3)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            **{name: getattr(self, name) for name in ERROR_KINDS},
            **{name: getattr(self, name) for name in COUNTED_APART},
            "latency_ms": latency,
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

    def count(self, second: int, name: str) -> None:
        """One more of ``name`` (one of COUNTED_APART but retries)."""
        figures = self._slot(second).figures
        setattr(figures, name, getattr(figures, name) + 1)
        setattr(self.total, name, getattr(self.total, name) + 1)

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
