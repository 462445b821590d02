"""Hostile clients, third round: framing, header and connection attacks on both processes.

Each must get one clear answer in the contract's JSON with the client's own request id (where it sent
a usable one), never two requests read out of one (smuggling), never a ``100 Continue`` for a body the
limit refuses; and the process stays healthy.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest

from captionfleet.runtime.server.testing import encode, shapes_image
from captionfleet.runtime.web.testing import raw_exchange, request_bytes
from tests.runtime.web.test_hostile import EDGE_KINDS, assert_contract_error, still_healthy

StartEdge = Any  # tests/runtime/web/conftest.py: start_edge(kind, upstream_settings=None, **settings)
IMAGE = encode(shapes_image(1))
PNG = [("Content-Type", "image/png"), ("Content-Length", str(len(IMAGE)))]


async def read_all_answers(url: str, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends on one connection after ``data``, until it closes it (or the
    timeout: then what came so far)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                received += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return received


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("count", [124, 125, 126, 127, 128, 129])
async def test_a_request_near_max_headers_gets_one_answer_with_its_own_request_id(
    start_edge: StartEdge, kind: str, count: int
) -> None:
    # Was, through the router: 125-128 headers passed it, the runtime refused the forwarded request
    # (the router's own headers on top) with a 400 whose request_id was a fresh one.
    edge = await start_edge(kind)
    headers = [("Host", "x"), *PNG, ("X-Request-Id", "mine-1")]
    headers += [(f"X-Extra-{i}", "v") for i in range(count - len(headers))]
    answer = await raw_exchange(edge.url, [request_bytes("POST", "/v1/caption", headers, IMAGE)])
    if count > 128:  # the parser's own refusal, before the request id is read
        assert_contract_error(answer, 400, "too_many_headers")
    elif answer.status == 200:
        assert answer.json()["request_id"] == "mine-1"
    else:  # the router's headers on top would pass max_headers: its own 400, with the client's id
        assert kind == "router" and count > 124
        assert assert_contract_error(answer, 400, "too_many_headers")["request_id"] == "mine-1"
    if kind == "server" or count <= 124:
        assert answer.status == (200 if count <= 128 else 400)
    assert answer.headers["x-request-id"] == answer.json()["request_id"]


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("size", [8170, 8180, 8185, 8190])
async def test_an_x_forwarded_for_near_max_header_bytes_gets_one_answer_with_its_own_request_id(
    start_edge: StartEdge, kind: str, size: int
) -> None:
    edge = await start_edge(kind)
    chain = ("10.0.0.1," * 1000)[:size]  # no trailing space (the parser would strip it)
    headers = [("Host", "x"), *PNG, ("X-Request-Id", "mine-2"), ("X-Forwarded-For", chain)]
    answer = await raw_exchange(edge.url, [request_bytes("POST", "/v1/caption", headers, IMAGE)])
    if kind == "server" or size + len(", 127.0.0.1") <= 8190:
        assert answer.status == 200, answer.body
    else:
        assert_contract_error(answer, 400, "header_too_large")
    assert answer.json()["request_id"] == "mine-2" == answer.headers["x-request-id"]


SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
FRAMINGS = {
    "Transfer-Encoding then Content-Length": b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "Content-Length then Transfer-Encoding": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "gzip, chunked": b"Transfer-Encoding: gzip, chunked\r\n",
    "gzip,<tab>chunked": b"Transfer-Encoding: gzip,\tchunked\r\n",
    "chunked twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "chunked, identity": b"Transfer-Encoding: chunked, identity\r\n",
    "two Content-Lengths": b"Content-Length: 5\r\nContent-Length: 6\r\n",
    "a Content-Length list": b"Content-Length: 5, 5\r\n",
    "a space before the colon": b"Transfer-Encoding : chunked\r\n",
    "an obs-fold continuation": b"Transfer-Encoding: gzip\r\n chunked\r\n",
    "NUL in a value": b"X-User-Id: a\x00b\r\n",
    "CR in a value": b"X-User-Id: a\rb\r\n",
    "a bare LF line end": b"X-User-Id: a\n",
    "a header name with a slash": b"X/User: a\r\n",
}


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("framing", list(FRAMINGS))
async def test_ambiguous_framing_and_malformed_header_lines_are_refused_and_never_split(
    start_edge: StartEdge, kind: str, framing: str
) -> None:
    # Was: "gzip, chunked" (and gzip,<tab>chunked) taken as chunked alone, the gzip ignored.
    edge = await start_edge(kind)
    head = b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + FRAMINGS[framing]
    received = await read_all_answers(edge.url, head + b"\r\n0\r\n\r\n" + SMUGGLED)
    assert received.count(b"X-Request-Id: ") == 1, received  # one answer: the smuggled GET is never read
    assert received[8:13] == b" 400 ", received[:200]
    assert b'"request_id"' in received and b"application/json" in received
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_transfer_encoding_on_http_1_0_is_refused(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind)
    data = (
        b"POST /v1/caption HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    answer = await raw_exchange(edge.url, [data])
    assert_contract_error(answer, 400, "unsupported_transfer_encoding")


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_expect_100_continue_over_the_limit_is_a_413_before_any_continue(
    start_edge: StartEdge, kind: str
) -> None:
    # Was: "100 Continue" at once, so the client sent the body; the 413 came after.
    edge = await start_edge(kind, max_body_bytes=1024 * 1024)
    head = request_bytes(
        "POST",
        "/v1/caption",
        [
            ("Host", "x"),
            ("Content-Type", "image/png"),
            ("Expect", "100-continue"),
            ("Content-Length", "5000000"),
        ],
    )
    received = await read_all_answers(edge.url, head)
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert b"100 Continue" not in received
    accepted = request_bytes("POST", "/v1/caption", [("Host", "x"), *PNG, ("Expect", "100-continue")])
    parts = urlsplit(edge.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(accepted)
        async with asyncio.timeout(5):
            assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
            assert await reader.readline() == b"\r\n"
            writer.write(IMAGE)
            assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_odd_request_targets_get_a_json_answer(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind)
    absolute = request_bytes("POST", "http://198.51.100.7/v1/caption", [("Host", "x"), *PNG], IMAGE)
    answer = await raw_exchange(edge.url, [absolute])  # RFC 9112 3.2.2: a server accepts absolute-form
    assert answer.status == 200, answer.body
    for request in (
        b"CONNECT 198.51.100.7:443 HTTP/1.1\r\nHost: 198.51.100.7:443\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host: RFC 9112 3.2 says 400
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ):
        answer = await raw_exchange(edge.url, [request])
        body = assert_contract_error(answer, answer.status)
        assert 400 <= answer.status < 500, (request, answer.status)
        assert answer.headers["x-request-id"] == body["request_id"]
    old = b"POST /v1/caption HTTP/1.0\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(IMAGE)
    answer = await raw_exchange(edge.url, [old + IMAGE])  # HTTP/1.0 needs no Host
    assert answer.status == 200, answer.body
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_pipelined_and_many_keep_alive_requests_are_answered_in_order(
    start_edge: StartEdge, kind: str
) -> None:
    edge = await start_edge(kind)
    caption = request_bytes("POST", "/v1/caption", [("Host", "x"), *PNG, ("X-Request-Id", "piped-1")], IMAGE)
    missing = b"GET /nope HTTP/1.1\r\nHost: x\r\nX-Request-Id: piped-2\r\n\r\n"
    probes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 300
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    received = await read_all_answers(edge.url, caption + missing + probes + last, timeout_s=10)
    assert received.count(b"HTTP/1.1 200 ") == 302, received[-300:]
    assert received.count(b"HTTP/1.1 404 ") == 1
    assert received.index(b"piped-1") < received.index(b"HTTP/1.1 404 ") < received.index(b"piped-2")


async def _pause() -> None:
    await asyncio.sleep(0.2)  # the slow client's pace, not a synchronisation


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("slow", ["a byte every 0.2 s", "cut short, then silence"])
async def test_a_body_slower_than_the_deadline_or_cut_short_is_a_504(
    start_edge: StartEdge, kind: str, slow: str
) -> None:
    edge = await start_edge(kind, request_timeout_ms=800)
    head = request_bytes("POST", "/v1/caption", [("Host", "x"), *PNG])
    if slow == "cut short, then silence":
        answer = await raw_exchange(edge.url, [head + IMAGE[:100]], timeout_s=5)
    else:
        trickle = [head, *(IMAGE[i : i + 1] for i in range(50))]
        answer = await raw_exchange(edge.url, trickle, between=_pause, timeout_s=5)
    assert_contract_error(answer, 504, "deadline_exceeded")


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_rotating_forwarding_headers_does_not_reset_the_failed_key_limit(
    start_edge: StartEdge, kind: str
) -> None:
    edge = await start_edge(kind, api_keys=("good-key",), auth_failure_burst=3, auth_failure_rps=0.01)
    statuses = []
    for attempt in range(6):
        spoofed = [
            ("X-Forwarded-For", f"203.0.113.{attempt}"),
            ("X-Real-IP", f"203.0.113.{attempt}"),
            ("Forwarded", f"for=203.0.113.{attempt}"),
        ]
        headers = [("Host", "x"), *PNG, ("X-API-Key", f"guess-{attempt}"), *spoofed]
        answer = await raw_exchange(edge.url, [request_bytes("POST", "/v1/caption", headers, IMAGE)])
        statuses.append(answer.status)
    assert statuses == [401, 401, 401, 429, 429, 429]
