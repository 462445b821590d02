"""Exact repeats: answers kept in the shared Redis by the digest of the image's bytes, so that a
process that cannot decode images (the router, while a version has no pod) can still answer them.

The server's result cache is perceptual (``cache.py``): finding an entry needs the decoded image.
A body seen before is known by its digest already (``image_key.KeyMemo``: the key of a body seen
before without decoding it); this module writes, next to every answer of ``POST /v1/caption`` for an
image sent in the request, the answer under ``repeat_key(model version, the request's option fields,
the digest)``. The router computes the same key from the same request (the same parsing,
``web/parsing.py``) and answers it from Redis, ``cached: true``, without waking a pod. The options are
the request's own fields (query and body, as parsed), not the server's resolved ones, which the
router cannot know: within one model version the defaults are the version's, and entries expire
after the cache's TTL. Light on purpose (no numpy, no PIL, no engine), so the router may import it.

Like the result cache, an optimisation: a Redis that is down or slow makes lookups miss and writes
vanish (logged and counted), never fails a request.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

KEY_PREFIX = "captionfleet:repeats:v1"


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def body_digest(data: bytes) -> bytes:
    """The digest of an image's bytes: the key of a body seen before (the memo's and Redis's)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def repeat_key(model_version: str, fields: Mapping[str, object], digest: bytes) -> str:
    """Where the answer to an image (by its digest) with these option fields is kept."""
    options = json.dumps({name: str(value) for name, value in sorted(fields.items())}).encode()
    return f"{KEY_PREFIX}:{model_version}:{hashlib.sha256(options).hexdigest()[:16]}:{digest.hex()}"


class SharedRedis:
    """A client of the shared cache's Redis whose failures are logged and counted, never raised."""

    what = "cache"

    def __init__(self, url: str, ttl_s: float, *, timeout_s: float = 0.5) -> None:
        import redis.asyncio

        self.url = redact_url(url)
        self.ttl_s = ttl_s
        self._client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self.errors = 0

    async def close(self) -> None:
        await self._client.aclose()

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        log.warning("redis %s %s failed (%s): %r", self.what, what, self.url, exc)


class RepeatStore(SharedRedis):
    """Answers (the contract's caption body without the per-request fields) in Redis, with a TTL."""

    what = "repeats"

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._client.get(key)
        except Exception as exc:  # redis.RedisError, OSError, timeouts: a miss, not a failure
            self._failed("read", exc)
            return None
        if raw is None:
            return None
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            self._failed("decode", exc)
            return None
        return answer if isinstance(answer, dict) and isinstance(answer.get("caption"), str) else None

    async def put(self, key: str, answer: Mapping[str, Any]) -> None:
        try:
            await self._client.set(key, json.dumps(dict(answer)), px=max(1, int(self.ttl_s * 1000)))
        except Exception as exc:
            self._failed("write", exc)
