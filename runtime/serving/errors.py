"""The data plane's domain errors, each with a stable machine ``code``.

The HTTP layer maps these classes (and the engine's) to statuses in one module
(``captionfleet.runtime.server.errors``); nothing here knows about HTTP. ``retry_after`` (seconds) is
set where waiting and retrying is the right reaction: a full queue, a drain, a rate limit.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error the data plane raises on purpose."""

    code: str = "serving_error"

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code


class InvalidRequest(ServingError):
    """The request is malformed: wrong field name, malformed JSON, bad base64, bad option types.

    ``code`` names the problem more precisely (``invalid_json``, ``missing_image``, ...)."""

    code = "invalid_request"


class PayloadTooLarge(ServingError):
    """The body (or a fetched URL's content) is larger than the configured limit."""

    code = "payload_too_large"


class UrlRefused(ServingError):
    """The image URL is not allowed: scheme, private address, too many redirects (SSRF guard)."""

    code = "url_refused"


class UrlFetchFailed(ServingError):
    """The image URL was allowed but could not be fetched: timeout, connection error, HTTP error."""

    code = "url_fetch_failed"


class Unauthorized(ServingError):
    """The API key is missing or unknown."""

    code = "unauthorized"


class RateLimited(ServingError):
    """The API key's token bucket is empty; ``retry_after`` says when the next token comes."""

    code = "rate_limited"


class QueueFull(ServingError):
    """The batcher's queue holds ``max_queue_size`` requests already."""

    code = "queue_full"


class Draining(ServingError):
    """The server is shutting down and takes no new work."""

    code = "draining"


class NotReady(ServingError):
    """The model is not loaded and warm yet."""

    code = "not_ready"


class DeadlineExceeded(ServingError):
    """The request's deadline (counting its time in the queue) passed before inference began."""

    code = "deadline_exceeded"


class InferenceFailed(ServingError):
    """The model call failed or returned the wrong number of results: a server fault, not the input's."""

    code = "inference_failed"
