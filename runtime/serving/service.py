"""Orchestration of one caption request: decode -> cache -> preprocess -> batch -> cache, off the loop.

:class:`CaptionService` owns the model, the preprocessing pool, the batcher and the cache; the HTTP
server owns none of them. CPU work (decoding, the cache key, preprocessing) runs in a thread pool
sized by ``preprocess_workers``, so one huge image never stalls the event loop or other requests, and
goes on while the model runs a batch in the batcher's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from PIL import Image

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.engine.options import resolve_options
from captionfleet.runtime.engine.types import Caption, GenerationOptions
from captionfleet.runtime.serving.batcher import BatchObserver, DynamicBatcher, Priority
from captionfleet.runtime.serving.cache import CacheLookup, MemoryCache, RedisCache, ResultCache
from captionfleet.runtime.serving.drift import DriftMonitor
from captionfleet.runtime.serving.errors import DeadlineExceeded, Draining, NotReady
from captionfleet.runtime.serving.image_key import ImageKey, KeyMemo, image_key
from captionfleet.runtime.serving.moderation import Moderation, moderation_jpeg
from captionfleet.runtime.serving.repeats import RepeatStore, body_digest, repeat_key
from captionfleet.settings import overlay
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger(__name__)


class ServiceObserver(BatchObserver, Protocol):
    """The figures the service reports besides the batcher's (the server's metrics implement it)."""

    def preprocessed(self, seconds: float) -> None: ...

    def cache_lookup(self, hit: bool) -> None: ...

    def captioned(self, caption: Caption) -> None: ...

    def answered(self, caption: Caption) -> None:
        """Every answered request, cached or not (the out-of-distribution count)."""
        ...


@dataclass(frozen=True)
class CaptionResult:
    caption: Caption
    model_version: str
    cached: bool

    def as_dict(self) -> dict[str, Any]:
        """The contract's caption body, without the per-request fields (latency, request id)."""
        caption = self.caption
        body: dict[str, Any] = {
            "caption": caption.text,
            "confidence": caption.confidence,
            "suggestions": [{"text": s.text, "confidence": s.confidence} for s in caption.suggestions],
            "model_version": self.model_version,
            "cached": self.cached,
        }
        if caption.ood_score is not None:  # once the model has reference statistics (the contract)
            body |= {"ood_score": caption.ood_score, "in_distribution": caption.in_distribution}
        return body


class CaptionService:
    """The data plane for one loaded model version."""

    def __init__(
        self,
        captioner: Captioner,
        settings: ServeSettings,
        observer: ServiceObserver,
        cache: ResultCache | None = None,
        moderation: Moderation | None = None,
    ) -> None:
        self.captioner = captioner
        self.settings = settings
        self.model_version = settings.model_version or captioner.version
        self.defaults = overlay(GenerationOptions(), settings)
        captioner.score_ood = settings.ood
        captioner.ood_threshold = settings.ood_threshold
        if settings.ood:
            captioner.build_reference_from_requests(settings.ood_reference_requests)
        self.drift = DriftMonitor(
            settings.drift_window, 1.0 - settings.ood_threshold, settings.drift_significance
        )
        self.cache = cache
        # Exact repeats beside a shared cache: what the router answers while the version has no pod.
        self.repeats = RepeatStore(settings.redis_url, settings.cache_ttl_s) if settings.redis_url else None
        self.moderation = moderation
        # The perceptual key serves the result cache and the moderation's verdicts.
        keyed = cache is not None or (moderation is not None and moderation.cache is not None)
        self._key_memo = KeyMemo(max(settings.cache_size, settings.moderation_cache_size)) if keyed else None
        self._observer = observer
        self._pool = ThreadPoolExecutor(
            settings.resolved_preprocess_workers(), thread_name_prefix="preprocess"
        )
        self.batcher: DynamicBatcher[torch.Tensor, GenerationOptions, Caption] = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            observer=observer,
            idle_dispatch=settings.idle_dispatch,
            bulk_calm_of_a_batch=settings.bulk_calm_of_a_batch,
            wait_for_arrivals=settings.wait_for_arrivals,
            max_bulk_batch_size=settings.resolved_max_bulk_batch_size(),
            bulk_time_share=settings.bulk_time_share,
            bulk_max_wait_s=settings.bulk_max_wait_ms / 1000 if settings.bulk_max_wait_ms > 0 else math.inf,
        )
        self.ready = False
        self.draining = False
        limit = settings.bulk_prepare_concurrency
        self._bulk_preparing = asyncio.Semaphore(limit) if limit > 0 else None

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about the model and how it is served."""
        info = self.captioner.info()
        info["version"] = self.model_version
        info["batching"] = {
            "max_batch_size": self.settings.max_batch_size,
            "max_queue_delay_ms": self.settings.max_queue_delay_ms,
            "max_queue_size": self.settings.max_queue_size,
            "idle_dispatch": self.settings.idle_dispatch,
            "wait_for_arrivals": self.settings.wait_for_arrivals,
        }
        info["defaults"] = {
            "num_beams": self.defaults.num_beams,
            "max_new_tokens": self.defaults.max_new_tokens,
        }
        info["cache"] = self.cache.kind if self.cache is not None else "off"
        if self.settings.ood:
            info["drift"] = self.drift.state().as_dict()
        info["moderation"] = (
            {"failure_policy": self.moderation.failure_policy, "timeout_ms": self.moderation.timeout_s * 1000}
            if self.moderation is not None
            else "off"
        )
        info["ready"] = self.ready
        return info

    async def start(self) -> None:
        """Start the batcher and run a warm-up batch on the model's thread; then the service is ready."""
        if isinstance(self.cache, RedisCache):
            try:
                await self.cache.ping()
            except Exception as exc:  # the cache is optional: serve without hits rather than not at all
                log.warning(
                    "redis at %s does not answer yet (%r); lookups miss until it does", self.cache.url, exc
                )
        self.batcher.start()
        started = time.monotonic()
        blank = Image.new("RGB", self.captioner.preprocessor.size, (127, 127, 127))
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._pool, self.captioner.preprocessor, blank)
        warm = replace(self.defaults, suggestions=1)
        # On the model's own thread, but not through the queue: no waiting for companions, no metrics.
        await loop.run_in_executor(self.batcher.executor, self._warm_batch, pixels, warm)
        self.ready = True
        log.info("model %s warmed up in %.2f s", self.model_version, time.monotonic() - started)

    def resolve_options(self, fields: dict[str, Any]) -> GenerationOptions:
        """Request fields (query or body; strings or numbers) -> validated options over the defaults."""
        return resolve_options(
            num_beams=fields.get("num_beams"),
            max_new_tokens=fields.get("max_new_tokens"),
            suggestions=fields.get("suggestions"),
            style=fields.get("style") or self.settings.style or None,
            prompt=fields.get("prompt"),
            defaults=self.defaults,
        )

    def deadline(self, arrived: float, client_timeout_ms: float | None = None) -> float | None:
        """The monotonic deadline of a request that arrived at ``arrived``: the configured timeout, or the
        client's own when that is shorter; ``None`` when neither sets one."""
        timeouts = [
            t for t in (self.settings.request_timeout_ms, client_timeout_ms) if t is not None and t > 0
        ]
        return arrived + min(timeouts) / 1000 if timeouts else None

    def arriving(self, priority: Priority) -> contextlib.AbstractContextManager[None]:
        """Around an interactive request's decoding and preprocessing, on its way to the batcher: the
        model, though idle, starts no bulk batch meanwhile (:meth:`DynamicBatcher.preparing`)."""
        return self.batcher.preparing() if priority is Priority.INTERACTIVE else contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def _preparation(self, priority: Priority) -> AsyncIterator[None]:
        """Around a request's decoding and preprocessing. Interactive: a free model may wait for it
        (the arrival wait). Bulk: one of at most ``bulk_prepare_concurrency``, each started only while
        no interactive request is being prepared, so bulk decoding never stands ahead of an interactive
        request in the pool, nor takes its CPU, by more than that many images."""
        if priority is Priority.INTERACTIVE or self._bulk_preparing is None:
            with self.arriving(priority):
                yield
            return
        async with self._bulk_preparing:
            await self.batcher.none_preparing()
            yield

    async def caption(
        self,
        data: bytes,
        options: GenerationOptions,
        deadline: float | None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> CaptionResult:
        """Caption one image given as bytes; raises engine and serving errors. Bulk requests only fill
        the model's spare room (:class:`DynamicBatcher`)."""
        if self.draining:
            raise Draining("the server is shutting down", retry_after=1.0)
        if not self.ready:
            raise NotReady("the model is still loading", retry_after=5.0)
        async with self._preparation(priority):
            prepared = await self._prepare(data, options, deadline)
        if isinstance(prepared, CaptionResult):
            return prepared
        pixels, lookup = prepared
        caption = await self.batcher.submit(pixels, options, deadline=deadline, priority=priority)
        self._observer.captioned(caption)
        self._answered(caption)
        if lookup is not None and self.cache is not None:
            await self.cache.put(lookup, caption)  # awaited: the next identical request finds it
        return CaptionResult(caption, self.model_version, cached=False)

    async def _prepare(
        self, data: bytes, options: GenerationOptions, deadline: float | None
    ) -> CaptionResult | tuple[torch.Tensor, CacheLookup | None]:
        """Decode, moderate, look the image up in the cache, preprocess: a cached result, or the pixels
        and where to store the caption."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        image, key = await loop.run_in_executor(self._pool, self._key_and_image, data)
        decoding_s = time.monotonic() - started
        if self.moderation is not None:  # before the result cache: a refused image gets no caption at all
            image = await self._moderate(data, image, key, deadline)
        lookup = None
        if self.cache is not None and key is not None:
            lookup = CacheLookup.of(self.model_version, options, key)
            cached = await self.cache.get(lookup)
            self._observer.cache_lookup(cached is not None)
            if cached is not None:
                self._observer.preprocessed(decoding_s)
                _check_deadline(deadline, "while its image was being looked up")  # cached or not
                self._answered(cached)
                return CaptionResult(cached, self.model_version, cached=True)
        started = time.monotonic()
        if image is None:  # a body seen before: its key came from the memo, the image is needed now
            image = await loop.run_in_executor(self._pool, self._decode_only, data)
        pixels = await loop.run_in_executor(self._pool, self.captioner.preprocessor, image)
        self._observer.preprocessed(decoding_s + time.monotonic() - started)
        _check_deadline(deadline, "while its image was being decoded")
        return pixels, lookup

    def _answered(self, caption: Caption) -> None:
        self.drift.observe(caption)
        self._observer.answered(caption)

    async def _moderate(
        self, data: bytes, image: Image.Image | None, key: ImageKey | None, deadline: float | None
    ) -> Image.Image | None:
        """Raise unless moderation allows the image; returns it decoded if moderation had to decode it."""
        assert self.moderation is not None
        loop = asyncio.get_running_loop()
        decoded = image

        async def jpeg() -> bytes:
            nonlocal decoded
            if decoded is None:  # a body seen before: its key came from the memo
                decoded = await loop.run_in_executor(self._pool, self._decode_only, data)
            return await loop.run_in_executor(self._pool, moderation_jpeg, decoded)

        await self.moderation.check(key, jpeg, deadline)
        return decoded

    async def remember(self, fields: Mapping[str, object], data: bytes, result: CaptionResult) -> None:
        """Keep ``result`` as the answer to these image bytes with these request option fields, for
        the router to answer exact repeats from Redis (``repeats.py``); with Redis only."""
        if self.repeats is not None:
            key = repeat_key(self.model_version, fields, body_digest(data))
            await self.repeats.put(key, result.as_dict())

    def flush(self) -> None:
        """Draining: queued requests run as soon as the model is free."""
        self.batcher.flush()

    async def close(self, grace_s: float) -> int:
        """Finish queued work within ``grace_s``; returns how many requests were failed instead."""
        self.draining = True
        self.ready = False
        left = await self.batcher.close(grace_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.cache is not None:
            await self.cache.close()
        if self.repeats is not None:
            await self.repeats.close()
        if self.moderation is not None:
            await self.moderation.close()
        return left

    def _decode_only(self, data: bytes) -> Image.Image:
        # The preprocessor's own draft rule: the tensors then stay within its documented tolerance.
        return self.captioner.preprocessor.decode(data, max_pixels=self.settings.max_pixels)

    def _key_and_image(self, data: bytes) -> tuple[Image.Image | None, ImageKey | None]:
        """The cache key, and the decoded image unless the key came from the memo of bodies seen before."""
        if self._key_memo is None:
            return self._decode_only(data), None
        digest = KeyMemo.digest(data)
        known = self._key_memo.get(digest)
        if known is not None:
            return None, known
        image = self._decode_only(data)
        key = image_key(image)
        self._key_memo.put(digest, key)
        return image, key

    def _run_batch(self, items: list[torch.Tensor], options: GenerationOptions) -> list[Caption]:
        return self.captioner.caption_pixels(torch.stack(items), options)

    def _warm_batch(self, pixels: torch.Tensor, options: GenerationOptions) -> list[Caption]:
        """Warm-up's blank image: not a request, so never part of a reference built from requests."""
        return self.captioner.caption_pixels(pixels[None], options, learn=False)


def build_cache(settings: ServeSettings) -> ResultCache | None:
    """Redis when ``redis_url`` is set, else an in-memory LRU; ``None`` when ``cache_size`` is 0."""
    if settings.redis_url:
        return RedisCache(settings.redis_url, settings.cache_ttl_s)
    if settings.cache_size <= 0:
        return None
    return MemoryCache[Caption](settings.cache_size, settings.cache_ttl_s)


def _check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the request's deadline passed {when}")
