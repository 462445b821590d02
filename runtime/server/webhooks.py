"""Job webhooks: one attempt at POSTing an ended job's state to the URL it gave, signed, SSRF-guarded.

- The body is the job's status JSON (``GET /v1/jobs/{id}``'s, frozen on the first attempt); with a
  secret (the job's ``webhook_secret``, else the ``jobs_webhook_secret`` setting) it is signed in
  ``X-Captionfleet-Signature: sha256=<hex HMAC-SHA256 of the body>``, so the receiver can check that
  the body came from us unchanged (compare in constant time); ``X-Captionfleet-Delivery`` is the
  same on every attempt, so the receiver can drop repeats.
- A 2xx answer delivers it; no answer, a connection error or any other status is a failure, retried
  by the data plane's queue (:mod:`captionfleet.runtime.serving.webhook_queue`: any replica, with
  doubling backoff, ``jobs_webhook_retries`` times).
- The URL passes the same guard as image URLs (``fetch.check_url``, and the resolver that refuses
  private addresses after resolution); redirects are not followed. A refused URL is not retried.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import aiohttp
from yarl import URL

from captionfleet.names import WEBHOOK_DELIVERY_HEADER, WEBHOOK_SIGNATURE_HEADER
from captionfleet.runtime.server.fetch import GuardedClient, RefusedAddress, absolute_url, check_url
from captionfleet.runtime.serving.webhook_queue import WebhookOutcome
from captionfleet.runtime.web.errors import UrlRefused
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)


def signature(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender(GuardedClient):
    """One attempt at a webhook (:class:`WebhookQueue` decides on retries, over the fleet)."""

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(allow_private=settings.allow_private_urls, timeout_s=settings.jobs_webhook_timeout_s)
        self.connections = settings.jobs_webhook_concurrency

    async def attempt(self, url: str, secret: str | None, body: bytes, delivery_id: str) -> WebhookOutcome:
        headers = {"Content-Type": "application/json", WEBHOOK_DELIVERY_HEADER: delivery_id}
        if secret:
            headers[WEBHOOK_SIGNATURE_HEADER] = signature(secret, body)
        try:
            failure = await self._post(absolute_url(url, "the webhook"), body, headers)
        except UrlRefused as exc:
            log.warning("webhook %s refused: %s", delivery_id, exc.message)
            return WebhookOutcome.REFUSED
        if failure is None:
            log.info("webhook %s delivered", delivery_id)
            return WebhookOutcome.DELIVERED
        log.info("webhook %s failed: %s", delivery_id, failure)
        return WebhookOutcome.FAILED

    async def _post(self, url: URL, body: bytes, headers: dict[str, str]) -> str | None:
        """One attempt: ``None`` when delivered, else why not."""
        check_url(url, self.allow_private)
        try:
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as answer:
                if 200 <= answer.status < 300:
                    return None
                return f"HTTP {answer.status}"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):
                raise UrlRefused(str(exc.os_error)) from exc
            return f"could not connect: {exc.os_error}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return repr(exc)
