"""The edge's errors and the contract's JSON error body, ``{"error": {"code", "message"}, "request_id"}``.

Two kinds of errors reach the edge:

- :class:`EdgeError` and its subclasses, raised by the HTTP layer itself (bad request bytes, keys, body
  limits, the router's upstream failures): each class carries its HTTP status and code, and an instance
  may carry ``retry_after`` (seconds).
- Domain errors of the data plane and the engine, which know nothing of HTTP: each process passes its
  one table of which domain error is which status (``server/errors.py``) to :func:`reply_for`.

Anything else is a 500 whose message hides the details (they go to the log with the request id).
Every 502, 503 and 429 answer carries ``Retry-After`` in whole seconds, rounded up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from captionfleet.errors import CodedError

StatusTable = Mapping[type[Exception], int]
"""Domain error class -> HTTP status; a subclass takes the status of its nearest listed class."""

RETRY_STATUSES = frozenset({429, 502, 503})
DEFAULT_RETRY_AFTER_S = 1.0


class EdgeError(CodedError):
    """Base of every error the HTTP edge raises on purpose: status and code by class.

    A subclass names its status in its header, ``class Unauthorized(EdgeError, status=401)``; without
    one it keeps its base's.
    """

    status: int = 400
    code: str = "bad_request"

    def __init_subclass__(cls, status: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status


class InvalidRequest(EdgeError, status=400):
    """The request is malformed: bad JSON, fields, headers or encoding; ``code`` names the problem."""


class UrlRefused(EdgeError, status=400):
    """The image URL is not allowed: scheme, private address, too many redirects (SSRF guard)."""


class UrlFetchFailed(EdgeError, status=400):
    """The image URL was allowed but could not be fetched: timeout, connection error, HTTP error."""


class Unauthorized(EdgeError, status=401):
    """The API key is missing or unknown."""


class RequestTimeout(EdgeError, status=408):
    """The client took too long to send its request (line and headers, or body)."""


class PayloadTooLarge(EdgeError, status=413):
    """The body (or a fetched URL's content) is larger than the configured limit."""


class UnsupportedMediaType(EdgeError, status=415):
    """The body is in a coding (``Content-Encoding``) the edge cannot decode."""


class RateLimited(EdgeError, status=429):
    """A token bucket is empty (the key's rate, or a client's failed key attempts)."""


class Overloaded(EdgeError, status=503):
    """The process holds as many request bytes as it may (``max_body_bytes_in_flight``)."""


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

    def response(self, request_id: str, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.json_response(
            self.body(request_id), status=self.status, headers={**self.headers(), **(headers or {})}
        )


INTERNAL = ErrorReply(500, "internal_error", "the server failed to handle this request (see its log)")


def status_in(table: StatusTable, error: BaseException) -> int | None:
    """The status of ``error``'s nearest class in ``table``; None when none is listed."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return None


def reply_for(error: BaseException, domain: StatusTable) -> ErrorReply:
    """The status, code, message and retry hint for any exception."""
    if isinstance(error, EdgeError):
        return _with_retry(ErrorReply(error.status, error.code, error.message, error.retry_after))
    status = status_in(domain, error)
    if status is not None and isinstance(error, CodedError):
        return _with_retry(ErrorReply(status, error.code, error.message, error.retry_after))
    if isinstance(error, web.HTTPException) and error.status >= 400:
        return aiohttp_reply(error)
    return INTERNAL


def _with_retry(reply: ErrorReply) -> ErrorReply:
    """Every 429/502/503 tells the client when to retry (1 s unless the error says)."""
    if reply.status in RETRY_STATUSES and reply.retry_after is None:
        return ErrorReply(reply.status, reply.code, reply.message, DEFAULT_RETRY_AFTER_S)
    return reply


def aiohttp_reply(error: web.HTTPException) -> ErrorReply:
    """aiohttp's own answers (404 no such route, 405 wrong method, ...), in the contract's shape."""
    code = error.reason.lower().replace(" ", "_") if error.reason else "http_error"
    message = error.text if error.text and error.text != f"{error.status}: {error.reason}" else error.reason
    return _with_retry(ErrorReply(error.status, code, message or code))
