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

from captionfleet.operator.figures import Prometheus, Wanted

LABELS = 'namespace="ml",captionmodel="demo",version="v2"'
Answer = Callable[[str], Any]  # a JSON body, or a str sent as it is


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
            if isinstance(body, str):  # not JSON at all
                return web.Response(text=body, content_type="text/html")
            failed = isinstance(body, dict) and body.get("status") not in (None, "success")
            return web.json_response(body, status=400 if failed else 200)

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


def sample(value: Any) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": value}]}}


GARBAGE = {
    "html": "<html>502 Bad Gateway</html>",
    "a list": [1, 2, 3],
    "no data": {"status": "success", "data": "nothing"},
    "result not a list": {"status": "success", "data": {"result": "x"}},
    "result items not objects": {"status": "success", "data": {"result": ["x"]}},
    "no value": {"status": "success", "data": {"result": [{"metric": {}}]}},
    "value not a pair": sample("12"),
    "value a number": sample([1, 12]),
    "value not a number": sample([1, "many"]),
    "infinite": sample([1, "+Inf"]),
    "negative": sample([1, "-3"]),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_a_prometheus_answering_garbage_means_no_figures_and_says_why(prometheus, garbage: Any) -> None:
    """No figures, never a crash or made-up ones (the check then holds: nothing is promoted)."""
    source, _ = await prometheus(lambda promql: garbage)
    reading = await source.read("ml", "demo", "v2", 60, Wanted(baseline="v1", shadow=True))
    assert reading.figures is None and reading.baseline is None
    assert len(reading.problems) == 1 and "Prometheus http://127.0.0.1:" in reading.problems[0]


async def test_garbage_in_a_single_series_spoils_the_whole_reading(prometheus) -> None:
    source, _ = await prometheus(lambda promql: sample([1, "oops"]) if "errors" in promql else vector("50"))
    reading = await source.read("ml", "demo", "v2", 60)
    assert reading.figures is None and "oops" in reading.problems[0]
