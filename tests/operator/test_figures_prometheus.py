"""The rollout's Prometheus figures source against an HTTP server speaking Prometheus' query API.

Prometheus itself cannot run here; the server below answers ``GET /api/v1/query`` in Prometheus' own
response format, from series it holds, and records the PromQL it was sent.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from captionfleet.operator.figures import Prometheus

LABELS = 'namespace="ml",captionmodel="demo",version="v2"'
Answer = Callable[[str], dict[str, Any]]


def vector(value: str) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, value]}]},
    }


EMPTY = {"status": "success", "data": {"resultType": "vector", "result": []}}


@pytest.fixture
async def prometheus() -> AsyncIterator[Callable[[Answer], Awaitable[tuple[Prometheus, list[str]]]]]:
    started: list[tuple[TestServer, aiohttp.ClientSession]] = []

    async def start(answer: Answer) -> tuple[Prometheus, list[str]]:
        queries: list[str] = []

        async def query(request: web.Request) -> web.Response:
            promql = request.query["query"]
            queries.append(promql)
            body = answer(promql)
            return web.json_response(body, status=200 if body.get("status") == "success" else 400)

        app = web.Application()
        app.router.add_get("/api/v1/query", query)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        session = aiohttp.ClientSession()
        started.append((server, session))
        return Prometheus(session, str(server.make_url("/"))), queries

    yield start
    for server, session in started:
        await session.close()
        await server.close()


async def test_counts_and_p99_come_from_the_routers_series(prometheus) -> None:
    def answer(promql: str) -> dict[str, Any]:
        if "histogram_quantile" in promql:
            return vector("0.25")
        if "upstream_errors_total" in promql:
            return vector("6.4")
        return vector("199.6")

    source, queries = await prometheus(answer)
    reading = await source.read("ml", "demo", "v2", 300)
    assert reading.problems == []
    assert reading.figures is not None
    assert (reading.figures.requests, reading.figures.errors, reading.figures.p99_ms) == (200, 6, 250.0)
    assert reading.figures.confidence == 1.0 and reading.figures.shadow is None  # no shadow asked for
    assert len(queries) == 5
    for promql in queries:
        assert "{" + LABELS + "}[300s]" in promql, promql
        assert re.search(
            r"captionfleet_router_(requests_total|upstream_errors_total|request_duration_seconds_bucket"
            r"|answer_confidence_(count|sum))",
            promql,
        )


async def test_no_series_yet_means_zero_requests_and_no_p99(prometheus) -> None:
    source, _ = await prometheus(lambda promql: vector("NaN") if "histogram_quantile" in promql else EMPTY)
    reading = await source.read("ml", "demo", "v2", 60)
    assert reading.figures is not None
    assert (reading.figures.requests, reading.figures.errors, reading.figures.p99_ms) == (0, 0, None)


async def test_a_prometheus_error_means_no_figures_and_says_why(prometheus) -> None:
    source, _ = await prometheus(
        lambda promql: {"status": "error", "errorType": "bad_data", "error": "parse error"}
    )
    reading = await source.read("ml", "demo", "v2", 60)
    assert reading.figures is None
    assert "parse error" in reading.problems[0]


async def test_an_unreachable_prometheus_means_no_figures() -> None:
    async with aiohttp.ClientSession() as session:
        reading = await Prometheus(session, "http://127.0.0.1:9").read("ml", "demo", "v2", 60)
    assert reading.figures is None and "Prometheus http://127.0.0.1:9" in reading.problems[0]
