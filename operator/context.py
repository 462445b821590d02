"""The operator's typed context: what every handler needs, passed by kopf as its ``memo``.

kopf gives each handler a shallow copy of the memo it was started with, so the clients made at startup
and the per-CaptionModel locks and wake-ups are shared by every handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from captionfleet import names
from captionfleet.operator.analysis import Tools
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.demand import Polling
from captionfleet.operator.figures import RouterStats, Source
from captionfleet.operator.gate_run import GateClients
from captionfleet.operator.kube import Kube
from captionfleet.operator.metrics import OperatorMetrics
from captionfleet.operator.settings import OperatorSettings


@dataclass
class Clients:
    """Made at startup, closed at cleanup."""

    kube: Kube
    http: aiohttp.ClientSession
    figures: Source
    metrics: OperatorMetrics
    routers: RouterStats  # the demand poll always asks the routers themselves
    metrics_server: web.AppRunner | None = None


@dataclass
class OperatorContext:
    settings: OperatorSettings
    config: ClusterConfig
    clients: Clients | None = None
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # one reconciliation at a time per uid
    wakeups: dict[str, asyncio.Event] = field(default_factory=dict)  # a reconciliation wakes the daemon
    held_at: dict[tuple[str, str, str], float] = field(default_factory=dict)  # demand.Polling.held_at

    @classmethod
    def create(cls, settings: OperatorSettings) -> OperatorContext:
        return cls(settings, ClusterConfig.from_settings(settings))

    def require(self) -> Clients:
        if self.clients is None:
            raise RuntimeError("the operator's startup handler has not run")
        return self.clients

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def released(self, uid: str) -> AsyncIterator[None]:
        """Let the lock of ``uid`` go for a while (a quality gate run waiting on pods) and take it
        back after, even when cancelled meanwhile: the caller's ``async with`` then releases it."""
        lock = self.lock(uid)
        if not lock.locked():
            yield
            return
        lock.release()
        try:
            yield
        finally:
            taking = asyncio.ensure_future(lock.acquire())
            try:
                await asyncio.shield(taking)
            except asyncio.CancelledError:
                await taking  # held again before the cancellation goes on
                raise

    def wakeup(self, uid: str) -> asyncio.Event:
        return self.wakeups.setdefault(uid, asyncio.Event())

    def demand_wakeup(self, uid: str) -> asyncio.Event:
        """A reconciliation wakes the demand poll too (a spec may just have lowered a floor to 0)."""
        return self.wakeups.setdefault(f"{uid}/demand", asyncio.Event())

    def forget(self, uid: str) -> None:
        self.locks.pop(uid, None)
        self.wakeups.pop(uid, None)
        self.wakeups.pop(f"{uid}/demand", None)

    def tools(self) -> Tools:
        clients = self.require()
        kube = clients.kube

        async def version_pods(namespace: str, service: str) -> list[str]:
            return await kube.ready_endpoints(namespace, service, names.HTTP_PORT_NAME)

        gate = GateClients(clients.http, version_pods, self.config.operator_key)
        return Tools(kube, self.config, clients.figures, clients.metrics, gate, self.released)

    def polling(self) -> Polling:
        clients = self.require()
        fast_s = max(0.05, self.settings.demand_poll_ms / 1000)
        idle_s = self.settings.idle_poll_seconds
        return Polling(clients.kube, self.config, clients.routers, fast_s, idle_s, self.held_at)
