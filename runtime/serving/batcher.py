"""The dynamic batcher: many concurrent requests in, few model calls out, one result per request.

The shape is Ray Serve's ``@serve.batch``: one record per request holding its asyncio future, one
consumer task that forms batches and runs them, and the rule that every future is resolved on every
path (results, the model's exception, a wrong result count, a deadline, a shutdown). What it adds:

- batches hold requests of one *group* only (equal generation options share one ``generate`` call);
- a batch goes when it is full, or ``max_queue_delay`` after its oldest request arrived, or at once
  while closing; a full batch of another group may go before the oldest group's delay ends;
- the idle fast path: the model is free (one consumer runs one batch at a time) and the oldest group
  already holds its expected *companions*, so those the delay would wait for have come: it goes at
  once. The companions are the last batch's interactive requests (their clients come back) plus those
  of its group that arrived while it ran, at most ``max_batch_size``. At one client that is every
  request (no ``max_queue_delay`` added to its latency); under load batches stay as large as before,
  since a batch that went small is followed by one that waits again;
- the arrival wait (``wait_for_arrivals``): a free model whose oldest group holds fewer than its
  companions waits for the others: ``max_queue_delay`` from the moment the model became free, then as
  long as requests keep arriving (``max_queue_delay`` after the latest) or any is on its way (callers
  inside :meth:`preparing`: reading, decoding, preprocessing), never longer than the last batch took.
  Why: in a closed loop (each client sends its next request when answered) the requests queued while a
  batch ran go alone the moment it ends, their delay long expired, and the answered ones come back to
  find the model busy: the batches settle into a large one and a small one in turn (31 and 1 at 32
  clients, measured), and a batch of 1 costs a third of a batch of 31. Counting as companions only the
  last batch's size kept such a split once it had formed (29 and 3 at 32 clients, 3 and 1 at 4,
  traced): the next batch went as soon as the returning clients alone were back. Counting those that
  arrived meanwhile too makes the two halves one batch again. Waiting longer than one batch takes cannot
  pay off: running now and the stragglers next costs that much; and in an open loop, where answered
  clients do not come back, the wait ends ``max_queue_delay`` after the last arrival;
- ``max_queue_size`` bounds the waiting requests (:class:`QueueFull` beyond, with a retry hint);
- a deadline per request counts its queue time: an expired request is answered with
  :class:`DeadlineExceeded` when the deadline passes, and is never sent to the model;
- requests whose caller went away (the awaiting task was cancelled) are skipped;
- the model runs in one worker thread, so the event loop, and the preprocessing of the next requests
  in their own pool, go on while a batch runs;
- two priorities, as Triton's priority levels: *interactive* requests form the batches (their size,
  their delay, the idle fast path), and *bulk* requests only fill the room an interactive batch
  leaves, or run on an idle model: no interactive request queued or being prepared (``preparing``),
  and none arrived or answered within ``max_queue_delay``, or the last batch's time if longer
  (``bulk_calm_of_a_batch``: the clients of the last batch come back within about that). A batch
  never waits for bulk work, and bulk delays an interactive request by at most the one batch already
  running. Bulk items fill an interactive batch by at most ``max_bulk_batch_size``, and within a time
  budget (``bulk_time_share``): each interactive batch earns that share of its predicted time, from
  the measured batch times (:class:`BatchCost`), in items of the measured per-item cost, and a share
  of an item carries over. Why: on a CPU a batch's time grows with its size (the bundled model, beam
  3, on 2 loaded cores: about 0.24 s a batch plus 0.015 s an item, fitted to traced batches), so the
  "room" is not free: each bulk item makes every interactive request in its batch wait longer. Amid
  steady traffic bulk work gets about that share of the model, and an interactive request waits
  about that share longer; on a GPU, where a batch costs about the same at any size, the items cost
  nothing and fill the room. Bulk-only
  batches start at that size and double with each one that follows without interactive traffic, up
  to ``max_batch_size``: on a CPU, where a batch's time grows with its size, an interactive request
  arriving amid steady interactive traffic waits behind a small bulk batch at most, and a long calm
  still uses the model's full batches. Bulk work never starves: once waiting bulk requests have had
  no turn for ``bulk_max_wait`` (traffic of other options leaves them no room, or a saturated model
  none at all), one bulk batch of ``max_bulk_batch_size`` goes between two interactive ones, and the
  wait starts again. Bulk requests have their own queue (bounded by
  ``max_queue_size`` too) and do not count in the reported queue depth: they are not interactive
  demand.

Why not a ``processing`` flag: a second batch that finds the flag set returns early and strands the
queue until the next arrival. Here one consumer owns the queue for its whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from captionfleet.runtime.serving.batch_cost import BatchCost
from captionfleet.runtime.serving.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
GroupT = TypeVar("GroupT", bound=Hashable)
ResultT = TypeVar("ResultT")


class BatchObserver(Protocol):
    """Receives the batcher's figures (the server's metrics implement it)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch_done(self, size: int, queue_waits: Sequence[float], inference_s: float) -> None: ...


class _NoObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits: Sequence[float], inference_s: float) -> None:
        pass


class Priority(enum.Enum):
    """A request's priority (the ``X-Priority`` header's values)."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class _Request(Generic[ItemT, GroupT, ResultT]):
    item: ItemT
    group: GroupT
    future: asyncio.Future[ResultT]
    enqueued: float
    deadline: float | None
    priority: Priority = Priority.INTERACTIVE
    state: _State = field(default=_State.QUEUED)


class DynamicBatcher(Generic[ItemT, GroupT, ResultT]):
    """Batches ``submit(item, group)`` calls into ``run_batch(items, group)`` calls in a worker thread.

    ``run_batch`` must return one result per item, in order; anything else fails that whole batch
    with :class:`InferenceFailed`. Times are ``time.monotonic()`` seconds.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT], GroupT], Sequence[ResultT]],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        name: str = "inference",
        idle_dispatch: bool = True,
        bulk_calm_of_a_batch: bool = True,
        max_bulk_batch_size: int | None = None,
        wait_for_arrivals: bool = True,
        bulk_time_share: float = math.inf,
        bulk_max_wait_s: float = math.inf,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        if not (bulk_time_share >= 0 and bulk_max_wait_s > 0):
            raise ValueError("bulk_time_share must be >= 0 and bulk_max_wait_s > 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._observer: BatchObserver = observer or _NoObserver()
        self._name = name
        self._queue: deque[_Request[ItemT, GroupT, ResultT]] = deque()  # interactive
        self._bulk: deque[_Request[ItemT, GroupT, ResultT]] = deque()
        self._running: list[_Request[ItemT, GroupT, ResultT]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._flushing = False
        self._consumer: asyncio.Task[None] | None = None
        # One thread: the model serves one batch at a time; a second would only contend for it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._last_batch_s = 0.0
        # The interactive requests the next batch expects (see the arrival wait): the last batch's,
        # whose clients come back, and those of its group that arrived while it ran. Bulk filler is no
        # sign of companions.
        self._companions = 0
        self._free_since = 0.0
        self.idle_dispatch = idle_dispatch
        self.bulk_calm_of_a_batch = bulk_calm_of_a_batch
        self.wait_for_arrivals = wait_for_arrivals
        self.max_bulk_batch_size = max_bulk_batch_size or max_batch_size
        # Interactive requests being read, decoded and preprocessed, not submitted yet: the arrival
        # wait waits for them, and an idle model starts no bulk batch meanwhile.
        self._preparing = 0
        self._none_preparing = asyncio.Event()
        self._none_preparing.set()
        self._last_interactive = -math.inf  # when one last arrived or was answered
        self._bulk_run = self.max_bulk_batch_size  # the next bulk-only batch's size
        self.bulk_time_share = bulk_time_share
        self.cost = BatchCost()  # the model's measured batch times, for the bulk filler's budget
        self._bulk_credit = 0.0  # bulk items earned by interactive batches and not spent yet
        self.bulk_max_wait_s = bulk_max_wait_s
        self._bulk_taken = -math.inf  # when bulk work last went to the model

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The model's worker thread (warm-up runs there too, so it is the thread that runs the model)."""
        return self._executor

    @property
    def depth(self) -> int:
        """Interactive requests waiting for a batch (not counting the batch on the model)."""
        return len(self._queue)

    @property
    def bulk_depth(self) -> int:
        """Bulk requests waiting for room on the model."""
        return len(self._bulk)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + len(self._bulk) + len(self._running)

    def start(self) -> None:
        if self._consumer is None:
            self._consumer = asyncio.get_running_loop().create_task(
                self._consume(), name=f"{self._name}-batcher"
            )

    async def submit(
        self,
        item: ItemT,
        group: GroupT,
        *,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> ResultT:
        """Queue one item and wait for its result (or its error)."""
        if self._closing or self._consumer is None:
            raise Draining("the server is shutting down", retry_after=1.0)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before it reached the queue")
        queue = self._queue if priority is Priority.INTERACTIVE else self._bulk
        if len(queue) >= self.max_queue_size:
            raise QueueFull(
                f"the {priority.value} queue holds {self.max_queue_size} requests already",
                retry_after=self._retry_hint(),
            )
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        request = _Request(item, group, future, now, deadline, priority)
        queue.append(request)
        if priority is Priority.INTERACTIVE:
            self._interactive_seen()
            self._observer.queue_depth(len(self._queue))
        self._wakeup.set()
        try:
            if deadline is not None:
                await asyncio.wait((future,), timeout=max(0.0, deadline - time.monotonic()))
                if not future.done() and request.state is _State.QUEUED:
                    self._remove(request)
                    future.set_exception(DeadlineExceeded(_expired_message(request)))
            # Once on the model, a request finishes: its result comes within one batch's time.
            return await future
        except asyncio.CancelledError:
            # The caller went away: forget the request if it still waits; a running one is ignored.
            if request.state is _State.QUEUED:
                self._remove(request)
            future.cancel()
            raise

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Around an interactive request's reading, decoding and preprocessing, before :meth:`submit`
        (no loop turn between leaving and submitting): the arrival wait counts it, and an idle model
        starts no bulk batch meanwhile, so the request does not arrive to find one running."""
        self._preparing += 1
        self._none_preparing.clear()
        try:
            yield
        finally:
            self._preparing -= 1
            if self._preparing == 0:
                self._none_preparing.set()
            self._interactive_seen()
            self._wakeup.set()  # the last one gone may make a batch due

    async def none_preparing(self) -> None:
        """Return once no interactive request is inside :meth:`preparing` (at once if none is)."""
        await self._none_preparing.wait()

    def flush(self) -> None:
        """From now on run batches as soon as the model is free, without waiting for companions.

        For a drain: requests accepted before it still get in, and nothing waits for arrivals that
        will not come."""
        self._flushing = True
        self._wakeup.set()

    async def close(self, grace_s: float) -> int:
        """Stop taking requests, run what is queued (no more waiting for companions) and stop.

        Returns how many requests were still unanswered after ``grace_s``; they get :class:`Draining`.
        """
        self._closing = True
        self._wakeup.set()
        left = 0
        if self._consumer is not None:
            done, _ = await asyncio.wait((self._consumer,), timeout=grace_s)
            if done and not self._consumer.cancelled() and self._consumer.exception() is not None:
                log.error("the batcher's consumer had failed: %r", self._consumer.exception())
            if not done:
                stranded = [*self._running, *self._queue, *self._bulk]
                left = sum(1 for r in stranded if not r.future.done())
                log.warning("drain grace period over: %d requests unanswered, failing them", left)
                for request in stranded:
                    _fail(request, Draining("the server shut down before this request finished"))
                self._queue.clear()
                self._bulk.clear()
                self._consumer.cancel()
                await asyncio.wait((self._consumer,))
        self._executor.shutdown(wait=False, cancel_futures=True)
        return left

    def _retry_hint(self) -> float:
        """Seconds until the queue has likely moved on: batches ahead times the last batch's time."""
        batches_ahead = len(self._queue) / self.max_batch_size
        return max(1.0, batches_ahead * max(self._last_batch_s, self.max_queue_delay_s))

    def _remove(self, request: _Request[ItemT, GroupT, ResultT]) -> None:
        try:
            (self._queue if request.priority is Priority.INTERACTIVE else self._bulk).remove(request)
        except ValueError:
            return
        request.state = _State.FINISHED
        self._observer.queue_depth(len(self._queue))

    async def _consume(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._run(batch)
        except asyncio.CancelledError:
            raise
        except BaseException:  # a bug here must not strand requests silently
            log.exception("the batcher's consumer failed; failing every waiting request")
            for request in [*self._running, *self._queue, *self._bulk]:
                _fail(request, InferenceFailed("the batcher failed"))
            self._queue.clear()
            self._bulk.clear()
            self._closing = True
            raise

    async def _next_batch(self) -> list[_Request[ItemT, GroupT, ResultT]] | None:
        """Wait for the next batch to be due; ``None`` once closing with nothing left."""
        while True:
            self._drop_unwanted()
            if not self._queue:
                if self._closing and not self._bulk:
                    return None
                bulk = await self._bulk_batch()
                if bulk:
                    return bulk
                continue
            now = time.monotonic()
            if self._bulk_starved_in(now) <= 0:
                return self._owed_bulk_batch()
            oldest = self._queue[0]
            members = self._members(self._queue, oldest.group)
            due = self._due(oldest.enqueued, len(members))
            enough = len(members) >= self.max_batch_size or (
                self.idle_dispatch and len(members) >= self._companions
            )
            if not (enough or self._closing or self._flushing or now >= due):
                members = self._full_group() or []
            if members:
                return self._take(members, self._bulk_filler(members))
            self._wakeup.clear()
            wait_s = due - now
            next_deadline = min(
                (r.deadline for r in (*self._queue, *self._bulk) if r.deadline is not None), default=None
            )
            if next_deadline is not None:
                wait_s = min(wait_s, max(0.0, next_deadline - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait_s)

    def _due(self, oldest_enqueued: float, queued: int) -> float:
        """When the oldest group goes without being full (see the arrival wait above)."""
        due = oldest_enqueued + self.max_queue_delay_s
        if not self.wait_for_arrivals or queued >= self._companions:
            return due
        # Arrivals keep the wait open: max_queue_delay after the latest (or while one is prepared).
        latest = max(self._free_since, self._last_interactive)
        arriving = math.inf if self._preparing > 0 else latest + self.max_queue_delay_s
        longest = self._free_since + max(self._last_batch_s, self.max_queue_delay_s)
        return max(due, min(arriving, longest))

    async def _bulk_batch(self) -> list[_Request[ItemT, GroupT, ResultT]]:
        """No interactive request waits: a bulk batch if the model is idle, else wait (empty list).

        Idle means: no interactive request is being prepared, and none arrived or was answered for
        ``max_queue_delay``, or as long as the last batch took if longer (``bulk_calm_of_a_batch``):
        the clients of the last batch send their next requests in about that time (a round trip and
        their decoding, which on a loaded machine or a real network exceed ``max_queue_delay``), and
        a bulk batch started in the gap would hold all of them up."""
        quiet_in = self._quiet_in()
        starved_in = self._bulk_starved_in(time.monotonic())
        if self._bulk and (quiet_in <= 0 or self._closing or self._flushing):
            group = self._bulk[0].group
            size = self._bulk_run
            self._bulk_run = min(self.max_batch_size, 2 * size)  # the longer the calm, the larger
            return self._take([], self._members(self._bulk, group, size))
        if starved_in <= 0:
            return self._owed_bulk_batch()
        self._wakeup.clear()
        soonest = min(quiet_in, starved_in)
        timeout = soonest if self._bulk and math.isfinite(soonest) else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
        return []

    def _bulk_filler(
        self, interactive: list[_Request[ItemT, GroupT, ResultT]]
    ) -> list[_Request[ItemT, GroupT, ResultT]]:
        """The bulk items that go with these interactive requests: the room they leave, at most
        ``max_bulk_batch_size``, within the time budget. Each interactive batch earns
        ``bulk_time_share`` of its predicted time (:class:`BatchCost`) in items of the measured
        per-item cost; a share of an item carries over to the next batch (with no fixed cost per batch,
        8 requests a batch and a share of 0.1: four batches in five carry one item, none two)."""
        room = min(self.max_batch_size - len(interactive), self.max_bulk_batch_size)
        if room <= 0 or not self._bulk:
            self._bulk_credit = 0.0  # no bulk work waits: no credit to spend later in one burst
            return []
        per_item = self.cost.per_item_s()
        if not self.cost.known:  # before any batch: a batch's time taken as proportional to its size
            self._bulk_credit += self.bulk_time_share * len(interactive)
        elif per_item > 0:
            self._bulk_credit += self.bulk_time_share * self.cost.predict_s(len(interactive)) / per_item
        else:  # a batch's time does not grow with its size (a GPU): filling the room is free
            self._bulk_credit = math.inf
        most = min(room, math.floor(self._bulk_credit)) if math.isfinite(self._bulk_credit) else room
        bulk = self._members(self._bulk, interactive[0].group, most)
        self._bulk_credit = min(self._bulk_credit - len(bulk), 1.0)
        return bulk

    def _interactive_seen(self) -> None:
        self._last_interactive = time.monotonic()
        self._bulk_run = self.max_bulk_batch_size

    def _bulk_starved_in(self, now: float) -> float:
        """Seconds until waiting bulk work is owed a turn amid interactive traffic (``inf``: none
        waits). Without it, bulk work whose options differ from the traffic's (a quality gate's
        requests, a job of other beams) never finds room, and on a saturated model none does: so once
        bulk work has had no turn for ``bulk_max_wait`` one small bulk batch
        (``max_bulk_batch_size``) goes between two interactive ones, which an interactive request then
        waits behind, as behind any one batch already running."""
        if not self._bulk or not math.isfinite(self.bulk_max_wait_s):
            return math.inf
        return max(self._bulk_taken, self._bulk[0].enqueued) + self.bulk_max_wait_s - now

    def _owed_bulk_batch(self) -> list[_Request[ItemT, GroupT, ResultT]]:
        """The small bulk batch (``max_bulk_batch_size``, the oldest's group) owed to starved bulk work."""
        return self._take([], self._members(self._bulk, self._bulk[0].group, self.max_bulk_batch_size))

    def _quiet_in(self) -> float:
        """Seconds until the model counts as idle for bulk work (``inf`` while a request is prepared)."""
        if self._preparing:
            return math.inf
        calm = (
            max(self.max_queue_delay_s, self._last_batch_s)
            if self.bulk_calm_of_a_batch
            else self.max_queue_delay_s
        )
        return self._last_interactive + calm - time.monotonic()

    def _take(
        self,
        interactive: list[_Request[ItemT, GroupT, ResultT]],
        bulk: list[_Request[ItemT, GroupT, ResultT]],
    ) -> list[_Request[ItemT, GroupT, ResultT]]:
        """Take these requests off their queues as one batch, the interactive ones first."""
        batch = [*interactive, *bulk]
        for request in batch:
            request.state = _State.RUNNING
        taken = set(map(id, batch))
        if interactive:
            self._queue = deque(r for r in self._queue if id(r) not in taken)
            self._observer.queue_depth(len(self._queue))
        if bulk:
            self._bulk = deque(r for r in self._bulk if id(r) not in taken)
            self._bulk_taken = time.monotonic()
        return batch

    def _members(
        self, queue: deque[_Request[ItemT, GroupT, ResultT]], group: GroupT, most: int | None = None
    ) -> list[_Request[ItemT, GroupT, ResultT]]:
        most = self.max_batch_size if most is None else most
        members: list[_Request[ItemT, GroupT, ResultT]] = []
        for request in queue:
            if len(members) >= most:
                break
            if request.group == group:
                members.append(request)
        return members

    def _full_group(self) -> list[_Request[ItemT, GroupT, ResultT]] | None:
        counts: dict[GroupT, int] = {}
        for request in self._queue:
            counts[request.group] = counts.get(request.group, 0) + 1
            if counts[request.group] >= self.max_batch_size:
                return self._members(self._queue, request.group)
        return None

    def _drop_unwanted(self) -> None:
        """Answer expired requests and forget cancelled ones, so neither reaches the model."""
        kept = self._unwanted_dropped(self._queue)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._observer.queue_depth(len(kept))
        self._bulk = self._unwanted_dropped(self._bulk)

    @staticmethod
    def _unwanted_dropped(
        queue: deque[_Request[ItemT, GroupT, ResultT]],
    ) -> deque[_Request[ItemT, GroupT, ResultT]]:
        now = time.monotonic()
        kept: deque[_Request[ItemT, GroupT, ResultT]] = deque()
        for request in queue:
            if request.future.done():  # cancelled by its caller, or expired by its own waiter
                request.state = _State.FINISHED
            elif request.deadline is not None and request.deadline <= now:
                request.state = _State.FINISHED
                request.future.set_exception(DeadlineExceeded(_expired_message(request)))
            else:
                kept.append(request)
        return kept if len(kept) != len(queue) else queue

    async def _run(self, batch: list[_Request[ItemT, GroupT, ResultT]]) -> None:
        started = time.monotonic()
        items = [request.item for request in batch]
        self._running = batch
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, items, batch[0].group
            )
        except asyncio.CancelledError:
            for request in batch:
                _fail(request, Draining("the server shut down while this request ran"))
            raise
        except Exception as exc:
            log.warning("a batch of %d failed: %r", len(batch), exc)
            for request in batch:
                _fail(request, exc)
        else:
            if len(results) != len(batch):
                error = InferenceFailed(f"the model returned {len(results)} results for {len(batch)} images")
                log.error("%s", error.message)
                for request in batch:
                    _fail(request, error)
            else:
                for request, result in zip(batch, results, strict=True):
                    if not request.future.done():
                        request.future.set_result(result)
                    request.state = _State.FINISHED
        finally:
            self._running = []
        self._free_since = time.monotonic()
        elapsed = self._free_since - started
        self._last_batch_s = elapsed
        self.cost.observe(len(batch), elapsed)
        interactive = sum(1 for r in batch if r.priority is Priority.INTERACTIVE)
        if interactive:  # a bulk-only batch says nothing of how many interactive companions come
            arrived = sum(1 for r in self._queue if r.group == batch[0].group)
            self._companions = min(self.max_batch_size, interactive + arrived)
            self._interactive_seen()  # its clients are about to send their next requests
        self._observer.batch_done(len(batch), [started - r.enqueued for r in batch], elapsed)


def _fail(request: _Request[ItemT, GroupT, ResultT], error: BaseException) -> None:
    request.state = _State.FINISHED
    if not request.future.done():
        request.future.set_exception(error)


def _expired_message(request: _Request[ItemT, GroupT, ResultT]) -> str:
    waited_ms = (time.monotonic() - request.enqueued) * 1000
    return f"the request's deadline passed after {waited_ms:.0f} ms in the queue"
