"""Moderation before captioning, over real HTTP: a real server, a real moderation service on loopback.

The service (``moderation_service`` in tests/runtime/conftest.py) blocks mostly-red images; the
scenes are the training scenes with their background painted red or blue.
"""

from __future__ import annotations

import dataclasses
import io
import time

import aiohttp
import pytest
from PIL import Image

from captionfleet.runtime.server.lifecycle import Server
from captionfleet.runtime.server.testing import encode
from captionfleet.runtime.training.scenes import OBJECT_COLOURS, scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED
from captionfleet.runtime.web.errors import UrlRefused
from captionfleet.settings.serve import ServeSettings


def scene(background: str, index: int = 0, size: int = 384) -> Image.Image:
    painted = dataclasses.replace(scene_at(HELD_OUT_SEED, index), background_rgb=OBJECT_COLOURS[background])
    return painted.render(size)


RED, BLUE = encode(scene("red")), encode(scene("blue"))


async def _caption(http: aiohttp.ClientSession, server: Server, body: bytes) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "image/png"}
    async with http.post(server.url + "/v1/caption", data=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def _metrics(http: aiohttp.ClientSession, server: Server) -> str:
    async with http.get(server.url + "/metrics") as response:
        return await response.text()


def _moderated(service, **overrides) -> dict:
    return {"moderation_url": service.url, "allow_private_urls": True} | overrides


async def test_a_red_scene_is_blocked_and_never_captioned_a_blue_one_is_captioned(
    start_server, http, moderation_service
) -> None:
    server = await start_server(**_moderated(moderation_service))
    status, _, body = await _caption(http, server, RED)
    assert status == 422, body
    assert body["error"]["code"] == "content_blocked" and "mostly red" in body["error"]["message"]
    metrics = await _metrics(http, server)
    assert "captionfleet_caption_confidence_count" not in metrics  # the model never saw it
    status, _, body = await _caption(http, server, BLUE)
    assert status == 200 and "caption" in body, body
    assert moderation_service.content_types == ["image/jpeg", "image/jpeg"]
    version = server.state.service.model_version
    metrics = await _metrics(http, server)
    for outcome in ("blocked", "allowed"):
        assert f'captionfleet_moderation_checks_total{{model="{version}",outcome="{outcome}"}} 1.0' in metrics


async def test_the_image_sent_is_a_jpeg_of_at_most_512_pixels_a_side(
    start_server, http, moderation_service
) -> None:
    server = await start_server(**_moderated(moderation_service))
    wide = scene("blue").resize((1200, 700))
    assert (await _caption(http, server, encode(wide)))[0] == 200
    small = scene("blue", index=1, size=200)
    assert (await _caption(http, server, encode(small)))[0] == 200
    assert moderation_service.sizes == [(512, 299), (200, 200)]


async def test_a_blocked_image_seen_again_is_blocked_from_the_cache(
    start_server, http, moderation_service
) -> None:
    server = await start_server(**_moderated(moderation_service))
    assert (await _caption(http, server, RED))[0] == 422
    # The same bytes, and the same scene re-encoded as a JPEG of half the size: one perceptual key.
    resized = scene("red").resize((192, 192))
    for again in (RED, encode(resized, "JPEG", quality=85)):
        status, _, body = await _caption(http, server, again)
        assert status == 422 and body["error"]["code"] == "content_blocked"
    assert moderation_service.calls == 1
    metrics = await _metrics(http, server)
    assert 'captionfleet_moderation_cache_hits_total{model="' in metrics
    # Without a verdict cache, every image is sent.
    uncached = await start_server(**_moderated(moderation_service, moderation_cache_size=0))
    for _ in range(2):
        assert (await _caption(http, uncached, RED))[0] == 422
    assert moderation_service.calls == 3


async def test_a_stopped_service_fails_requests_under_fail_and_is_bypassed_under_ignore(
    start_server, http, moderation_service
) -> None:
    failing = await start_server(**_moderated(moderation_service))
    ignoring = await start_server(**_moderated(moderation_service, moderation_failure_policy="Ignore"))
    await moderation_service.stop()
    status, headers, body = await _caption(http, failing, BLUE)
    assert status == 503 and body["error"]["code"] == "moderation_unavailable", body
    assert int(headers["Retry-After"]) >= 1
    status, _, body = await _caption(http, ignoring, RED)  # unmoderated: even a red one is captioned
    assert status == 200 and "caption" in body, body
    version = ignoring.state.service.model_version
    metrics = await _metrics(http, ignoring)
    assert f'captionfleet_moderation_bypassed_total{{model="{version}"}} 1.0' in metrics
    assert f'captionfleet_moderation_checks_total{{model="{version}",outcome="unavailable"}} 1.0' in metrics
    # An unavailable verdict is not cached: the image is asked about again.
    assert (await _caption(http, failing, BLUE))[0] == 503


async def test_a_slow_service_times_out(start_server, http, moderation_service) -> None:
    moderation_service.slow = True
    timeout_ms = 300
    failing = await start_server(**_moderated(moderation_service, moderation_timeout_ms=timeout_ms))
    started = time.monotonic()
    status, headers, body = await _caption(http, failing, BLUE)
    assert status == 503 and body["error"]["code"] == "moderation_unavailable", body
    assert "300 ms" in body["error"]["message"] and "Retry-After" in headers
    assert time.monotonic() - started >= timeout_ms / 1000
    ignoring = await start_server(
        **_moderated(moderation_service, moderation_timeout_ms=timeout_ms, moderation_failure_policy="Ignore")
    )
    assert (await _caption(http, ignoring, BLUE))[0] == 200


async def test_a_deadline_shorter_than_the_timeout_answers_504(
    start_server, http, moderation_service
) -> None:
    moderation_service.slow = True
    server = await start_server(**_moderated(moderation_service, moderation_failure_policy="Ignore"))
    headers = {"Content-Type": "image/png", "X-Request-Timeout-Ms": "400"}
    async with http.post(server.url + "/v1/caption", data=BLUE, headers=headers) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "deadline_exceeded"


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ({"allowed": "no", "reason": "x"}, 200),
        ({"reason": "no verdict"}, 200),
        ({"allowed": False, "reason": 7}, 200),
        (["allowed", False], 200),
        (b"<html>not json</html>", 200),
        (b"\xff\xfe", 200),
        ({"allowed": True, "reason": ""}, 500),
        ({"allowed": True, "reason": ""}, 302),
    ],
)
async def test_malformed_answers_count_as_unavailable(
    start_server, http, moderation_service, answer, status
) -> None:
    moderation_service.answer, moderation_service.status = answer, status
    server = await start_server(**_moderated(moderation_service))
    status_code, _, body = await _caption(http, server, BLUE)
    assert status_code == 503 and body["error"]["code"] == "moderation_unavailable", body


async def test_an_answer_without_a_reason_and_a_reason_with_control_characters(
    start_server, http, moderation_service
) -> None:
    server = await start_server(**_moderated(moderation_service, moderation_cache_size=0))
    moderation_service.answer = {"allowed": True}
    assert (await _caption(http, server, BLUE))[0] == 200
    moderation_service.answer = {"allowed": False, "reason": "nudity\r\nX-Injected: 1" + "x" * 2000}
    status, _, body = await _caption(http, server, BLUE)
    assert status == 422
    message = body["error"]["message"]
    assert "nudity  X-Injected: 1" in message and "\n" not in message and len(message) < 600


async def test_the_batch_endpoint_moderates_each_image(start_server, http, moderation_service) -> None:
    server = await start_server(**_moderated(moderation_service))
    form = aiohttp.FormData()
    for name, data in (("red.png", RED), ("blue.png", BLUE)):
        form.add_field("images", data, filename=name, content_type="image/png")
    async with http.post(server.url + "/v1/caption/batch", data=form) as response:
        assert response.status == 200
        red, blue = (await response.json())["results"]
    assert red["status"] == 422 and red["error"]["code"] == "content_blocked"
    assert "caption" in blue and "error" not in blue
    form = aiohttp.FormData()
    form.add_field("images", RED, filename="red.png", content_type="image/png")
    async with http.post(server.url + "/v1/caption/batch", data=form) as response:
        assert response.status == 422  # nothing to return: the one error speaks for the request


async def test_the_moderation_url_is_checked_like_image_urls(tiny_model_dir, moderation_service) -> None:
    for url in (moderation_service.url, "http://10.0.0.7/moderate", "http://[::1]:9/", "http://localhost/m"):
        with pytest.raises(UrlRefused):
            Server(ServeSettings(model=str(tiny_model_dir), moderation_url=url))
    with pytest.raises(UrlRefused, match="http and https"):
        Server(ServeSettings(model=str(tiny_model_dir), moderation_url="ftp://example.com/m", port=0))
    # Allowed for moderation alone, or with every URL.
    Server(ServeSettings(moderation_url=moderation_service.url, moderation_allow_private=True))
    Server(ServeSettings(moderation_url=moderation_service.url, allow_private_urls=True))


async def test_a_name_that_resolves_to_a_private_address_is_refused_on_connection(
    start_server, http, moderation_service
) -> None:
    """127.0.0.1 written as one decimal number is no IP literal to the URL check, but the resolver makes
    it 127.0.0.1: the guarded resolver refuses the address it would connect to."""
    port = moderation_service.url.split(":")[2].split("/")[0]
    server = await start_server(moderation_url=f"http://2130706433:{port}/v1/moderate")
    status, _, body = await _caption(http, server, BLUE)
    assert status == 503 and body["error"]["code"] == "moderation_unavailable", body
    assert "127.0.0.1" not in body["error"]["message"]
    assert moderation_service.calls == 0


def test_the_command_refuses_a_moderation_url_it_may_not_use(tiny_model_dir) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "captionfleet", "serve", "--moderation-url", "http://169.254.169.254/x"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "moderation_url may not be used" in result.stderr and "link-local" in result.stderr


async def test_models_say_how_moderation_is_configured(start_server, http, moderation_service) -> None:
    server = await start_server(**_moderated(moderation_service, moderation_failure_policy="Ignore"))
    async with http.get(server.url + "/v1/models") as response:
        (model,) = (await response.json())["models"]
    assert model["moderation"] == {"failure_policy": "Ignore", "timeout_ms": 2000.0}
    plain = await start_server()
    async with http.get(plain.url + "/v1/models") as response:
        assert (await response.json())["models"][0]["moderation"] == "off"


def test_the_moderation_jpeg_keeps_the_aspect_ratio() -> None:
    from captionfleet.runtime.serving.moderation import moderation_jpeg

    tall = Image.new("L", (300, 2000), 128)
    sent = Image.open(io.BytesIO(moderation_jpeg(tall)))
    assert sent.format == "JPEG" and sent.mode == "RGB" and sent.size == (77, 512)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"moderation_url": "moderation:8080"}, "moderation_url must be an http"),
        ({"moderation_failure_policy": "fail"}, "moderation_failure_policy must be one of Fail, Ignore"),
        ({"moderation_timeout_ms": 0}, "moderation_timeout_ms must be > 0"),
        ({"moderation_max_connections": 0}, "moderation_max_connections >= 1"),
        ({"moderation_cache_size": -1}, "moderation_cache_size must be >= 0"),
        ({"moderation_cache_ttl_s": 0}, "moderation_cache_ttl_s > 0"),
    ],
)
def test_moderation_settings_are_checked(overrides: dict, problem: str) -> None:
    assert ServeSettings(moderation_url="https://mod.example.com/check").check() == []
    problems = ServeSettings(**{"moderation_url": "https://mod.example.com/check", **overrides}).check()
    assert any(problem in p for p in problems), problems
