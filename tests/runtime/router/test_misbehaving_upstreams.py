"""Runtimes that misbehave, seen from the router: a raw asyncio server answers what no runtime would.

Each answer the router cannot relay is the contract's JSON 502 (``bad_upstream_response``, with
``Retry-After``) or 504 (``deadline_exceeded``) carrying the client's request id, counted in the
version's figures (``bad_responses``, ``timeouts``), never a 500, a relayed redirect or a connection
left checked out of the router's pool (``relay.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from captionfleet.runtime.router.app import ROUTER
from captionfleet.runtime.web.testing import raw_exchange

OK_BODY = json.dumps(
    {"caption": "x", "confidence": 0.5, "suggestions": [], "model_version": "v1", "cached": False,
     "latency_ms": 1.0, "request_id": "the-runtime-s-own"}
).encode()  # fmt: skip
HOLD = None  # in a script: keep the connection open, send nothing more


def answer(status: int, body: bytes, extra: bytes = b"", content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %d Whatever\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        status,
        content_type,
        len(body),
    )
    return head + extra + b"\r\n" + body


def _chunked_past(limit: int) -> bytes:
    chunk = b"a" * 65536
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + (b"10000\r\n" + chunk + b"\r\n") * (limit // len(chunk) + 2) + b"0\r\n\r\n"


LIMIT = 256 * 1024  # the router's max_response_bytes in these tests
BAD = {  # answers the router must not relay: 502 bad_upstream_response
    "bytes that are not HTTP": [b"SSH-2.0-OpenSSH_9.6\r\n\r\n"],
    "a huge header block": [b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"],
    "500 headers": [b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 500 + b"Content-Length: 2\r\n\r\n{}"],
    "a Content-Length that is no number": [b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}"],
    "Content-Length and chunked": [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ],
    "broken chunk framing": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"],
    "closed mid-body": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"],
    "200 with HTML": [answer(200, b"<html>hi</html>", content_type=b"text/html")],
    "200 with a JSON list": [answer(200, b"[1, 2]")],
    "200 with broken JSON": [answer(200, b'{"caption": ')],
    "204 without a body": [b"HTTP/1.1 204 No Content\r\n\r\n"],
    "500 with HTML": [answer(500, b"<html>oops</html>", content_type=b"text/html")],
    "400 with a JSON error of another shape": [answer(400, b'{"detail": "bad"}')],
    "503 in plain text": [answer(503, b"upstream connect error", content_type=b"text/plain")],
    "101 switching protocols": [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", HOLD],
    "302 to elsewhere": [answer(302, b"", extra=b"Location: http://198.51.100.7/\r\n")],
    "304 not modified": [b"HTTP/1.1 304 Not Modified\r\n\r\n"],
    "status 999": [answer(999, OK_BODY)],
    "a chunked body past max_response_bytes": [_chunked_past(LIMIT), HOLD],
}  # fmt: skip
SLOW = {  # answers that never end within the budget: 504 deadline_exceeded
    "a Content-Length it does not send": [answer(200, OK_BODY)[:-10], HOLD],
    "a 102 and nothing after": [b"HTTP/1.1 102 Processing\r\n\r\n", HOLD],
    "no length, the connection kept open after the body": [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY,
        HOLD,
    ],
    "a body trickled slower than the deadline": ["trickle"],
}
GOOD = {  # odd but valid: relayed, with the client's request id in the body
    "a 100 before the 200": [b"HTTP/1.1 100 Continue\r\n\r\n" + answer(200, OK_BODY)],
    "HTTP/1.0, ended by closing": [b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY],
}


Script = list[Any]


@pytest.fixture
async def raw_runtime() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """``await raw_runtime(script)``: the URL of a fake runtime that reads each request's head and
    writes the script's pieces (``HOLD``: stays silent with the connection open; ``"trickle"``: a
    200 whose body comes a byte every 50 ms), then closes."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(script: Script) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            for piece in script:
                if piece is HOLD:
                    await asyncio.Event().wait()  # until the test ends and closes it
                elif piece == "trickle":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                    )
                    for _ in range(400):
                        writer.write(b" ")
                        await writer.drain()
                        await asyncio.sleep(0.05)  # the pace of the slow peer, not a synchronisation
                else:
                    writer.write(piece)
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()


async def _caption_through(start_router: Any, url: str, timeout_ms: float) -> tuple[Any, int, dict[str, Any]]:
    router = await start_router(
        routes=(f"v1={url}",), request_timeout_ms=timeout_ms, max_response_bytes=LIMIT
    )
    response = await router.caption(headers={"Content-Type": "image/png", "X-Request-Id": "client-7"})
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = json.loads(await response.read())
    assert response.headers["X-Request-Id"] == "client-7" and body["request_id"] == "client-7", body
    return router, response.status, body | {"retry-after": response.headers.get("Retry-After")}


def _no_connection_checked_out(router: Any) -> None:
    connector = router.app[ROUTER].forwarder.session.connector
    assert not connector._acquired  # a connection still checked out leaks: the pool never gets it back


OUTCOMES = {  # case -> (status, code, the figure it counts in)
    **{case: (502, "bad_upstream_response", "bad_responses") for case in BAD},
    **{case: (504, "deadline_exceeded", "timeouts") for case in SLOW},
}


@pytest.mark.parametrize("case", list(OUTCOMES))
async def test_an_answer_no_runtime_gives_is_a_json_502_or_504(
    start_router: Any, raw_runtime: Any, case: str
) -> None:
    status, code, figure = OUTCOMES[case]
    url = await raw_runtime({**BAD, **SLOW}[case])
    router, answered, body = await _caption_through(start_router, url, 1100)
    assert answered == status, body
    assert set(body["error"]) == {"code", "message"} and body["error"]["code"] == code
    if status == 502:
        assert int(body["retry-after"]) >= 1
    figures = await router.figures("v1")
    assert figures[figure] == 1 and figures["errors"] == 1, figures
    assert router.app[ROUTER].balancer.ejected_endpoints() == []  # one timeout, or an answer: still in
    _no_connection_checked_out(router)


@pytest.mark.parametrize("case", list(GOOD))
async def test_odd_but_valid_answers_are_relayed(start_router: Any, raw_runtime: Any, case: str) -> None:
    url = await raw_runtime(GOOD[case])
    router, status, body = await _caption_through(start_router, url, 1500)
    assert status == 200 and body["caption"] == "x", body
    _no_connection_checked_out(router)


@pytest.mark.parametrize("status", [400, 429, 503])
async def test_a_runtime_error_is_relayed_with_the_clients_request_id_and_a_retry_after(
    start_router: Any, raw_runtime: Any, status: int
) -> None:
    # A runtime's parser refuses a request before reading its id, and answers with one of its own;
    # a runtime (or a proxy beside it) may leave out Retry-After, which the contract requires.
    error = {"error": {"code": "too_many_headers", "message": "m"}, "request_id": "fresh-one"}
    url = await raw_runtime([answer(status, json.dumps(error).encode())])
    _, answered, body = await _caption_through(start_router, url, 1500)
    assert answered == status and body["error"] == error["error"]
    if status != 400:
        assert body["retry-after"] == "1"


async def test_job_results_cut_mid_body_never_look_complete(start_router: Any, raw_runtime: Any) -> None:
    lines = b"".join(json.dumps({"index": i, "id": None, "result": {}}).encode() + b"\n" for i in range(50))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n" % len(lines)
    url = await raw_runtime([head + lines[: len(lines) // 2]])
    router = await start_router(routes=(f"v1={url}",), request_timeout_ms=1500)
    async with router.client.get(router.url + "/v1/jobs/v1.abc/results") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    _no_connection_checked_out(router)


async def test_job_results_answered_with_a_redirect_are_a_json_502(
    start_router: Any, raw_runtime: Any
) -> None:
    url = await raw_runtime([answer(307, b"", extra=b"Location: http://198.51.100.7/\r\n")])
    router = await start_router(routes=(f"v1={url}",), request_timeout_ms=1500)
    async with router.client.get(router.url + "/v1/jobs/v1.abc/results", allow_redirects=False) as response:
        body = await response.json()
        assert response.status == 502 and body["error"]["code"] == "bad_upstream_response"
        assert "Location" not in response.headers


async def test_what_is_forwarded_is_the_clients_end_to_end_headers_and_an_origin_form_target(
    start_runtime: Any, start_router: Any
) -> None:
    runtime = await start_runtime("v1")
    router = await start_router(routes=(f"v1={runtime.url}",))
    request = (
        b"POST http://198.51.100.7/v1/caption?style=concise HTTP/1.1\r\nHost: 198.51.100.7\r\n"
        b"Content-Type: image/png\r\nContent-Length: 4\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\nX-User-Id: u1\r\n\r\nfake"
    )
    answer = await raw_exchange(router.url, [request])
    assert answer.status == 200, answer.body
    received = runtime.received[-1]
    assert received.path_qs == "/v1/caption?style=concise"  # never the absolute form's host
    assert received.headers["Host"] == runtime.url.split("//", 1)[1]
    assert "X-Secret-Hop" not in received.headers  # named in Connection: hop-by-hop (RFC 9110 7.6.1)
    assert received.headers["X-User-Id"] == "u1"
    for added in ("User-Agent", "Accept", "Accept-Encoding"):  # not the HTTP client's own
        assert added not in received.headers


async def test_a_runtime_that_keeps_answering_garbage_is_ejected_and_its_200_probe_does_not_bring_it_back(
    start_router: Any, raw_runtime: Any, eventually: Any
) -> None:
    # Its port answers every request, /readyz included, with a 200 in HTML: a broken pod behind a
    # proxy, say. Three such answers in a row take it out; a probe wants a runtime's {"ready": true}.
    broken = await raw_runtime(BAD["200 with HTML"])
    good = await raw_runtime([answer(200, OK_BODY)])
    router = await start_router(
        routes=(f"v1={broken}", f"v1={good}"), outlier_base_ejection_s=0.2, outlier_max_ejection_s=1.0
    )
    balancer = router.app[ROUTER].balancer
    statuses = [(await router.caption()).status for _ in range(5)]  # round robin: broken, good, ...
    assert statuses == [502, 200, 502, 200, 502]
    assert balancer.ejected_endpoints() == [broken]
    assert balancer.counts.ejections["bad_response"] == 1

    async def probed_and_refused() -> bool:
        return balancer.counts.probe_failures >= 2

    await eventually(probed_and_refused, timeout_s=20, what="failed probes of the broken runtime")
    assert balancer.ejected_endpoints() == [broken] and balancer.counts.returns == 0
    assert [(await router.caption()).status for _ in range(6)] == [200] * 6
    figures = await router.figures("v1")
    assert figures["bad_responses"] == 3 and figures["requests"] == 11
    async with router.client.get(router.url + "/metrics") as scraped:
        text = await scraped.text()
    assert 'captionfleet_router_endpoint_ejections_total{cause="bad_response"} 1.0' in text


async def test_a_busy_runtimes_503s_never_eject_it(start_router: Any, raw_runtime: Any) -> None:
    busy = {"error": {"code": "overloaded", "message": "queue full"}, "request_id": "r"}
    url = await raw_runtime([answer(503, json.dumps(busy).encode(), extra=b"Retry-After: 1\r\n")])
    router = await start_router(routes=(f"v1={url}",))
    for _ in range(6):
        response = await router.caption()
        assert response.status == 503 and (await response.json())["error"]["code"] == "overloaded"
    assert router.app[ROUTER].balancer.ejected_endpoints() == []
