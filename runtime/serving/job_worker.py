"""The consumer of the job stream on one replica: bulk items captioned with the model's spare room.

Every replica on the same Redis runs one :class:`JobWorker` in the stream's consumer group, so the
items of a job are spread over the fleet:

- it reads (``XREADGROUP``) only while it holds fewer than ``jobs_prefetch`` items and the model's
  interactive queue is shorter than a batch; the items it holds go to the batcher as *bulk*, which
  only fills room interactive requests leave (:mod:`batcher`);
- an item is acknowledged (``XACK``, then ``XDEL``: the stream's length is the backlog) only after its
  result is stored; storing is idempotent by item (:meth:`JobStore.record`), so an item that is
  captioned twice is recorded once;
- every third of ``jobs_claim_timeout_s`` it renews the items it holds (``XCLAIM`` to itself resets
  their idle time) and claims items idle for longer than the timeout (``XAUTOCLAIM``): those of a
  replica that died, or that this one gave up on (the model was not ready);
- a Redis that goes away (restarts, fails over) is waited for with backoff; results are kept and
  stored once it is back, so none is lost and none counted twice;
- the worker that stores a job's last item hands the job's state to the :class:`JobNotifier`
  (the server's webhook sender), once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError, ResponseError

from captionfleet.errors import CodedError
from captionfleet.runtime.serving.batcher import Priority
from captionfleet.runtime.serving.errors import Draining, JobNotFound, JobsUnavailable, NotReady, QueueFull
from captionfleet.runtime.serving.jobs import JobStore, StartedItem
from captionfleet.runtime.serving.service import CaptionService
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
Fetch = Callable[[str], Awaitable[bytes]]
RETRY_FIRST_S = 0.1
RETRY_MOST_S = 2.0
READ_BLOCK_MS = 500
ROOM_POLL_S = 0.05
TRANSIENT = (Draining, NotReady, QueueFull)
"""Errors of this replica's state, not of the item: the item is left for a later claim."""


class JobNotifier(Protocol):
    """Delivers a finished job's state to its webhook (retries are the notifier's)."""

    async def notify(self, url: str, secret: str | None, state: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class JobsObserver(Protocol):
    def jobs_pending(self, items: int) -> None: ...


class JobWorker:
    def __init__(
        self,
        store: JobStore,
        service: CaptionService,
        settings: ServeSettings,
        *,
        fetch: Fetch,
        notifier: JobNotifier,
        observer: JobsObserver,
        consumer: str | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.prefetch = settings.resolved_jobs_prefetch()
        self.claim_timeout_s = settings.jobs_claim_timeout_s
        self.webhook_secret = settings.jobs_webhook_secret or None
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._fetch = fetch
        self._notifier = notifier
        self._observer = observer
        self._held: dict[str, asyncio.Task[None]] = {}
        self._notifying: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._stopping = False
        self._next_upkeep = 0.0
        self._main: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """Items this replica holds now."""
        return len(self._held)

    @property
    def delivering(self) -> int:
        """Webhooks of ended jobs being delivered (or waiting for a retry)."""
        return len(self._notifying)

    def start(self) -> None:
        self._main = asyncio.get_running_loop().create_task(self._run(), name="job-worker")

    async def close(self, grace_s: float) -> None:
        """Stop reading; finish the held items within ``grace_s`` (the rest stay pending in the group,
        for another replica to claim); deliver what webhooks it can; close the connection."""
        self._stopping = True
        self._room.set()
        ends = time.monotonic() + grace_s
        for tasks in ([self._main] if self._main else [], list(self._held.values()), list(self._notifying)):
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=max(0.0, ends - time.monotonic()))
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
        await self._notifier.close()
        await self.store.close()

    async def _run(self) -> None:
        pause = RETRY_FIRST_S
        while not self._stopping:
            try:
                await self._read_some()
                pause = RETRY_FIRST_S
            except (RedisError, OSError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._next_upkeep = 0.0  # the group is gone (a Redis without persistence): again
                    continue
                log.warning("the job stream does not answer (%r); retrying in %.1f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(RETRY_MOST_S, pause * 2)

    async def _read_some(self) -> None:
        """Wait for spare room, then take items: claimed ones of dead consumers first, then new ones."""
        while not self._has_room():
            self._room.clear()
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=ROOM_POLL_S)
        if time.monotonic() >= self._next_upkeep:
            await self._upkeep()
            self._next_upkeep = time.monotonic() + self.claim_timeout_s / 3
        room = self.prefetch - len(self._held)
        if room <= 0 or self._stopping:
            return
        client = self.store.client
        reply: list[Any] = await client.xreadgroup(  # type: ignore[assignment]
            self.store.group, self.consumer, {self.store.stream: ">"}, count=room, block=READ_BLOCK_MS
        )
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._hold(entry_id, fields)

    def _has_room(self) -> bool:
        """Spare capacity: fewer items held than the prefetch, and no interactive batch waiting."""
        batcher = self.service.batcher
        return self._stopping or (len(self._held) < self.prefetch and batcher.depth < batcher.max_batch_size)

    async def _upkeep(self) -> None:
        """The group exists; held items are renewed; items idle past the timeout are claimed."""
        await self.store.ensure_group()
        client, stream, group = self.store.client, self.store.stream, self.store.group
        if self._held:
            await client.xclaim(stream, group, self.consumer, 0, list(self._held), justid=True)
        room = self.prefetch - len(self._held)
        start = "0-0"
        while room > 0:
            reply: list[Any] = await client.xautoclaim(
                stream, group, self.consumer, int(self.claim_timeout_s * 1000), start_id=start, count=room
            )
            start, entries = _text(reply[0]), reply[1]
            for entry_id, fields in entries:
                if fields and _text(entry_id) not in self._held:
                    log.info("claimed job item %s from a consumer that stopped renewing it", _text(entry_id))
                    self._hold(entry_id, fields)
                    room -= 1
            if start == "0-0" or not entries:
                break
        self._observer.jobs_pending(await self.store.pending_items())

    def _hold(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> None:
        key = _text(entry_id)
        task = asyncio.get_running_loop().create_task(self._item(key, fields), name=f"job-item-{key}")
        self._held[key] = task

    async def _item(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            try:
                job_id, index = fields[b"job"].decode(), int(fields[b"index"])
            except (KeyError, ValueError, UnicodeDecodeError):
                log.error("job stream entry %s is malformed (%r); dropped", entry_id, fields)
                await self._retrying(lambda: self._ack(entry_id))
                return
            started = await self._retrying(lambda: self.store.begin_item(job_id, index))
            if started is not None:
                outcome = await self._caption(started)
                if outcome is None:
                    return  # not this replica's moment: the item stays pending for a later claim
                result, error = outcome
                final = await self._retrying(lambda: self.store.record(started, result=result, error=error))
                if final is not None:
                    self._notify(job_id)
            await self._retrying(lambda: self._ack(entry_id))
        finally:
            self._held.pop(entry_id, None)
            self._room.set()

    async def _caption(
        self, item: StartedItem
    ) -> tuple[dict[str, Any] | None, tuple[str, str] | None] | None:
        """(result, None) or (None, (code, message)); ``None`` when this replica cannot serve it now."""
        started = time.monotonic()
        try:
            data = item.data if item.data is not None else await self._fetch(item.url or "")
            options = self.service.resolve_options(item.options)
            result = await self.service.caption(data, options, None, Priority.BULK)
        except TRANSIENT as exc:
            log.info("job item %s/%d left for later: %s", item.job_id, item.index, exc)
            return None
        except CodedError as exc:
            return None, (exc.code, exc.message)
        except Exception:
            log.exception("job item %s/%d failed", item.job_id, item.index)
            return None, ("internal_error", "captioning this item failed on the server")
        body = result.as_dict() | {
            "latency_ms": (time.monotonic() - started) * 1000,
            "request_id": f"{item.job_id}:{item.index}",
        }
        return body, None

    async def _ack(self, entry_id: str) -> None:
        async with self.store.client.pipeline(transaction=False) as pipe:
            pipe.xack(self.store.stream, self.store.group, entry_id)
            pipe.xdel(self.store.stream, entry_id)
            await pipe.execute()

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis step until it works: Redis restarts are waited out (the drain's grace, which
        cancels this, bounds the wait)."""
        pause = RETRY_FIRST_S
        while True:
            try:
                return await step()
            except (RedisError, OSError, JobsUnavailable) as exc:
                log.warning("the job store does not answer (%r); retrying in %.1f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(RETRY_MOST_S, pause * 2)

    def notify_ended(self, job_id: str) -> None:
        """Deliver the ended job's state to its webhook, if it has one (in the background)."""
        self._notify(job_id)

    def _notify(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(job_id), name=f"webhook-{job_id}")
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _deliver(self, job_id: str) -> None:
        try:
            status = await self._retrying(lambda: self.store.status(job_id, owner=None))
        except JobNotFound:
            return  # expired meanwhile
        if status.webhook:
            await self._notifier.notify(
                status.webhook, status.webhook_secret or self.webhook_secret, status.as_dict()
            )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
