"""Fixtures shared by the runtime's tests: torch threads, real photos, real servers, a real Redis.

- ``one_torch_thread``, ``photos``: for the engine, training and evaluation tests.
- ``tiny_captioner``: a tiny random BLIP saved with save_pretrained and loaded for real (session-wide);
  its captions are gibberish but depend on the image.
- ``start_server``: an in-process server (the same :class:`Server` that ``captionfleet serve`` runs)
  on a free loopback port; drained at the end of the test.
- ``serve_process``: ``captionfleet serve`` as a subprocess, for signals and exit codes.
- ``redis_url``: a ``redis-server`` subprocess on a free port (Debian's package; ``make test``
  installs it).
- ``moderation_service``: a real moderation service (aiohttp on loopback) that blocks mostly-red images,
  and can be made slow, malformed or stopped.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import skimage.data
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.engine.loading import load_captioner
from captionfleet.runtime.server.lifecycle import Server
from captionfleet.runtime.server.testing import RedisProcess, ServeProcess
from captionfleet.settings.serve import ServeSettings

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
"""Real photos that ship with scikit-image (no download)."""


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small models on shared CPUs: torch's thread pool only adds spin-waiting (50x slower when the
    cores are busy), so these tests run single-threaded and put the setting back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for this test session."""
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield redis.url
    redis.stop()


StartServer = Callable[..., Awaitable[Server]]
StartProcess = Callable[..., ServeProcess]


@pytest.fixture(scope="session")
def tiny_captioner(tiny_model_dir: Path) -> Captioner:
    return load_captioner(str(tiny_model_dir))


def tiny_settings(model_dir: Path | str, **overrides: Any) -> ServeSettings:
    """Settings for test servers: loopback, any free port, short generation so CPU runs stay short."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "model": str(model_dir),
        "num_beams": 1,
        "max_new_tokens": 8,
        "preprocess_workers": 2,
        "drain_grace_s": 20.0,
        # The session shares one tiny captioner: no server may leave it a reference built from requests.
        "ood_reference_requests": 0,
    }
    values.update(overrides)
    return ServeSettings(**values)


@pytest.fixture
async def start_server(tiny_model_dir: Path, tiny_captioner: Captioner) -> AsyncIterator[StartServer]:
    """``await start_server(**settings)``: a started in-process server (the tiny model by default).

    Pass ``captioner=`` to serve another loaded model; every server is drained when the test ends.
    """
    started: list[Server] = []

    async def start(captioner: Captioner | None = None, **overrides: Any) -> Server:
        server = Server(tiny_settings(tiny_model_dir, **overrides), captioner=captioner or tiny_captioner)
        started.append(server)
        await server.start()
        return server

    yield start
    for server in started:
        if not server.state.draining:
            await server.drain()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[StartProcess]:
    """``serve_process(settings, env=None)``: ``captionfleet serve`` as a subprocess; killed at the end."""
    processes: list[ServeProcess] = []

    def start(settings: ServeSettings, env: dict[str, str] | None = None) -> ServeProcess:
        process = ServeProcess(settings, tmp_path / f"serve-{len(processes)}.log", env)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


@dataclass
class ModerationService:
    """A moderation service as the runtime expects one: it blocks images that are mostly red.

    It records what it received (content types, image sizes); ``answer`` replaces its verdict with any
    JSON value or raw bytes (a malformed service), ``status`` its HTTP status, ``slow`` makes it hold
    every call until the test ends."""

    server: TestServer
    url: str = ""
    content_types: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    answer: object = None
    status: int = 200
    slow: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def calls(self) -> int:
        return len(self.content_types)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = await request.read()
        self.content_types.append(request.content_type)
        image = Image.open(io.BytesIO(data))
        self.sizes.append(image.size)
        if self.slow:
            await self.released.wait()
        if isinstance(self.answer, bytes):
            return web.Response(body=self.answer, status=self.status, content_type="application/json")
        if self.answer is not None:
            return web.json_response(self.answer, status=self.status)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
        if red.mean() > 0.5:
            return web.json_response({"allowed": False, "reason": "mostly red"}, status=self.status)
        return web.json_response({"allowed": True, "reason": ""}, status=self.status)

    async def stop(self) -> None:
        self.released.set()
        await self.server.close()


@pytest.fixture
async def moderation_service() -> AsyncIterator[ModerationService]:
    app = web.Application()
    service = ModerationService(TestServer(app, host="127.0.0.1"))
    app.router.add_post("/v1/moderate", service.handle)
    await service.server.start_server()
    service.url = str(service.server.make_url("/v1/moderate"))
    yield service
    await service.stop()
