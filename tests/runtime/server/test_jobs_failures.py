"""Jobs through failures: real ``captionfleet serve`` processes on one stream, one of them SIGKILLed
or SIGTERMed mid-job, or SIGKILLed before the job's webhook is delivered; a ``redis-server`` with
append-only persistence restarted mid-job. The job must end with every item exactly once: nothing
lost (a dead consumer's items are claimed by another, a draining one's are handed back), nothing
counted twice (results are stored once per item), and its webhook delivered by whoever is left."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from captionfleet.names import JOBS_CONSUMER_GROUP, WEBHOOK_DELIVERY_HEADER, WEBHOOK_SIGNATURE_HEADER
from captionfleet.runtime.server.testing import (
    RedisProcess,
    ServeProcess,
    encode,
    eventually,
    shapes_image,
)
from captionfleet.settings.serve import ServeSettings

ITEMS = 80
DEADLINE_S = 240.0


def slow_settings(model_dir: Path, redis_url: str, stream: str, **overrides: Any) -> ServeSettings:
    """Batches of one and a long beam search: the job lasts long enough to be interrupted."""
    values: dict[str, Any] = dict(
        port=0, model=str(model_dir), max_batch_size=1, num_beams=4, max_new_tokens=40, cache_size=0,
        torch_threads=1, jobs_redis_url=redis_url, jobs_stream=stream, jobs_claim_timeout_s=3.0,
    )  # fmt: skip
    return ServeSettings(**(values | overrides))


def job_body(count: int = ITEMS) -> dict[str, Any]:
    items = [
        {"id": f"i{i}", "image_base64": base64.b64encode(encode(shapes_image(i))).decode()}
        for i in range(count)
    ]
    return {"items": items}


async def poll(http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The job's state, or None while the server cannot reach Redis (503) or is gone."""
    try:
        async with http.get(url) as response:
            if response.status == 503:
                return None
            assert response.status == 200, await response.text()
            return dict(await response.json())
    except aiohttp.ClientConnectionError:
        return None


async def until(http: aiohttp.ClientSession, url: str, done: Any, what: str) -> dict[str, Any]:
    ends = time.monotonic() + DEADLINE_S
    while True:
        state = await poll(http, url)
        if state is not None and done(state):
            return state
        assert time.monotonic() < ends, f"timed out waiting for {what}: {state}"
        await asyncio.sleep(0.1)


async def check_every_item_once(http: aiohttp.ClientSession, base: str, job_id: str) -> None:
    state = await until(
        http, f"{base}/v1/jobs/{job_id}", lambda s: s["status"] not in ("queued", "running"), "the job's end"
    )
    assert state["status"] == "succeeded", state
    assert state["counts"] == {"total": ITEMS, "done": ITEMS, "failed": 0}
    async with http.get(f"{base}/v1/jobs/{job_id}/results") as response:
        assert response.status == 200
        lines = [line for line in (await response.text()).splitlines() if line]
    assert len(lines) == ITEMS
    parsed = [json.loads(line) for line in lines]
    assert [line["index"] for line in parsed] == list(range(ITEMS))
    assert [line["id"] for line in parsed] == [f"i{i}" for i in range(ITEMS)]
    assert all(isinstance(line["result"]["caption"], str) for line in parsed)


def consumer_name(pid: int) -> bytes:
    return f"{socket.gethostname()}-{pid}".encode()


async def held_by(client: redis.asyncio.Redis, stream: str, pid: int) -> int:
    """Items the consumer of process ``pid`` holds (read, not acknowledged)."""
    summary = await client.xpending(stream, JOBS_CONSUMER_GROUP)
    name = consumer_name(pid)
    return sum(int(c["pending"]) for c in summary.get("consumers") or [] if c["name"] == name)


async def start_two(serve_process: Any, settings: ServeSettings) -> tuple[ServeProcess, ServeProcess]:
    first: ServeProcess = serve_process(settings)
    second: ServeProcess = serve_process(settings)
    await asyncio.gather(asyncio.to_thread(first.wait_ready), asyncio.to_thread(second.wait_ready))
    return first, second


async def submit(http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> str:
    async with http.post(base + "/v1/jobs", json=body) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["id"])


@pytest.fixture
def stream() -> str:
    return f"test-jobs:{uuid.uuid4().hex[:8]}"


async def test_a_job_survives_a_consumer_killed_mid_job(
    serve_process, tiny_model_dir: Path, redis_url: str, stream: str
) -> None:
    settings = slow_settings(tiny_model_dir, redis_url, stream)
    front: ServeProcess = serve_process(settings)
    victim: ServeProcess = serve_process(settings)
    await asyncio.gather(asyncio.to_thread(front.wait_ready), asyncio.to_thread(victim.wait_ready))
    client = redis.asyncio.Redis.from_url(redis_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.post(front.url + "/v1/jobs", json=job_body()) as response:
            assert response.status == 202, await response.text()
            job_id = (await response.json())["id"]
        ends = time.monotonic() + DEADLINE_S
        while await held_by(client, stream, victim.process.pid) == 0:  # it has items in hand
            assert time.monotonic() < ends, "the second process never took items"
            await asyncio.sleep(0.02)
        state = await poll(http, f"{front.url}/v1/jobs/{job_id}")
        assert state is not None and state["counts"]["done"] < ITEMS, "the job ended before the kill"
        victim.process.kill()
        victim.process.wait(timeout=30)
        await check_every_item_once(http, front.url, job_id)
    await client.aclose()


async def _answers_while_redis_is_down(http: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    calls = {
        "submit": http.post(base + "/v1/jobs", json=job_body(2)),
        "status": http.get(f"{base}/v1/jobs/{job_id}"),
        "results": http.get(f"{base}/v1/jobs/{job_id}/results"),
        "cancel": http.delete(f"{base}/v1/jobs/{job_id}"),
    }
    for name, call in calls.items():
        async with call as response:
            body = await response.json()
            answers[name] = (response.status, body["error"]["code"], "Retry-After" in response.headers)
    async with http.post(base + "/v1/caption", data=encode(shapes_image(3))) as response:
        answers["caption"] = response.status
    async with http.get(base + "/readyz") as response:
        answers["readyz"] = response.status
    return answers


@pytest.mark.parametrize("outage", ["restart", "kill"])
async def test_a_job_survives_redis_going_away(
    outage: str, serve_process, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """redis-server (append-only) restarted mid-job, or SIGKILLed (no clean shutdown) and started again
    a while later: while it is down every job route answers 503 jobs_unavailable with Retry-After
    (the cancel too: it did not happen) and captions go on; the job ends with every item exactly once."""
    (tmp_path / "redis").mkdir()
    store = RedisProcess(tmp_path / "redis", appendonly=True)
    try:
        process = serve_process(slow_settings(tiny_model_dir, store.url, "jobs"))
        await asyncio.to_thread(process.wait_ready)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            job_id = await submit(http, process.url, job_body())
            url = f"{process.url}/v1/jobs/{job_id}"
            await until(http, url, lambda s: s["counts"]["done"] >= 10, "10 items done")
            if outage == "restart":
                await asyncio.to_thread(store.restart)
            else:
                await asyncio.to_thread(store.kill)
                unavailable = (503, "jobs_unavailable", True)
                assert await _answers_while_redis_is_down(http, process.url, job_id) == {
                    "submit": unavailable, "status": unavailable, "results": unavailable,
                    "cancel": unavailable, "caption": 200, "readyz": 200,
                }  # fmt: skip
                await asyncio.to_thread(store.start_again)
            state = await until(http, url, lambda s: True, "the job's state after the outage")
            assert state["counts"]["done"] < ITEMS, "the job ended before the outage"
            await check_every_item_once(http, process.url, job_id)
    finally:
        store.stop()


async def test_a_draining_consumer_finishes_or_hands_back_its_items(
    serve_process, tiny_model_dir: Path, redis_url: str, stream: str
) -> None:
    claim_timeout_s = 30.0  # longer than the test may wait: only a hand-back lets the other take them
    settings = slow_settings(
        tiny_model_dir, redis_url, stream, jobs_claim_timeout_s=claim_timeout_s, drain_grace_s=2.0
    )
    front, victim = await start_two(serve_process, settings)
    client = redis.asyncio.Redis.from_url(redis_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        job_id = await submit(http, front.url, job_body())
        ends = time.monotonic() + DEADLINE_S
        while await held_by(client, stream, victim.process.pid) == 0:  # it has items in hand
            assert time.monotonic() < ends, "the second process never took items"
            await asyncio.sleep(0.02)
        victim.terminate()
        assert await asyncio.to_thread(victim.wait, 60) == 0, victim.log_text()
        # What it did not finish within the grace is marked idle for the whole claim timeout, so the
        # other replica's next upkeep (every third of it) takes it rather than waiting it out.
        left = await client.xpending_range(
            stream, JOBS_CONSUMER_GROUP, "-", "+", 100, consumername=consumer_name(victim.process.pid)
        )
        assert all(entry["time_since_delivered"] >= claim_timeout_s * 1000 for entry in left), left
        await check_every_item_once(http, front.url, job_id)
    await client.aclose()


async def test_a_webhook_survives_the_replica_that_owed_it(
    serve_process, tiny_model_dir: Path, redis_url: str, stream: str, receiver: Any
) -> None:
    url, received = receiver
    settings = slow_settings(
        tiny_model_dir, redis_url, stream, allow_private_urls=True, jobs_webhook_secret="s3cret",
        jobs_webhook_backoff_s=600.0,  # the replica that got the 500 would retry only long after the test
    )  # fmt: skip
    first, second = await start_two(serve_process, settings)
    client = redis.asyncio.Redis.from_url(redis_url)
    webhooks = f"{stream}:webhooks"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        job_id = await submit(http, first.url, job_body(4) | {"webhook": url})
        await eventually(lambda: len(received) >= 1, DEADLINE_S, "the webhook's first attempt")
        holders = (await client.xpending(webhooks, JOBS_CONSUMER_GROUP))["consumers"]
        assert len(holders) == 1, holders
        first_owes = holders[0]["name"] == consumer_name(first.process.pid)
        owing, other = (first, second) if first_owes else (second, first)
        owing.process.kill()
        owing.process.wait(timeout=30)
        await eventually(lambda: len(received) >= 2, DEADLINE_S, "the other replica's delivery")
        assert other.process.poll() is None
        ends = time.monotonic() + DEADLINE_S
        while await client.xlen(webhooks) > 0:  # acknowledged and deleted once delivered
            assert time.monotonic() < ends, "the delivered webhook was never acknowledged"
            await asyncio.sleep(0.05)
    assert len(received) == 2, received
    (body, headers), (again, headers_again) = received
    assert again == body  # the same bytes, frozen on the first attempt, so the same signature
    assert headers_again[WEBHOOK_SIGNATURE_HEADER] == headers[WEBHOOK_SIGNATURE_HEADER]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[WEBHOOK_SIGNATURE_HEADER], expected)
    assert headers[WEBHOOK_DELIVERY_HEADER] == headers_again[WEBHOOK_DELIVERY_HEADER]
    assert headers[WEBHOOK_DELIVERY_HEADER].startswith(job_id + ".")
    state = json.loads(body)
    assert state["id"] == job_id and state["status"] == "succeeded"
    assert state["counts"] == {"total": 4, "done": 4, "failed": 0}
    await client.aclose()
