"""The consumer of the job stream on one replica: bulk items captioned with the model's spare room.

Every replica on the same Redis runs one :class:`JobWorker` in the stream's consumer group, so the
items of a job are spread over the fleet (reading, renewing, claiming and handing back are
:class:`StreamConsumer`'s):

- it reads (``XREADGROUP``) only while it holds fewer than ``jobs_prefetch`` items and the model's
  interactive queue is shorter than a batch; the items it holds go to the batcher as *bulk*, which
  only fills room interactive requests leave (:mod:`batcher`);
- an item is acknowledged (``XACK``, then ``XDEL``: the stream's length is the backlog) only after its
  result is stored; storing is idempotent by item (:meth:`JobStore.record`), so an item that is
  captioned twice is recorded once;
- items it cannot serve now (the model not ready, the queue full) are left pending, unrenewed, and
  claimed after ``jobs_claim_timeout_s`` by any replica; a drain stops the reading at once, finishes
  what it holds within the grace and hands back the rest;
- a Redis that goes away (restarts, fails over) is waited for with backoff; results are kept and
  stored once it is back, so none is lost and none counted twice;
- the script that stores a job's last item queues its webhook, delivered by any replica's
  :class:`WebhookQueue` (started and closed with this worker).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from captionfleet.errors import CodedError
from captionfleet.runtime.serving.batcher import Priority
from captionfleet.runtime.serving.errors import Draining, NotReady, QueueFull
from captionfleet.runtime.serving.jobs import JobStore, StartedItem, retrying
from captionfleet.runtime.serving.service import CaptionService
from captionfleet.runtime.serving.stream_consumer import StreamConsumer
from captionfleet.runtime.serving.webhook_queue import WebhookNotifier, WebhookQueue
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)

Fetch = Callable[[str], Awaitable[bytes]]
TRANSIENT = (Draining, NotReady, QueueFull)
"""Errors of this replica's state, not of the item: the item is left for a later claim."""


class JobsObserver(Protocol):
    def jobs_pending(self, items: int) -> None: ...


class JobWorker(StreamConsumer):
    def __init__(
        self,
        store: JobStore,
        service: CaptionService,
        settings: ServeSettings,
        *,
        fetch: Fetch,
        notifier: WebhookNotifier,
        observer: JobsObserver,
        consumer: str | None = None,
    ) -> None:
        name = consumer or f"{socket.gethostname()}-{os.getpid()}"
        super().__init__(store, store.stream, name, settings.jobs_claim_timeout_s)
        self.service = service
        self.prefetch = settings.resolved_jobs_prefetch()
        self.webhooks = WebhookQueue(store, notifier, settings, name)
        self._fetch = fetch
        self._observer = observer

    @property
    def delivering(self) -> int:
        """Webhooks this replica is delivering (or holding for a retry)."""
        return self.webhooks.held

    def start(self, name: str = "job-worker") -> None:
        super().start(name)
        self.webhooks.start("webhook-queue")

    async def close(self, grace_s: float) -> None:
        """Stop reading; finish the held items within ``grace_s`` and hand back the rest (another
        replica claims them); deliver what webhooks it can, hand back the rest; close the connection."""
        await asyncio.gather(super().close(grace_s), self.webhooks.close(grace_s))
        await self.store.close()

    def room(self) -> int:
        """Spare capacity: items up to the prefetch, while no interactive batch waits."""
        batcher = self.service.batcher
        if batcher.depth >= batcher.max_batch_size:
            return 0
        return self.prefetch - self.held

    async def upkeep(self) -> None:
        await super().upkeep()
        self._observer.jobs_pending(await self.store.pending_items())

    async def handle(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        try:
            job_id, index = fields[b"job"].decode(), int(fields[b"index"])
        except (KeyError, ValueError, UnicodeDecodeError):
            log.error("job stream entry %s is malformed (%r); dropped", entry_id, fields)
            return True
        started = await retrying(lambda: self.store.begin_item(job_id, index))
        if started is None:
            return True  # stored already, cancelled, or the job expired
        outcome = await self._caption(started)
        if outcome is None:
            return False  # not this replica's moment: the item stays pending for a later claim
        result, error = outcome
        await retrying(lambda: self.store.record(started, result=result, error=error))
        return True  # the job's end queued its webhook in the same step (WebhookQueue)

    async def _caption(
        self, item: StartedItem
    ) -> tuple[dict[str, Any] | None, tuple[str, str] | None] | None:
        """(result, None) or (None, (code, message)); ``None`` when this replica cannot serve it now."""
        started = time.monotonic()
        try:
            source = item.source
            data = source.data if source.data is not None else await self._fetch(source.url or "")
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
