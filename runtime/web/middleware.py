"""The edge's middleware, the same in both processes: request id, deadline, body budget, errors, log.

For every request:

- **Request id**: the client's ``X-Request-Id`` when it is a sane token (1-128 of ``A-Z a-z 0-9 . _ : /
  + = @ -``), else a fresh one; set on the answer, on every log line (a context variable) and in every
  error body.
- **Deadline**: the process's ``request_timeout_ms`` from arrival, shortened by the client's
  ``X-Request-Timeout-Ms``. Handlers read it (``request[DEADLINE]``) for their own checks, which answer
  first; the edge's own timer, ``DEADLINE_BACKSTOP_S`` later, is the backstop for anything that does
  not check (a cache hit stuck behind a busy decoder pool, a slow body): past it the answer is 504,
  never a late 200. A handler that streams its answer stops the timer once the head is out
  (``context.head_sent``) and bounds the gaps between chunks itself.
- **Body budget**: ``request[BODY]``, the request's share of ``max_body_bytes_in_flight``, given back
  when the answer is ready. A client that sent ``Expect: 100-continue`` gets its ``100 Continue`` only
  once the declared size is checked and room for it taken (``protocol.defer_continue``), so a body
  over the limit gets its 413 (or a full server its 503) before the client sends it.
- **Errors**: every exception becomes the contract's JSON error (:func:`~captionfleet.runtime.web.errors.
  reply_for` with the process's table of domain errors); an answer that leaves part of the body unread
  closes the connection, so a refused upload is not read on.
- **499**: a client that went away cancels its handler; it is counted and logged as nginx's "client
  closed request".
- **Access log**: one line per request, DEBUG for the probes (polled every few seconds), WARNING for
  5xx, INFO for the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from captionfleet.names import REQUEST_ID_HEADER, ROUTED_VERSION_HEADER
from captionfleet.runtime.serving.errors import DeadlineExceeded
from captionfleet.runtime.web.body import BodyAllowance, BodyBudget
from captionfleet.runtime.web.coding import DECODED_CODINGS, content_coding
from captionfleet.runtime.web.context import (
    ARRIVED,
    BACKSTOP,
    BODY,
    CONTINUE_DEFERRED,
    DEADLINE,
    REQUEST_ID,
    ms_since,
)
from captionfleet.runtime.web.errors import InvalidRequest, StatusTable, UnsupportedMediaType, reply_for
from captionfleet.runtime.web.logs import request_id_var
from captionfleet.runtime.web.parsing import is_text
from captionfleet.runtime.web.protocol import EdgeProtocol, send_continue
from captionfleet.runtime.web.timeouts import client_timeout_ms
from captionfleet.settings.edge import EdgeSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


REQUEST_ID_RULE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
DEADLINE_BACKSTOP_S = 0.1

log = logging.getLogger("captionfleet.runtime.web")
ACCESS_LOG = logging.getLogger("captionfleet.runtime.web.access")


@dataclass(frozen=True)
class EdgePolicy:
    """What the edge needs of its process."""

    domain_statuses: StatusTable
    """The process's one table of domain errors -> statuses (the edge's own errors carry theirs)."""
    timeout_ms: float
    """The process's own deadline per request (0: none)."""
    budget: BodyBudget
    body_wait_s: float
    count: Callable[[str, int], None] = lambda route, status: None
    """Called with (route, status) for every answer, 499 included: the process's requests metric."""
    access_log: logging.Logger = ACCESS_LOG
    """The process's access logger (``captionfleet.runtime.server.access``, ``...router.access``)."""

    @classmethod
    def of(cls, settings: EdgeSettings, budget: BodyBudget, **process: Any) -> EdgePolicy:
        """The policy of a process with these edge settings; ``process``: the other fields."""
        return cls(
            timeout_ms=settings.request_timeout_ms,
            budget=budget,
            body_wait_s=settings.body_wait_ms / 1000,
            **process,
        )


def request_id_of(header: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    if header and REQUEST_ID_RULE.fullmatch(header):
        return header
    return uuid.uuid4().hex


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def edge_middleware(policy: EdgePolicy) -> Middleware:
    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[ARRIVED] = arrived = time.monotonic()
        request[REQUEST_ID] = request_id = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        request[DEADLINE] = float("inf")
        token = request_id_var.set(request_id)
        protocol = request.protocol if isinstance(request.protocol, EdgeProtocol) else None
        if protocol is not None:
            protocol.request_started()
        request[BODY] = allowance = BodyAllowance(policy.budget, policy.body_wait_s, None)
        if request.get(CONTINUE_DEFERRED):
            allowance.on_admitted = functools.partial(send_continue, request)
        route = route_of(request)
        try:
            try:
                response = await _answer(request, handler, policy)
            except asyncio.CancelledError:
                policy.count(route, 499)  # nginx's "client closed request"
                policy.access_log.info("client went away", extra={"route": route, "status": 499})
                raise
            response.headers[REQUEST_ID_HEADER] = request_id
            policy.count(route, response.status)
            _log_access(policy.access_log, request, route, response, arrived)
            return response
        finally:
            allowance.release()
            request_id_var.reset(token)
            if protocol is not None:
                protocol.request_finished()

    return edge


async def _answer(request: web.Request, handler: Handler, policy: EdgePolicy) -> web.StreamResponse:
    """The handler's answer under the request's deadline, or the contract's JSON error."""
    try:
        _check_framing(request)
        _check_content_type(request)
        _check_content_encoding(request)
        deadline = _deadline(request, policy.timeout_ms)
        request[DEADLINE] = request[BODY].deadline = deadline
        if deadline == float("inf"):
            return await handler(request)
        request[BACKSTOP] = backstop = asyncio.timeout(deadline + DEADLINE_BACKSTOP_S - time.monotonic())
        try:
            async with backstop:
                return await handler(request)
        except TimeoutError:
            if not backstop.expired():
                raise
            raise DeadlineExceeded("the request's deadline passed before it was answered") from None
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect or the like: aiohttp sends it as it is
        return _error(request, exc, policy)
    except Exception as exc:
        return _error(request, exc, policy)


CONTENT_CODINGS = frozenset({"identity", *DECODED_CODINGS})
"""The body codings the edge decodes (``web/coding.py``); any other is refused before the body is read."""


def _check_content_encoding(request: web.Request) -> None:
    coding = content_coding(request.headers)
    if coding not in CONTENT_CODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {coding[:40]!r} is not supported: send the body as it is, or gzip or "
            "deflate of it",
            code="unsupported_content_encoding",
        )


def _check_content_type(request: web.Request) -> None:
    """A ``Content-Type`` that is not UTF-8 text is refused before the body is read, by both processes:
    the router cannot forward its bytes (its HTTP client cuts the bytes that are not UTF-8 out, so it
    drops the header: ``proxy.forwarded_headers``), and the runtime behind it would then read the body
    as another type than a direct request's (a multipart body sniffed as a raw image: 415, not 400)."""
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    if content_type is not None and not is_text(content_type):
        raise InvalidRequest("Content-Type is not UTF-8 text", code="invalid_header")


UNFRAMED = "unsupported_transfer_encoding"


def _check_framing(request: web.Request) -> None:
    """A body framed only by ``Transfer-Encoding: chunked`` on HTTP/1.1 (RFC 9112 6.1). aiohttp takes
    ``gzip, chunked`` as chunked alone, and a coding it does not apply would pass for the body itself;
    HTTP/1.0 has no transfer codings, so their framing is faulty there. Refused before the body is read
    (the connection is closed: what follows on it cannot be framed)."""
    coding = request.headers.get(hdrs.TRANSFER_ENCODING)
    if coding is None:
        return
    if coding.strip().lower() != "chunked" or request.version < (1, 1):
        raise InvalidRequest(
            f"Transfer-Encoding {coding[:40]!r} is not supported: send the body with a Content-Length, or "
            "chunked (HTTP/1.1 only)",
            code=UNFRAMED,
        )


def _deadline(request: web.Request, timeout_ms: float) -> float:
    if route_of(request) in PROBE_ROUTES:
        return float("inf")  # probes answer at once; the kubelet has its own timeout
    limits = [t for t in (timeout_ms, client_timeout_ms(request.headers)) if t is not None and t > 0]
    return request[ARRIVED] + min(limits) / 1000 if limits else float("inf")


def _error(request: web.Request, error: BaseException, policy: EdgePolicy) -> web.Response:
    reply = reply_for(error, policy.domain_statuses)
    if reply.code == "internal_error":
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
    response = reply.response(request[REQUEST_ID])
    if not request.content.is_eof() or reply.code == UNFRAMED:
        response.force_close()  # do not read on a body the answer refused (or did not need)
    return response


def _log_access(
    access_log: logging.Logger,
    request: web.Request,
    route: str,
    response: web.StreamResponse,
    arrived: float,
) -> None:
    status = response.status
    level = logging.DEBUG if route in PROBE_ROUTES else logging.WARNING if status >= 500 else logging.INFO
    extra = {"route": route, "status": status, "latency_ms": ms_since(arrived)}
    version = response.headers.get(ROUTED_VERSION_HEADER)
    if version is not None:
        extra["version"] = version
    access_log.log(level, "%s %s %d", request.method, request.path, status, extra=extra)
