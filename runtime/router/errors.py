"""The router's domain errors and the one place where errors become HTTP statuses and the contract's
JSON error body: ``{"error": {"code": str, "message": str}, "request_id": str}``.

The body and ``Retry-After`` rule are shared with the runtime server (``runtime/web/errors.py``), and
the data plane's error classes serve the shared cases. Answers relayed from a runtime are not errors of
the router and pass through unchanged.
"""

from __future__ import annotations

from aiohttp import web

from captionfleet.runtime.serving.errors import (
    DeadlineExceeded,
    InvalidRequest,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)
from captionfleet.runtime.web.errors import ErrorReply, aiohttp_reply, domain_reply, status_in


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


def status_of(error: BaseException) -> int:
    return status_in(STATUS_BY_ERROR, error)


def error_kind(error: BaseException) -> str | None:
    """The stats field an error of a routed request counts under, or None."""
    for cls in type(error).__mro__:
        if cls in ERROR_KIND:
            return ERROR_KIND[cls]
    return None


def reply_for(error: BaseException) -> ErrorReply:
    """The status, code, message and retry hint for any exception."""
    if isinstance(error, ServingError):
        return domain_reply(status_of(error), error.code, error.message, error.retry_after)
    if isinstance(error, web.HTTPException):
        return aiohttp_reply(error)
    return ErrorReply(500, "internal_error", "the router failed to handle this request (see its log)")


def error_response(
    error: BaseException, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    return reply_for(error).response(request_id, headers)
