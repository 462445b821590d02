"""Job webhooks: the ended job's state POSTed to the URL it gave, signed, retried, SSRF-guarded.

- The body is the job's status JSON (``GET /v1/jobs/{id}``'s); with a secret (the job's
  ``webhook_secret``, else the ``jobs_webhook_secret`` setting) it is signed in
  ``X-Captionfleet-Signature: sha256=<hex HMAC-SHA256 of the body>``, so the receiver can check that
  the body came from us unchanged (compare in constant time).
- A 2xx answer delivers it; no answer, a connection error or any other status is retried after
  ``jobs_webhook_backoff_s``, doubling, ``jobs_webhook_retries`` times.
- The URL passes the same guard as image URLs (``fetch.check_url``, and the resolver that refuses
  private addresses after resolution); redirects are not followed. A refused URL is not retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import Any

import aiohttp
from yarl import URL

from captionfleet.names import WEBHOOK_SIGNATURE_HEADER
from captionfleet.runtime.server.fetch import RefusedAddress, absolute_url, check_url, guarded_session
from captionfleet.runtime.web.errors import UrlRefused
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)


def signature(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(self, settings: ServeSettings) -> None:
        self.allow_private = settings.allow_private_urls
        self.timeout_s = settings.jobs_webhook_timeout_s
        self.retries = settings.jobs_webhook_retries
        self.backoff_s = settings.jobs_webhook_backoff_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(self.allow_private, self.timeout_s, connections=16)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def notify(self, url: str, secret: str | None, state: dict[str, Any]) -> None:
        """Deliver ``state`` to ``url``; gives up (logged) after the retries."""
        body = json.dumps(state).encode()
        headers = {"Content-Type": "application/json"}
        if secret:
            headers[WEBHOOK_SIGNATURE_HEADER] = signature(secret, body)
        for attempt in range(self.retries + 1):
            try:
                failure = await self._post(absolute_url(url, "the webhook"), body, headers)
            except UrlRefused as exc:
                log.warning("webhook of job %s refused: %s", state.get("id"), exc.message)
                return
            if failure is None:
                log.info("webhook of job %s delivered", state.get("id"))
                return
            if attempt < self.retries:
                pause = self.backoff_s * 2**attempt
                log.info("webhook of job %s failed (%s); retry in %.1f s", state.get("id"), failure, pause)
                await asyncio.sleep(pause)
        log.warning(
            "webhook of job %s not delivered after %d tries: %s", state.get("id"), attempt + 1, failure
        )

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
