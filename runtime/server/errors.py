"""The one place where domain errors become HTTP statuses and the contract's JSON error body.

The body and ``Retry-After`` rule are the shared ones (``runtime/web/errors.py``). Anything unexpected
is a 500 whose message hides the details (they go to the log with the request id).
"""

from __future__ import annotations

from aiohttp import web

from captionfleet.runtime.engine.errors import (
    EngineError,
    ImageTooLarge,
    InvalidImage,
    InvalidOptions,
    ModelLoadError,
    UnsupportedImageFormat,
)
from captionfleet.runtime.serving.errors import (
    DeadlineExceeded,
    Draining,
    InferenceFailed,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    ServingError,
    Unauthorized,
    UrlFetchFailed,
    UrlRefused,
)
from captionfleet.runtime.web.errors import ErrorReply, aiohttp_reply, domain_reply, status_in

STATUS_BY_ERROR: dict[type[Exception], int] = {
    # Bad input (400): the caller must change the request.
    InvalidImage: 400,
    ImageTooLarge: 400,  # too many pixels (decompression bomb guard); bytes over the limit are 413
    InvalidOptions: 400,
    InvalidRequest: 400,
    UrlRefused: 400,
    UrlFetchFailed: 400,
    Unauthorized: 401,
    PayloadTooLarge: 413,
    UnsupportedImageFormat: 415,
    RateLimited: 429,
    # The server's own state or faults.
    InferenceFailed: 500,
    ModelLoadError: 500,
    QueueFull: 503,
    Draining: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
}


def status_of(error: BaseException) -> int:
    return status_in(STATUS_BY_ERROR, error)


def reply_for(error: BaseException) -> ErrorReply:
    """The status, code, message and retry hint for any exception."""
    if isinstance(error, (ServingError, EngineError)):
        retry_after = error.retry_after if isinstance(error, ServingError) else None
        return domain_reply(status_of(error), error.code, error.message, retry_after)
    if isinstance(error, web.HTTPException):
        return aiohttp_reply(error)
    return ErrorReply(500, "internal_error", "the server failed to handle this request (see its log)")


def error_response(error: BaseException, request_id: str) -> web.Response:
    return reply_for(error).response(request_id)
