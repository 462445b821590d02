"""The base of every error the project raises on purpose: a stable machine ``code`` and a message.

The engine's, the data plane's and the HTTP edge's errors all extend it, so whoever answers a client
reads one shape; only the edge's errors know their HTTP status. A class's code is its name in snake
case unless it says otherwise, so an error class is its name and its docstring. ``retry_after``
(seconds) is set where waiting and retrying is the right reaction (a full queue, a drain, a rate limit).
"""

from __future__ import annotations

import re


def snake_case(name: str) -> str:
    """``ImageTooLarge`` -> ``image_too_large``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class CodedError(Exception):
    """``code``: the class's own, else its name in snake case (``class QueueFull`` -> ``queue_full``)."""

    code: str = "error"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in vars(cls):
            cls.code = snake_case(cls.__name__)

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:
            self.code = code
