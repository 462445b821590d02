"""One replica's consumer of a Redis stream in the jobs' consumer group: what the job items' consumer
(:mod:`job_worker`) and the webhooks' (:mod:`webhook_queue`) share.

- it reads (``XREADGROUP``) only as many entries as it has room for (:meth:`StreamConsumer.room`),
  and handles each in a task of its own;
- an entry is acknowledged (``XACK``, then ``XDEL``: the stream's length is what is owed) only once
  its handler says it is done with it;
- every third of the claim timeout it renews the entries it holds (``XCLAIM`` to itself resets their
  idle time) and claims entries idle for longer than the timeout (``XAUTOCLAIM``): those of a replica
  that died;
- on a drain (:meth:`close`) it stops reading at once, lets its handlers finish within the grace, and
  hands back what is left unacknowledged: ``XCLAIM ... IDLE <claim timeout>`` marks those entries as
  idle for the whole timeout, so another replica's next upkeep claims them (there is no "un-read" in
  Redis streams; without this they would wait out the timeout);
- a Redis that goes away (restarts, fails over) is waited for with backoff.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import RedisError, ResponseError

from captionfleet.runtime.serving.jobs import RETRY_FIRST_S, RETRY_MOST_S, JobStore, retrying

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500
ROOM_POLL_S = 0.05


class StreamConsumer(abc.ABC):
    """Entries of ``stream`` held by this replica (``consumer``) until handled."""

    def __init__(self, store: JobStore, stream: str, consumer: str, claim_timeout_s: float) -> None:
        self.store = store
        self.stream = stream
        self.consumer = consumer
        self.claim_timeout_s = claim_timeout_s
        self._held: dict[str, asyncio.Task[None]] = {}
        self._unacked: set[str] = set()
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._next_upkeep = 0.0
        self._main: asyncio.Task[None] | None = None

    @abc.abstractmethod
    def room(self) -> int:
        """How many more entries to take now (0: wait)."""

    @abc.abstractmethod
    async def handle(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Handle one entry; True when it is done with (acknowledge it), False to leave it pending."""

    @property
    def held(self) -> int:
        """Entries this replica holds now."""
        return len(self._held)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self, name: str) -> None:
        self._main = asyncio.get_running_loop().create_task(self._run(), name=name)

    def stop_reading(self) -> None:
        """Take no more entries (the drain's first step); what is held goes on."""
        self._stop.set()
        self._room.set()

    async def stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the drain starts meanwhile; True when it did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        return self.stopping

    async def close(self, grace_s: float) -> None:
        """Stop reading; let the held entries finish within ``grace_s``; hand back the rest."""
        self.stop_reading()
        ends = time.monotonic() + grace_s
        for tasks in ([self._main] if self._main else [], list(self._held.values())):
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=max(0.0, ends - time.monotonic()))
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
        await self._hand_back()

    async def _hand_back(self) -> None:
        if not self._unacked:
            return
        left = self._unacked_ids()
        try:
            await self.store.client.xclaim(
                self.stream, self.store.group, self.consumer, 0, left,
                idle=int(self.claim_timeout_s * 1000), justid=True,
            )  # fmt: skip
            log.info("handed back %d entries of %s for other replicas to claim", len(left), self.stream)
        except (RedisError, OSError) as exc:
            log.warning(
                "could not hand back %d entries of %s (%r): claimed after the timeout",
                len(left),
                self.stream,
                exc,
            )

    def _unacked_ids(self) -> list[Any]:
        return sorted(self._unacked)

    async def _run(self) -> None:
        pause = RETRY_FIRST_S
        while not self.stopping:
            try:
                await self._read_some()
                pause = RETRY_FIRST_S
            except (RedisError, OSError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._next_upkeep = 0.0  # the group is gone (a Redis without persistence): again
                    continue
                log.warning("the stream %s does not answer (%r); retrying in %.1f s", self.stream, exc, pause)
                await asyncio.sleep(pause)
                pause = min(RETRY_MOST_S, pause * 2)

    async def _read_some(self) -> None:
        """Wait for room, then take entries: claimed ones of dead consumers first, then new ones."""
        while self.room() <= 0:
            self._room.clear()
            if self.stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=ROOM_POLL_S)
        if self.stopping:
            return
        if time.monotonic() >= self._next_upkeep:
            await self.upkeep()
            self._next_upkeep = time.monotonic() + self.claim_timeout_s / 3
        room = self.room()
        if room <= 0 or self.stopping:
            return
        reply: list[Any] = await self.store.client.xreadgroup(  # type: ignore[assignment]
            self.store.group, self.consumer, {self.stream: ">"}, count=room, block=READ_BLOCK_MS
        )
        for _, entries in reply or []:
            for entry_id, fields in entries:
                if self._stop.is_set():  # a drain began during the read: hand these back untouched
                    self._unacked.add(text(entry_id))
                else:
                    self._hold(entry_id, fields)

    async def upkeep(self) -> None:
        """The group exists; held entries are renewed; entries idle past the timeout are claimed."""
        await self.store.ensure_group(self.stream)
        client, group = self.store.client, self.store.group
        if self._unacked:
            await client.xclaim(self.stream, group, self.consumer, 0, self._unacked_ids(), justid=True)
        room = self.room()
        start = "0-0"
        while room > 0:
            reply: list[Any] = await client.xautoclaim(
                self.stream,
                group,
                self.consumer,
                int(self.claim_timeout_s * 1000),
                start_id=start,
                count=room,
            )
            start, entries = text(reply[0]), reply[1]
            for entry_id, fields in entries:
                if fields and text(entry_id) not in self._held:
                    log.info(
                        "claimed %s of %s from a consumer that stopped renewing it",
                        text(entry_id),
                        self.stream,
                    )
                    self._hold(entry_id, fields)
                    room -= 1
            if start == "0-0" or not entries:
                break

    def _hold(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> None:
        key = text(entry_id)
        task = asyncio.get_running_loop().create_task(self._entry(key, fields), name=f"{self.stream}-{key}")
        self._held[key] = task
        self._unacked.add(key)

    async def _entry(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            if await self._handled(entry_id, fields):
                await retrying(lambda: self._ack(entry_id))
            elif not self.stopping:
                self._unacked.discard(entry_id)  # not renewed: claimed after the timeout, by any replica
        finally:
            self._held.pop(entry_id, None)
            self._room.set()

    async def _handled(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        try:
            return await self.handle(entry_id, fields)
        except Exception:  # a bug must not leave the entry renewed, and so stuck here, for ever
            log.exception("handling %s of %s failed; left for a later claim", entry_id, self.stream)
            return False

    async def _ack(self, entry_id: str) -> None:
        async with self.store.client.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, self.store.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
        self._unacked.discard(entry_id)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
