"""The data plane's domain errors, each with a stable machine ``code``.

The server maps these classes (and the engine's) to statuses in one module
(``captionfleet.runtime.server.errors``); nothing here knows about HTTP. ``retry_after`` (seconds) is
set where waiting and retrying is the right reaction: a full queue, a drain. The errors of the HTTP
edge itself (bad requests, keys, body limits) are ``captionfleet.runtime.web.errors``.
"""

from __future__ import annotations

from captionfleet.errors import CodedError


class ServingError(CodedError):
    """Base of every error the data plane raises on purpose."""


class QueueFull(ServingError):
    """The batcher's queue holds ``max_queue_size`` requests already."""


class Draining(ServingError):
    """The server is shutting down and takes no new work."""


class NotReady(ServingError):
    """The model is not loaded and warm yet."""


class DeadlineExceeded(ServingError):
    """The request's deadline (counting its time in the queue) passed before inference began."""


class InferenceFailed(ServingError):
    """The model call failed or returned the wrong number of results: a server fault, not the input's."""


class JobNotFound(ServingError):
    """No such job: never created, expired, or made with another API key (the same answer for each)."""

    code = "job_not_found"


class JobsUnavailable(ServingError):
    """The job API is not configured (no ``jobs_redis_url``), or its Redis does not answer."""

    code = "jobs_unavailable"


class ContentBlocked(ServingError):
    """The moderation service did not allow the image: it is never captioned. The message gives the
    service's reason."""


class ModerationUnavailable(ServingError):
    """The moderation service could not judge the image: down, slower than its timeout, or an answer
    that is not ``{"allowed": bool, "reason": str}``. Raised to the client under the ``Fail`` policy."""
