"""Holding requests through a version's cold start: the router's half of scale to zero.

A version marked ``cold_start`` in the routing table may have no ready pod (scaled to zero, or its
pods still starting). Its requests are then *held*: each waits on one event per version, set when a
table with an endpoint of that version is published (no polling loop per request), and is then sent
as any other. Nothing else changes for them: a held request is never served by another version, and
sticky assignment is the table's, unchanged by cold starts (``table.py``).

Bounds, so that holding never piles memory up or hangs a client (the activator's and KEDA's add-on's
failures): at most ``cold_start_max_held`` requests held at once over all versions, and at most
``cold_start_max_held_bytes`` of their bodies (the edge's ``max_body_bytes_in_flight`` counts them
too); beyond either, 503 ``cold_start`` at once. A request is held at most ``cold_start_timeout_ms``
(then 503 ``cold_start``) and never past its own deadline (then 504 ``deadline_exceeded``, as for any
request, though not counted as the version's timeout). Every 503 ``cold_start`` carries ``Retry-After``:
the median of the last cold starts' durations (first hold to first ready pod), less the time this one
has run already, at least 1 s; before any was seen, the hold timeout.

The demand is visible at once: ``held`` per version on ``GET /v1/router/stats`` and the gauge
``captionfleet_router_held_requests``, which the operator polls to scale the version from zero; the
router itself needs no write access to the cluster.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque

from captionfleet.runtime.router.errors import ColdStart, HeldPastDeadline, NoRoute
from captionfleet.runtime.router.metrics import RouterMetrics
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.router.stats import RouterStats
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.settings.router import RouterSettings

RECENT_COLD_STARTS = 16
"""Cold-start durations kept for the Retry-After estimate."""


class ColdStarts:
    """The requests one router holds, per version, and what it knows of recent cold starts."""

    def __init__(
        self, settings: RouterSettings, holder: TableHolder, stats: RouterStats, metrics: RouterMetrics
    ) -> None:
        self.max_held = settings.cold_start_max_held
        self.max_held_bytes = settings.cold_start_max_held_bytes
        self.timeout_s = settings.cold_start_timeout_ms / 1000
        self.holder = holder
        self.stats = stats
        self.metrics = metrics
        self.held: dict[str, int] = {}  # version -> requests held now (no entry: none)
        self.held_bytes = 0
        self._ready: dict[str, asyncio.Event] = {}  # version -> set once it has a ready endpoint
        self._began: dict[str, float] = {}  # version -> monotonic start of its cold start in progress
        self._durations: deque[float] = deque(maxlen=RECENT_COLD_STARTS)
        holder.on_change(self._table_changed)

    @property
    def total_held(self) -> int:
        return sum(self.held.values())

    def _table_changed(self, table: RoutingTable) -> None:
        """Wake the requests of every version that is no longer cold (ready, or gone from the table)."""
        now = time.monotonic()
        for name, began in list(self._began.items()):
            version = table.version(name)
            if version is not None and version.routable:
                self._durations.append(now - began)
                del self._began[name]
        for name in list(self._ready):
            version = table.version(name)
            if version is None or not version.cold:
                self._ready.pop(name).set()

    def retry_after_s(self, name: str) -> float:
        """Seconds until ``name`` is likely ready: recent cold starts' median, less this one's age."""
        typical = statistics.median(self._durations) if self._durations else self.timeout_s
        began = self._began.get(name)
        elapsed = time.monotonic() - began if began is not None else 0.0
        return max(1.0, typical - elapsed)

    async def hold(self, name: str, size: int, deadline: float) -> Version:
        """Wait until version ``name`` has a ready endpoint and return it (the current table's);
        ``size``: the bytes of the request's body, ``deadline``: its own (monotonic seconds).
        Raises ColdStart (503), HeldPastDeadline (504), or NoRoute (503: the version left the table)."""
        refused = self._refusal(size)
        if refused is not None:
            raise self._rejected(name, refused, f"{refused}: {self._limits()}")
        if not self.held.get(name):
            self.stats.record_cold_start(name)
            self.metrics.cold_starts.labels(version=name).inc()
            self._began.setdefault(name, time.monotonic())
        self.held[name] = self.held.get(name, 0) + 1
        self.held_bytes += size
        self.metrics.held.labels(version=name).inc()
        self.stats.touch(name)
        started = time.monotonic()
        try:
            version = await self._wait(name, started + self.timeout_s, deadline)
        finally:
            self._release(name, size)
        self.metrics.cold_start_wait.labels(version=name).observe(time.monotonic() - started)
        return version

    def _refusal(self, size: int) -> str | None:
        if self.total_held >= self.max_held:
            return "count"
        if self.held_bytes + size > self.max_held_bytes:
            return "bytes"
        return None

    def _limits(self) -> str:
        return (
            f"{self.total_held} requests ({self.held_bytes} bytes) are held for cold starts; the limits "
            f"are {self.max_held} (cold_start_max_held) and {self.max_held_bytes} bytes "
            "(cold_start_max_held_bytes)"
        )

    def _rejected(self, name: str, reason: str, detail: str) -> ColdStart:
        self.stats.record_cold_start_rejection(name)
        self.metrics.cold_start_rejections.labels(version=name, reason=reason).inc()
        return ColdStart(
            f"version {name} has no ready pod yet (cold start) and the request cannot wait: {detail}",
            retry_after=self.retry_after_s(name),
        )

    def _release(self, name: str, size: int) -> None:
        self.held_bytes -= size
        self.metrics.held.labels(version=name).dec()
        self.held[name] -= 1
        if not self.held[name]:
            del self.held[name]
            version = self.holder.table.version(name)
            if version is None or not version.routable:
                self._began.pop(name, None)  # held in vain: the next hold starts the count again

    async def _wait(self, name: str, hold_until: float, deadline: float) -> Version:
        until = min(hold_until, deadline)
        while True:
            version = self.holder.table.version(name)
            if version is None or not version.servable:
                raise NoRoute(
                    f"version {name} stopped taking traffic while its requests were held", retry_after=1.0
                )
            if version.routable:
                return version
            ready = self._ready.setdefault(name, asyncio.Event())
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await ready.wait()
            except TimeoutError:
                break
        if deadline <= hold_until:
            raise HeldPastDeadline(
                f"the request's deadline passed while it was held for version {name}'s first pod"
            )
        raise self._rejected(
            name, "timeout", f"held {self.timeout_s * 1000:.0f} ms (cold_start_timeout_ms) in vain"
        )
