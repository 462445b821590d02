"""The HTTP connection of both processes: aiohttp's, with the contract's JSON errors and a header timeout.

aiohttp answers what its own parser refuses (a request line or header over ``max_header_bytes``, too
many headers, broken chunked framing, bytes that are not HTTP; a ``Content-Encoding`` it cannot decode,
were its decoding on: the edge decodes, ``web/coding.py``) before any middleware runs, in plain text.
:class:`EdgeProtocol` answers them in the contract's JSON body, with
a fresh request id, and closes the connection as aiohttp does.

aiohttp also waits for a request's headers for ever: a client that sends them a byte a second holds a
connection (and its memory) as long as it likes (slowloris), and one that sends nothing at all is kept
for ever. Here a request's line and headers must arrive within ``header_timeout_s`` of the
connection's opening or of its first byte, else the client gets 408 and the connection is closed. The
clock starts when the connection opens, and when a byte arrives on a connection with no request in
progress, and stops when the edge's middleware sees the request (:meth:`EdgeProtocol.request_started`);
an idle keep-alive connection between requests is aiohttp's ``keepalive_timeout``'s business.

aiohttp answers an ``Expect`` other than ``100-continue`` before any middleware runs, in plain text
(and with a 500 when the value is not UTF-8): :func:`expectation_guard` answers it with the
contract's 417 instead. And aiohttp sends ``100 Continue`` as soon as the headers are in, so a client
is told to send a body the limit then refuses: routes that take a body use :func:`defer_continue`,
which leaves the ``100 Continue`` to the body's admission (``BodyAllowance.reserve_declared``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, hdrs, http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from captionfleet.runtime.web.context import CONTINUE_DEFERRED
from captionfleet.runtime.web.errors import INTERNAL, ErrorReply

log = logging.getLogger("captionfleet.runtime.web")

_PARSER_CODES: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "header_too_large"),
    (http_exceptions.ContentEncodingError, "unsupported_content_encoding"),
    (http_exceptions.TransferEncodingError, "invalid_chunked_encoding"),
    (http_exceptions.ContentLengthError, "invalid_content_length"),
    (http_exceptions.BadStatusLine, "invalid_request_line"),
    (http_exceptions.InvalidHeader, "invalid_header"),
    (http_exceptions.InvalidURLError, "invalid_url"),
)
_MAX_MESSAGE = 200


def parser_reply(status: int, error: BaseException | None) -> ErrorReply:
    """The contract's error for what aiohttp's HTTP parser refused (or an error outside any handler)."""
    if status >= 500 or error is None:
        return INTERNAL if status >= 500 else ErrorReply(status, "bad_request", HTTPStatus(status).phrase)
    code = next((c for cls, c in _PARSER_CODES if isinstance(error, cls)), "bad_request")
    if code == "unsupported_content_encoding":
        status = 415  # a coding aiohttp knows but cannot decode here (br, zstd without their library)
    if code == "bad_request" and "Too many headers" in str(error):
        code = "too_many_headers"
    message = getattr(error, "message", None) or str(error) or HTTPStatus(status).phrase
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return ErrorReply(status, code, f"the request is not valid HTTP: {message}")


def raw_response(reply: ErrorReply, request_id: str) -> bytes:
    """A whole HTTP/1.1 response with the JSON error body, for a connection that has no request."""
    body = json.dumps(reply.body(request_id)).encode()
    head = (
        f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class EdgeProtocol(RequestHandler):
    """aiohttp's request handler with JSON parser errors and a deadline for a request's headers."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_timer()  # a connection that never sends a byte is timed out too

    def data_received(self, data: bytes) -> None:
        if data:
            self._start_timer()
        super().data_received(data)

    def request_started(self) -> None:
        """The edge's middleware has the request: its headers came in time."""
        self._in_request = True
        self._stop_timer()

    def request_finished(self) -> None:
        self._in_request = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The JSON body of the contract instead of aiohttp's plain text; the connection is closed."""
        if status >= 500:
            log.error("error outside any handler", exc_info=exc)
        if request.writer.output_size > 0:  # as aiohttp: some of an answer is out, nothing else fits
            raise ConnectionError("a response was being sent already")
        request_id = uuid.uuid4().hex
        response = parser_reply(status, exc).response(request_id, {"X-Request-Id": request_id})
        response.force_close()
        return response

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_request or self.transport is None:
            return
        reply = ErrorReply(
            408, "request_timeout", f"the request's headers did not arrive within {self.header_timeout_s:g} s"
        )
        self.transport.write(raw_response(reply, uuid.uuid4().hex))
        self.force_close()

    def _start_timer(self) -> None:
        if self._header_timer is None and not self._in_request:
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def expectation_guard(handler: Handler) -> Handler:
    """``handler``, except for a request whose ``Expect`` is not ``100-continue`` (the only expectation
    HTTP defines, RFC 9110 10.1.1): that gets the contract's 417 with a fresh request id."""

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect is None or expect.strip().lower() == "100-continue" or request.version < (1, 1):
            return await handler(request)
        request_id = uuid.uuid4().hex
        reply = ErrorReply(417, "expectation_failed", "only 'Expect: 100-continue' is supported")
        response = reply.response(request_id, {"X-Request-Id": request_id})
        response.force_close()  # its body, if any, is not read
        return response

    return guarded


async def defer_continue(request: web.Request) -> None:
    """The ``expect_handler`` of a route that takes a body: ``Expect: 100-continue`` (the only one
    :func:`expectation_guard` lets through) is answered when the body is let in, not at once."""
    if request.version == HttpVersion11:
        request[CONTINUE_DEFERRED] = True


async def send_continue(request: web.Request) -> None:
    """``100 Continue``: the client may send its body now (as aiohttp's own expect handler sends it)."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # not a part of the answer: an error may still follow
