"""Hostile clients, second round: variants of the issue's cases that the first fixes did not cover.

Each was found answering a 500, plain text, a silently accepted bad value, or holding a connection or
a core for ever, on ``captionfleet serve``, ``captionfleet router`` or both; each must now get the
contract's JSON error with a request id (both processes where both are affected).
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
import zlib
from typing import Any

import aiohttp
import pytest

from captionfleet.runtime.server.testing import encode, shapes_image
from captionfleet.runtime.web.testing import RawAnswer, raw_exchange
from tests.runtime.web.test_hostile import EDGE_KINDS, assert_contract_error, post, still_healthy

StartEdge = Any  # tests/runtime/web/conftest.py: start_edge(kind, upstream_settings=None, **settings)
IMAGE = encode(shapes_image(1))
IMAGE_B64 = base64.b64encode(IMAGE).decode()
JSON = [("Content-Type", "application/json")]


def multipart(parts: list[tuple[str, bytes, str]], boundary: str = "b0und") -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart body of (name, value, extra disposition parameters) parts."""
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode(
            "utf-8", "surrogateescape"
        )
        + value
        + b"\r\n"
        for name, value, extra in parts
    )
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("expect", [b"\xff\xfe", "\u00e9".encode(), b"nope", b"200-ok"])
async def test_an_expectation_other_than_100_continue_is_a_json_417(
    start_edge: StartEdge, kind: str, expect: bytes
) -> None:
    # Was: a plain-text 417 from aiohttp's expect handler (before any middleware), a 500 when not UTF-8.
    edge = await start_edge(kind)
    answer = await post(edge.url, [("Content-Type", "image/png"), ("Expect", expect)], IMAGE)
    body = assert_contract_error(answer, 417, "expectation_failed")
    assert answer.headers["x-request-id"] == body["request_id"]
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_expect_100_continue_still_gets_its_caption(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind)
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            edge.url + "/v1/caption", data=IMAGE, headers={"Content-Type": "image/png"}, expect100=True
        ) as response,
    ):
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize(
    "body",
    [
        b'{"url": "http://\\ud800.example/"}',
        b'{"image_base64": "%s", "prompt": "a \\udfff"}' % IMAGE_B64.encode(),
        b'{"image_base64": "%s", "\\ud800": 1}' % IMAGE_B64.encode(),
    ],
    ids=["url", "prompt", "key"],
)
async def test_a_lone_surrogate_in_json_is_a_400(start_edge: StartEdge, kind: str, body: bytes) -> None:
    edge = await start_edge(kind)
    answer = await post(edge.url, JSON, body)
    assert_contract_error(answer, 400, "invalid_json")


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_a_connection_that_sends_nothing_is_timed_out(start_edge: StartEdge, kind: str) -> None:
    # Was: the header clock started at the first byte, so a silent connection was held for ever.
    edge = await start_edge(kind, header_timeout_ms=300)
    started = time.monotonic()
    answer = await raw_exchange(edge.url, [], timeout_s=10)
    assert_contract_error(answer, 408, "request_timeout")
    assert time.monotonic() - started < 5
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_thousands_of_tiny_multipart_fields_are_refused_at_the_limit(
    start_edge: StartEdge, kind: str
) -> None:
    # Was: 20,000 one-byte fields (1 MB) kept a core busy for 7-11 s before the caption.
    edge = await start_edge(kind, upstream_settings={"max_form_fields": 8}, max_form_fields=8)
    content_type, body = multipart([("other", b"x", "")] * 5000 + [("image", IMAGE, "")])
    started = time.monotonic()
    answer = await post(edge.url, [("Content-Type", content_type)], body)
    assert_contract_error(answer, 400, "too_many_fields")
    assert time.monotonic() - started < 5
    content_type, body = multipart([("other", b"x", "")] * 8 + [("image", IMAGE, "")])
    ok = await post(edge.url, [("Content-Type", content_type)], body)
    assert ok.status == 200, ok.body


async def test_a_batch_is_refused_at_its_first_image_over_the_limit(start_edge: StartEdge) -> None:
    edge = await start_edge("server", max_batch_images=2)
    for parts in ([("images", IMAGE, "")] * 3, [("images", b"", "")] * 5000):
        content_type, body = multipart(parts)
        answer = await post(edge.url, [("Content-Type", content_type)], body, path="/v1/caption/batch")
        assert_contract_error(answer, 400, "too_many_images")
    images = json.dumps({"images": [{"image_base64": IMAGE_B64}] * 3}).encode()
    answer = await post(edge.url, JSON, images, path="/v1/caption/batch")
    assert_contract_error(answer, 400, "too_many_images")


REFUSED_DEADLINES = ["\u0663\u0660\u0660\u0660", "1_000", "infinity", "0x10", "1e400"]
TAKEN_DEADLINES = ["2500", "2500.5", ".5e4", "3E3"]


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("given", REFUSED_DEADLINES + TAKEN_DEADLINES)
async def test_a_client_deadline_is_ascii_decimal(start_edge: StartEdge, kind: str, given: str) -> None:
    # Was: float() read Arabic-Indic digits and underscores, so "٣٠٠٠" was 3 s.
    edge = await start_edge(kind)
    headers: list[tuple[str, str | bytes]] = [
        ("Content-Type", "image/png"),
        ("X-Request-Timeout-Ms", given.encode()),
    ]
    answer = await post(edge.url, headers, IMAGE)
    if given in TAKEN_DEADLINES:
        assert answer.status == 200, answer.body
    else:
        assert_contract_error(answer, 400, "invalid_timeout")


async def _submit(edge_url: str, content_type: str, body: bytes) -> RawAnswer:
    return await post(edge_url, [("Content-Type", content_type)], body, path="/v1/jobs")


def _job(**fields: Any) -> bytes:
    return json.dumps({"items": [{"image_base64": IMAGE_B64}], **fields}).encode()


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_job_submissions_with_values_that_are_not_text_are_a_400(
    start_edge: StartEdge, kind: str, redis_url: str
) -> None:
    # Was: a 500 for a lone surrogate in an item's URL or the webhook's secret; "options": [] taken
    # as no options; a multipart filename (the item's id) of any length, or not UTF-8, taken.
    stream = f"test-edge:{uuid.uuid4().hex[:8]}"
    edge = await start_edge(kind, upstream_settings={"jobs_redis_url": redis_url, "jobs_stream": stream})
    bodies = [
        b'{"items": [{"url": "http://\\ud800/"}]}',
        _job(webhook="https://example.com/hook", webhook_secret="\ud800"),
    ]
    for body in bodies:
        assert_contract_error(await _submit(edge.url, "application/json", body), 400, "invalid_json")
    for options in ([], 0, "", False):
        answer = await _submit(edge.url, "application/json", _job(options=options))
        assert_contract_error(answer, 400, "invalid_field")
    for filename in ("a" * 300, "\udcff\udcfe"):
        content_type, body = multipart([("images", IMAGE, f'; filename="{filename}"')])
        assert_contract_error(await _submit(edge.url, content_type, body), 400, "invalid_field")
    content_type, body = multipart([("images", IMAGE, '; filename="photo-1.png"')])
    accepted = await _submit(edge.url, content_type, body)
    assert accepted.status == 202, accepted.body
    await still_healthy(edge.url)


def _gzip_cases() -> dict[str, tuple[bytes, int, str | None]]:
    """name -> (body sent as Content-Encoding: gzip, status, code)."""
    whole = gzip.compress(IMAGE)
    return {
        "whole": (whole, 200, None),
        "cut before its trailer": (whole[:-8], 400, "invalid_body"),
        "cut mid-stream": (whole[: len(whole) // 2], 400, "invalid_body"),
        "trailing garbage": (whole + b"garbage!", 400, "invalid_body"),
        "a bomb past max_body_bytes": (gzip.compress(b"\0" * (8 * 1024 * 1024)), 413, "payload_too_large"),
    }


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("case", list(_gzip_cases()))
async def test_a_gzip_body_is_decoded_whole_or_refused(start_edge: StartEdge, kind: str, case: str) -> None:
    # Was: a gzip stream cut off before its end (no checksum) was captioned as whatever it decoded to.
    body, status, code = _gzip_cases()[case]
    edge = await start_edge(kind, max_body_bytes=1024 * 1024)
    answer = await post(edge.url, [("Content-Type", "image/png"), ("Content-Encoding", "gzip")], body)
    if status == 200:
        assert answer.status == 200, answer.body
    else:
        assert_contract_error(answer, status, code)
    await still_healthy(edge.url)


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_deflate_and_gzip_bodies_of_every_kind_are_captioned(start_edge: StartEdge, kind: str) -> None:
    edge = await start_edge(kind)
    content_type, form = multipart([("image", IMAGE, ""), ("style", b"concise", "")])
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    cases = [
        ("deflate", "image/png", zlib.compress(IMAGE)),
        ("deflate", "image/png", raw_deflate.compress(IMAGE) + raw_deflate.flush()),  # as browsers send it
        ("GZIP", content_type, gzip.compress(form)),
        ("gzip", "application/json", gzip.compress(json.dumps({"image_base64": IMAGE_B64}).encode())),
    ]
    for coding, body_type, body in cases:
        headers: list[tuple[str, str | bytes]] = [("Content-Type", body_type), ("Content-Encoding", coding)]
        answer = await post(edge.url, headers, body)
        assert answer.status == 200, (coding, body_type, answer.body)
        assert answer.json()["caption"]


async def test_a_gzipped_job_is_taken(start_edge: StartEdge, redis_url: str) -> None:
    stream = f"test-edge:{uuid.uuid4().hex[:8]}"
    edge = await start_edge("router", upstream_settings={"jobs_redis_url": redis_url, "jobs_stream": stream})
    headers: list[tuple[str, str | bytes]] = [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
    ]
    answer = await post(edge.url, headers, gzip.compress(_job()), path="/v1/jobs")
    assert answer.status == 202, answer.body
    cut = await post(edge.url, headers, gzip.compress(_job())[:-4], path="/v1/jobs")
    assert_contract_error(cut, 400, "invalid_body")


async def test_a_cached_answer_ready_just_past_a_tiny_deadline_is_a_504(start_edge: StartEdge) -> None:
    # Was: a 200 from the cache, ready within the edge's backstop grace (0.1 s) but past the deadline.
    edge = await start_edge("server")
    first = await post(edge.url, [("Content-Type", "image/png")], IMAGE)
    assert first.status == 200 and not first.json()["cached"]
    headers: list[tuple[str, str | bytes]] = [
        ("Content-Type", "image/png"),
        ("X-Request-Timeout-Ms", "0.001"),
    ]
    late = await post(edge.url, headers, IMAGE)
    assert_contract_error(late, 504, "deadline_exceeded")
    again = await post(edge.url, [("Content-Type", "image/png")], IMAGE)
    assert again.status == 200 and again.json()["cached"]
