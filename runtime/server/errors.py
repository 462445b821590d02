"""The one place where the runtime's domain errors become HTTP statuses.

The data plane (``serving``) and the engine raise domain errors that know nothing of HTTP; this table
says which status each one is. The edge's own errors (bad requests, keys, body limits) carry their
status themselves, and the JSON body and ``Retry-After`` rule are the edge's
(``captionfleet.runtime.web.errors``). Anything not listed is a 500 whose message hides the details.
"""

from __future__ import annotations

from captionfleet.runtime.engine.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidOptions,
    ModelLoadError,
    UnsupportedImageFormat,
)
from captionfleet.runtime.serving.errors import (
    ContentBlocked,
    DeadlineExceeded,
    Draining,
    InferenceFailed,
    JobNotFound,
    JobsUnavailable,
    ModerationUnavailable,
    NotReady,
    QueueFull,
)
from captionfleet.runtime.web.errors import StatusTable

DOMAIN_STATUSES: StatusTable = {
    # Bad input (400): the caller must change the request.
    InvalidImage: 400,
    ImageTooLarge: 400,  # too many pixels (decompression bomb guard); bytes over the limit are 413
    InvalidOptions: 400,
    UnsupportedImageFormat: 415,
    JobNotFound: 404,
    ContentBlocked: 422,  # well-formed, but the moderation service refused it: resending will not help
    # The server's own state or faults.
    InferenceFailed: 500,
    ModelLoadError: 500,
    QueueFull: 503,
    Draining: 503,
    NotReady: 503,
    JobsUnavailable: 503,
    ModerationUnavailable: 503,  # under failurePolicy Fail; always with Retry-After
    DeadlineExceeded: 504,
}
