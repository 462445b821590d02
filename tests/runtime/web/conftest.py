"""Fixtures of the edge's tests: both processes that share it, each with its real listener.

``start_edge(kind, **settings)`` starts ``server`` (an in-process ``captionfleet serve`` with the tiny
model) or ``router`` (an in-process ``captionfleet router`` with static routes to such a server), with
the given edge settings on the process under test, and returns its base URL. ``upstream_settings``
are the server's in both cases (the router's upstream), such as its job store.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.router.app import build_app
from captionfleet.runtime.server.lifecycle import Server
from captionfleet.runtime.web.listener import Listener
from captionfleet.settings.router import RouterSettings
from tests.runtime.conftest import tiny_settings

T = TypeVar("T")


@dataclass
class Edge:
    kind: str
    url: str
    app: web.Application
    upstream: Server | None = None


StartEdge = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def start_edge(start_server: Callable[..., Awaitable[Server]]) -> AsyncIterator[StartEdge]:
    listeners: list[Listener] = []

    async def start(kind: str, upstream_settings: dict[str, Any] | None = None, **overrides: Any) -> Edge:
        if kind == "server":
            server = await start_server(**{**(upstream_settings or {}), **overrides})
            return Edge(kind, server.url, server.listener.app)
        upstream = await start_server(**(upstream_settings or {}))
        listener = await start_router(upstream.url, **overrides)
        listeners.append(listener)
        return Edge(kind, listener.url, listener.app, upstream)

    yield start
    for listener in listeners:
        await listener.stop()


class LoopThread:
    """An event loop in a thread of its own, so that a synchronous test (hypothesis's) can drive servers
    that run on it: ``run(coroutine)`` waits for its result. ``close()`` stops the loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


@contextlib.contextmanager
def server_in_thread(
    model_dir: Path, captioner: Captioner, **overrides: Any
) -> Iterator[tuple[LoopThread, Server]]:
    """A started server with the tiny model and ``overrides`` on a :class:`LoopThread`; drained after."""
    loop = LoopThread()
    server = Server(tiny_settings(model_dir, **overrides), captioner=captioner)
    try:
        loop.run(server.start())
        yield loop, server
        loop.run(server.drain(), timeout_s=60)
    finally:
        loop.close()


async def start_router(upstream_url: str, **overrides: Any) -> Listener:
    """A started router (static routes: version ``v1`` at ``upstream_url``) on its real listener."""
    settings = RouterSettings(
        host="127.0.0.1", port=0, routes=(f"v1={upstream_url}",), drain_grace_s=0, **overrides
    )
    listener = Listener(build_app(settings, rng=random.Random(7)), settings, close_timeout_s=1.0)
    await listener.start()
    return listener
