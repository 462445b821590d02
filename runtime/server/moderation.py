"""The moderation service over HTTP: the data plane's ``ModerationClient`` (``serving/moderation.py``).

One POST per image, the JPEG as the body (``Content-Type: image/jpeg``), answered by
``{"allowed": bool, "reason": str}``. The URL is checked as image URLs are (``fetch.py``): http or
https only, and, unless private addresses are allowed, no loopback, private, link-local or other
non-public address, checked on the address actually connected to (the guarded resolver). Redirects are
not followed: a moderation service answers itself. Anything but a 200 with such a JSON answer,
within :data:`MAX_ANSWER_BYTES`, is the service being unavailable; the timeout is the data plane's.
"""

from __future__ import annotations

import json
import logging

import aiohttp
from yarl import URL

from captionfleet.runtime.server.fetch import GuardedResolver, RefusedAddress, check_url
from captionfleet.runtime.serving.errors import ModerationUnavailable
from captionfleet.runtime.serving.moderation import Verdict
from captionfleet.runtime.web.body import read_all
from captionfleet.runtime.web.errors import PayloadTooLarge
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
"""Largest answer read from the moderation service; a verdict is a few dozen bytes."""


class HttpModerationClient:
    def __init__(self, url: str, *, allow_private: bool, max_connections: int) -> None:
        """Raises UrlRefused when the URL may not be used (scheme, host, private IP literal)."""
        self.url = URL(url.strip())
        if not self.url.is_absolute():
            raise ValueError("the moderation URL must be absolute (http:// or https://)")
        check_url(self.url, allow_private)
        self.allow_private = allow_private
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.allow_private), limit=self.max_connections
            )
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, headers={"User-Agent": "captionfleet-runtime"}
            )
        return self._session

    async def judge(self, jpeg: bytes) -> Verdict:
        headers = {"Content-Type": "image/jpeg", "Accept": "application/json"}
        try:
            async with self._client().post(
                self.url, data=jpeg, headers=headers, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise ModerationUnavailable(f"the moderation service answered HTTP {response.status}")
                body = await read_all(response.content, None, MAX_ANSWER_BYTES, what="moderation answer")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):  # the details (addresses) for the log only
                log.error("the moderation URL may not be used: %s", exc.os_error)
                raise ModerationUnavailable("the moderation service's address may not be used") from exc
            raise ModerationUnavailable("the moderation service could not be reached") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ModerationUnavailable(f"the call to the moderation service failed: {exc!r}") from exc
        except PayloadTooLarge as exc:
            raise ModerationUnavailable(f"the moderation answer is over {MAX_ANSWER_BYTES} bytes") from exc
        try:
            answer = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError included
            raise ModerationUnavailable("the moderation service's answer is not JSON") from exc
        return Verdict.from_answer(answer)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def moderation_client(settings: ServeSettings) -> HttpModerationClient | None:
    """The client of ``moderation_url`` (None without one); raises UrlRefused or ValueError for a URL
    that may not be used, so a wrong one stops the server at start rather than failing every request."""
    if not settings.moderation_url:
        return None
    return HttpModerationClient(
        settings.moderation_url,
        allow_private=settings.moderation_allow_private or settings.allow_private_urls,
        max_connections=settings.moderation_max_connections,
    )
