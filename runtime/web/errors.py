"""The contract's JSON error body, ``{"error": {"code": str, "message": str}, "request_id": str}``.

429 and 503 answers carry ``Retry-After`` in whole seconds, rounded up. Which domain error is which
status is each process's own table (``server/errors.py``, ``router/errors.py``); this module turns a
status table and an exception into the reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web


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


def status_in(table: Mapping[type[Exception], int], error: BaseException) -> int:
    """The status of ``error``'s nearest class in ``table``; 500 when none is listed."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return 500


def domain_reply(status: int, code: str, message: str, retry_after: float | None) -> ErrorReply:
    """A domain error's reply; every 503 tells the client when to retry (1 s unless the error says)."""
    if status == 503 and retry_after is None:
        retry_after = 1.0
    return ErrorReply(status, code, message, retry_after)


def aiohttp_reply(error: web.HTTPException) -> ErrorReply:
    """aiohttp's own answers (404 no such route, 405 wrong method, ...), in the contract's shape."""
    code = error.reason.lower().replace(" ", "_") if error.reason else "http_error"
    message = error.text if error.text and error.text != f"{error.status}: {error.reason}" else error.reason
    return ErrorReply(error.status, code, message or code)
