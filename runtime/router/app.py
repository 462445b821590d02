"""The router's aiohttp application: the runtime's public API, proxied, plus the router's own endpoints.

Routes: ``POST /v1/caption`` and ``POST /v1/caption/batch`` (proxied to the version picked by the
routing table), ``GET /healthz``, ``GET /readyz`` (a version can take traffic and the router is not
draining), ``GET /metrics``, ``GET /v1/models`` (the routing table), ``GET /v1/router/stats`` (per-version
figures over a window, for the operator's rollout analysis) and ``GET /openapi.json`` (a runtime's API
description with the router's additions).

Every answer carries ``X-Request-Id``; a proxied one also ``X-Routed-Version``. The router's own errors
use the contract's JSON error body (``errors.py``); a runtime's answers are relayed as they are.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from captionfleet.runtime.router.errors import (
    BadUpstreamResponse,
    NoRoute,
    error_kind,
    error_response,
    status_of,
)
from captionfleet.runtime.router.kube import KubeAccess
from captionfleet.runtime.router.metrics import CONTENT_TYPE, NO_VERSION, RouterMetrics
from captionfleet.runtime.router.proxy import (
    REQUEST_ID_HEADER,
    Balancer,
    Forwarder,
    forwarded_headers,
    read_body,
)
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.router.startup import source_context
from captionfleet.runtime.router.stats import RouterStats
from captionfleet.runtime.router.table import RoutingTable
from captionfleet.runtime.serving.errors import InvalidRequest, ServingError
from captionfleet.runtime.serving.keys import ApiKeys
from captionfleet.runtime.web.logs import request_id_var
from captionfleet.runtime.web.timeouts import client_timeout_ms
from captionfleet.settings.router import RouterSettings

log = logging.getLogger(__name__)

USER_ID_HEADER = "X-User-Id"
ROUTED_VERSION_HEADER = "X-Routed-Version"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Router:
    """Everything one router process holds: settings, the table, figures, the HTTP client."""

    def __init__(
        self,
        settings: RouterSettings,
        holder: TableHolder,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.rng = rng or random.Random()
        self.stats = RouterStats(settings.stats_window_s, clock)
        self.metrics = RouterMetrics()
        self.keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)
        self.balancer = Balancer()
        self.draining = False
        self._forwarder: Forwarder | None = None
        holder.on_change(self._table_changed)

    def _table_changed(self, table: RoutingTable) -> None:
        self.metrics.table_changed(table, self.holder.updated_at)
        self.metrics.ready.set(int(self.ready))

    @property
    def ready(self) -> bool:
        return self.holder.table.routable and not self.draining

    def start_draining(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    @property
    def forwarder(self) -> Forwarder:
        if self._forwarder is None:
            raise RuntimeError("the router's HTTP client is not started")
        return self._forwarder

    def attach(self, session: aiohttp.ClientSession) -> None:
        self._forwarder = Forwarder(
            session,
            self.balancer,
            connect_timeout_s=self.settings.connect_timeout_ms / 1000,
            retry=self.settings.retry,
            max_response_bytes=self.settings.max_response_bytes,
        )

    def budget_s(self, request: web.Request) -> float:
        """The request's time budget: the router's, shortened by the client's X-Request-Timeout-Ms."""
        client_ms = client_timeout_ms(request.headers)
        budget_ms = self.settings.request_timeout_ms
        return (budget_ms if client_ms is None else min(budget_ms, client_ms)) / 1000

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        arrived = request[ARRIVED]
        request_id = request[REQUEST_ID]
        try:
            self.keys.authenticate(request.headers.get("X-API-Key"))
            deadline = arrived + self.budget_s(request)
            body = await read_body(request.content, request.content_length, self.settings.max_body_bytes)
            pick = self.holder.table.pick(request.headers.get(USER_ID_HEADER, "").strip() or None, self.rng)
            if pick is None:
                raise NoRoute("no model version can take traffic now", retry_after=1.0)
        except ServingError as exc:
            if isinstance(exc, NoRoute):
                self.stats.record_unrouted(_ms_since(arrived))
            self.metrics.requests.labels(version=NO_VERSION, code=str(status_of(exc))).inc()
            raise
        version = pick.version
        if pick.meant_for is not None:
            self.stats.record_fallback(pick.meant_for)
            self.metrics.fallbacks.labels(version=pick.meant_for).inc()
        retries = 0

        def on_retry(reason: str) -> None:
            nonlocal retries
            retries += 1
            self.metrics.retries.labels(version=version.name, reason=reason).inc()

        self.metrics.in_flight.inc()
        try:
            answer = await self.forwarder.forward(
                version,
                method=request.method,
                path_qs=request.rel_url.raw_path_qs,
                headers=forwarded_headers(request.headers, request.remote),
                body=body,
                request_id=request_id,
                deadline=deadline,
                on_retry=on_retry,
            )
        except ServingError as exc:
            self._count(version.name, status_of(exc), error_kind(exc), arrived, retries)
            return error_response(exc, request_id, {ROUTED_VERSION_HEADER: version.name})
        finally:
            self.metrics.in_flight.dec()
        self._count(
            version.name, answer.status, "status_5xx" if answer.status >= 500 else None, arrived, retries
        )
        response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
        response.headers[ROUTED_VERSION_HEADER] = version.name
        return response

    def _count(self, version: str, status: int, error: str | None, arrived: float, retries: int) -> None:
        latency_ms = _ms_since(arrived)
        self.stats.record(version, error=error, latency_ms=latency_ms, retries=retries)
        self.metrics.requests.labels(version=version, code=str(status)).inc()
        self.metrics.latency.labels(version=version).observe(latency_ms / 1000)
        if error is not None:
            self.metrics.errors.labels(version=version, kind=error).inc()


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


ROUTER = web.AppKey("router", Router)
REQUEST_ID = web.RequestKey("request_id", str)
ARRIVED = web.RequestKey("arrived", float)


def request_id_of(header: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    if header and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[ARRIVED] = time.monotonic()
    request_id = request[REQUEST_ID] = request_id_of(request.headers.get(REQUEST_ID_HEADER))
    token = request_id_var.set(request_id)
    try:
        try:
            response = await handler(request)
        except (ServingError, web.HTTPException) as exc:
            if isinstance(exc, web.HTTPException) and exc.status < 400:
                raise
            response = error_response(exc, request_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error", extra={"path": request.path})
            response = error_response(RuntimeError(), request_id)
        response.headers[REQUEST_ID_HEADER] = request_id
        if response.status >= 500 or request.path.startswith("/v1/caption"):
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "version": response.headers.get(ROUTED_VERSION_HEADER),
                    "ms": round(_ms_since(request[ARRIVED]), 2),
                },
            )
        return response
    finally:
        request_id_var.reset(token)


def build_app(
    settings: RouterSettings,
    *,
    holder: TableHolder | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    start_source: bool = True,
    access: KubeAccess | None = None,
) -> web.Application:
    """The router app. With ``start_source``, the table source that ``settings`` choose runs with the
    app (static routes are applied at once; a bad routes option or file raises TableError here)."""
    holder = holder or TableHolder()
    router = Router(settings, holder, rng=rng, clock=clock)
    app = web.Application(middlewares=[request_middleware], client_max_size=settings.max_body_bytes)
    app[ROUTER] = router
    app.cleanup_ctx.append(_client_session)
    if start_source:
        app.cleanup_ctx.append(source_context(settings, holder, access))
    app.router.add_post("/v1/caption", router.proxy)
    app.router.add_post("/v1/caption/batch", router.proxy)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/router/stats", stats)
    app.router.add_get("/openapi.json", openapi)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[ROUTER].settings
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Content-Type")
    ) as session:
        app[ROUTER].attach(session)
        log.info("router started", extra={"source": settings.source()})
        yield


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """The runtime's shape: ``{"ready": true, ...}``, or 503 with ``{"ready": false, "reason": ...}``."""
    router = request.app[ROUTER]
    table = router.holder.table
    if router.draining:
        return web.json_response({"ready": False, "reason": "draining"}, status=503)
    if not table.routable:
        reason = router.holder.last_error or f"no version of {table.source or 'the table'} can take traffic"
        return web.json_response({"ready": False, "reason": reason}, status=503)
    return web.json_response({"ready": True, "versions": [v.name for v in table.versions if v.routable]})


async def metrics(request: web.Request) -> web.StreamResponse:
    body = request.app[ROUTER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def models(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    holder = router.holder
    body: dict[str, Any] = {
        "models": holder.table.describe(),
        "ready": router.ready,
        "router": {
            "source": holder.table.source,
            "updated_at": round(holder.updated_at, 3),
            "updates": holder.updates,
            "last_error": holder.last_error,
        },
    }
    return web.json_response(body)


async def stats(request: web.Request) -> web.StreamResponse:
    """``?window=<seconds>`` (default 60, at most stats_window_s); ``?seconds=true`` adds the ring."""
    router = request.app[ROUTER]
    try:
        window = int(request.query.get("window", "60"))
    except ValueError:
        window = 0
    if window <= 0:
        raise InvalidRequest("window must be a whole number of seconds > 0", code="invalid_window")
    per_second = request.query.get("seconds", "false").lower() in ("1", "true", "yes")
    names = [v.name for v in router.holder.table.versions]
    return web.json_response(router.stats.snapshot(window, versions=names, per_second=per_second))


ROUTER_PATHS: dict[str, Any] = {
    "/v1/router/stats": {
        "get": {
            "summary": "Per-version requests, errors and latency over a recent window (the router only)",
            "parameters": [
                {
                    "name": "window",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                },
                {"name": "seconds", "in": "query", "required": False, "schema": {"type": "boolean"}},
            ],
            "responses": {"200": {"description": "Figures per version"}},
        }
    },
}


async def openapi(request: web.Request) -> web.StreamResponse:
    """A runtime's description of the API (the router serves the same one), plus the router's own paths."""
    router = request.app[ROUTER]
    pick = router.holder.table.pick(None, router.rng)
    if pick is None:
        raise NoRoute("no model version can take traffic now, and the API description comes from one")
    url = router.balancer.choose(pick.version) + "/openapi.json"
    timeout = aiohttp.ClientTimeout(total=router.settings.request_timeout_ms / 1000)
    try:
        async with router.forwarder.session.get(url, timeout=timeout) as response:
            if response.status != 200:
                raise BadUpstreamResponse(f"{url} answered {response.status}")
            document = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise BadUpstreamResponse(f"cannot read the API description from {url}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("paths"), dict):
        raise BadUpstreamResponse(f"{url} did not answer an OpenAPI document")
    document["paths"].update(ROUTER_PATHS)
    info = document.setdefault("info", {})
    if isinstance(info, dict):
        info["title"] = "captionfleet router"
    return web.json_response(document)
