"""The job API (CONTRACT.md, Jobs) on real servers and a real redis-server.

Each test gets a stream of its own on the session's Redis, so jobs of one test are invisible to the
next. Waiting is polling with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import aiohttp
import pytest
import torch

from captionfleet.names import WEBHOOK_DELIVERY_HEADER, WEBHOOK_SIGNATURE_HEADER
from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from captionfleet.runtime.engine.types import GenerationOptions
from captionfleet.runtime.server.testing import encode, eventually, png_bomb, shapes_image
from captionfleet.runtime.training.scenes import scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED

JOB_DEADLINE_S = 180.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tiny_items(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"img-{i}", "image_base64": b64(encode(shapes_image(i)))} for i in range(start, start + count)
    ]


@pytest.fixture
def stream() -> str:
    return f"test-jobs:{uuid.uuid4().hex[:8]}"


async def submit(
    http: aiohttp.ClientSession, base: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.post(base + "/v1/jobs", json=body, headers=headers) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Location"].startswith("/v1/jobs/")
        return dict(await response.json())


async def job(
    http: aiohttp.ClientSession, base: str, job_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(f"{base}/v1/jobs/{job_id}", headers=headers) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def finished(
    http: aiohttp.ClientSession, base: str, job_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The job's state once it has ended (polled, with a deadline)."""
    ends = time.monotonic() + JOB_DEADLINE_S
    while True:
        state = await job(http, base, job_id, headers)
        if state["status"] in ("succeeded", "failed", "cancelled"):
            return state
        assert time.monotonic() < ends, f"job {job_id} did not end in {JOB_DEADLINE_S:.0f} s: {state}"
        await asyncio.sleep(0.1)


async def results(
    http: aiohttp.ClientSession, base: str, job_id: str, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    async with http.get(f"{base}/v1/jobs/{job_id}/results", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/x-ndjson"
        text = await response.text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    torch.set_num_threads(1)
    return load_captioner(str(bundled_model_dir()))


async def test_a_job_of_300_scenes_gets_every_exact_caption_in_input_order(
    start_server, http, redis_url: str, stream: str, bundled: Captioner
) -> None:
    scenes = [scene_at(HELD_OUT_SEED, index) for index in range(300)]
    options = GenerationOptions(num_beams=1, max_new_tokens=30)
    expected: list[str] = []
    for start in range(0, len(scenes), 16):  # the engine itself, in batches of another composition
        expected += [
            c.text for c in bundled.caption_images([s.render() for s in scenes[start : start + 16]], options)
        ]
    assert sum(text == scene.caption for text, scene in zip(expected, scenes, strict=True)) >= 270
    server = await start_server(
        captioner=bundled, jobs_redis_url=redis_url, jobs_stream=stream, cache_size=0, max_new_tokens=30
    )
    items = [{"id": f"scene-{i}", "image_base64": b64(encode(s.render()))} for i, s in enumerate(scenes)]
    created = await submit(http, server.url, {"items": items, "options": {"num_beams": 1}})
    assert created["status"] == "queued" and created["counts"] == {"total": 300, "done": 0, "failed": 0}
    state = await finished(http, server.url, created["id"])
    assert state["status"] == "succeeded"
    assert state["counts"] == {"total": 300, "done": 300, "failed": 0}
    assert state["created_at"] <= state["finished_at"]
    lines = await results(http, server.url, created["id"])
    assert [line["index"] for line in lines] == list(range(300))
    assert [line["id"] for line in lines] == [f"scene-{i}" for i in range(300)]
    assert [line["result"]["caption"] for line in lines] == expected


async def test_multipart_jobs_take_many_images_with_their_filenames_as_ids(
    start_server, http, redis_url: str, stream: str
) -> None:
    server = await start_server(jobs_redis_url=redis_url, jobs_stream=stream)
    form = aiohttp.FormData()
    for i in range(5):
        form.add_field("images", encode(shapes_image(i)), filename=f"photo-{i}.png", content_type="image/png")
    form.add_field("suggestions", "2")
    async with http.post(server.url + "/v1/jobs", data=form) as response:
        assert response.status == 202, await response.text()
        created = await response.json()
    assert (await finished(http, server.url, created["id"]))["counts"]["done"] == 5
    lines = await results(http, server.url, created["id"])
    assert [line["id"] for line in lines] == [f"photo-{i}.png" for i in range(5)]
    assert all(len(line["result"]["suggestions"]) == 2 for line in lines)


async def test_bad_items_get_their_own_errors_while_the_rest_succeed(
    start_server, http, redis_url: str, stream: str
) -> None:
    server = await start_server(jobs_redis_url=redis_url, jobs_stream=stream)
    good = tiny_items(2)
    bad = [
        {"id": "text", "image_base64": b64(b"hello, world\n" * 20)},
        {"id": "bomb", "image_base64": b64(png_bomb())},
        {"id": "private", "url": "http://127.0.0.1:9/cat.png"},
        {"id": "metadata", "url": "http://169.254.169.254/latest/meta-data/"},
    ]
    created = await submit(http, server.url, {"items": [good[0], *bad, good[1]]})
    state = await finished(http, server.url, created["id"])
    assert state["status"] == "succeeded"
    assert state["counts"] == {"total": 6, "done": 2, "failed": 4}
    lines = await results(http, server.url, created["id"])
    errors = {line["id"]: line["error"]["code"] for line in lines if "error" in line}
    assert errors == {
        "text": "unsupported_image_format",
        "bomb": "image_too_large",
        "private": "url_refused",
        "metadata": "url_refused",
    }
    assert [line["id"] for line in lines if "result" in line] == ["img-0", "img-1"]


async def test_a_job_of_nothing_but_bad_items_fails(start_server, http, redis_url: str, stream: str) -> None:
    server = await start_server(jobs_redis_url=redis_url, jobs_stream=stream)
    created = await submit(http, server.url, {"items": [{"image_base64": b64(b"not an image")}]})
    state = await finished(http, server.url, created["id"])
    assert state["status"] == "failed" and state["counts"] == {"total": 1, "done": 0, "failed": 1}
    assert (await results(http, server.url, created["id"]))[0]["id"] is None


async def test_cancel_stops_the_items_not_started(start_server, http, redis_url: str, stream: str) -> None:
    server = await start_server(
        jobs_redis_url=redis_url, jobs_stream=stream, max_batch_size=1, jobs_prefetch=1
    )
    created = await submit(http, server.url, {"items": tiny_items(150)})
    async with http.delete(f"{server.url}/v1/jobs/{created['id']}") as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["status"] == "cancelled"
    jobs = server.state.jobs
    assert jobs is not None
    # Every entry is consumed: the cancelled ones are acknowledged without being captioned.
    ends = time.monotonic() + JOB_DEADLINE_S
    while await jobs.pending_items() or server.state.job_worker.held:
        assert time.monotonic() < ends, "the cancelled job's items were never drained from the stream"
        await asyncio.sleep(0.05)
    state = await job(http, server.url, created["id"])
    assert state["status"] == "cancelled" and state["finished_at"]
    assert state["counts"]["done"] < 20  # the ones already held when the cancel came, at most
    lines = await results(http, server.url, created["id"])
    assert [line["index"] for line in lines] == list(range(150))
    cancelled = [line for line in lines if "error" in line]
    assert len(cancelled) == 150 - state["counts"]["done"]
    assert {line["error"]["code"] for line in cancelled} == {"cancelled"}
    async with http.delete(f"{server.url}/v1/jobs/{created['id']}") as response:
        assert (await response.json())["counts"] == state["counts"]  # cancelling again changes nothing


async def test_a_job_is_visible_only_to_the_key_that_made_it(
    start_server, http, redis_url: str, stream: str
) -> None:
    server = await start_server(
        jobs_redis_url=redis_url, jobs_stream=stream, api_keys=("alpha-key", "beta-key")
    )
    alpha, beta = {"X-API-Key": "alpha-key"}, {"X-API-Key": "beta-key"}
    created = await submit(http, server.url, {"items": tiny_items(2)}, alpha)
    base = f"{server.url}/v1/jobs/{created['id']}"
    for method, url in (("GET", base), ("GET", base + "/results"), ("DELETE", base)):
        async with http.request(method, url, headers=beta) as response:
            assert response.status == 404, (method, url)
            assert (await response.json())["error"]["code"] == "job_not_found"
        async with http.request(method, url) as response:
            assert response.status == 401
    assert (await finished(http, server.url, created["id"], alpha))["counts"]["done"] == 2
    assert len(await results(http, server.url, created["id"], alpha)) == 2


async def test_the_webhook_arrives_once_signed_after_a_retry(
    start_server, http, redis_url: str, stream: str, receiver
) -> None:
    url, received = receiver
    server = await start_server(
        jobs_redis_url=redis_url,
        jobs_stream=stream,
        allow_private_urls=True,  # the receiver is on loopback
        jobs_webhook_secret="s3cret",
        jobs_webhook_backoff_s=0.05,
    )
    created = await submit(http, server.url, {"items": tiny_items(3), "webhook": url})
    await finished(http, server.url, created["id"])
    await eventually(lambda: len(received) >= 2, 30, "the webhook's retry")
    worker = server.state.job_worker
    await eventually(lambda: worker.delivering == 0, 30, "the webhook's delivery to end")
    assert len(received) == 2  # the 500, then one delivery, and nothing after it
    assert received[0][0] == received[1][0]  # the same bytes, so the same signature
    deliveries = {headers[WEBHOOK_DELIVERY_HEADER] for _, headers in received}
    assert len(deliveries) == 1 and created["id"] in deliveries.pop()  # one id: receivers can dedupe
    assert await worker.store.client.xlen(worker.store.webhook_stream) == 0  # acknowledged and deleted
    for body, headers in received:
        expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers[WEBHOOK_SIGNATURE_HEADER], expected)
        state = json.loads(body)
        assert state["id"] == created["id"] and state["status"] == "succeeded"
        assert state["counts"] == {"total": 3, "done": 3, "failed": 0}


async def test_a_job_with_its_own_webhook_secret_is_signed_with_it(
    start_server, http, redis_url: str, stream: str, receiver
) -> None:
    url, received = receiver
    server = await start_server(
        jobs_redis_url=redis_url, jobs_stream=stream, allow_private_urls=True, jobs_webhook_backoff_s=0.05
    )
    created = await submit(
        http, server.url, {"items": tiny_items(1), "webhook": url, "webhook_secret": "mine"}
    )
    await finished(http, server.url, created["id"])
    await eventually(lambda: len(received) >= 2, 30, "the webhook's delivery")
    body, headers = received[-1]
    assert (
        headers[WEBHOOK_SIGNATURE_HEADER] == "sha256=" + hmac.new(b"mine", body, hashlib.sha256).hexdigest()
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"items": []}, 400, "missing_image"),
        ({"items": [{"url": "http://example.com/a.png", "image_base64": "AAAA"}]}, 400, "missing_image"),
        ({"items": [{"image_base64": "AAAA", "caption": "x"}]}, 400, "unknown_field"),
        ({"items": [{"image_base64": "AAAA"}], "priority": "high"}, 400, "unknown_field"),
        ({"items": [{"image_base64": "AAAA"}], "options": {"num_beams": 99}}, 400, "invalid_options"),
        ({"items": [{"image_base64": "AAAA"}], "options": {"colour": "red"}}, 400, "unknown_field"),
        ({"items": [{"image_base64": "%%%"}]}, 400, "invalid_base64"),
        ({"items": [{"image_base64": "AAAA"}], "webhook": "http://10.0.0.1/hook"}, 400, "url_refused"),
        ({"items": [{"image_base64": "AAAA"}], "webhook": "file:///etc/passwd"}, 400, "url_refused"),
        ({"items": [{"image_base64": "AAAA", "id": 7}]}, 400, "invalid_field"),
        ({"items": tiny_items(1) * 5}, 400, "too_many_items"),
    ],
)
async def test_bad_submissions_are_refused_whole(
    start_server, http, redis_url: str, stream: str, body: dict[str, Any], status: int, code: str
) -> None:
    server = await start_server(jobs_redis_url=redis_url, jobs_stream=stream, jobs_max_items=4)
    async with http.post(server.url + "/v1/jobs", json=body) as response:
        assert response.status == status, await response.text()
        assert (await response.json())["error"]["code"] == code


async def test_a_job_over_the_byte_limit_is_413_and_unknown_jobs_are_404(
    start_server, http, redis_url: str, stream: str
) -> None:
    server = await start_server(jobs_redis_url=redis_url, jobs_stream=stream, jobs_max_bytes=64 * 1024)
    big = {"items": [{"image_base64": b64(bytes(40 * 1024))}, {"image_base64": b64(bytes(40 * 1024))}]}
    async with http.post(server.url + "/v1/jobs", json=big) as response:
        assert response.status == 413
    form = aiohttp.FormData()
    for _ in range(2):
        form.add_field("images", bytes(40 * 1024), filename="x.png", content_type="image/png")
    async with http.post(server.url + "/v1/jobs", data=form) as response:
        assert response.status == 413
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/not-a-job/results"):
        async with http.get(server.url + path) as response:
            assert response.status == 404


async def test_without_a_jobs_redis_the_job_api_says_so(start_server, http) -> None:
    server = await start_server()
    async with http.post(server.url + "/v1/jobs", json={"items": tiny_items(1)}) as response:
        assert response.status == 503 and "Retry-After" in response.headers
        assert (await response.json())["error"]["code"] == "jobs_unavailable"


async def test_synchronous_calls_may_ask_for_bulk_priority(start_server, http) -> None:
    server = await start_server()
    image = encode(shapes_image(3))
    captions = []
    for priority in ("interactive", "bulk", "BULK"):
        async with http.post(
            server.url + "/v1/caption", data=image, headers={"X-Priority": priority}
        ) as response:
            assert response.status == 200, await response.text()
            captions.append((await response.json())["caption"])
    assert len(set(captions)) == 1
    async with http.post(
        server.url + "/v1/caption", data=image, headers={"X-Priority": "urgent"}
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_header"
