"""Raw HTTP for tests of the edge: requests no well-behaved client library would send; fake peers.

Hostile clients send bytes that aiohttp's client refuses to produce (non-UTF-8 headers, broken chunked
framing, headers one byte a second), so these helpers speak HTTP/1.1 over a plain socket and read the
answer back: the status, the headers and the body (by Content-Length, or to the end of the stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def _read_answer(reader: asyncio.StreamReader, *, bodyless: bool = False) -> RawAnswer:
    """The final answer (interim 1xx ones skipped); ``bodyless``: the answer to a HEAD, no body read."""
    status = 100
    while 100 <= status < 200:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the connection closed without an answer")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    if bodyless:
        return RawAnswer(status, headers, b"")
    length = headers.get("content-length")
    body = await reader.readexactly(int(length)) if length is not None else await reader.read()
    return RawAnswer(status, headers, body)


async def raw_exchange(
    url: str,
    pieces: Sequence[bytes],
    *,
    between: Callable[[], Awaitable[None]] | None = None,
    timeout_s: float = 30.0,
    bodyless: bool = False,
) -> RawAnswer:
    """Send ``pieces`` on one new connection (awaiting ``between()`` after each), then read the answer
    (``bodyless``: the head only, as for a HEAD request).

    Writing stops early, without error, once the server has closed its side: what it answered then is
    read and returned.
    """
    parts = urlsplit(url)
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        # Read while writing: a server that answers early and closes makes later writes fail, and the
        # stream then refuses to hand over what had arrived already.
        answer = asyncio.create_task(_read_answer(reader, bodyless=bodyless))
        try:
            for piece in pieces:
                if answer.done() or writer.is_closing():
                    break
                try:
                    writer.write(piece)
                    await writer.drain()
                except ConnectionError:
                    break
                if between is not None:
                    await between()
            return await answer
        finally:
            answer.cancel()
            writer.close()


def request_bytes(
    method: str, path: str, headers: Sequence[tuple[str, str | bytes]], body: bytes = b""
) -> bytes:
    """One HTTP/1.1 request; header values may be bytes (sent as they are)."""
    head = f"{method} {path} HTTP/1.1\r\n".encode()
    for name, value in headers:
        head += name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    return head + b"\r\n" + body


async def start_fake_peer(routes: Sequence[web.RouteDef], *, client_max_size: int = 1024**2) -> TestServer:
    """A real aiohttp server on a free loopback port answering ``routes``: a stand-in for a runtime
    or a job API that a test controls. The caller closes it; its base URL is ``base_url(server)``."""
    app = web.Application(client_max_size=client_max_size)
    app.add_routes(routes)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")
