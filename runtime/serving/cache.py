"""The result cache: captions keyed by model version + generation options + perceptual image key.

Layout, the same in memory and in Redis: a *bucket* per (model version, options, image bucket) holds
the most recent :data:`BUCKET_ENTRIES` captions with their images' signatures. A lookup reads every
bucket the image key probes (see :mod:`image_key`) and takes the entry whose signature is closest,
within tolerance. Entries expire ``ttl_s`` after they were written.

The cache is an optimisation: a Redis that is down or slow makes lookups miss and writes vanish
(logged and counted), never fails a request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from captionfleet.runtime.engine.types import Caption, GenerationOptions, Suggestion
from captionfleet.runtime.serving.image_key import TOLERANCE, ImageKey, same_image
from captionfleet.runtime.serving.repeats import SharedRedis

log = logging.getLogger(__name__)

BUCKET_ENTRIES = 64
"""Distinct images kept per bucket (the most recent). Similar-looking images share buckets: 400
synthetic scenes fill about 130 buckets, the busiest with 28 (plain white backgrounds)."""
KEY_PREFIX = "captionfleet:captions:v1"

T = TypeVar("T")
V = TypeVar("V")


@dataclass(frozen=True)
class CacheLookup:
    """Where one image's caption lives: the namespace (model + options) and the image key."""

    namespace: str
    image: ImageKey

    @classmethod
    def of(cls, model_version: str, options: GenerationOptions, image: ImageKey) -> CacheLookup:
        options_json = json.dumps(asdict(options), sort_keys=True).encode()
        return cls(f"{KEY_PREFIX}:{model_version}:{hashlib.sha256(options_json).hexdigest()[:16]}", image)

    @property
    def home(self) -> str:
        """The bucket this image is written to."""
        return f"{self.namespace}:{self.image.bucket}"

    def buckets(self) -> list[str]:
        """The buckets a lookup reads, the home bucket first."""
        return [f"{self.namespace}:{name}" for name in self.image.probes()]


class ResultCache(Protocol):
    kind: str

    async def get(self, lookup: CacheLookup) -> Caption | None: ...

    async def put(self, lookup: CacheLookup, caption: Caption) -> None: ...

    async def close(self) -> None: ...


def caption_to_dict(caption: Caption) -> dict[str, object]:
    return {
        "text": caption.text,
        "confidence": caption.confidence,
        "suggestions": [{"text": s.text, "confidence": s.confidence} for s in caption.suggestions],
        "ood_score": caption.ood_score,
        "in_distribution": caption.in_distribution,
    }


def caption_from_dict(data: dict[str, object]) -> Caption:
    suggestions = data["suggestions"]
    assert isinstance(suggestions, list)
    score = data.get("ood_score")  # absent in entries written before scores existed
    return Caption(
        text=str(data["text"]),
        confidence=float(data["confidence"]),  # type: ignore[arg-type]
        suggestions=tuple(Suggestion(str(s["text"]), float(s["confidence"])) for s in suggestions),
        ood_score=float(score) if isinstance(score, (int, float)) else None,
        in_distribution=bool(data["in_distribution"]) if isinstance(score, (int, float)) else None,
    )


def closest(signature: bytes, candidates: Iterable[tuple[bytes, T]]) -> T | None:
    """The value of the candidate whose signature is nearest ``signature``, if within tolerance."""
    usable = [(candidate, value) for candidate, value in candidates if len(candidate) == len(signature)]
    if not usable:
        return None
    stacked = np.frombuffer(b"".join(c for c, _ in usable), dtype=np.uint8).reshape(len(usable), -1)
    query = np.frombuffer(signature, dtype=np.uint8).astype(np.int16)
    distances = np.abs(stacked.astype(np.int16) - query).max(axis=1)
    best = int(distances.argmin())
    return usable[best][1] if distances[best] <= TOLERANCE else None


@dataclass
class _Entry(Generic[V]):
    signature: bytes
    value: V
    expires: float


class MemoryCache(Generic[V]):
    """An LRU of buckets with a TTL per entry, bounded by the number of entries held.

    The values are captions for the result cache (``MemoryCache[Caption]``), and moderation verdicts
    for the moderation's cache (the same perceptual key, another namespace)."""

    kind = "memory"

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._buckets: OrderedDict[str, list[_Entry[V]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    async def get(self, lookup: CacheLookup) -> V | None:
        now = self._clock()
        candidates = [
            (entry.signature, (name, entry.value))
            for name in lookup.buckets()
            for entry in self._buckets.get(name, ())
            if entry.expires > now
        ]
        found = closest(lookup.image.signature, candidates)
        if found is None:
            return None
        name, value = found
        self._buckets.move_to_end(name)
        return value

    async def put(self, lookup: CacheLookup, value: V) -> None:
        if self.max_entries <= 0:
            return
        now = self._clock()
        name = lookup.home
        old = self._buckets.pop(name, [])
        signature = lookup.image.signature
        kept = [e for e in old if e.expires > now and not same_image(e.signature, signature)]
        kept.append(_Entry(signature, value, now + self.ttl_s))
        kept = kept[-BUCKET_ENTRIES:]
        self._size += len(kept) - len(old)
        self._buckets[name] = kept
        while self._size > self.max_entries and self._buckets:
            _, evicted = self._buckets.popitem(last=False)
            self._size -= len(evicted)

    async def close(self) -> None:
        self._buckets.clear()
        self._size = 0


class RedisCache(SharedRedis):
    """Buckets as capped Redis lists of ``{"s": signature, "c": caption, "t": expiry}``, shared by replicas.

    Memory is bounded by the cap, the TTL and Redis's own ``maxmemory`` policy (``allkeys-lru``)."""

    kind = "redis"

    async def ping(self) -> None:
        """Raise unless Redis answers (used at start-up to report a wrong URL early)."""
        await self._client.ping()

    async def get(self, lookup: CacheLookup) -> Caption | None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in lookup.buckets():
                    pipe.lrange(name, 0, BUCKET_ENTRIES - 1)
                buckets = await pipe.execute()
        except Exception as exc:  # redis.RedisError, OSError, timeouts: a miss, not a failure
            self._failed("read", exc)
            return None
        now = time.time()
        candidates: list[tuple[bytes, dict[str, object]]] = []
        for raw in (item for bucket in buckets for item in bucket):
            try:
                entry = json.loads(raw)
                if float(entry["t"]) > now:
                    candidates.append((base64.b64decode(entry["s"]), entry["c"]))
            except (ValueError, KeyError, TypeError):
                continue  # written by another version of this code: ignore it
        found = closest(lookup.image.signature, candidates)
        if found is None:
            return None
        try:
            return caption_from_dict(found)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            self._failed("decode", exc)
            return None

    async def put(self, lookup: CacheLookup, caption: Caption) -> None:
        entry = {
            "s": base64.b64encode(lookup.image.signature).decode(),
            "c": caption_to_dict(caption),
            "t": time.time() + self.ttl_s,
        }
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.lpush(lookup.home, json.dumps(entry))
                pipe.ltrim(lookup.home, 0, BUCKET_ENTRIES - 1)
                pipe.pexpire(lookup.home, max(1, int(self.ttl_s * 1000)))
                await pipe.execute()
        except Exception as exc:
            self._failed("write", exc)
