"""Hostile clients against the shared edge, on both processes that use it (server and router).

Each case was seen answered with a 500, plain text, a hang or unbounded reading before the edge was
shared; each must now get the contract's JSON error with a request id, and the process stays healthy.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import aiohttp
import pytest

from captionfleet.runtime.router.app import ROUTER
from captionfleet.runtime.server.state import STATE
from captionfleet.runtime.server.testing import encode, shapes_image
from captionfleet.runtime.web.testing import RawAnswer, raw_exchange, request_bytes

EDGE_KINDS = ("server", "router")
StartEdge = Any  # tests/runtime/web/conftest.py: start_edge(kind, **settings) -> Edge
IMAGE = encode(shapes_image(1))


def assert_contract_error(answer: RawAnswer, status: int, code: str | None = None) -> dict[str, Any]:
    assert answer.status == status, answer.body[:300]
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error", "request_id"} and body["request_id"], body
    assert set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if status in (429, 502, 503):
        assert int(answer.headers["retry-after"]) >= 1
    return body


async def post(
    url: str, headers: list[tuple[str, str | bytes]], body: bytes, path: str = "/v1/caption"
) -> RawAnswer:
    host = url.split("//", 1)[1]
    return await raw_exchange(
        url,
        [request_bytes("POST", path, [("Host", host), ("Content-Length", str(len(body))), *headers], body)],
    )


async def still_healthy(url: str) -> None:
    async with aiohttp.ClientSession() as client, client.get(url + "/healthz") as response:
        assert response.status == 200


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_json_nested_a_thousand_levels_deep_is_a_400(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind)
    body = b'{"url": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    answer = await post(edge.url, [("Content-Type", "application/json")], body)
    assert_contract_error(answer, 400, "invalid_json")
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("query", ["num_beams=" + "9" * 5000, "suggestions=%EF%BC%93", "prompt=%FF%FE"])
async def test_integer_options_are_ascii_digits_and_queries_utf8(
    start_edge: StartEdge, kind: str, query: str
) -> None:
    # 5000 digits (int() refuses over 4300), a full-width ３, bytes that are not UTF-8.
    edge = await start_edge(kind)
    answer = await post(edge.url, [("Content-Type", "image/png")], IMAGE, path=f"/v1/caption?{query}")
    assert_contract_error(answer, 400)


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("header", ["X-API-Key", "X-User-Id"])
async def test_headers_that_are_not_utf8_get_a_clear_answer(
    start_edge: StartEdge, kind: str, header: str
) -> None:
    edge = await start_edge(kind, api_keys=("good-key",))
    headers: list[tuple[str, str | bytes]] = [("Content-Type", "image/png"), ("X-API-Key", "good-key")]
    headers = [h for h in headers if h[0] != header] + [(header, b"\xff\xfe\xc3")]
    answer = await post(edge.url, headers, IMAGE)
    if header == "X-API-Key":
        assert_contract_error(answer, 401, "unauthorized")
    else:
        assert answer.status == 200, answer.body


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_a_key_that_is_not_utf8_is_never_forwarded_as_another_key(
    start_edge: StartEdge, kind: str
) -> None:
    # The runtime holds the keys, the router none: \xffsecret reached the runtime as "secret" (200).
    edge = await start_edge(kind, upstream_settings={"api_keys": ("secret",)})
    headers: list[tuple[str, str | bytes]] = [("Content-Type", "image/png"), ("X-API-Key", b"\xffsecret")]
    assert_contract_error(await post(edge.url, headers, IMAGE), 401, "unauthorized")
    ok = await post(edge.url, [("Content-Type", "image/png"), ("X-API-Key", "secret")], IMAGE)
    assert ok.status == 200, ok.body


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(
    start_edge: StartEdge, kind: str
) -> None:
    edge = await start_edge(kind)
    answer = await post(
        edge.url, [("Content-Type", "image/png"), ("Content-Encoding", "gzip")], b"not gzip at all"
    )
    assert_contract_error(answer, 400, "invalid_body")


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_a_gzipped_body_is_captioned_through_the_router_too(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind)
    answer = await post(
        edge.url, [("Content-Type", "image/png"), ("Content-Encoding", "gzip")], gzip.compress(IMAGE)
    )
    assert answer.status == 200, answer.body
    assert answer.json()["caption"]


def _too_long_header() -> list[bytes]:
    return [request_bytes("GET", "/healthz", [("Host", "x"), ("X-Long", "a" * 9000)])]


def _too_long_url() -> list[bytes]:
    return [request_bytes("GET", "/healthz?" + "a" * 9000, [("Host", "x")])]


def _too_many_headers() -> list[bytes]:
    return [request_bytes("GET", "/healthz", [("Host", "x")] + [(f"X-H{i}", "v") for i in range(300)])]


def _bad_chunks() -> list[bytes]:
    head = request_bytes(
        "POST",
        "/v1/caption",
        [("Host", "x"), ("Transfer-Encoding", "chunked"), ("Content-Type", "image/png")],
    )
    return [head + b"zz\r\nnot a chunk\r\n0\r\n\r\n"]


def _not_http() -> list[bytes]:
    return [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 hello\r\n\r\n"]


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize(
    "pieces", [_too_long_header, _too_long_url, _too_many_headers, _bad_chunks, _not_http]
)
async def test_what_the_http_parser_refuses_is_a_json_400(
    start_edge: StartEdge, kind: str, pieces: Any
) -> None:
    edge = await start_edge(kind)
    answer = await raw_exchange(edge.url, pieces())
    body = assert_contract_error(answer, 400)
    assert answer.headers["x-request-id"] == body["request_id"]
    await still_healthy(edge.url)


REFUSED_HEADER_VALUES = [
    *(("Content-Encoding", coding.encode(), 415, "unsupported_content_encoding") for coding in
      ("bogus", "compress", "gzip, br", "br")),
    # The router used to take \xffbulk for interactive and forward it as "bulk" (aiohttp's client cuts
    # the bytes that are not UTF-8 out of a value), so the runtime behind it queued it as bulk.
    *(("X-Priority", value, 400, "invalid_header") for value in
      (b"\xffbulk", b"urgent", "bulk\u00e9".encode())),
]  # fmt: skip


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize(("header", "value", "status", "code"), REFUSED_HEADER_VALUES)
async def test_a_header_value_the_edge_cannot_take_is_refused_by_both(
    start_edge: StartEdge, kind: str, header: str, value: bytes, status: int, code: str
) -> None:
    edge = await start_edge(kind)
    answer = await post(edge.url, [("Content-Type", "image/png"), (header, value)], IMAGE)
    assert_contract_error(answer, status, code)
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_a_key_with_a_hash_is_taken_whole_and_guessing_is_rate_limited(
    start_edge: StartEdge, kind: str
) -> None:
    edge = await start_edge(kind, api_keys=("k#1",), auth_failure_rps=0.01, auth_failure_burst=5)
    ok = await post(edge.url, [("Content-Type", "image/png"), ("X-API-Key", "k#1")], IMAGE)
    assert ok.status == 200, ok.body
    statuses = []
    for guess in range(8):
        answer = await post(edge.url, [("Content-Type", "image/png"), ("X-API-Key", f"guess-{guess}")], IMAGE)
        statuses.append(answer.status)
        if answer.status == 429:
            assert_contract_error(answer, 429, "rate_limited")
    assert statuses == [401] * 5 + [429] * 3
    # Blocked even with the right key now: the guesser learns nothing until the bucket refills.
    blocked = await post(edge.url, [("Content-Type", "image/png"), ("X-API-Key", "k#1")], IMAGE)
    assert blocked.status == 429


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_headers_sent_a_byte_at_a_time_are_timed_out(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind, header_timeout_ms=1000)
    head = request_bytes("GET", "/healthz", [("Host", "x"), ("X-Slow", "s" * 200)])
    started = time.monotonic()

    async def a_while() -> None:
        await asyncio.sleep(0.05)  # the attack's pace, not synchronisation

    answer = await raw_exchange(edge.url, [bytes([b]) for b in head], between=a_while, timeout_s=20)
    assert_contract_error(answer, 408, "request_timeout")
    assert time.monotonic() - started < 10  # the whole header would take 11 s at this pace
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_after_a_413_the_rest_of_the_body_is_not_read(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind, max_body_bytes=1024 * 1024)
    head = request_bytes(
        "POST",
        "/v1/caption",
        [("Host", "x"), ("Transfer-Encoding", "chunked"), ("Content-Type", "image/png")],
    )
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"\0" * 64 * 1024)
    pieces = [head, *[chunk] * 8000]  # 500 MiB if it were all read
    sent = 0

    async def count() -> None:
        nonlocal sent
        sent += 1

    answer = await raw_exchange(edge.url, pieces, between=count, timeout_s=60)
    assert_contract_error(answer, 413, "payload_too_large")
    assert sent * 64 * 1024 < 64 * 1024 * 1024, f"{sent} chunks were taken after the limit"


async def test_bodies_held_at_once_are_bounded_whatever_the_concurrency(start_edge: StartEdge) -> None:
    edge = await start_edge(
        "router", max_body_bytes=1024 * 1024, max_body_bytes_in_flight=2 * 1024 * 1024, body_wait_ms=200
    )
    router = edge.app[ROUTER]
    body = IMAGE + b"\0" * (900 * 1024 - len(IMAGE))  # a PNG with trailing bytes still decodes
    host = edge.url.split("//", 1)[1]
    head = request_bytes(
        "POST",
        "/v1/caption",
        [("Host", host), ("Content-Length", str(len(body))), ("Content-Type", "image/png")],
    )

    async def slow_upload() -> RawAnswer:
        async def pause() -> None:
            await asyncio.sleep(0.05)

        return await raw_exchange(
            edge.url, [head, *[body[i : i + 65536] for i in range(0, len(body), 65536)]], between=pause
        )

    answers = await asyncio.gather(*(slow_upload() for _ in range(8)))
    statuses = sorted(a.status for a in answers)
    assert router.budget.peak <= 2 * 1024 * 1024
    assert 503 in statuses and 200 in statuses, statuses
    for answer in answers:
        if answer.status == 503:
            assert_contract_error(answer, 503, "overloaded")
    assert router.budget.held == 0


async def test_a_cached_answer_past_its_deadline_is_a_504(start_edge: StartEdge) -> None:
    import threading

    edge = await start_edge("server", preprocess_workers=1)
    first = await post(edge.url, [("Content-Type", "image/png")], IMAGE)
    assert first.status == 200 and not first.json()["cached"]
    service = edge.app[STATE].service
    assert service is not None
    release = threading.Event()
    service._pool.submit(release.wait, 30)  # the decoder pool is busy for a while
    try:
        started = time.monotonic()
        late = await post(edge.url, [("Content-Type", "image/png"), ("X-Request-Timeout-Ms", "300")], IMAGE)
        assert_contract_error(late, 504, "deadline_exceeded")
        assert time.monotonic() - started < 5
    finally:
        release.set()
    again = await post(edge.url, [("Content-Type", "image/png")], IMAGE)
    assert again.status == 200 and again.json()["cached"]
