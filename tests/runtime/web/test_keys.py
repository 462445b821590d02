"""API keys (hashed, constant-time) and per-key token-bucket rate limits, alone and over HTTP."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from captionfleet.runtime.server.testing import encode, shapes_image
from captionfleet.runtime.web.errors import RateLimited, Unauthorized
from captionfleet.runtime.web.keys import ApiKeys, RateLimiter


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_come_from_settings_and_file_and_are_held_only_as_digests(tmp_path: Path) -> None:
    hashed = hashlib.sha256(b"from-a-digest").hexdigest()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nfile-key-1\n\n  file-key-2  # trailing comment\nsha256:{hashed}\n")
    keys = ApiKeys.load(["env-key"], str(keys_file))
    assert len(keys) == 4 and not keys.open
    for key in ("env-key", "file-key-1", "file-key-2", "from-a-digest"):
        assert keys.authenticate(key) == hashlib.sha256(key.encode()).hexdigest()[:12]
    for wrong in (None, "", "file-key", "FILE-KEY-1", hashed, f"sha256:{hashed}"):
        with pytest.raises(Unauthorized):
            keys.authenticate(wrong)
    assert not any(b"file-key" in digest for digest in keys._digests)


def test_a_bad_keys_file_is_refused_with_its_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("ok\nsha256:nothex\n")
    with pytest.raises(ValueError, match=r"keys:2"):
        ApiKeys.load([], str(keys_file))
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.load([], str(tmp_path / "missing"))


def test_no_keys_means_open() -> None:
    keys = ApiKeys.load([], "")
    assert keys.open and keys.authenticate(None) == "anonymous"


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.acquire("k")
    with pytest.raises(RateLimited) as limited:
        limiter.acquire("k")
    assert limited.value.retry_after == 1  # half a second to the next token, rounded up
    limiter.acquire("other")  # buckets are per key
    clock.now += 0.5
    limiter.acquire("k")
    with pytest.raises(RateLimited):
        limiter.acquire("k")
    clock.now += 100
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.acquire("k")
    with pytest.raises(RateLimited):
        limiter.acquire("k")


def test_a_zero_rate_means_no_limit() -> None:
    limiter = RateLimiter(rate=0, burst=1)
    for _ in range(1000):
        limiter.acquire("k")


async def test_over_http_a_key_is_needed_and_checked(start_server, http, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("secret-one\n")
    server = await start_server(api_keys=("secret-two",), api_keys_file=str(keys_file))
    image = encode(shapes_image(0))
    for headers, status in (({}, 401), ({"X-API-Key": "nope"}, 401), ({"X-API-Key": "secret-one"}, 200),
                            ({"X-API-Key": "secret-two"}, 200)):  # fmt: skip
        async with http.post(server.url + "/v1/caption", data=image, headers=headers) as response:
            body = await response.json()
            assert response.status == status, body
            if status == 401:
                assert body["error"]["code"] == "unauthorized"
    async with http.get(server.url + "/healthz") as response:  # probes stay open for the kubelet
        assert response.status == 200
    async with http.get(server.url + "/v1/models") as response:  # the operator's cascade reads it
        assert response.status == 200 and (await response.json())["models"]


async def test_over_http_the_rate_limit_answers_429_with_retry_after(start_server, http) -> None:
    server = await start_server(api_keys=("k1", "k2"), rate_limit_rps=0.01, rate_limit_burst=2)
    image = encode(shapes_image(0))
    statuses = []
    for _ in range(3):
        async with http.post(server.url + "/v1/caption", data=image, headers={"X-API-Key": "k1"}) as response:
            statuses.append(response.status)
            if response.status == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert (await response.json())["error"]["code"] == "rate_limited"
    assert statuses == [200, 200, 429]
    async with http.post(server.url + "/v1/caption", data=image, headers={"X-API-Key": "k2"}) as response:
        assert response.status == 200  # another key has its own bucket


async def test_an_open_server_says_so_in_its_log(start_server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="captionfleet.runtime.server"):
        await start_server()
    assert any("no API keys configured" in record.getMessage() for record in caplog.records)
