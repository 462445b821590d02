"""The dynamic batcher on its own, with a plain function as the model.

The "model" is a real function run in the batcher's worker thread; a gate (threading.Event) holds it
inside a batch, so queue states are produced deterministically instead of by timing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from captionfleet.runtime.server.testing import eventually
from captionfleet.runtime.serving.batch_cost import BatchCost
from captionfleet.runtime.serving.batcher import DynamicBatcher, Priority
from captionfleet.runtime.serving.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull


class GatedModel:
    """Multiplies by 10; records every call; waits at ``gate`` while ``hold`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gate.set()
        self.fail_with: Exception | None = None
        self.drop_one = False
        self.gates: dict[int, threading.Event] = {}
        """Gates of single calls by index, held instead of ``gate`` (a batch held while others run)."""

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    def __call__(self, items: list[int], group: str) -> Sequence[int]:
        gate = self.gates.get(len(self.calls), self.gate)
        self.calls.append((list(items), group))
        self.entered.set()
        assert gate.wait(30), "the test never released the model"
        if self.fail_with is not None:
            raise self.fail_with
        results = [item * 10 for item in items]
        return results[:-1] if self.drop_one else results

    def seen(self) -> list[int]:
        return [item for items, _ in self.calls for item in items]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the model was never called"


@pytest.fixture
async def model() -> GatedModel:
    return GatedModel()


def make(
    model: GatedModel, *, idle_dispatch: bool = True, wait_for_arrivals: bool = True, **kwargs: float
) -> DynamicBatcher[int, str, int]:
    options = {"max_batch_size": 4, "max_queue_delay_s": 0.005, "max_queue_size": 64} | kwargs
    batcher: DynamicBatcher[int, str, int] = DynamicBatcher(
        model,
        max_batch_size=int(options["max_batch_size"]),
        max_queue_delay_s=float(options["max_queue_delay_s"]),
        max_queue_size=int(options["max_queue_size"]),
        idle_dispatch=idle_dispatch,
        max_bulk_batch_size=int(options.get("max_bulk_batch_size", 0)) or None,
        wait_for_arrivals=wait_for_arrivals,
        bulk_time_share=float(options.get("bulk_time_share", math.inf)),
        bulk_max_wait_s=float(options.get("bulk_max_wait_s", math.inf)),
    )
    batcher.start()
    return batcher


async def occupy(
    batcher: DynamicBatcher[int, str, int], model: GatedModel, item: int = 0, group: str = "a", **submit: Any
) -> asyncio.Task[int]:
    """Holds the model on ``item``'s batch, so that what is submitted next waits behind it."""
    model.hold()
    running = asyncio.ensure_future(batcher.submit(item, group, **submit))
    await model.wait_entered()
    return running


async def test_every_request_gets_its_own_result_in_batches_of_at_most_max(model: GatedModel) -> None:
    batcher = make(model)
    first = await occupy(batcher, model)  # the model is busy with [0]: the rest piles up in the queue
    rest = [asyncio.ensure_future(batcher.submit(i, "a")) for i in range(1, 23)]
    await eventually(lambda: batcher.depth == 22, 10, "22 queued requests")
    model.release()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
    assert results == [i * 10 for i in range(23)]
    assert sorted(model.seen()) == list(range(23))  # each exactly once
    sizes = [len(items) for items, _ in model.calls]
    assert max(sizes) == 4 and all(size <= 4 for size in sizes)
    assert await batcher.close(5) == 0


async def test_a_request_arriving_during_a_batch_is_not_stranded(model: GatedModel) -> None:
    # The seed's bug: a `processing` flag made the second arrival return early and strand the queue.
    batcher = make(model, max_batch_size=8, max_queue_delay_s=0.001)
    first = await occupy(batcher, model, 1)
    second = asyncio.ensure_future(batcher.submit(2, "a"))
    model.release()
    assert await asyncio.wait_for(first, 10) == 10
    assert await asyncio.wait_for(second, 10) == 20  # no further arrival is needed to run it
    await batcher.close(5)


async def test_groups_never_share_a_model_call(model: GatedModel) -> None:
    batcher = make(model)
    blocker = await occupy(batcher, model, 100, "x")
    futures = [asyncio.ensure_future(batcher.submit(i, "ab"[i % 2])) for i in range(12)]
    model.release()
    assert await asyncio.wait_for(asyncio.gather(*futures), 30) == [i * 10 for i in range(12)]
    await blocker
    for items, group in model.calls:
        assert all("ab"[i % 2] == group for i in items if i != 100)
    await batcher.close(5)


async def test_a_lone_request_runs_after_the_queue_delay_without_companions(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=64, max_queue_delay_s=0.02)
    assert await asyncio.wait_for(batcher.submit(7, "a"), 10) == 70
    await batcher.close(5)


async def test_an_idle_model_takes_a_lone_request_without_waiting_the_delay(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=64, max_queue_delay_s=30)  # only the idle fast path is quick
    for item in (1, 2, 3):
        assert await asyncio.wait_for(batcher.submit(item, "a"), 10) == item * 10
    assert [items for items, _ in model.calls] == [[1], [2], [3]]
    await batcher.close(5)


async def test_after_a_larger_batch_a_lone_request_waits_for_companions(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=8, max_queue_delay_s=30)
    first = await occupy(batcher, model)  # idle: goes at once
    burst = [asyncio.ensure_future(batcher.submit(i, "a")) for i in range(1, 6)]
    await eventually(lambda: batcher.depth == 5, 10, "5 queued requests")
    model.release()
    assert await asyncio.wait_for(first, 10) == 0
    # The companions are the 5 that arrived while [0] ran and [0]'s client, which comes back: the 5
    # wait for it (the delay is 30 s) instead of going without it and splitting the clients in two.
    back = asyncio.ensure_future(batcher.submit(6, "a"))
    assert await asyncio.wait_for(asyncio.gather(*burst, back), 10) == [i * 10 for i in range(1, 7)]
    lone = asyncio.ensure_future(batcher.submit(7, "a"))
    await eventually(lambda: batcher.depth == 1, 10, "the lone request queued")
    # The last batch held 6: the lone request waits until 5 companions come.
    later = [asyncio.ensure_future(batcher.submit(i, "a")) for i in range(8, 13)]
    assert await asyncio.wait_for(asyncio.gather(lone, *later), 10) == [i * 10 for i in range(7, 13)]
    assert [items for items, _ in model.calls] == [[0], [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    await batcher.close(5)


async def test_a_split_closed_loop_becomes_one_batch_again(model: GatedModel) -> None:
    """Four clients split 3 and 1 (the one arrived while the three ran). Once the three are answered
    and come back, the next batch waits for them and holds all four; counting only the last batch's
    three as companions, it went with the first three back and left the fourth to go alone."""
    batcher = make(model, max_batch_size=8, max_queue_delay_s=30)
    other = await occupy(batcher, model, group="b")
    three = [asyncio.ensure_future(batcher.submit(i, "a")) for i in (1, 2, 3)]
    await eventually(lambda: batcher.depth == 3, 10, "3 queued requests")
    model.gates[1] = three_held = threading.Event()
    model.release()  # the "b" batch ends; [1, 2, 3] goes (they are the one companion and more)
    await eventually(lambda: len(model.calls) == 2, 10, "the batch of three on the model")
    fourth = asyncio.ensure_future(batcher.submit(4, "a"))
    await eventually(lambda: batcher.depth == 1, 10, "the fourth queued")
    three_held.set()
    assert await asyncio.wait_for(asyncio.gather(other, *three), 10) == [0, 10, 20, 30]
    back = []
    for item in (5, 6, 7):  # one at a time, as the clients come back
        back.append(asyncio.ensure_future(batcher.submit(item, "a")))
        queued = len(back) + 1
        await eventually(lambda: bool(model.calls[2:]) or batcher.depth == queued, 10, "queued")  # noqa: B023
    assert await asyncio.wait_for(asyncio.gather(fourth, *back), 10) == [40, 50, 60, 70]
    assert [items for items, _ in model.calls][2:] == [[4, 5, 6, 7]]
    await batcher.close(5)


async def test_without_the_idle_fast_path_a_lone_request_waits_the_delay(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=8, max_queue_delay_s=30, idle_dispatch=False)
    lone = asyncio.ensure_future(batcher.submit(1, "a"))
    await eventually(lambda: batcher.depth == 1, 10, "the lone request queued")
    assert not model.calls
    assert await batcher.close(5) == 0  # closing makes it due
    assert await lone == 10


async def _lone_after_a_long_batch(batcher: DynamicBatcher[int, str, int], model: GatedModel) -> list[int]:
    """A batch of 4 held on the model for 1 s while one more request queues and one is on its way (in
    ``arriving``); the rest of the four clients come back once they are answered. Returns the second
    batch (a closed loop: without the arrival wait the lone request goes alone, its delay expired)."""
    model.hold()
    began = time.monotonic()
    with batcher.preparing():
        first = asyncio.ensure_future(asyncio.gather(*(batcher.submit(i, "a") for i in range(4))))
        await model.wait_entered()
        lone = asyncio.ensure_future(batcher.submit(4, "a"))
        await eventually(lambda: batcher.depth == 1, 10, "the lone request queued")
        # The batch must outlast the test's next steps: the wait for arrivals is at most its length.
        await eventually(lambda: time.monotonic() - began >= 1.0, 10, "a batch of 1 s")
        model.release()
        assert await asyncio.wait_for(first, 10) == [0, 10, 20, 30]
        back = [asyncio.ensure_future(batcher.submit(i, "a")) for i in (5, 6)]
    last = asyncio.ensure_future(batcher.submit(7, "a"))  # the one that was on its way
    assert await asyncio.wait_for(asyncio.gather(lone, *back, last), 10) == [40, 50, 60, 70]
    return model.calls[1][0]


async def test_a_free_model_waits_for_the_requests_on_their_way_instead_of_splitting(
    model: GatedModel,
) -> None:
    batcher = make(model, max_batch_size=8, max_queue_delay_s=0.005)
    assert await _lone_after_a_long_batch(batcher, model) == [4, 5, 6, 7]
    assert len(model.calls) == 2
    await batcher.close(5)


async def test_without_the_arrival_wait_the_closed_loop_splits_into_a_lone_batch(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=8, max_queue_delay_s=0.005, wait_for_arrivals=False)
    assert await _lone_after_a_long_batch(batcher, model) == [4]
    await batcher.close(5)


async def test_the_arrival_wait_is_at_most_one_batch_long(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=8, max_queue_delay_s=0.005)
    assert await asyncio.gather(*(batcher.submit(i, "a") for i in range(3))) == [0, 10, 20]
    with batcher.preparing():  # on its way and never coming (e.g. a cache hit still decoding)
        assert await asyncio.wait_for(batcher.submit(3, "a"), 10) == 30  # goes, after a short batch's time
    await batcher.close(5)


async def test_a_full_queue_refuses_with_a_retry_hint(model: GatedModel) -> None:
    batcher = make(model, max_queue_size=3, max_batch_size=1)
    running = await occupy(batcher, model)
    queued = [asyncio.ensure_future(batcher.submit(i, "a")) for i in (1, 2, 3)]
    await eventually(lambda: batcher.depth == 3, 10, "3 queued requests")
    with pytest.raises(QueueFull) as refused:
        await batcher.submit(4, "a")
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    model.release()
    assert await asyncio.gather(running, *queued) == [0, 10, 20, 30]
    await batcher.close(5)


async def test_an_expired_request_gets_deadline_exceeded_and_never_reaches_the_model(
    model: GatedModel,
) -> None:
    batcher = make(model, max_batch_size=1)
    running = await occupy(batcher, model)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(5, "a", deadline=loop.time() + 0.05)  # loop.time() is time.monotonic()
    patient = asyncio.ensure_future(batcher.submit(6, "a", deadline=loop.time() + 60))
    model.release()
    assert await running == 0
    assert await patient == 60
    assert 5 not in model.seen()
    await batcher.close(5)


async def test_a_request_whose_caller_went_away_is_skipped(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=1)
    running = await occupy(batcher, model)
    abandoned = asyncio.ensure_future(batcher.submit(9, "a"))
    kept = asyncio.ensure_future(batcher.submit(8, "a"))
    await eventually(lambda: batcher.depth == 2, 10, "2 queued requests")
    abandoned.cancel()
    model.release()
    assert await kept == 80 and await running == 0
    assert abandoned.cancelled()
    assert 9 not in model.seen()
    assert batcher.depth == 0
    await batcher.close(5)


async def test_a_failing_model_fails_its_batch_only(model: GatedModel) -> None:
    batcher = make(model)
    model.fail_with = RuntimeError("out of memory")
    results = await asyncio.gather(*(batcher.submit(i, "a") for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    model.fail_with = None
    assert await batcher.submit(4, "a") == 40  # the consumer survived
    await batcher.close(5)


async def test_a_wrong_number_of_results_fails_the_whole_batch(model: GatedModel) -> None:
    batcher = make(model)
    model.drop_one = True
    results = await asyncio.gather(*(batcher.submit(i, "a") for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) for r in results)
    await batcher.close(5)


async def test_close_runs_what_is_queued_then_refuses(model: GatedModel) -> None:
    # only closing can make these due
    batcher = make(model, max_batch_size=8, max_queue_delay_s=30, idle_dispatch=False)
    futures = [asyncio.ensure_future(batcher.submit(i, "a")) for i in range(5)]
    await eventually(lambda: batcher.depth == 5, 10, "5 queued requests")
    assert await batcher.close(10) == 0
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40]
    with pytest.raises(Draining):
        await batcher.submit(1, "a")


async def test_close_fails_what_the_grace_period_cannot_finish(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=1)
    model.hold()
    futures = [asyncio.ensure_future(batcher.submit(i, "a")) for i in range(3)]
    await model.wait_entered()
    left = await batcher.close(0.05)
    assert left == 3
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, Draining) for r in results)
    model.release()  # let the worker thread finish its (abandoned) call


BULK = Priority.BULK


async def held_with_bulk(
    batcher: DynamicBatcher[int, str, int],
    model: GatedModel,
    items: Sequence[int],
    *,
    first: int = 0,
    first_priority: Priority = BULK,
    first_group: str = "a",
) -> tuple[asyncio.Future[int], list[asyncio.Future[int]]]:
    """The model held inside a batch of ``first``, and ``items`` queued as bulk (group "a") behind it."""
    running = await occupy(batcher, model, first, first_group, priority=first_priority)
    bulk = [asyncio.ensure_future(batcher.submit(i, "a", priority=BULK)) for i in items]
    await eventually(lambda: batcher.bulk_depth == len(items), 10, f"{len(items)} bulk items queued")
    return running, bulk


async def test_interactive_requests_go_first_and_bulk_fills_the_room_they_leave(model: GatedModel) -> None:
    batcher = make(model)
    blocker = await occupy(batcher, model, priority=BULK)
    bulk = [asyncio.ensure_future(batcher.submit(i, "a", priority=BULK)) for i in range(10, 16)]
    interactive = [asyncio.ensure_future(batcher.submit(i, "a")) for i in (1, 2, 3)]
    await eventually(lambda: batcher.depth == 3 and batcher.bulk_depth == 6, 10, "both queues filled")
    model.release()
    assert await asyncio.wait_for(asyncio.gather(*interactive), 10) == [10, 20, 30]
    assert await asyncio.wait_for(asyncio.gather(blocker, *bulk), 10) == [0, *(i * 10 for i in range(10, 16))]
    # Queued first, the bulk items still come after the interactive ones, filling their batch's room.
    assert [items for items, _ in model.calls] == [[0], [1, 2, 3, 10], [11, 12, 13, 14], [15]]
    assert await batcher.close(5) == 0


async def test_bulk_delays_an_interactive_request_by_at_most_the_running_batch(model: GatedModel) -> None:
    batcher = make(model)
    model.hold()
    bulk = [asyncio.ensure_future(batcher.submit(i, "a", priority=BULK)) for i in range(100, 140)]
    await model.wait_entered()  # a bulk batch is on the model, 36 more bulk items wait
    late = asyncio.ensure_future(batcher.submit(1, "a"))
    await eventually(lambda: batcher.depth == 1, 10, "the interactive request queued")
    model.release()
    assert await asyncio.wait_for(late, 10) == 10
    assert model.calls[1][0][0] == 1  # the very next batch after the running one
    await asyncio.wait_for(asyncio.gather(*bulk), 30)
    assert sorted(model.seen()) == [1, *range(100, 140)]
    await batcher.close(5)


async def test_an_interactive_batch_never_waits_for_bulk_companions(model: GatedModel) -> None:
    # A bulk batch of 4 ran last; the lone interactive request after it still takes the idle fast path
    # (bulk filler is no sign that interactive companions are coming), despite a 30 s queue delay.
    batcher = make(model, max_queue_delay_s=30)
    blocker, bulk = await held_with_bulk(batcher, model, range(10, 14), first_group="b")
    model.release()
    await asyncio.wait_for(asyncio.gather(blocker, *bulk), 10)
    assert await asyncio.wait_for(batcher.submit(7, "a"), 10) == 70
    assert [items for items, _ in model.calls] == [[0], [10, 11, 12, 13], [7]]
    await batcher.close(5)


async def test_bulk_work_is_not_interactive_demand_and_has_its_own_bound(model: GatedModel) -> None:
    batcher = make(model, max_queue_size=2, max_batch_size=1)
    running, bulk = await held_with_bulk(batcher, model, (1, 2), first_priority=Priority.INTERACTIVE)
    assert batcher.depth == 0
    with pytest.raises(QueueFull):
        await batcher.submit(3, "a", priority=BULK)
    interactive = asyncio.ensure_future(batcher.submit(4, "a"))  # a full bulk queue refuses no user
    await eventually(lambda: batcher.depth == 1, 10, "the interactive request queued")
    model.release()
    assert await asyncio.wait_for(asyncio.gather(running, interactive, *bulk), 10) == [0, 40, 10, 20]
    assert model.seen() == [0, 4, 1, 2]
    await batcher.close(5)


async def test_close_answers_queued_bulk_requests_too(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=1)
    running, waiting = await held_with_bulk(batcher, model, (1, 2, 3))
    assert await batcher.close(0.2) == 4  # the model stays held: the grace period runs out
    model.release()
    for future in (running, *waiting):
        with pytest.raises(Draining):
            await asyncio.wait_for(future, 10)


async def test_bulk_work_runs_in_batches_of_at_most_its_own_size(model: GatedModel) -> None:
    batcher = make(model, max_bulk_batch_size=2)
    blocker = await occupy(batcher, model, priority=BULK)
    bulk = [asyncio.ensure_future(batcher.submit(i, "a", priority=BULK)) for i in range(10, 15)]
    interactive = asyncio.ensure_future(batcher.submit(1, "a"))
    await eventually(lambda: batcher.depth == 1 and batcher.bulk_depth == 5, 10, "both queues filled")
    model.release()
    await asyncio.wait_for(asyncio.gather(blocker, interactive, *bulk), 10)
    assert [items for items, _ in model.calls] == [[0], [1, 10, 11], [12, 13], [14]]
    await batcher.close(5)


async def test_no_bulk_batch_starts_while_an_interactive_request_is_prepared(model: GatedModel) -> None:
    batcher = make(model)
    with batcher.preparing():  # as the service does while it decodes and preprocesses
        bulk = asyncio.ensure_future(batcher.submit(10, "a", priority=BULK))
        for _ in range(20):  # the consumer gets every chance to run (no timing involved)
            await asyncio.sleep(0)
        assert batcher.bulk_depth == 1 and not model.calls
    interactive = asyncio.ensure_future(batcher.submit(1, "a"))
    assert await asyncio.wait_for(asyncio.gather(interactive, bulk), 10) == [10, 100]
    assert [items for items, _ in model.calls] == [[1, 10]]
    await batcher.close(5)


async def bulk_behind_a_batch(
    batcher: DynamicBatcher[int, str, int], model: GatedModel
) -> tuple[asyncio.Task[int], asyncio.Future[int]]:
    """An interactive batch on the model (item 0) and one bulk item (10) queued behind it."""
    first = await occupy(batcher, model)
    bulk = asyncio.ensure_future(batcher.submit(10, "a", priority=BULK))
    await eventually(lambda: batcher.bulk_depth == 1, 10, "the bulk item queued")
    return first, bulk


async def next_request_joins_the_bulk_item(
    batcher: DynamicBatcher[int, str, int], model: GatedModel, bulk: asyncio.Future[int]
) -> None:
    """The last batch's client sends its next request: one batch of it and the waiting bulk item."""
    again = asyncio.ensure_future(batcher.submit(1, "a"))
    assert await asyncio.wait_for(asyncio.gather(again, bulk), 10) == [10, 100]
    assert [items for items, _ in model.calls] == [[0], [1, 10]]
    await batcher.close(5)


async def test_bulk_waits_for_the_clients_of_the_last_batch_to_come_back(model: GatedModel) -> None:
    # An interactive batch just ended: within max_queue_delay its clients send their next requests,
    # and a bulk batch started in that gap would hold them all up.
    batcher = make(model, max_queue_delay_s=30)
    first, bulk = await bulk_behind_a_batch(batcher, model)
    model.release()
    assert await asyncio.wait_for(first, 10) == 0
    assert batcher.bulk_depth == 1  # not started alone after the batch
    await next_request_joins_the_bulk_item(batcher, model, bulk)


async def test_bulk_waits_a_batch_long_for_clients_slower_than_the_queue_delay(model: GatedModel) -> None:
    # The clients of a 1 s batch take 0.2 s to come back (a loaded machine, a real network): far past
    # max_queue_delay, well within the batch's time. No bulk batch may start in that gap.
    batcher = make(model, max_queue_delay_s=0.005)
    first, bulk = await bulk_behind_a_batch(batcher, model)
    held_until = time.monotonic() + 1.0
    await eventually(lambda: time.monotonic() >= held_until, 10, "the batch to have run 1 s")
    model.release()
    assert await asyncio.wait_for(first, 10) == 0
    answered = time.monotonic()
    await eventually(lambda: time.monotonic() >= answered + 0.2, 10, "the client's round trip")
    assert batcher.bulk_depth == 1  # not started in the gap
    await next_request_joins_the_bulk_item(batcher, model, bulk)


async def test_bulk_batches_grow_while_no_interactive_request_comes(model: GatedModel) -> None:
    batcher = make(model, max_batch_size=8, max_bulk_batch_size=2)
    blocker, bulk = await held_with_bulk(batcher, model, range(1, 21))
    model.release()
    await asyncio.wait_for(asyncio.gather(blocker, *bulk), 10)
    assert [len(items) for items, _ in model.calls] == [1, 4, 8, 8]
    await batcher.close(5)


class SteppedModel(GatedModel):
    """Like :class:`GatedModel`, but each batch waits for a permit of its own (``step``)."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)

    def __call__(self, items: list[int], group: str) -> Sequence[int]:
        self.calls.append((list(items), group))
        assert self.permits.acquire(timeout=30), "the test never let the batch finish"
        return [item * 10 for item in items]

    async def step(self, calls: int) -> None:
        """Let the batch on the model finish; return once the next one (call number ``calls``) began."""
        self.permits.release()
        await eventually(lambda: len(self.calls) == calls, 10, f"batch {calls} on the model")


def measured_line(fixed_s: float, per_item_s: float) -> BatchCost:
    """A cost model that has seen many batches of 1 to 8 items on this line (no forgetting: the test's
    own few batches, of a few milliseconds, hardly move it)."""
    cost = BatchCost(decay=1.0)
    for _ in range(1000):
        for size in range(1, 9):
            cost.observe(size, fixed_s + per_item_s * size)
    return cost


async def interactive_waves(
    batcher: DynamicBatcher[int, str, int], model: SteppedModel, waves: int, bulk_items: int
) -> list[int]:
    """A batch of one on the model, ``bulk_items`` bulk items queued behind it, then ``waves`` batches of
    four interactive requests, each queued while the one before runs; every request answered. Returns
    how many bulk items each of those interactive batches carried."""
    first = len(model.calls)
    items = [0]
    futures = [asyncio.ensure_future(batcher.submit(0, "a"))]
    await eventually(lambda: len(model.calls) == first + 1, 10, "the first batch on the model")
    items += range(100, 100 + bulk_items)
    futures += [asyncio.ensure_future(batcher.submit(i, "a", priority=BULK)) for i in items[1:]]
    await eventually(lambda: batcher.bulk_depth == bulk_items, 10, "the bulk items queued")
    for wave in range(waves):
        wave_items = [10 * wave + i for i in range(1, 5)]
        items += wave_items
        futures += [asyncio.ensure_future(batcher.submit(i, "a")) for i in wave_items]
        await eventually(lambda: batcher.depth == 4, 10, "the wave queued")
        await model.step(first + wave + 2)
    model.permits.release(100)  # the rest, bulk batches on the then idle model included
    assert await asyncio.wait_for(asyncio.gather(*futures), 30) == [i * 10 for i in items]
    model.permits = threading.Semaphore(0)  # all answered: the model is idle, the spare permits go
    return [
        sum(1 for item in batch if item >= 100) for batch, _ in model.calls[first + 1 : first + waves + 1]
    ]


@pytest.mark.parametrize(
    ("fixed_s", "per_item_s", "max_bulk", "carried"),
    [
        # 0.1 s an item: a batch of 4 earns 0.15 * 0.4 s = 0.6 of an item; the share carries over.
        (0.0, 0.1, 8, [0, 1, 0, 1]),
        # Plus 0.4 s a batch: a batch of 4 earns 0.15 * 0.8 s = 1.2 items.
        (0.4, 0.1, 8, [1, 1, 1, 1]),
        # A GPU: more items take no more time, so filling the room (up to max_bulk_batch_size) is free.
        (0.05, 0.0, 3, [3, 3, 3, 3]),
    ],
)
async def test_bulk_fills_interactive_batches_within_its_share_of_their_time(
    fixed_s: float, per_item_s: float, max_bulk: int, carried: list[int]
) -> None:
    model = SteppedModel()
    batcher = make(model, max_batch_size=8, max_bulk_batch_size=max_bulk, bulk_time_share=0.15)
    batcher.cost = measured_line(fixed_s, per_item_s)
    assert await interactive_waves(batcher, model, waves=4, bulk_items=20) == carried
    await batcher.close(5)


async def test_no_bulk_in_interactive_batches_at_a_share_of_zero() -> None:
    model = SteppedModel()
    batcher = make(model, max_batch_size=8, max_bulk_batch_size=8, bulk_time_share=0.0)
    batcher.cost = measured_line(0.0, 0.1)
    assert await interactive_waves(batcher, model, waves=3, bulk_items=5) == [0, 0, 0]
    assert [len(items) for items, _ in model.calls[4:]] == [5]  # all on the idle model after the waves
    await batcher.close(5)


async def test_the_share_is_not_saved_up_while_no_bulk_work_waits() -> None:
    # Four batches without bulk work earn nothing to spend later: the first with bulk carries one item.
    model = SteppedModel()
    batcher = make(model, max_batch_size=8, max_bulk_batch_size=8, bulk_time_share=0.3)
    batcher.cost = measured_line(0.0, 0.1)
    assert await interactive_waves(batcher, model, waves=4, bulk_items=0) == [0, 0, 0, 0]
    assert await interactive_waves(batcher, model, waves=1, bulk_items=4) == [1]
    await batcher.close(5)


async def other_traffic(
    batcher: DynamicBatcher[int, str, int], model: SteppedModel, bulk_items: int, most_waves: int
) -> list[asyncio.Future[int]]:
    """Bulk items of group "b" queued behind a batch on the model, then waves of four interactive
    requests of group "a", each queued while the one before runs, until a "b" batch runs or after
    ``most_waves``. Returns every request's future (the batch on the model still held)."""
    futures = [asyncio.ensure_future(batcher.submit(0, "a"))]
    await eventually(lambda: len(model.calls) == 1, 10, "the first batch on the model")
    futures += [
        asyncio.ensure_future(batcher.submit(i, "b", priority=BULK)) for i in range(100, 100 + bulk_items)
    ]
    await eventually(lambda: batcher.bulk_depth == bulk_items, 10, "the bulk items queued")
    for wave in range(1, most_waves + 1):
        futures += [asyncio.ensure_future(batcher.submit(10 * wave + i, "a")) for i in range(1, 5)]
        await eventually(lambda: batcher.depth == 4, 10, "the wave queued")
        await model.step(len(model.calls) + 1)
        if model.calls[-1][1] == "b":
            break
    return futures


async def answer_all(model: SteppedModel, futures: list[asyncio.Future[int]]) -> None:
    model.permits.release(100)
    await asyncio.wait_for(asyncio.gather(*futures), 30)
    model.permits = threading.Semaphore(0)  # all answered: the spare permits go


async def test_bulk_work_of_other_options_gets_a_small_turn_amid_steady_traffic() -> None:
    # Steady traffic of group "a" never leaves room for bulk work of group "b" (other options: a
    # quality gate's, a job of other beams). Once it has waited bulk_max_wait, one bulk batch of
    # max_bulk_batch_size goes between two interactive ones; the interactive wave queued meanwhile
    # goes next, though bulk work still waits (its wait starts again).
    model = SteppedModel()
    batcher = make(model, max_batch_size=4, max_bulk_batch_size=2, bulk_max_wait_s=0.05)
    futures = await other_traffic(batcher, model, bulk_items=5, most_waves=2000)
    groups = [group for _, group in model.calls]
    assert groups[-1] == "b" and len(model.calls[-1][0]) == 2 and set(groups[:-1]) == {"a"}
    await model.step(len(model.calls) + 1)
    assert model.calls[-1][1] == "a"  # the queued wave, not the 3 bulk items still waiting
    await answer_all(model, futures)
    assert sorted(item for items, group in model.calls if group == "b" for item in items) == list(
        range(100, 105)
    )
    await batcher.close(5)


async def test_without_a_longest_wait_bulk_work_of_other_options_waits_for_calm() -> None:
    model = SteppedModel()
    batcher = make(model, max_batch_size=4, max_bulk_batch_size=2)
    futures = await other_traffic(batcher, model, bulk_items=2, most_waves=30)
    assert {group for _, group in model.calls} == {"a"}
    await answer_all(model, futures)
    await batcher.close(5)
