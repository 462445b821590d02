"""The router's domain errors and the one place where errors become HTTP statuses and the contract's
JSON error body: ``{"error": {"code": str, "message": str}, "request_id": str}``.

It mirrors ``captionfleet.runtime.server.errors`` (same body, same ``Retry-After`` rule, and it reuses
the data plane's error classes for the shared cases) so the two can merge into one module; the router
may not import the server, which is its sibling layer. Answers relayed from a runtime are not errors of
the router and pass through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiohttp import web

from captionfleet.runtime.serving.errors import (
    DeadlineExceeded,
    InvalidRequest,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)


class NoRoute(ServingError):
    """No version can take traffic: no routing table yet, every weight 0, or no ready endpoints."""

    code = "no_route"


class UpstreamUnreachable(ServingError):
    """The version's runtimes refused or dropped the connection, on the retry too."""

    code = "upstream_unreachable"


class BadUpstreamResponse(ServingError):
    """The runtime's answer could not be relayed: cut short, or larger than ``max_response_bytes``."""

    code = "bad_upstream_response"


class UpstreamTimeout(DeadlineExceeded):
    """The request's budget was spent before the runtime answered."""


STATUS_BY_ERROR: dict[type[Exception], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    PayloadTooLarge: 413,
    UpstreamUnreachable: 502,
    BadUpstreamResponse: 502,
    NoRoute: 503,
    DeadlineExceeded: 504,
}

# What each error counts as in the per-version figures (stats.py); the rest are not the version's fault.
ERROR_KIND: dict[type[Exception], str] = {
    UpstreamUnreachable: "connect_failures",
    UpstreamTimeout: "timeouts",
    BadUpstreamResponse: "bad_responses",
}


@dataclass(frozen=True)
class ErrorReply:
    status: int
    code: str
    message: str
    retry_after: float | None = None

    def body(self, request_id: str) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}, "request_id": request_id}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def status_of(error: BaseException) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_kind(error: BaseException) -> str | None:
    """The stats field an error of a routed request counts under, or None."""
    for cls in type(error).__mro__:
        if cls in ERROR_KIND:
            return ERROR_KIND[cls]
    return None


def reply_for(error: BaseException) -> ErrorReply:
    """The status, code, message and retry hint for any exception."""
    if isinstance(error, ServingError):
        status = status_of(error)
        retry_after = error.retry_after
        if status == 503 and retry_after is None:
            retry_after = 1.0
        return ErrorReply(status, error.code, error.message, retry_after)
    if isinstance(error, web.HTTPException):
        # aiohttp's own answers (404 no such route, 405 wrong method, ...), in our JSON shape.
        code = error.reason.lower().replace(" ", "_") if error.reason else "http_error"
        message = (
            error.text if error.text and error.text != f"{error.status}: {error.reason}" else error.reason
        )
        return ErrorReply(error.status, code, message or code)
    return ErrorReply(500, "internal_error", "the router failed to handle this request (see its log)")


def error_response(
    error: BaseException, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    reply = reply_for(error)
    return web.json_response(
        reply.body(request_id), status=reply.status, headers={**reply.headers(), **(headers or {})}
    )
