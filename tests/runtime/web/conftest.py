"""Fixtures of the edge's tests: both processes that share it, each with its real listener.

``start_edge(kind, **settings)`` starts ``server`` (an in-process ``captionfleet serve`` with the tiny
model) or ``router`` (an in-process ``captionfleet router`` with static routes to such a server), with
the given edge settings on the process under test, and returns its base URL. ``upstream_settings``
are the server's in both cases (the router's upstream), such as its job store.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from captionfleet.runtime.router.app import build_app
from captionfleet.runtime.server.lifecycle import Server
from captionfleet.runtime.web.listener import Listener
from captionfleet.settings.router import RouterSettings


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
        settings = RouterSettings(
            host="127.0.0.1", port=0, routes=(f"v1={upstream.url}",), drain_grace_s=0, **overrides
        )
        app = build_app(settings, rng=random.Random(7))
        listener = Listener(app, settings, close_timeout_s=1.0)
        await listener.start()
        listeners.append(listener)
        return Edge(kind, listener.url, app, upstream)

    yield start
    for listener in listeners:
        await listener.stop()
