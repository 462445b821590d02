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

    code: str = "serving_error"


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


class ContentBlocked(ServingError):
    """The moderation service did not allow the image: it is never captioned. The message gives the
    service's reason."""

    code = "content_blocked"


class ModerationUnavailable(ServingError):
    """The moderation service could not judge the image: down, slower than its timeout, or an answer
    that is not ``{"allowed": bool, "reason": str}``. Raised to the client under the ``Fail`` policy."""

    code = "moderation_unavailable"
