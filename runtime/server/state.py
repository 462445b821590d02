"""What the runtime's handlers share: settings, metrics, guards, the data plane, and admission.

One module below the route modules (``app`` for captions, ``jobs`` for the job API), so each reads the
same state and admits requests by the same rule.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from captionfleet.names import API_KEY_HEADER
from captionfleet.runtime.server.fetch import UrlFetcher
from captionfleet.runtime.server.metrics import ServerMetrics
from captionfleet.runtime.serving.batcher import Priority
from captionfleet.runtime.serving.errors import Draining, NotReady
from captionfleet.runtime.serving.job_worker import JobWorker
from captionfleet.runtime.serving.jobs import JobStore
from captionfleet.runtime.serving.service import CaptionService
from captionfleet.runtime.web.body import BodyBudget
from captionfleet.runtime.web.keys import KeyGuard, RateLimiter
from captionfleet.runtime.web.parsing import priority_of
from captionfleet.settings.serve import ServeSettings


@dataclass
class ServerState:
    """What the handlers share: settings, the data plane (``None`` while the model loads), drain state."""

    settings: ServeSettings
    metrics: ServerMetrics
    guard: KeyGuard
    limiter: RateLimiter
    fetcher: UrlFetcher
    budget: BodyBudget
    service: CaptionService | None = None
    jobs: JobStore | None = None
    job_worker: JobWorker | None = None
    draining: bool = False
    load_error: str | None = None
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def ready(self) -> bool:
        return self.service is not None and self.service.ready and not self.draining

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.ready:
            assert self.service is not None
            return True, {"model_version": self.service.model_version}
        return False, {"reason": "draining" if self.draining else (self.load_error or "loading")}

    def render_metrics(self) -> bytes:
        self.metrics.ready.set(1 if self.ready else 0)
        return self.metrics.render()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Count a caption request as in flight (the drain waits for none to be left)."""
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.labels(self.metrics.model).set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.labels(self.metrics.model).set(self.in_flight)
            if self.in_flight == 0:
                self.idle.set()


STATE = web.AppKey("state", ServerState)


def admit(request: web.Request, state: ServerState) -> tuple[CaptionService, str]:
    """Raise unless this request may go on: not draining, model ready, key valid, within its rate.

    Returns the data plane and the key's id (``anonymous`` without keys)."""
    if state.draining:
        raise Draining("the server is shutting down; retry on another replica", retry_after=1.0)
    service = state.service
    if service is None or not service.ready:
        raise NotReady(state.load_error or "the model is still loading", retry_after=5.0)
    key_id = state.guard.authenticate(request.headers.get(API_KEY_HEADER), request.remote)
    state.limiter.acquire(key_id)
    return service, key_id


def priority(request: web.Request) -> Priority:
    """The request's ``X-Priority`` (interactive when absent)."""
    return Priority(priority_of(request.headers))
