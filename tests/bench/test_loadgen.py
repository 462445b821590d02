"""The load generator counts every request it sends, whatever the answer, and measures only the 200s."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from captionfleet.bench.loadgen import Payload, percentile, run_load

# The answers in arrival order, repeated: a mix of successes, errors and a dropped connection.
SCRIPT = ("ok", "cached", 503, "drop", 415, "ok", 400)


@pytest.fixture
async def scripted_url() -> AsyncIterator[str]:
    arrivals = itertools.count()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = SCRIPT[next(arrivals) % len(SCRIPT)]
        if answer == "drop":
            assert request.transport is not None
            request.transport.close()  # no HTTP answer at all
            return web.Response()
        if isinstance(answer, int):
            return web.json_response({"error": {"code": "scripted", "message": ""}}, status=answer)
        return web.json_response({"caption": "x", "cached": answer == "cached"})

    app = web.Application()
    app.router.add_post("/v1/caption", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/v1/caption"))
    await server.close()


async def test_every_request_is_counted_once_by_its_answer(scripted_url: str) -> None:
    count = 3 * len(SCRIPT) + 2  # not a multiple of the script: the tail matters too
    result = await run_load(scripted_url, [Payload(b"\xff\xd8\xff fake")], concurrency=4, count=count)

    expected = Counter(SCRIPT[i % len(SCRIPT)] for i in range(count))
    assert result.sent == count
    assert result.answered + sum(result.failures.values()) == count
    assert sum(result.failures.values()) == expected["drop"]
    assert result.statuses[200] == expected["ok"] + expected["cached"]
    assert result.statuses[503] == expected[503]
    assert result.statuses[415] == expected[415]
    assert result.statuses[400] == expected[400]
    assert result.cached == expected["cached"]
    assert len(result.latencies_s) == result.ok  # percentiles are over the 200s only
    assert result.throughput > 0 and math.isfinite(result.percentile_ms(99))
    summary = result.summary()
    assert summary["sent"] == count and summary["statuses"]["503"] == expected[503]


async def test_the_time_limit_stops_sending_but_counts_what_was_sent(scripted_url: str) -> None:
    result = await run_load(scripted_url, [Payload(b"x")], concurrency=2, count=10_000, max_seconds=0.0)
    assert result.sent == 0 and result.answered == 0 and math.isnan(result.percentile_ms(50))


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


async def test_runs_added_together_count_every_request_of_both(scripted_url: str) -> None:
    first = await run_load(scripted_url, [Payload(b"x")], concurrency=1, count=7)
    second = await run_load(scripted_url, [Payload(b"x")], concurrency=1, count=7)
    total = await run_load(scripted_url, [Payload(b"x")], concurrency=1, count=0)
    total.add(first)
    total.add(second)
    assert total.sent == 14 and total.answered == first.answered + second.answered == 12
    assert total.statuses == first.statuses + second.statuses
    assert total.failures == first.failures + second.failures
    assert sorted(total.latencies_s) == sorted(first.latencies_s + second.latencies_s)
    assert total.cached == 2 and total.elapsed_s >= first.elapsed_s + second.elapsed_s


async def test_the_warm_wave_sends_one_request_per_client_uncounted() -> None:
    """``warm_wave``: the server sees one request from every client before the counted ones, and the
    run counts only those (the connections opened by the wave are the ones the run uses)."""
    seen: list[tuple[int, int]] = []  # (arrival, client port)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        seen.append((len(seen), request.transport.get_extra_info("peername")[1]))
        return web.json_response({"caption": "x"})

    app = web.Application()
    app.router.add_post("/v1/caption", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/v1/caption"))
        result = await run_load(url, [Payload(b"x")], concurrency=3, count=7, warm_wave=True)
    finally:
        await server.close()
    assert result.sent == 7 and result.ok == 7 and len(result.latencies_s) == 7
    assert len(seen) == 3 + 7
    wave_ports = {port for _, port in seen[:3]}
    assert len(wave_ports) == 3  # one request per client
    assert {port for _, port in seen[3:]} <= wave_ports  # the run reuses the wave's connections
