"""The aiohttp application: routes, the request-context middleware and thin handlers.

Handlers admit (draining, readiness, API key, rate limit), parse, and call the data plane; every
exception becomes the contract's JSON error in the middleware, through ``server.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from captionfleet.runtime.server.errors import error_response, reply_for
from captionfleet.runtime.server.fetch import UrlFetcher
from captionfleet.runtime.server.metrics import CONTENT_TYPE, ServerMetrics
from captionfleet.runtime.server.openapi import openapi_document
from captionfleet.runtime.server.parsing import ImageSource, parse_request
from captionfleet.runtime.serving.errors import Draining, InvalidRequest, NotReady
from captionfleet.runtime.serving.keys import ApiKeys, RateLimiter
from captionfleet.runtime.serving.service import CaptionResult, CaptionService
from captionfleet.runtime.web.logs import request_id_var
from captionfleet.runtime.web.timeouts import client_timeout_ms
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger("captionfleet.runtime.server")
access_log = logging.getLogger("captionfleet.runtime.server.access")

_REQUEST_ID = re.compile(r"^[\w.:/+=@-]{1,128}$")
ARRIVED = web.RequestKey("arrived", float)
REQUEST_ID = web.RequestKey("request_id", str)


@dataclass
class ServerState:
    """What the handlers share: settings, the data plane (``None`` while the model loads), drain state."""

    settings: ServeSettings
    metrics: ServerMetrics
    keys: ApiKeys
    limiter: RateLimiter
    fetcher: UrlFetcher
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


def _request_id(header: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def request_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Request id, JSON errors, the requests counter and the access log, for every route."""
    request_id = _request_id(request.headers.get("X-Request-Id"))
    token = request_id_var.set(request_id)
    request[REQUEST_ID] = request_id
    request[ARRIVED] = time.monotonic()
    metrics = request.app[STATE].metrics
    route = _route(request)
    try:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            metrics.requests.labels(route, "499").inc()  # nginx's "client closed request"
            access_log.info("client went away", extra={"route": route, "status": 499})
            raise
        except Exception as exc:
            reply = reply_for(exc)
            if reply.status >= 500 and reply.code == "internal_error":
                log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(exc, request_id)
        response.headers["X-Request-Id"] = request_id
        metrics.requests.labels(route, str(response.status)).inc()
        access_log.log(
            _access_level(route, response.status),
            "%s %s %d",
            request.method,
            request.path,
            response.status,
            extra={"route": route, "status": response.status, "latency_ms": _elapsed_ms(request)},
        )
        return response
    finally:
        request_id_var.reset(token)


PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Polled every few seconds by kubelet and Prometheus: their lines go to DEBUG, not to every log."""


def _access_level(route: str, status: int) -> int:
    if route in PROBE_ROUTES:
        return logging.DEBUG
    return logging.WARNING if status >= 500 else logging.INFO


def _elapsed_ms(request: web.Request) -> float:
    return round((time.monotonic() - request[ARRIVED]) * 1000, 3)


def _admit(request: web.Request, state: ServerState) -> CaptionService:
    """Raise unless this request may go on: not draining, model ready, key valid, within its rate."""
    if state.draining:
        raise Draining("the server is shutting down; retry on another replica", retry_after=1.0)
    service = state.service
    if service is None or not service.ready:
        raise NotReady(state.load_error or "the model is still loading", retry_after=5.0)
    key_id = state.keys.authenticate(request.headers.get("X-API-Key"))
    state.limiter.acquire(key_id)
    return service


def _deadline(request: web.Request, service: CaptionService) -> float | None:
    """The request's deadline: the server's timeout, shortened by the client's ``X-Request-Timeout-Ms``."""
    return service.deadline(request[ARRIVED], client_timeout_ms(request.headers))


async def _image_bytes(state: ServerState, source: ImageSource) -> bytes:
    if source.data is not None:
        return source.data
    assert source.url is not None
    return await state.fetcher.fetch(source.url)


def _result_body(result: CaptionResult) -> dict[str, Any]:
    caption = result.caption
    return {
        "caption": caption.text,
        "confidence": caption.confidence,
        "suggestions": [{"text": s.text, "confidence": s.confidence} for s in caption.suggestions],
        "model_version": result.model_version,
        "cached": result.cached,
    }


async def caption(request: web.Request) -> web.Response:
    state = request.app[STATE]
    with state.tracking():
        service = _admit(request, state)
        parsed = await parse_request(request, max_body_bytes=state.settings.max_body_bytes, batch=False)
        options = service.resolve_options(parsed.fields)
        data = await _image_bytes(state, parsed.images[0])
        result = await service.caption(data, options, _deadline(request, service))
        latency_ms = _elapsed_ms(request)
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
        deadline = _deadline(request, service)

        async def one(source: ImageSource) -> CaptionResult:
            return await service.caption(await _image_bytes(state, source), options, deadline)

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
                reply = reply_for(outcome)
                results.append(
                    {"error": {"code": reply.code, "message": reply.message}, "status": reply.status}
                )
            else:
                results.append(_result_body(outcome))
        latency_ms = _elapsed_ms(request)
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


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.ready:
        assert state.service is not None
        return web.json_response({"ready": True, "model_version": state.service.model_version})
    reason = "draining" if state.draining else (state.load_error or "loading")
    return web.json_response({"ready": False, "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.ready.set(1 if state.ready else 0)
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(state: ServerState) -> web.Application:
    """The application; the body limit is enforced by our own streaming reads, not aiohttp's."""
    app = web.Application(middlewares=[request_context], client_max_size=state.settings.max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/caption", caption)
    app.router.add_post("/v1/caption/batch", caption_batch)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)

    async def close_fetcher(_: web.Application) -> None:
        await state.fetcher.close()

    app.on_cleanup.append(close_fetcher)
    return app
