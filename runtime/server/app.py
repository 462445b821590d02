"""The runtime's aiohttp application: routes and thin handlers over the data plane.

Handlers admit (draining, readiness, API key, rate limit), parse, and call the data plane. Request
ids, deadlines, the body budget, JSON errors and the access log are the shared edge's
(``captionfleet.runtime.web``); which domain error is which status is ``server.errors``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from captionfleet.runtime.server.errors import DOMAIN_STATUSES
from captionfleet.runtime.server.jobs import add_job_routes
from captionfleet.runtime.server.openapi import openapi_document
from captionfleet.runtime.server.state import STATE, ServerState, admit, priority
from captionfleet.runtime.serving.batcher import Priority
from captionfleet.runtime.serving.service import CaptionResult, CaptionService
from captionfleet.runtime.serving.sources import ImageSource
from captionfleet.runtime.web.context import ARRIVED, BODY, DEADLINE, REQUEST_ID, ms_since
from captionfleet.runtime.web.errors import reply_for
from captionfleet.runtime.web.middleware import EdgePolicy, edge_middleware
from captionfleet.runtime.web.parsing import FormLimits, ParsedRequest, parse_request
from captionfleet.runtime.web.probes import add_probe_routes
from captionfleet.runtime.web.protocol import defer_continue


def _deadline(request: web.Request) -> float | None:
    """The request's deadline (the edge's: the server's timeout, shortened by the client's)."""
    deadline = request[DEADLINE]
    return None if deadline == float("inf") else deadline


async def _image_bytes(request: web.Request, source: ImageSource) -> bytes:
    if source.data is not None:
        return source.data
    assert source.url is not None
    return await request.app[STATE].fetcher.fetch(source.url, request[BODY])


async def _admitted(
    request: web.Request, state: ServerState, *, batch: bool
) -> tuple[CaptionService, Priority, ParsedRequest]:
    """The service that answers, the request's priority and its parsed body (after admission)."""
    service, _ = admit(request, state)
    level = priority(request)
    settings = state.settings
    limits = FormLimits(
        settings.max_body_bytes, settings.max_form_fields, settings.max_batch_images if batch else 1
    )
    parsed = await parse_request(request, limits, batch=batch)
    return service, level, parsed


def _observed_latency_ms(request: web.Request, state: ServerState, route: str) -> float:
    """The request's latency so far, recorded in the latency histogram of ``route``."""
    latency_ms = ms_since(request[ARRIVED])
    state.metrics.request_latency.labels(state.metrics.model, route).observe(latency_ms / 1000)
    return latency_ms


async def caption(request: web.Request) -> web.Response:
    state = request.app[STATE]
    with state.tracking():
        service, level, parsed = await _admitted(request, state, batch=False)
        options = service.resolve_options(parsed.fields)
        data = await _image_bytes(request, parsed.images[0])
        result = await service.caption(data, options, _deadline(request), level)
        if parsed.images[0].data is not None:  # sent, not fetched: the router can know it again
            await service.remember(parsed.fields, data, result)
        latency_ms = _observed_latency_ms(request, state, "/v1/caption")
        body = result.as_dict() | {"latency_ms": latency_ms, "request_id": request[REQUEST_ID]}
        return web.json_response(body)


async def caption_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    with state.tracking():
        service, level, parsed = await _admitted(request, state, batch=True)  # at most max_batch_images
        options = service.resolve_options(parsed.fields)
        deadline = _deadline(request)

        async def one(source: ImageSource) -> CaptionResult:
            return await service.caption(await _image_bytes(request, source), options, deadline, level)

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
                results.append(outcome.as_dict())
        latency_ms = _observed_latency_ms(request, state, "/v1/caption/batch")
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
    app.router.add_post("/v1/caption", caption, expect_handler=defer_continue)
    app.router.add_post("/v1/caption/batch", caption_batch, expect_handler=defer_continue)
    app.router.add_get("/v1/models", models)
    add_job_routes(app)
    add_probe_routes(app, state)
    app.router.add_get("/openapi.json", openapi)

    async def close_fetcher(_: web.Application) -> None:
        await state.fetcher.close()

    app.on_cleanup.append(close_fetcher)
    return app
