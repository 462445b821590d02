"""The router's aiohttp application: the runtime's public API, proxied, plus the router's own endpoints.

Routes: ``POST /v1/caption`` and ``POST /v1/caption/batch`` (proxied to the version picked by the
routing table), the job API ``/v1/jobs*`` (``jobs.py``: to the version a job id names),
``GET /healthz``, ``GET /readyz`` (a version can take traffic and the router is not draining),
``GET /metrics``, ``GET /v1/models`` (the routing table), ``GET /v1/router/stats`` (per-version figures
over a window, for the operator's rollout analysis) and ``GET /openapi.json`` (a runtime's API
description with the router's additions).

Every answer carries ``X-Request-Id``; a proxied one also ``X-Routed-Version``. The router's own errors
use the contract's JSON error body (``errors.py``); a runtime's answers are relayed as they are, once
``relay.py`` found them a runtime's (else 502).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from captionfleet.names import API_KEY_HEADER, ROUTED_VERSION_HEADER, USER_ID_HEADER
from captionfleet.runtime.router.answers import AnswerObserver
from captionfleet.runtime.router.balancer import Balancer, OutlierPolicy
from captionfleet.runtime.router.cascade import Cascade
from captionfleet.runtime.router.coldstart import ColdStarts
from captionfleet.runtime.router.errors import DOMAIN_STATUSES, BadUpstreamResponse, NoRoute, error_kind
from captionfleet.runtime.router.jobs import JobRoutes
from captionfleet.runtime.router.kube import KubeAccess
from captionfleet.runtime.router.metrics import NO_VERSION, RouterMetrics
from captionfleet.runtime.router.proxy import Forwarder, Outgoing, UpstreamAnswer, outgoing_of
from captionfleet.runtime.router.repeats import RouterRepeats
from captionfleet.runtime.router.shadow import Shadower
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.router.startup import source_context
from captionfleet.runtime.router.stats import RouterStats
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.runtime.web.body import BodyBudget
from captionfleet.runtime.web.coding import read_decoded
from captionfleet.runtime.web.context import ARRIVED, BODY, REQUEST_ID
from captionfleet.runtime.web.errors import EdgeError, InvalidRequest, reply_for
from captionfleet.runtime.web.keys import KeyGuard
from captionfleet.runtime.web.middleware import EdgePolicy, edge_middleware
from captionfleet.runtime.web.parsing import FormLimits, priority_of
from captionfleet.runtime.web.probes import add_probe_routes
from captionfleet.runtime.web.protocol import defer_continue
from captionfleet.settings.router import RouterSettings

log = logging.getLogger(__name__)

Replier = Callable[[Outgoing, Callable[[str], None]], Awaitable[web.StreamResponse]]
"""Sends one request to a version (the retry callback counts second attempts) and builds the answer."""
Rewrite = Callable[[UpstreamAnswer], UpstreamAnswer]


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
        self.stats = RouterStats(settings.stats_window_s, clock, max_slots=settings.stats_max_slots)
        self.metrics = RouterMetrics()
        self.guard = KeyGuard.from_settings(settings)
        self.budget = BodyBudget(settings.max_body_bytes_in_flight)
        self.balancer = Balancer(OutlierPolicy.from_settings(settings))
        self.cold = ColdStarts(settings, holder, self.stats, self.metrics)
        limits = FormLimits(settings.max_body_bytes, settings.max_form_fields)
        self.repeats = RouterRepeats(settings.redis_url, limits) if settings.redis_url else None
        self.draining = False
        self._forwarder: Forwarder | None = None
        self.answers = AnswerObserver(settings, self.stats, self.metrics, self.rng, lambda: self.forwarder)
        self.cascade = Cascade.of(self, RouterStats(settings.stats_window_s, clock, settings.stats_max_slots))
        holder.on_change(self.cascade.table_changed)
        holder.on_change(self._table_changed)
        holder.on_change(self.balancer.table_changed)
        self.metrics.watch_balancer(self.balancer)
        self.metrics.watch_sources(holder)

    def _table_changed(self, table: RoutingTable) -> None:
        self.metrics.table_changed(table, self.holder.updated_at)
        self.metrics.ready.set(int(self.ready))

    @property
    def ready(self) -> bool:
        return self.holder.table.routable and not self.draining

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """The runtime's shape: ready with the versions that take traffic, or why not."""
        table = self.holder.table
        if self.draining:
            return False, {"reason": "draining"}
        if not table.routable:
            reason = self.holder.last_error or f"no version of {table.source or 'the table'} can take traffic"
            return False, {"reason": reason}
        live = [v.name for v in table.versions if v.cold or (v.routable and self.balancer.live_endpoints(v))]
        if not live:
            return False, {"reason": "every endpoint of every version is ejected (failing or hung)"}
        return True, {"versions": live}

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def start_draining(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    @property
    def shadower(self) -> Shadower:
        """The bounded background copier of shadow traffic (``answers.py``)."""
        return self.answers.shadower

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
            max_headers=self.settings.max_headers,
            max_header_bytes=self.settings.max_header_bytes,
        )

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/caption`` and ``/v1/caption/batch``: to the version of the user (``X-User-Id``),
        else a weighted random one."""
        body, bulk = await self.admit(request, self.settings.max_body_bytes)
        sticky = request.headers.get(USER_ID_HEADER, "").strip() or None
        if self.cascade.plan is not None:
            return await self.cascade.answer(request, body, sticky, bulk)
        version = self.pick(request, sticky, bulk=bulk)
        return await self.relay_caption(request, version, body, bulk, self.holder.table)

    async def relay_caption(
        self, request: web.Request, version: Version, body: bytes, bulk: bool, table: RoutingTable
    ) -> web.StreamResponse:
        """``version``'s answer to a caption request (``table``: where it was picked from); an
        interactive 200 answer is observed (confidence, shadow copies: ``answers.py``)."""
        reply = self.sent_to(version, self.buffered, caption_arrived=request[ARRIVED])
        response = await self.route(request, version, body, request.rel_url.raw_path_qs, reply, bulk)
        if not bulk and isinstance(response, web.Response) and isinstance(response.body, bytes):
            self.answers.answered(table, version, outgoing_of(request, body), response.status, response.body)
        return response

    async def admit(
        self, request: web.Request, limit: int, *, bulk: bool | None = None
    ) -> tuple[bytes, bool]:
        """The API key checked, then (``bulk`` None) the request's ``X-Priority`` read, then the whole body
        read (once, through the edge's budget: it may be sent twice): the body and whether the request
        is bulk, or the edge error, counted without a version. The key comes first, as in the runtime
        (``server/state.py`` ``admit``), so that both refuse a request with a wrong key and a bad
        priority for its key (401), not one for its priority (400)."""
        try:
            self.guard.authenticate(request.headers.get(API_KEY_HEADER), request.remote)
            if bulk is None:
                bulk = is_bulk(request)
            await request[BODY].reserve_declared(request.content_length, limit)
            return await read_decoded(request.headers, request.content, request[BODY], limit), bulk
        except EdgeError as exc:
            self.count_unrouted(exc, bulk=bool(bulk))
            raise

    def pick(self, request: web.Request, sticky: str | None, *, bulk: bool) -> Version:
        """The version for a request: sticky by ``sticky`` (a user id, or a key), by the table's weights."""
        pick = self.holder.table.pick(sticky, self.rng)
        if pick is None:
            error = NoRoute("no model version can take traffic now", retry_after=1.0)
            if not bulk:
                self.stats.record_unrouted(_ms_since(request[ARRIVED]))
            self.count_unrouted(error, bulk=bulk)
            raise error
        if pick.meant_for is not None:
            self.stats.record_fallback(pick.meant_for)
            self.metrics.fallbacks.labels(version=pick.meant_for).inc()
        return pick.version

    def count_unrouted(self, error: EdgeError, *, bulk: bool) -> None:
        counter = self.metrics.bulk_requests if bulk else self.metrics.requests
        counter.labels(version=NO_VERSION, code=str(error.status)).inc()

    async def route(
        self, request: web.Request, version: Version, body: bytes, path_qs: str, reply: Replier, bulk: bool
    ) -> web.StreamResponse:
        """The answer of ``version`` to the request sent on as ``path_qs`` with ``body``; the router's
        own errors in the contract's body. Counted in the version's figures (bulk apart)."""
        arrived = request[ARRIVED]
        retries = 0

        def on_retry(reason: str) -> None:
            nonlocal retries
            retries += 1
            self.metrics.retries.labels(version=version.name, reason=reason).inc()

        if not version.cold:  # a held request counts when its hold begins (coldstart.py)
            self.stats.touch(version.name)
        self.metrics.in_flight.inc()
        try:
            response = await reply(outgoing_of(request, body, path_qs), on_retry)
        except EdgeError as exc:
            self.count_answer(version.name, exc.status, error_kind(exc), arrived, retries, bulk)
            return reply_for(exc, DOMAIN_STATUSES).response(
                request[REQUEST_ID], {ROUTED_VERSION_HEADER: version.name}
            )
        finally:
            self.metrics.in_flight.dec()
        error = "status_5xx" if response.status >= 500 else None
        self.count_answer(version.name, response.status, error, arrived, retries, bulk)
        return response

    def sent_to(
        self, version: Version, replier: Callable[[Version], Replier], *, caption_arrived: float | None = None
    ) -> Replier:
        """``replier(version)``; for a cold version, once the request was held until the version has a
        ready pod (``coldstart.py``): never another version's. ``caption_arrived``: a caption request
        (arrived then), which may be an exact repeat answered from Redis instead (``repeats.py``)."""
        if not version.cold:
            return replier(version)

        async def reply(outgoing: Outgoing, on_retry: Callable[[str], None]) -> web.StreamResponse:
            if self.repeats is not None and caption_arrived is not None:
                kept = await self.repeats.answer(version.name, outgoing)
                if kept is not None:
                    body = kept | {"cached": True, "latency_ms": _ms_since(caption_arrived)}
                    body["request_id"] = outgoing.request_id
                    return web.json_response(body, headers={ROUTED_VERSION_HEADER: version.name})
            ready = await self.cold.hold(version.name, len(outgoing.body), outgoing.deadline)
            return await replier(ready)(outgoing, on_retry)

        return reply

    def buffered(self, version: Version, rewrite: Rewrite | None = None, *, once: bool = False) -> Replier:
        """Relays the runtime's whole answer (bounded by ``max_response_bytes``), ``rewrite`` applied;
        ``once``: a request never sent twice (``Forwarder.forward``)."""

        async def reply(outgoing: Outgoing, on_retry: Callable[[str], None]) -> web.StreamResponse:
            answer = await self.forwarder.forward(version, outgoing, on_retry, once=once)
            if rewrite is not None:
                answer = rewrite(answer)
            response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
            response.headers[ROUTED_VERSION_HEADER] = version.name
            return response

        return reply

    def count_answer(
        self, version: str, status: int, error: str | None, arrived: float, retries: int, bulk: bool
    ) -> None:
        """One answer of ``version`` (``status``; ``error``: its kind when it counts against the
        version) to a request that arrived at monotonic ``arrived`` after ``retries`` second attempts:
        in the version's live figures and metrics, or only as bulk (never part of its analysis)."""
        if bulk:
            self.stats.record_bulk(version)
            self.metrics.bulk_requests.labels(version=version, code=str(status)).inc()
            return
        latency_ms = _ms_since(arrived)
        self.stats.record(version, error=error, latency_ms=latency_ms, retries=retries)
        self.metrics.requests.labels(version=version, code=str(status)).inc()
        self.metrics.latency.labels(version=version).observe(latency_ms / 1000)
        if error is not None:
            self.metrics.errors.labels(version=version, kind=error).inc()


def is_bulk(request: web.Request) -> bool:
    """``X-Priority: bulk``: work that must never pass for interactive demand (400 for a value the
    runtime would refuse)."""
    return priority_of(request.headers) == "bulk"


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


ROUTER = web.AppKey("router", Router)


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
    policy = EdgePolicy.of(
        settings,
        router.budget,
        domain_statuses=DOMAIN_STATUSES,
        access_log=logging.getLogger("captionfleet.runtime.router.access"),
    )
    app = web.Application(middlewares=[edge_middleware(policy)], client_max_size=settings.max_body_bytes)
    app[ROUTER] = router
    app.cleanup_ctx.append(_client_session)
    if start_source:
        app.cleanup_ctx.append(source_context(settings, holder, access))
    app.router.add_post("/v1/caption", router.proxy, expect_handler=defer_continue)
    app.router.add_post("/v1/caption/batch", router.proxy, expect_handler=defer_continue)
    JobRoutes(router).add_to(app)
    add_probe_routes(app, router)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/router/stats", stats)
    app.router.add_get("/openapi.json", openapi)
    return app


NOT_ADDED = ("User-Agent", "Content-Type", "Accept", "Accept-Encoding")
"""Headers aiohttp's client would add to a forwarded request: the client's own (if any) go on instead;
each added line could take a request past the runtime's ``max_headers`` (``relay.py``)."""


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[ROUTER].settings
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=NOT_ADDED
    ) as session:
        app[ROUTER].attach(session)
        log.info("router started", extra={"source": settings.source()})
        yield
        await app[ROUTER].answers.close()  # copies still out, before the HTTP client they use
        await app[ROUTER].balancer.close()  # its probes, before the HTTP client they use
        repeats = app[ROUTER].repeats
        if repeats is not None:
            await repeats.close()


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
    if holder.table.cascade is not None:
        body["cascade"] = holder.table.cascade.describe()
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
    body = router.stats.snapshot(window, versions=names, per_second=per_second, held=router.cold.held)
    if router.cascade.plan is not None:
        body["cascade"] = router.cascade.figures.snapshot(window)
    return web.json_response(body)


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
    if pick is None or not pick.version.endpoints:
        raise NoRoute("no model version has a ready pod now, and the API description comes from one")
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
