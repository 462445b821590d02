"""Fixtures of the router tests: fake runtimes on loopback and the real router app in front of them.

A fake runtime is a small aiohttp app that answers like ``captionfleet serve`` (``model_version`` in the
JSON body, and the job API's shapes with a store of its own, as each version has) and records what it
received; a test scripts its answers (status codes, hanging until
released) to inject faults. Everything listens on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from captionfleet.runtime.router.app import build_app
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.web.listener import Listener
from captionfleet.runtime.web.testing import base_url, start_fake_peer
from captionfleet.settings.router import RouterSettings


@dataclass
class Received:
    path_qs: str
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    body: bytes


@dataclass
class FakeRuntime:
    """One fake runtime replica of a model version."""

    version: str
    url: str = ""
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 200s; 0: no answer
    hang: bool = False  # answer only when `release` is set
    release: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = True  # what GET /readyz says (200 or 503)
    probes: int = 0  # GET /readyz received
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # the version's job store
    result_lines: int = 3  # lines of every job's results
    line_gap: asyncio.Event | None = None  # set: the results wait for it between lines (cleared after each)
    die_after_lines: int | None = None  # the results connection is dropped after this many lines
    job_id_in_answer: bool = True
    drop_job_answers: bool = False  # the connection is closed once a submission is read: no answer
    confidences: list[float] = field(default_factory=list)  # answered in turn, then 0.9
    answer_delay_s: float = 0.0  # a slow model: each caption takes this long
    batch_results: list[dict[str, Any]] | None = None  # set: /v1/caption/batch answers these results

    async def create_job(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.rel_url.raw_path_qs, CIMultiDict(request.headers), body))
        if self.drop_job_answers and request.transport is not None:
            request.transport.close()
            return web.Response()
        job_id = uuid.uuid4().hex
        job = {"id": job_id, "status": "queued", "counts": {"total": 2, "done": 0, "failed": 0}}
        self.jobs[job_id] = {**job, "key": request.headers.get("X-API-Key")}
        shown = job if self.job_id_in_answer else {k: v for k, v in job.items() if k != "id"}
        return web.json_response(shown, status=202, headers={"Location": f"/v1/jobs/{job_id}"})

    def _job(self, request: web.Request) -> dict[str, Any] | None:
        self.received.append(Received(request.rel_url.raw_path_qs, CIMultiDict(request.headers), b""))
        job = self.jobs.get(request.match_info["job_id"])
        return job if job is not None and job["key"] == request.headers.get("X-API-Key") else None

    async def job_status(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        if job is None:
            error = {"error": {"code": "job_not_found", "message": "no such job"}, "request_id": ""}
            return web.json_response(error, status=404)
        if request.method == "DELETE":
            job["status"] = "cancelled"
        return web.json_response({k: v for k, v in job.items() if k != "key"})

    async def job_results(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        if job is None:
            return await self.job_status(request)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for index in range(self.result_lines):
            if index == self.die_after_lines and request.transport is not None:
                request.transport.close()
                return response
            if self.line_gap is not None:
                await self.line_gap.wait()
                self.line_gap.clear()
            line = {"index": index, "id": None, "result": {"caption": f"{self.version} {index} " + "x" * 200}}
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.rel_url.raw_path_qs, CIMultiDict(request.headers), body))
        request_id = request.headers.get("X-Request-Id", "")
        if self.hang:
            await self.release.wait()
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)  # the model's work, not a synchronisation
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 0 and request.transport is not None:  # the connection dropped, no answer
            request.transport.close()
            return web.Response()
        if status != 200:
            error = {"error": {"code": f"fake_{status}", "message": "scripted"}, "request_id": request_id}
            headers = {"Retry-After": "2"} if status in (429, 503) else {}
            return web.json_response(error, status=status, headers=headers)
        if self.batch_results is not None and request.path == "/v1/caption/batch":
            batch = {"results": self.batch_results, "model_version": self.version, "request_id": request_id}
            return web.json_response(batch)
        return web.json_response(
            {
                "caption": f"a caption by {self.version}",
                "confidence": self.confidences.pop(0) if self.confidences else 0.9,
                "suggestions": [],
                "model_version": self.version,
                "cached": False,
                "latency_ms": 1.0,
                "request_id": request_id,
                "echo_bytes": len(body),
            },
            headers={"X-Fake-Runtime": self.url},
        )

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        self.probes += 1
        if self.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": "scripted"}, status=503)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        document = {"openapi": "3.1.0", "info": {"title": "runtime"}, "paths": {"/v1/caption": {}}}
        return web.json_response(document)


StartRuntime = Callable[[str], Awaitable[FakeRuntime]]


@pytest.fixture
async def start_runtime() -> AsyncIterator[StartRuntime]:
    servers: list[tuple[FakeRuntime, TestServer]] = []

    async def start(version: str) -> FakeRuntime:
        runtime = FakeRuntime(version)
        routes = [
            web.post("/v1/caption", runtime.handle),
            web.post("/v1/caption/batch", runtime.handle),
            web.get("/openapi.json", runtime.openapi),
            web.get("/readyz", runtime.readyz),
            web.post("/v1/jobs", runtime.create_job),
            web.get("/v1/jobs/{job_id}", runtime.job_status),
            web.delete("/v1/jobs/{job_id}", runtime.job_status),
            web.get("/v1/jobs/{job_id}/results", runtime.job_results),
        ]
        server = await start_fake_peer(routes)
        runtime.url = base_url(server)
        servers.append((runtime, server))
        return runtime

    yield start
    for runtime, server in servers:
        runtime.release.set()
        await server.close()


@pytest.fixture
async def hung_url() -> AsyncIterator[str]:
    """A loopback URL that accepts connections and never answers (nor reads): a hung pod."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class RouterUnderTest:
    client: aiohttp.ClientSession
    url: str
    app: web.Application
    holder: TableHolder

    async def caption(self, **kwargs: Any) -> aiohttp.ClientResponse:
        kwargs.setdefault("data", b"\x89PNG fake image bytes")
        kwargs.setdefault("headers", {"Content-Type": "image/png"})
        response = await self.client.post(self.url + "/v1/caption", **kwargs)
        await response.read()
        return response

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.client.get(self.url + path) as response:
            return response.status, await response.json()

    async def figures(self, version: str, span: str = "total") -> dict[str, Any]:
        """One version's figures from ``GET /v1/router/stats``: since start (``total``) or ``window``."""
        status, stats = await self.get_json("/v1/router/stats")
        assert status == 200
        return dict(stats["versions"][version][span])

    async def scrape(self) -> dict[str, float]:
        """``GET /metrics`` as sample name (with its labels, as exposed) -> value."""
        async with self.client.get(self.url + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


StartRouter = Callable[..., Awaitable[RouterUnderTest]]

BASE = RouterSettings(
    host="127.0.0.1", port=0, request_timeout_ms=5000, connect_timeout_ms=500, drain_grace_s=0
)


@pytest.fixture
async def start_router() -> AsyncIterator[StartRouter]:
    """The real router app behind the real edge listener (the one ``captionfleet router`` runs)."""
    started: list[tuple[Listener, aiohttp.ClientSession]] = []

    async def start(*, seed: int = 7, **overrides: Any) -> RouterUnderTest:
        settings = replace(BASE, **overrides)
        holder = TableHolder()
        app = build_app(settings, holder=holder, rng=random.Random(seed))
        listener = Listener(app, settings, close_timeout_s=1.0)
        await listener.start()
        client = aiohttp.ClientSession()
        started.append((listener, client))
        return RouterUnderTest(client, listener.url, app, holder)

    yield start
    for listener, client in started:
        await client.close()
        await listener.stop()


Eventually = Callable[..., Awaitable[None]]


async def _eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0, what: str = ""
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def eventually() -> Eventually:
    """``await eventually(check, timeout_s=..., what=...)``: poll an async check until it is true or the
    deadline passes (a poll with a deadline, not a sleep as synchronisation)."""
    return _eventually
