"""Overload, deadlines, clients that hang up and drain, on a real in-process server.

Pressure comes from holding the model's one worker thread (a job that waits on a threading.Event is
put on the batcher's executor, exactly where batches run), not from sleeps or timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from captionfleet.runtime.server.lifecycle import Server
from captionfleet.runtime.server.testing import encode, eventually, shapes_image

IMAGES = [encode(shapes_image(i)) for i in range(12)]


class ModelHold:
    """Occupies the server's model thread until released."""

    def __init__(self, server: Server) -> None:
        assert server.state.service is not None
        self.batcher = server.state.service.batcher
        self.gate = threading.Event()
        self.batcher.executor.submit(self.gate.wait, 60)

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def hold_model() -> Iterator[Callable[[Server], ModelHold]]:
    """``hold_model(server)``: occupy its model thread until ``release()`` (or the test's end)."""
    made: list[ModelHold] = []

    def hold(server: Server) -> ModelHold:
        made.append(ModelHold(server))
        return made[-1]

    yield hold
    for held in made:  # never leave a worker blocked, whatever the test did
        held.release()


async def _first_on_the_model(http: aiohttp.ClientSession, server: Server, hold: ModelHold) -> asyncio.Future:
    """Send a request and wait until it is on the held model, with nothing queued behind it."""
    first = asyncio.ensure_future(_status(http, server.url, IMAGES[0]))
    await eventually(
        lambda: hold.batcher.in_flight == 1 and hold.batcher.depth == 0, 10, "the first request on the model"
    )
    return first


async def _status(http: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, dict, dict]:
    async with http.post(url + "/v1/caption", data=data) as response:
        return response.status, dict(response.headers), await response.json()


async def test_overload_answers_every_request_with_200_or_503(start_server, http, hold_model) -> None:
    server = await start_server(max_queue_size=8, max_batch_size=8, cache_size=0)
    hold = hold_model(server)
    tasks = [asyncio.ensure_future(_status(http, server.url, IMAGES[i % len(IMAGES)])) for i in range(200)]
    await eventually(
        lambda: any(t.done() and t.result()[0] == 503 for t in tasks), 30, "the first 503 from a full queue"
    )
    assert hold.batcher.depth == 8
    hold.release()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)  # none hangs
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 16  # the batch taken before the hold, and the full queue
    for status, headers, body in results:
        if status == 503:
            assert body["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1
        else:
            assert isinstance(body["caption"], str)
    assert hold.batcher.depth == 0 and hold.batcher.in_flight == 0


async def test_a_request_whose_deadline_passes_in_the_queue_gets_504(start_server, http, hold_model) -> None:
    # The first request must be on the model within the deadline too: its reading and decoding on a
    # loaded 2-core runner have taken over 300 ms, so the deadline is a couple of seconds.
    server = await start_server(request_timeout_ms=2000, cache_size=0)
    hold = hold_model(server)
    first = await _first_on_the_model(http, server, hold)
    status, _, body = await asyncio.wait_for(_status(http, server.url, IMAGES[1]), 10)
    assert (status, body["error"]["code"]) == (504, "deadline_exceeded")  # answered while the model is held
    hold.release()
    assert (await first)[0] == 200  # a request on the model finishes
    text = await (await http.get(server.url + "/metrics")).text()
    assert (
        f'captionfleet_batch_size_sum{{model="{server.state.metrics.model}"}} 1.0' in text
    )  # the first request's batch only


async def test_a_clients_own_shorter_deadline_gets_504_and_a_bad_one_400(
    start_server, http, hold_model
) -> None:
    server = await start_server(request_timeout_ms=60_000, cache_size=0)
    hold = hold_model(server)
    first = await _first_on_the_model(http, server, hold)  # on the model, behind the hold
    url = server.url + "/v1/caption"
    async with http.post(url, data=IMAGES[2], headers={"X-Request-Timeout-Ms": "200"}) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (504, "deadline_exceeded")
    for bad in ("soon", "0", "-5", "nan", "inf"):
        async with http.post(url, data=IMAGES[2], headers={"X-Request-Timeout-Ms": bad}) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (400, "invalid_timeout"), (
                bad
            )
    hold.release()
    assert (await first)[0] == 200
    async with http.post(url, data=IMAGES[2], headers={"X-Request-Timeout-Ms": "30000"}) as response:
        assert response.status == 200


async def test_a_client_that_hangs_up_leaves_the_queue(start_server, http, hold_model) -> None:
    server = await start_server(cache_size=0)
    hold = hold_model(server)
    batcher = hold.batcher
    first = await _first_on_the_model(http, server, hold)
    gone = asyncio.ensure_future(_status(http, server.url, IMAGES[1]))
    await eventually(lambda: batcher.depth == 1, 10, "the second request in the queue")
    gone.cancel()  # closes its connection: the server cancels the handler
    await eventually(lambda: batcher.depth == 0, 10, "the abandoned request to leave the queue")
    hold.release()
    assert (await first)[0] == 200
    text = await (await http.get(server.url + "/metrics")).text()
    assert 'captionfleet_requests_total{code="499",route="/v1/caption"} 1.0' in text
    assert f'captionfleet_batch_size_sum{{model="{server.state.metrics.model}"}} 1.0' in text  # never ran


async def test_drain_refuses_new_work_finishes_what_it_can_and_fails_the_rest(
    start_server, http, hold_model
) -> None:
    server = await start_server(drain_grace_s=1.0, cache_size=0)
    hold = hold_model(server)
    batcher = hold.batcher
    accepted = [asyncio.ensure_future(_status(http, server.url, image)) for image in IMAGES[:3]]
    await eventually(
        lambda: server.state.in_flight == 3 and batcher.in_flight == 3, 10, "3 accepted requests"
    )
    draining = asyncio.ensure_future(server.drain())
    await eventually(lambda: server.state.draining, 10, "the drain to start")
    async with http.get(server.url + "/readyz") as response:
        assert response.status == 503 and (await response.json())["reason"] == "draining"
    status, headers, body = await _status(http, server.url, IMAGES[4])
    assert (status, body["error"]["code"]) == (503, "draining") and headers["Retry-After"]
    assert await asyncio.wait_for(draining, 30) == 3  # the model never came back within the grace period
    for status, _, body in await asyncio.gather(*accepted):
        assert (status, body["error"]["code"]) == (503, "draining")


async def test_drain_lets_accepted_requests_finish(start_server, http, hold_model) -> None:
    server = await start_server(drain_grace_s=30.0, cache_size=0, max_queue_delay_ms=10_000)
    hold = hold_model(server)
    accepted = [asyncio.ensure_future(_status(http, server.url, image)) for image in IMAGES[:6]]
    await eventually(lambda: hold.batcher.in_flight == 6, 10, "6 accepted requests")
    draining = asyncio.ensure_future(server.drain())
    await eventually(lambda: server.state.draining, 10, "the drain to start")
    hold.release()  # the queue is flushed at once, not after max_queue_delay
    assert await asyncio.wait_for(draining, 30) == 0
    assert [status for status, _, _ in await asyncio.gather(*accepted)] == [200] * 6
