"""Request bodies, read within two bounds: one body's size, and the bytes all bodies hold at once.

``max_body_bytes`` bounds one body: a declared ``Content-Length`` over it is refused before reading,
and a chunked body is cut off as soon as it passes it (413). ``max_body_bytes_in_flight`` bounds the
request bytes the whole process holds: every request reads through its :class:`BodyAllowance`, which
takes room from the process's :class:`BodyBudget` before a chunk is kept and gives it back when the
request is answered. A body with a declared length takes all its room before its first byte is read
(so two uploads never each hold half of the room and wait for the other); a chunked one takes room
chunk by chunk. A request that finds no room waits, first come first served, for at most
``body_wait_ms`` (and never past its deadline), then gets 503 with ``Retry-After``. Peak memory in
request bodies is then bounded by a setting, whatever the concurrency.

A body sent with ``Content-Encoding: gzip``/``deflate`` is read as sent, then decoded by the edge
(``web/coding.py``: the limit counts the decoded bytes too, so a compression bomb is cut off at it);
a body that is not what its encoding says, or broken chunked framing, is a 400 ``invalid_body``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, StreamReader
from aiohttp.web import RequestPayloadError

from captionfleet.runtime.web.errors import InvalidRequest, Overloaded, PayloadTooLarge

CHUNK = 256 * 1024


@dataclass
class _Waiter:
    size: int
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BodyBudget:
    """Bytes of request bodies the process may hold at once, handed out first come, first served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()

    async def take(self, size: int, wait_s: float) -> None:
        """Take ``size`` bytes of room, waiting at most ``wait_s`` seconds; :class:`Overloaded` beyond."""
        if not self._waiters and self.held + size <= self.capacity:
            self._hold(size)
            return
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        try:
            # shield: the future itself is never cancelled, so _grant can always resolve it.
            await asyncio.wait_for(asyncio.shield(waiter.ready), timeout=max(0.0, wait_s))
        except TimeoutError:
            if waiter.ready.done():  # granted just as the wait ran out: keep it
                return
            self._withdraw(waiter)
            raise Overloaded(
                "the server holds as many request bytes as it may; retry shortly", retry_after=1.0
            ) from None
        except BaseException:  # cancelled (the client went away): nothing may stay taken
            if waiter.ready.done():
                self.give_back(size)
            else:
                self._withdraw(waiter)
            raise

    def give_back(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _withdraw(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)
        self._grant()  # those behind it may fit now

    def _hold(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _grant(self) -> None:
        while self._waiters and self.held + self._waiters[0].size <= self.capacity:
            waiter = self._waiters.popleft()
            self._hold(waiter.size)
            waiter.ready.set_result(None)


class BodyAllowance:
    """One request's share of the budget: what it took, given back at once when it is answered."""

    def __init__(self, budget: BodyBudget, wait_s: float, deadline: float | None) -> None:
        self.budget = budget
        self.wait_s = wait_s
        self.deadline = deadline
        self.taken = 0
        self.used = 0
        self.on_admitted: Callable[[], Awaitable[None]] | None = None
        """Awaited once, when the body is let in (:meth:`reserve_declared`): the deferred ``100 Continue``."""

    async def reserve(self, size: int) -> None:
        """Take room for ``size`` more bytes (or none, when room for them is taken already)."""
        missing = self.used + size - self.taken
        if missing <= 0:
            return
        wait_s = self.wait_s
        if self.deadline is not None:
            wait_s = min(wait_s, self.deadline - time.monotonic())
        await self.budget.take(missing, wait_s)
        self.taken += missing

    async def reserve_declared(self, declared: int | None, limit: int) -> None:
        """413 for a declared body size (Content-Length) over ``limit``; else room for all of it, taken
        before the first byte is read (no declared size: room is taken as the bytes arrive). Then the
        body is let in (``on_admitted``)."""
        if declared is not None:
            if declared > limit:
                raise PayloadTooLarge(f"the request body is {declared} bytes, over the limit of {limit}")
            await self.reserve(declared)
        admitted, self.on_admitted = self.on_admitted, None
        if admitted is not None:
            await admitted()

    async def keep(self, size: int) -> None:
        """Count ``size`` bytes of body as held (room taken first)."""
        await self.reserve(size)
        self.used += size

    def release(self) -> None:
        self.budget.give_back(self.taken)
        self.taken = self.used = 0


async def read_all(
    stream: StreamReader | BodyPartReader,
    allowance: BodyAllowance | None,
    limit: int,
    what: str = "request body",
) -> bytes:
    """Read a stream to its end through ``allowance`` (None: outside the budget), refusing it as soon
    as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = await (
                stream.read_chunk(CHUNK) if isinstance(stream, BodyPartReader) else stream.read(CHUNK)
            )
        except RequestPayloadError as exc:
            raise InvalidRequest(f"the {what} could not be read: {exc}", code="invalid_body") from exc
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the {what} is larger than the limit of {limit} bytes")
        if allowance is not None:
            await allowance.keep(len(chunk))
        chunks.append(chunk)
