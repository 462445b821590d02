"""The base of every error the project raises on purpose: a stable machine ``code`` and a message.

The engine's, the data plane's and the HTTP edge's errors all extend it, so whoever answers a client
reads one shape; only the edge's errors know their HTTP status. ``retry_after`` (seconds) is set where
waiting and retrying is the right reaction (a full queue, a drain, a rate limit).
"""

from __future__ import annotations


class CodedError(Exception):
    code: str = "error"

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code
