"""Jobs through failures: real ``captionfleet serve`` processes on one stream, one of them SIGKILLed
mid-job; a ``redis-server`` with append-only persistence restarted mid-job. The job must end with
every item exactly once: nothing lost (a dead consumer's items are claimed by another), nothing
counted twice (results are stored once per item)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from captionfleet.names import JOBS_CONSUMER_GROUP
from captionfleet.runtime.server.testing import RedisProcess, ServeProcess, encode, shapes_image
from captionfleet.settings.serve import ServeSettings

ITEMS = 80
DEADLINE_S = 240.0


def slow_settings(model_dir: Path, redis_url: str, stream: str) -> ServeSettings:
    """Batches of one and a long beam search: the job lasts long enough to be interrupted."""
    return ServeSettings(
        port=0, model=str(model_dir), max_batch_size=1, num_beams=4, max_new_tokens=40, cache_size=0,
        torch_threads=1, jobs_redis_url=redis_url, jobs_stream=stream, jobs_claim_timeout_s=3.0,
    )  # fmt: skip


def job_body() -> dict[str, Any]:
    items = [
        {"id": f"i{i}", "image_base64": base64.b64encode(encode(shapes_image(i))).decode()}
        for i in range(ITEMS)
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


async def held_by(client: redis.asyncio.Redis, stream: str, pid: int) -> int:
    """Items the consumer of process ``pid`` holds (read, not acknowledged)."""
    summary = await client.xpending(stream, JOBS_CONSUMER_GROUP)
    name = f"{socket.gethostname()}-{pid}".encode()
    return sum(int(c["pending"]) for c in summary.get("consumers") or [] if c["name"] == name)


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


async def test_a_job_survives_a_redis_restart(serve_process, tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    store = RedisProcess(tmp_path / "redis", appendonly=True)
    try:
        process = serve_process(slow_settings(tiny_model_dir, store.url, "jobs"))
        await asyncio.to_thread(process.wait_ready)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            async with http.post(process.url + "/v1/jobs", json=job_body()) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            url = f"{process.url}/v1/jobs/{job_id}"
            await until(http, url, lambda s: s["counts"]["done"] >= 10, "10 items done")
            await asyncio.to_thread(store.restart)
            state = await until(http, url, lambda s: True, "the job's state after the restart")
            assert state["counts"]["done"] < ITEMS, "the job ended before the restart"
            await check_every_item_once(http, process.url, job_id)
    finally:
        store.stop()
