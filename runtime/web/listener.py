"""Listening, and serving until signalled: the one loop of ``captionfleet serve`` and ``captionfleet router``.

:class:`Listener` runs an aiohttp application on a TCP port through aiohttp's public runner API, with
the edge's own connection handler (:class:`~captionfleet.runtime.web.protocol.EdgeProtocol`) and the
header limits of :class:`~captionfleet.settings.edge.EdgeSettings`. :func:`serve_until_signalled`
waits for SIGTERM or SIGINT (or for the process's own reason to stop, such as a model that failed to
load), runs the process's drain (readiness is already false by then; a second signal cuts it short),
then stops listening and gives the connections still open ``close_timeout_s`` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from captionfleet.runtime.web.protocol import EdgeProtocol, expectation_guard
from captionfleet.settings.edge import EdgeSettings

log = logging.getLogger("captionfleet.runtime.web")

LINGERING_S = 1.0
"""How long aiohttp reads on after an answer that left part of a body unread (its default is 10 s, in
which a client may push hundreds of MB at a refused request); then it closes the connection."""


class Listener:
    """One aiohttp application listening on ``settings.host``:``settings.port``."""

    def __init__(self, app: web.Application, settings: EdgeSettings, *, close_timeout_s: float) -> None:
        self.app = app
        self.settings = settings
        # handler_cancellation: a client that hangs up cancels its handler (and its place in a batch).
        self._runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, shutdown_timeout=close_timeout_s
        )
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen (OSError when the address is taken)."""
        await self._runner.setup()
        manager = self._runner.server
        assert manager is not None
        manager.request_handler = expectation_guard(manager.request_handler)
        settings = self.settings

        def connection() -> EdgeProtocol:
            return EdgeProtocol(
                manager,
                header_timeout_s=settings.header_timeout_ms / 1000,
                max_line_size=settings.max_header_bytes,
                max_field_size=settings.max_header_bytes,
                max_headers=settings.max_headers,
                lingering_time=LINGERING_S,
                auto_decompress=False,  # the edge decodes, strictly: web/coding.py
                access_log=None,
            )

        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                connection, settings.host, settings.port, reuse_address=True
            )
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening", extra={"host": settings.host, "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, let open requests finish within ``close_timeout_s``, close the rest (once)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await self._runner.cleanup()


async def serve_until_signalled(
    listener: Listener,
    *,
    drain: Callable[[asyncio.Event], Awaitable[None]],
    failed: asyncio.Future[None] | None = None,
) -> bool:
    """Serve until SIGTERM/SIGINT (True) or until ``failed`` resolves (False), then drain and stop.

    ``drain(cut_short)`` is the process's own: it finishes what it accepted within its grace period,
    or sooner when ``cut_short`` is set by another signal.
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    cut_short = asyncio.Event()

    def on_signal() -> None:
        (cut_short if signalled.is_set() else signalled).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    waiting = loop.create_task(signalled.wait())
    try:
        stops: list[asyncio.Future[Any]] = [waiting, *([failed] if failed is not None else [])]
        await asyncio.wait(stops, return_when=asyncio.FIRST_COMPLETED)
        by_signal = signalled.is_set()
        log.info("draining", extra={"reason": "signal" if by_signal else "failed to start"})
        await drain(cut_short)
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await listener.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return by_signal
