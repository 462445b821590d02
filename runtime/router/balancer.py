"""Which endpoint of a version takes a request: round robin over the live ones, and outlier ejection.

Passive health checking, as Envoy's outlier detection does it, with an active probe to come back:

- An endpoint is *ejected* after ``connect_failures`` failed connection attempts in a row (refused
  or connect timeout: default 1, a pod that is gone) or ``timeouts`` requests in a row that ran out of
  budget without an answer from it (default 2: one may be a slow batch, two with no answer in between
  is a hung pod). A timeout counts only when the attempt had at least ``timeout_min_budget_s``: a
  client's short ``X-Request-Timeout-Ms`` says nothing about the endpoint. A connection dropped once
  the request went out (a reset, a kept-alive connection the runtime closed as it was reused) counts
  as neither: the request is retried, and a pod that is gone refuses the retry's connection, which
  counts. Ejecting on a drop would answer every other request of a one-pod version 503 until the
  retry came back. An endpoint is ejected too after ``bad_responses`` answers in a row that could
  not be relayed (default 3: bytes that are not HTTP, an answer cut short, a status or body no
  runtime sends), a broken runtime whose port still answers. A well-formed error (a busy runtime's
  503) is an answer like any other. A good answer resets all three counts; a bad one, the first two.
- An ejected endpoint takes no requests. After its ejection time a background task asks it
  ``GET /readyz`` (``probe_timeout_s``); a runtime's 200 ``{"ready": true}`` brings it back,
  anything else ejects it again. The ejection time is ``base_ejection_s`` doubled with each
  ejection in a row (a failed probe included), at most ``max_ejection_s``; an endpoint that stays in
  for ``max_ejection_s`` starts again from the base. Without a probe (no HTTP client attached, no
  event loop) an endpoint comes back when its ejection time is up. So no endpoint is out for ever,
  not even the last one of a version.
- When every endpoint of a version is ejected, :meth:`Balancer.choose` fails at once with
  :class:`NoLiveEndpoint` (503, ``Retry-After``: until the next probe) instead of sending the request
  to a pod that hangs. :meth:`Balancer.live_endpoints` says which endpoints are in rotation, for
  readiness and route choice; :attr:`Balancer.counts` counts ejections, failed probes and returns.

Endpoints are known by their URL; state is kept for endpoints that failed, and
:meth:`Balancer.table_changed` forgets those no longer in the routing table (and stops their probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from captionfleet.runtime.router.errors import NoRoute, UpstreamUnreachable
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.settings.router import RouterSettings

log = logging.getLogger(__name__)

Probe = Callable[[str], Awaitable[bool]]  # endpoint -> ready?
CAUSES = ("connect", "timeout", "bad_response")
# What each cause counts, in a row: the same name in OutlierPolicy (its limit) and _Health (the count).
_IN_A_ROW = {"connect": "connect_failures", "timeout": "timeouts", "bad_response": "bad_responses"}
_MAX_DOUBLINGS = 30  # 2**30 * any sane base is past any cap; keeps the float finite


class NoLiveEndpoint(NoRoute, UpstreamUnreachable):
    """Every endpoint of the chosen version is ejected: 503 ``no_route`` with Retry-After (NoRoute's
    status and code), counted in the version's figures as a connect failure (UpstreamUnreachable's)."""

    code = NoRoute.code


@dataclass(frozen=True)
class OutlierPolicy:
    """The ejection rules; ``from_settings`` takes them from the router's settings (same defaults)."""

    connect_failures: int
    timeouts: int
    bad_responses: int
    timeout_min_budget_s: float
    base_ejection_s: float
    max_ejection_s: float
    probe_timeout_s: float

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> OutlierPolicy:
        return cls(
            connect_failures=settings.outlier_connect_failures,
            timeouts=settings.outlier_timeouts,
            bad_responses=settings.outlier_bad_responses,
            timeout_min_budget_s=settings.outlier_timeout_min_budget_ms / 1000,
            base_ejection_s=settings.outlier_base_ejection_s,
            max_ejection_s=settings.outlier_max_ejection_s,
            probe_timeout_s=settings.outlier_probe_timeout_ms / 1000,
        )


@dataclass
class EjectionCounts:
    """Since start: ejections by cause (``connect``, ``timeout``), failed probes, endpoints back."""

    ejections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    probe_failures: int = 0
    returns: int = 0


@dataclass
class _Health:
    connect_failures: int = 0  # in a row
    timeouts: int = 0  # in a row
    bad_responses: int = 0  # in a row
    ejections: int = 0  # in a row: the back-off's exponent
    out_until: float | None = None  # ejected: when the probe (or the return) is due
    returned_at: float = float("-inf")

    def clear(self) -> None:
        """No failures in a row (after a good answer, an ejection, a return)."""
        self.connect_failures = self.timeouts = self.bad_responses = 0


class Balancer:
    """Round robin over each version's live endpoints; ejects and probes outliers (module docstring).

    ``clock`` is monotonic seconds (tests pass their own). ``probe`` asks an endpoint whether it is
    ready; the Forwarder lends one that uses its HTTP client (:meth:`use_probe`)."""

    def __init__(
        self,
        policy: OutlierPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        probe: Probe | None = None,
    ) -> None:
        self.policy = policy or OutlierPolicy.from_settings(RouterSettings())
        self.counts = EjectionCounts()
        self._clock = clock
        self._probe = probe
        self._turn: dict[str, int] = {}
        self._health: dict[str, _Health] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def use_probe(self, probe: Probe) -> None:
        """Probe ejected endpoints with ``probe`` from now on, unless one was given already."""
        if self._probe is None:
            self._probe = probe

    # -- choosing ---------------------------------------------------------------------------------

    def live_endpoints(self, version: Version) -> list[str]:
        """The version's endpoints in rotation (not ejected), in the version's order."""
        now = self._clock()
        return [e for e in version.endpoints if self._is_live(e, now)]

    def ejected_endpoints(self) -> list[str]:
        """Every endpoint ejected now (for a gauge)."""
        return sorted(e for e, h in self._health.items() if h.out_until is not None)

    def choose(self, version: Version, avoid: str | None = None) -> str:
        """The next live endpoint; raises NoLiveEndpoint when every endpoint is ejected.

        With ``avoid`` (a retry), the first live endpoint after it; when there is none, ``avoid``
        itself: with a single endpoint (a Service address) the retry goes to the same address."""
        live = self.live_endpoints(version)
        if avoid is not None:
            others = [e for e in live if e != avoid]
            if not others:
                return avoid
            return _after(version.endpoints, avoid, others) if avoid in version.endpoints else others[0]
        if not live:
            raise NoLiveEndpoint(
                f"every runtime of version {version.name} failed recently and is being probed",
                retry_after=self._retry_after(version),
            )
        turn = self._turn.get(version.name, 0)
        self._turn[version.name] = turn + 1
        return live[turn % len(live)]

    def _is_live(self, endpoint: str, now: float) -> bool:
        health = self._health.get(endpoint)
        if health is None or health.out_until is None:
            return True
        if now >= health.out_until and endpoint not in self._tasks and not self._start_probe(endpoint):
            self._return(endpoint, health)  # nothing can probe it: back when its time is up
            return True
        return False

    def _retry_after(self, version: Version) -> float:
        """Seconds until the first of the version's endpoints may be back (at least 1)."""
        now = self._clock()
        health = [self._health.get(e) for e in version.endpoints]
        due = [h.out_until for h in health if h is not None and h.out_until is not None]
        soonest = min(due, default=now) - now
        return max(1.0, soonest + (self.policy.probe_timeout_s if soonest > 0 else 0.0))

    # -- outcomes ---------------------------------------------------------------------------------

    def connect_failed(self, endpoint: str) -> None:
        """An attempt could not connect to ``endpoint`` (refused, connect timeout)."""
        self._failed(endpoint, "connect")

    def timed_out(self, endpoint: str, budget_s: float) -> None:
        """An attempt that had ``budget_s`` got no (whole) answer from ``endpoint`` within it."""
        if budget_s >= self.policy.timeout_min_budget_s:
            self._failed(endpoint, "timeout")

    def bad_response(self, endpoint: str) -> None:
        """``endpoint`` answered, with something that could not be relayed (a 502 to the client)."""
        health = self._health.setdefault(endpoint, _Health())
        health.connect_failures = health.timeouts = 0  # it did answer
        self._failed(endpoint, "bad_response")

    def _failed(self, endpoint: str, cause: str) -> None:
        """One more failure of ``cause`` in a row; ejected once the policy's limit for it is reached
        (a limit of 0: never). Failures of an endpoint already out do not count."""
        health = self._health.setdefault(endpoint, _Health())
        if health.out_until is not None:
            return
        counter = _IN_A_ROW[cause]
        in_a_row = getattr(health, counter) + 1
        setattr(health, counter, in_a_row)
        if 0 < getattr(self.policy, counter) <= in_a_row:
            self._eject(endpoint, health, cause)

    def succeeded(self, endpoint: str) -> None:
        """``endpoint`` answered with something relayed (any status): the failures in a row end; an
        ejected one is back."""
        health = self._health.get(endpoint)
        if health is None:
            return
        if health.out_until is not None:
            self._return(endpoint, health)
        health.clear()

    def probed(self, endpoint: str, ready: bool) -> None:
        """A probe's outcome: back in rotation, or ejected again for twice as long."""
        health = self._health.get(endpoint)
        if health is None or health.out_until is None:
            return
        if ready:
            self._return(endpoint, health)
            return
        self.counts.probe_failures += 1
        self._eject(endpoint, health, None)

    def _eject(self, endpoint: str, health: _Health, cause: str | None) -> None:
        now = self._clock()
        if cause is not None:  # a new ejection, not a failed probe
            if now - health.returned_at >= self.policy.max_ejection_s:
                health.ejections = 0  # it stayed in long enough: the back-off is forgotten
            self.counts.ejections[cause] += 1
        doublings = min(health.ejections, _MAX_DOUBLINGS)
        health.ejections += 1
        duration = min(self.policy.max_ejection_s, self.policy.base_ejection_s * 2**doublings)
        health.out_until = now + duration
        health.clear()
        log.warning(
            "endpoint ejected" if cause else "endpoint still failing its probe",
            extra={"endpoint": endpoint, "cause": cause or "probe", "for_s": duration},
        )
        self._start_probe(endpoint)

    def _return(self, endpoint: str, health: _Health) -> None:
        health.out_until = None
        health.returned_at = self._clock()
        health.clear()
        self.counts.returns += 1
        log.info("endpoint back in rotation", extra={"endpoint": endpoint})

    # -- probing ----------------------------------------------------------------------------------

    def _start_probe(self, endpoint: str) -> bool:
        """Make sure a task will probe ``endpoint``; False when none can (no probe, no event loop)."""
        if endpoint in self._tasks:
            return True
        if self._probe is None:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        task = loop.create_task(self._probe_until_back(endpoint, self._probe), name=f"probe {endpoint}")
        self._tasks[endpoint] = task
        task.add_done_callback(lambda done: self._forget_task(endpoint, done))
        return True

    def _forget_task(self, endpoint: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(endpoint) is task:
            del self._tasks[endpoint]

    async def _probe_until_back(self, endpoint: str, probe: Probe) -> None:
        while (health := self._health.get(endpoint)) is not None and health.out_until is not None:
            delay = health.out_until - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                ready = await probe(endpoint)
            except RuntimeError:  # the HTTP client is closed: the router is stopping
                return
            self.probed(endpoint, ready)

    def table_changed(self, table: RoutingTable) -> None:
        """Forget endpoints that left the table (their pods are gone) and stop probing them."""
        current = {e for v in table.versions for e in v.endpoints}
        for endpoint in [e for e in self._health if e not in current]:
            del self._health[endpoint]
            task = self._tasks.pop(endpoint, None)
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """Stop every probe (before the HTTP client they use is closed)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _after(endpoints: tuple[str, ...], failed: str, usable: list[str]) -> str:
    """The first usable endpoint after ``failed`` in the version's order (wrapping round)."""
    start = endpoints.index(failed)
    for offset in range(1, len(endpoints) + 1):
        candidate = endpoints[(start + offset) % len(endpoints)]
        if candidate in usable:
            return candidate
    return usable[0]
