"""The router's own errors: edge errors, each carrying its status (``captionfleet.runtime.web.errors``).

Answers relayed from a runtime are not errors of the router and pass through unchanged.
"""

from __future__ import annotations

from captionfleet.runtime.serving.errors import DeadlineExceeded
from captionfleet.runtime.web.errors import EdgeError, StatusTable


class NoRoute(EdgeError, status=503):
    """No version can take traffic: no routing table yet, every weight 0, or no live endpoints."""


class UpstreamUnreachable(EdgeError, status=502):
    """The version's runtimes refused or dropped the connection, on the retry too."""


class BadUpstreamResponse(EdgeError, status=502):
    """The runtime's answer could not be relayed: cut short, larger than ``max_response_bytes``, or not
    what a runtime answers (``relay.py``)."""


class UpstreamTimeout(EdgeError, status=504):
    """The request's budget was spent before the runtime answered."""

    code = "deadline_exceeded"


class ColdStart(EdgeError, status=503):
    """A request for a version without a ready pod that cannot be held (too many held, too many bytes
    held) or was held for ``cold_start_timeout_ms`` in vain; its ``Retry-After`` is an estimate of the
    time left until the version is ready."""


class HeldPastDeadline(EdgeError, status=504):
    """The request's own deadline passed while it was held for its version's first pod (not the
    version's fault: not counted as its timeout)."""

    code = "deadline_exceeded"


class UnknownJob(EdgeError):
    """A job id that names no version of the routing table (or is not one the router gave out): the
    runtime's own answer for a job it does not have, with its code."""

    status = 404
    code = "job_not_found"


DOMAIN_STATUSES: StatusTable = {DeadlineExceeded: 504}
"""The data plane's errors the router meets: the edge's deadline backstop."""

# What each error counts as in the per-version figures (stats.py); the rest are not the version's fault.
ERROR_KIND: dict[type[Exception], str] = {
    UpstreamUnreachable: "connect_failures",
    UpstreamTimeout: "timeouts",
    BadUpstreamResponse: "bad_responses",
}


def error_kind(error: BaseException) -> str | None:
    """The stats field an error of a routed request counts under, or None."""
    for cls in type(error).__mro__:
        if cls in ERROR_KIND:
            return ERROR_KIND[cls]
    return None
