"""Property: whatever a client sends to ``POST /v1/caption``, the answer is a 200 caption or a 4xx in the
contract's JSON body, never a 500 (hypothesis generates the requests; a real server answers them).

The server runs in a thread of its own with its own event loop (``conftest.server_in_thread``), so that
hypothesis can drive it from a plain synchronous test, one request per example over a real socket.
"""

from __future__ import annotations

import gzip
import http.client
import json
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.server.testing import encode, shapes_image
from tests.runtime.web.conftest import server_in_thread

PNG = encode(shapes_image(2))
OPTION_NAMES = ("suggestions", "style", "prompt", "num_beams", "max_new_tokens")
FIELD_NAMES = (*OPTION_NAMES, "url", "image_base64", "images", "image", "other")


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path, tiny_captioner: Captioner) -> Iterator[str]:
    # max_form_fields low, so that the examples' field counts cross it
    with server_in_thread(
        tiny_model_dir, tiny_captioner, max_new_tokens=4, cache_size=100, max_form_fields=6
    ) as (_, server):
        yield server.url


text = st.text(max_size=40)
# Lone surrogates are valid JSON escapes ("\ud800") but no Unicode text.
json_text = text | st.text(st.sampled_from(["\ud800", "\udfff", "a", "\u00e9", "\u0663"]), max_size=5)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True), json_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)
json_bodies = st.dictionaries(st.sampled_from(FIELD_NAMES) | text, json_values, max_size=5).map(
    lambda d: json.dumps(d).encode()
) | st.binary(max_size=200)
option_values = st.one_of(
    text, st.integers(-5, 50).map(str), st.sampled_from(["３", "1" * 5000, "concise", " 2 "])
)
queries = st.dictionaries(st.sampled_from(OPTION_NAMES), option_values, max_size=3)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["b0undary", "x"]))
    parts = []
    for _ in range(draw(st.integers(0, 9))):
        name = draw(st.sampled_from(FIELD_NAMES) | text)
        value = draw(st.sampled_from([PNG, b"", b"\xff\xfe"]) | st.binary(max_size=50) | text.map(str.encode))
        extra = draw(
            st.sampled_from(["", '; filename="a.png"', '; filename="../\xff"', "; filename*=x''%FF"])
        )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    closing = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", b"--garbage"]))
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data"]))
    return content_type, b"".join(parts) + closing


bodies = st.one_of(
    st.tuples(st.just("application/json"), json_bodies),
    st.tuples(
        st.sampled_from(["image/png", "application/octet-stream", "text/plain", ""]),
        st.sampled_from([PNG, b""]) | st.binary(max_size=300),
    ),
    multipart_bodies(),
)
extra_headers = st.dictionaries(
    st.sampled_from(
        ["X-Request-Timeout-Ms", "X-Request-Id", "X-User-Id", "X-API-Key", "Content-Encoding", "Expect"]
    ),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "nan",
            "1e309",
            "250",
            "1_000",
            "\u0663",
            "gzip",
            "identity",
            "100-continue",
            "a" * 300,
        ]
    )
    | text,
    max_size=3,
)


def _latin1(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _send(url: str, body: bytes, headers: dict[str, str], query: dict[str, str]) -> tuple[int, Any]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        path = "/v1/caption" + ("?" + urllib.parse.urlencode(query) if query else "")
        connection.putrequest("POST", path)
        connection.putheader("Content-Length", str(len(body)))
        for name, value in headers.items():
            if value and "\n" not in value and "\r" not in value:
                connection.putheader(name, _latin1(value))
        connection.endheaders(body)
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload)
    finally:
        connection.close()


def _assert_caption_or_json_4xx(status: int, answer: Any) -> None:
    assert status == 200 or 400 <= status < 500, (status, answer)
    assert answer["request_id"]
    if status == 200:
        assert isinstance(answer["caption"], str)
    else:
        assert set(answer["error"]) == {"code", "message"}, answer


SLOW = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
"""Each example is a real request: no per-example deadline, and a module's servers as the fixture."""


@settings(SLOW, max_examples=200)
@given(body=bodies, headers=extra_headers, query=queries)
def test_any_request_gets_a_caption_or_a_json_4xx(
    server_url: str, body: tuple[str, bytes], headers: dict[str, str], query: dict[str, str]
) -> None:
    content_type, data = body
    status, answer = _send(server_url, data, {**headers, "Content-Type": content_type}, query)
    _assert_caption_or_json_4xx(status, answer)


def encoded(data: bytes, coding: str) -> bytes:
    """``data`` in ``coding``: gzip, deflate (zlib) or deflate-raw (what some clients send as deflate)."""
    if coding == "deflate-raw":
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return compressor.compress(data) + compressor.flush()
    return gzip.compress(data) if coding == "gzip" else zlib.compress(data)


@settings(SLOW, max_examples=60)
@given(
    body=bodies,
    coding=st.sampled_from(["gzip", "deflate", "deflate-raw"]),
    cut=st.integers(0, 30),
    garbage=st.sampled_from([b""]) | st.binary(max_size=8),
)
def test_any_coded_body_gets_a_caption_or_a_json_4xx(
    server_url: str, body: tuple[str, bytes], coding: str, cut: int, garbage: bytes
) -> None:
    # Whole, cut short by up to 30 bytes, or followed by other bytes: decoded whole or refused.
    content_type, data = body
    whole = encoded(data, coding)
    sent = whole[: len(whole) - cut] + garbage
    headers = {"Content-Type": content_type, "Content-Encoding": coding.removesuffix("-raw")}
    status, answer = _send(server_url, sent, headers, {})
    _assert_caption_or_json_4xx(status, answer)
