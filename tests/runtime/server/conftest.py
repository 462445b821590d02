"""Fixtures of the server's tests: a webhook receiver on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from captionfleet.runtime.server.testing import serve_app


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[bytes, dict[str, str]]]]]:
    """A webhook receiver on loopback that answers 500 to the first POST and 200 to the rest."""
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=500 if len(received) == 1 else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await serve_app(app)
    yield f"http://127.0.0.1:{port}/hook", received
    await runner.cleanup()
