"""Durable webhook delivery: the webhooks owed, in a Redis stream, delivered by any replica.

The script that ends a job (its last item stored, or a cancel) queues one entry ``{job}`` in
``{jobs_stream}:webhooks`` in the same atomic step (:mod:`jobs`), so a webhook is owed exactly once.
Every replica consumes that stream in the jobs' consumer group (:class:`StreamConsumer`):

- an entry is acknowledged only after a 2xx answer, a URL the guard refuses, a job that expired, or
  ``jobs_webhook_retries`` failed retries, counted over the fleet in the job's hash: a replica that
  dies between attempts (or before the first) leaves the entry pending, and another claims it after
  ``jobs_claim_timeout_s`` and goes on from the attempt it had reached;
- every attempt sends the same bytes (frozen in the job's hash on the first), so the same signature,
  and the same delivery id (the job's id and the entry's), so a receiver can drop a repeat: HTTP
  delivery is at least once (an answer lost after the receiver acted on it is retried);
- the backoff between retries (``jobs_webhook_backoff_s``, doubling) is waited by the replica that
  holds the entry, renewing it meanwhile; a drain hands it back at once.

The HTTP attempt itself is the server's (:class:`WebhookNotifier`): the data plane knows no HTTP.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

from captionfleet.runtime.serving.jobs import JobStore, WebhookAttempt, retrying
from captionfleet.runtime.serving.stream_consumer import StreamConsumer
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)


class WebhookOutcome(enum.Enum):
    DELIVERED = "delivered"
    FAILED = "failed"
    """No answer, a connection error or a status other than 2xx: worth a retry."""
    REFUSED = "refused"
    """The URL is not one we may call (the SSRF guard): never retried."""


class WebhookNotifier(Protocol):
    """One attempt at delivering a webhook's body (the server's HTTP client)."""

    async def attempt(
        self, url: str, secret: str | None, body: bytes, delivery_id: str
    ) -> WebhookOutcome: ...

    async def close(self) -> None: ...


class WebhookQueue(StreamConsumer):
    def __init__(
        self, store: JobStore, notifier: WebhookNotifier, settings: ServeSettings, consumer: str
    ) -> None:
        super().__init__(store, store.webhook_stream, consumer, settings.jobs_claim_timeout_s)
        self.notifier = notifier
        self.retries = settings.jobs_webhook_retries
        self.backoff_s = settings.jobs_webhook_backoff_s
        self.concurrency = settings.jobs_webhook_concurrency
        self.default_secret = settings.jobs_webhook_secret or None

    def room(self) -> int:
        return self.concurrency - self.held

    async def close(self, grace_s: float) -> None:
        await super().close(grace_s)
        await self.notifier.close()

    async def handle(self, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Attempt until delivered or given up (True: acknowledge); False when a drain interrupts the
        backoff (the entry is handed back)."""
        try:
            job_id = fields[b"job"].decode()
        except (KeyError, UnicodeDecodeError):
            log.error("webhook stream entry %s is malformed (%r); dropped", entry_id, fields)
            return True
        delivery_id = f"{job_id}.{entry_id}"
        while True:
            attempt = await retrying(lambda: self.store.webhook_attempt(job_id))
            if attempt is None:
                return True  # the job expired meanwhile
            if attempt.number > self.retries + 1:
                return self._gave_up(delivery_id, attempt)  # a replica died during the last attempt
            outcome = await self.notifier.attempt(
                attempt.url, attempt.secret or self.default_secret, attempt.body, delivery_id
            )
            if outcome is not WebhookOutcome.FAILED:
                return True
            if attempt.number > self.retries:
                return self._gave_up(delivery_id, attempt)
            if await self.stopped_within(self.backoff_s * 2 ** (attempt.number - 1)):
                return False

    def _gave_up(self, delivery_id: str, attempt: WebhookAttempt) -> bool:
        log.warning(
            "webhook %s to %s not delivered after %d attempts", delivery_id, attempt.url, self.retries + 1
        )
        return True
