"""The runtime's aiohttp application: routes and thin handlers over the data plane.

Handlers admit (draining, readiness, API key, rate limit), parse, and call the data plane. Request
ids, deadlines, the body budget, JSON errors and the access log are the shared edge's
(``captionfleet.runtime.web``); which domain error is which status is ``server.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from captionfleet.names import API_KEY_HEADER
from captionfleet.runtime.server.errors import DOMAIN_STATUSES
from captionfleet.runtime.server.fetch import UrlFetcher
from captionfleet.runtime.server.metrics import ServerMetrics
from captionfleet.runtime.server.openapi import openapi_document
from captionfleet.runtime.server.parsing import ImageSource, parse_request
from captionfleet.runtime.serving.errors import Draining, NotReady
from captionfleet.runtime.serving.service import CaptionResult, CaptionService
from captionfleet.runtime.web.body import BodyBudget
from captionfleet.runtime.web.context import ARRIVED, BODY, DEADLINE, REQUEST_ID, ms_since
from captionfleet.runtime.web.errors import InvalidRequest, reply_for
from captionfleet.runtime.web.keys import KeyGuard, RateLimiter
from captionfleet.runtime.web.middleware import EdgePolicy, edge_middleware
from captionfleet.runtime.web.probes import add_probe_routes
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


def _admit(request: web.Request, state: ServerState) -> CaptionService:
    """Raise unless this request may go on: not draining, model ready, key valid, within its rate."""
    if state.draining:
        raise Draining("the server is shutting down; retry on another replica", retry_after=1.0)
    service = state.service
    if service is None or not service.ready:
        raise NotReady(state.load_error or "the model is still loading", retry_after=5.0)
    key_id = state.guard.authenticate(request.headers.get(API_KEY_HEADER), request.remote)
    state.limiter.acquire(key_id)
    return service


def _deadline(request: web.Request) -> float | None:
    """The request's deadline (the edge's: the server's timeout, shortened by the client's)."""
    deadline = request[DEADLINE]
    return None if deadline == float("inf") else deadline


async def _image_bytes(request: web.Request, source: ImageSource) -> bytes:
    if source.data is not None:
        return source.data
    assert source.url is not None
    return await request.app[STATE].fetcher.fetch(source.url, request[BODY])


def _result_body(result: CaptionResult) -> dict[str, Any]:
    caption = result.caption
    body: dict[str, Any] = {
        "caption": caption.text,
        "confidence": caption.confidence,
        "suggestions": [{"text": s.text, "confidence": s.confidence} for s in caption.suggestions],
        "model_version": result.model_version,
        "cached": result.cached,
    }
    if caption.ood_score is not None:  # once the model has reference statistics (the contract)
        body |= {"ood_score": caption.ood_score, "in_distribution": caption.in_distribution}
    return body


async def caption(request: web.Request) -> web.Response:
    state = request.app[STATE]
    with state.tracking():
        service = _admit(request, state)
        parsed = await parse_request(request, max_body_bytes=state.settings.max_body_bytes, batch=False)
        options = service.resolve_options(parsed.fields)
        data = await _image_bytes(request, parsed.images[0])
        result = await service.caption(data, options, _deadline(request))
        latency_ms = ms_since(request[ARRIVED])
        state.metrics.request_latency.labels(state.metrics.model, "/v1/caption").observe(latency_ms / 1000)
        body = _result_body(result) | {"latency_ms": latency_ms, "request_id": request[REQUEST_ID]}
        return web.json_response(body)


async def caption_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    with state.tracking():
        service = _admit(request, state)
        parsed = await parse_request(request, max_body_bytes=state.settings.max_body_bytes, batch=True)
        if len(parsed.images) > state.settings.max_batch_images:
            raise InvalidRequest(
                f"{len(parsed.images)} images in one batch; the limit is {state.settings.max_batch_images}",
                code="too_many_images",
            )
        options = service.resolve_options(parsed.fields)
        deadline = _deadline(request)

        async def one(source: ImageSource) -> CaptionResult:
            return await service.caption(await _image_bytes(request, source), options, deadline)

        outcomes = await asyncio.gather(*(one(source) for source in parsed.images), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError) or not isinstance(failure, Exception):
                raise failure
        if failures and len(failures) == len(outcomes):
            raise failures[0]  # nothing to return: the first error speaks for the request
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                reply = reply_for(outcome, DOMAIN_STATUSES)
                results.append(
                    {"error": {"code": reply.code, "message": reply.message}, "status": reply.status}
                )
            else:
                results.append(_result_body(outcome))
        latency_ms = ms_since(request[ARRIVED])
        state.metrics.request_latency.labels(state.metrics.model, "/v1/caption/batch").observe(
            latency_ms / 1000
        )
        return web.json_response(
            {
                "results": results,
                "model_version": service.model_version,
                "latency_ms": latency_ms,
                "request_id": request[REQUEST_ID],
            }
        )


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    service = state.service
    if service is None:
        return web.json_response({"models": [], "ready": False, "reason": state.load_error or "loading"})
    return web.json_response({"models": [service.info()], "ready": state.ready})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(state: ServerState) -> web.Application:
    """The application; the body limits are enforced by the edge's streaming reads, not aiohttp's."""
    policy = EdgePolicy.of(
        state.settings,
        state.budget,
        domain_statuses=DOMAIN_STATUSES,
        count=lambda route, status: state.metrics.requests.labels(route, str(status)).inc(),
        access_log=logging.getLogger("captionfleet.runtime.server.access"),
    )
    app = web.Application(
        middlewares=[edge_middleware(policy)], client_max_size=state.settings.max_body_bytes
    )
    app[STATE] = state
    app.router.add_post("/v1/caption", caption)
    app.router.add_post("/v1/caption/batch", caption_batch)
    app.router.add_get("/v1/models", models)
    add_probe_routes(app, state)
    app.router.add_get("/openapi.json", openapi)

    async def close_fetcher(_: web.Application) -> None:
        await state.fetcher.close()

    app.on_cleanup.append(close_fetcher)
    return app
