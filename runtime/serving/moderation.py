"""Moderation before captioning: a verdict per image from an outside service, cached by perceptual key.

The data plane knows the service only as a :class:`ModerationClient` (``judge`` one JPEG, get a
:class:`Verdict` or :class:`ModerationUnavailable`); the HTTP client is the server's
(``captionfleet.runtime.server.moderation``). :class:`Moderation` adds what does not depend on the
transport: the image as the service receives it (JPEG, longest side at most :data:`MAX_SIDE`), the
timeout (never past the request's deadline), the verdict cache (the result cache's perceptual key, in
its own namespace, so a re-encoded or resized copy of a refused image is refused without asking
again), and the failure policy (``Fail``: the request fails with 503; ``Ignore``: it is captioned
unmoderated, and counted).

Images are never stored or logged: the JPEG lives only for the call, the cache keeps the verdict and
the 16x16 colour signature of the key, and log lines name the failure, not the image.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from captionfleet.runtime.serving.cache import CacheLookup, MemoryCache
from captionfleet.runtime.serving.errors import ContentBlocked, DeadlineExceeded, ModerationUnavailable
from captionfleet.runtime.serving.image_key import ImageKey
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)

MAX_SIDE = 512
"""Longest side of the JPEG sent to the moderation service, in pixels (smaller images are sent as is)."""
JPEG_QUALITY = 90
MAX_REASON_CHARS = 500
"""The service's reason is cut to this length in the client's message."""
RETRY_AFTER_S = 1.0
"""Retry-After of a 503 moderation_unavailable: the router retries once on another pod at once, then
the client after this."""
NAMESPACE = "captionfleet:moderation:v1"
FAIL, IGNORE = "Fail", "Ignore"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str

    @classmethod
    def from_answer(cls, answer: object) -> Verdict:
        """The service's JSON answer ``{"allowed": bool, "reason": str}`` (reason optional) -> a verdict;
        anything else raises :class:`ModerationUnavailable`: a service that answers nonsense cannot judge."""
        if not isinstance(answer, dict) or not isinstance(answer.get("allowed"), bool):
            raise ModerationUnavailable('the moderation service\'s answer has no boolean "allowed"')
        reason = answer.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ModerationUnavailable('the moderation service\'s "reason" is not a string')
        return cls(answer["allowed"], printable(reason or ""))


def printable(text: str) -> str:
    """The reason fit for an error message: no control characters, at most MAX_REASON_CHARS."""
    cleaned = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text).strip()
    return cleaned[:MAX_REASON_CHARS]


class ModerationClient(Protocol):
    """The moderation service, whatever carries the call (the server's is HTTP)."""

    async def judge(self, jpeg: bytes) -> Verdict:
        """The verdict on one JPEG; raises ModerationUnavailable when there is none."""
        ...

    async def close(self) -> None: ...


class ModerationObserver(Protocol):
    """The figures of moderation (the server's metrics implement it)."""

    def moderation_checked(self, outcome: str, seconds: float) -> None:
        """One call to the service: outcome ``allowed``, ``blocked`` or ``unavailable``."""
        ...

    def moderation_cache_hit(self) -> None: ...

    def moderation_bypassed(self) -> None:
        """An image captioned without a verdict (the service unavailable, policy ``Ignore``)."""
        ...


def moderation_jpeg(image: Image.Image) -> bytes:
    """The image as the service receives it: RGB JPEG, longest side at most MAX_SIDE (CPU work)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if max(rgb.size) > MAX_SIDE:
        rgb = rgb.copy()
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class Moderation:
    """The check every image passes before captioning."""

    def __init__(
        self,
        client: ModerationClient,
        observer: ModerationObserver,
        *,
        timeout_s: float,
        failure_policy: str,
        cache: MemoryCache[Verdict] | None,
    ) -> None:
        if failure_policy not in (FAIL, IGNORE):
            raise ValueError(f"failure policy {failure_policy!r} is not {FAIL} or {IGNORE}")
        self.client = client
        self.timeout_s = timeout_s
        self.failure_policy = failure_policy
        self.cache = cache
        self._observer = observer

    async def check(
        self, key: ImageKey | None, jpeg: Callable[[], Awaitable[bytes]], deadline: float | None
    ) -> None:
        """Return when the image may be captioned; raise ContentBlocked, or ModerationUnavailable
        under ``Fail``, or DeadlineExceeded. ``jpeg`` makes the image to send, only when it is needed."""
        cache = self.cache
        lookup = CacheLookup(NAMESPACE, key) if key is not None and cache is not None else None
        verdict = await cache.get(lookup) if lookup is not None and cache is not None else None
        if verdict is not None:
            self._observer.moderation_cache_hit()
        else:
            try:
                verdict = await self._ask(await jpeg(), deadline)
            except ModerationUnavailable as exc:
                if self.failure_policy == FAIL:
                    raise ModerationUnavailable(exc.message, retry_after=RETRY_AFTER_S) from exc
                self._observer.moderation_bypassed()
                return
            if lookup is not None and cache is not None:
                await cache.put(lookup, verdict)
        if not verdict.allowed:
            reason = verdict.reason or "no reason given"
            raise ContentBlocked(f"the image was blocked by moderation: {reason}")

    async def _ask(self, jpeg: bytes, deadline: float | None) -> Verdict:
        """One call within the timeout, cut short by the request's deadline (then 504, not 503)."""
        timeout_s = self.timeout_s
        by_deadline = False
        if deadline is not None and deadline - time.monotonic() < timeout_s:
            timeout_s, by_deadline = deadline - time.monotonic(), True
            if timeout_s <= 0:
                raise DeadlineExceeded("the request's deadline passed before its image was moderated")
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                verdict = await self.client.judge(jpeg)
        except TimeoutError:
            self._observer.moderation_checked("unavailable", time.monotonic() - started)
            if by_deadline:
                raise DeadlineExceeded("the request's deadline passed during its moderation") from None
            log.warning("the moderation service did not answer within %.0f ms", self.timeout_s * 1000)
            raise ModerationUnavailable(
                f"the moderation service did not answer within {self.timeout_s * 1000:.0f} ms"
            ) from None
        except ModerationUnavailable as exc:
            self._observer.moderation_checked("unavailable", time.monotonic() - started)
            log.warning("moderation unavailable: %s", exc.message)
            raise
        outcome = "allowed" if verdict.allowed else "blocked"
        self._observer.moderation_checked(outcome, time.monotonic() - started)
        return verdict

    async def close(self) -> None:
        await self.client.close()
        if self.cache is not None:
            await self.cache.close()


def build_moderation(
    settings: ServeSettings, client: ModerationClient, observer: ModerationObserver
) -> Moderation:
    """The moderation the settings describe, over ``client``."""
    cache = (
        MemoryCache[Verdict](settings.moderation_cache_size, settings.moderation_cache_ttl_s)
        if settings.moderation_cache_size > 0
        else None
    )
    return Moderation(
        client,
        observer,
        timeout_s=settings.moderation_timeout_ms / 1000,
        failure_policy=settings.moderation_failure_policy,
        cache=cache,
    )
