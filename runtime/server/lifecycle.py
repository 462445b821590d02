"""Start, serve and drain one runtime.

Start: listen first (``/healthz`` answers, ``/readyz`` says "loading"), load the model in a thread,
run a warm-up batch, then ``/readyz`` turns true. A model that fails to load ends the process with a
non-zero status, so Kubernetes restarts it and shows why.

Drain (SIGTERM, SIGINT): readiness goes false and new caption requests get 503 at once; requests
already accepted finish (their queue is flushed without waiting for companions) within
``drain_grace_s``; whatever is left after that is answered 503 and logged; then the process exits 0.
With the job API, the consumer of job items stops reading at once, finishes what it holds within the
grace and hands back the rest (another replica claims it); webhooks being delivered likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.server.app import build_app
from captionfleet.runtime.server.fetch import UrlFetcher
from captionfleet.runtime.server.metrics import ServerMetrics
from captionfleet.runtime.server.moderation import moderation_client
from captionfleet.runtime.server.state import ServerState
from captionfleet.runtime.server.webhooks import WebhookSender
from captionfleet.runtime.serving.job_worker import JobWorker
from captionfleet.runtime.serving.jobs import JobStore
from captionfleet.runtime.serving.moderation import build_moderation
from captionfleet.runtime.serving.service import CaptionService, build_cache
from captionfleet.runtime.web.body import BodyBudget
from captionfleet.runtime.web.keys import KeyGuard, RateLimiter
from captionfleet.runtime.web.listener import Listener
from captionfleet.runtime.web.listener import serve_until_signalled as serve_edge
from captionfleet.settings.serve import ServeSettings

log = logging.getLogger("captionfleet.runtime.server")


def _load(settings: ServeSettings) -> Captioner:
    from captionfleet.runtime.engine.loading import bundled_model_dir, load_captioner

    source = settings.model or str(bundled_model_dir())
    return load_captioner(
        source,
        device=settings.device,
        dtype=settings.precision,
        version=settings.model_version or None,
        decoder=settings.decoder,
    )


class Server:
    """One runtime: the HTTP listener, the model and its data plane."""

    def __init__(self, settings: ServeSettings, *, captioner: Captioner | None = None) -> None:
        self.settings = settings
        self._captioner = captioner
        self.state = ServerState(
            settings=settings,
            metrics=ServerMetrics(settings.model_version or "loading", settings.max_batch_size),
            guard=KeyGuard.from_settings(settings),
            limiter=RateLimiter(settings.rate_limit_rps, settings.resolved_rate_limit_burst()),
            budget=BodyBudget(settings.max_body_bytes_in_flight),
            fetcher=UrlFetcher(
                allow_private=settings.allow_private_urls,
                timeout_s=settings.url_timeout_s,
                max_bytes=settings.url_max_bytes,
                max_redirects=settings.url_max_redirects,
            ),
        )
        self.moderation_client = moderation_client(settings)  # a refused URL stops the start here
        # Answers written by the end of the grace period still get a second to reach their clients.
        self.listener = Listener(build_app(self.state), settings, close_timeout_s=1.0)
        self.loading: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        return self.listener.port

    @property
    def url(self) -> str:
        return self.listener.url

    async def start(self, *, wait_ready: bool = True) -> None:
        """Listen, then load and warm the model (in the background unless ``wait_ready``)."""
        await self.listener.start()
        keys = self.state.guard.keys
        if keys.open:
            log.warning("no API keys configured: the caption API is open to anyone who can reach it")
        else:
            log.info("API keys required (%d configured)", len(keys))
        self.loading = asyncio.get_running_loop().create_task(self._load_and_warm(), name="load-model")
        if wait_ready:
            await self.loading

    async def _load_and_warm(self) -> None:
        started = time.monotonic()
        try:
            captioner = self._captioner
            if captioner is None:
                captioner = await asyncio.get_running_loop().run_in_executor(None, _load, self.settings)
            version = self.settings.model_version or captioner.version
            metrics = self.state.metrics
            metrics.model = version
            info = captioner.info()
            metrics.describe_model(str(info["name"]), str(info["device"]), str(info["dtype"]))
            client = self.moderation_client
            moderation = build_moderation(self.settings, client, metrics) if client is not None else None
            service = CaptionService(
                captioner, self.settings, metrics, build_cache(self.settings), moderation=moderation
            )
            self.state.service = service
            if self.settings.ood:
                metrics.watch_drift(service.drift.state)
            await service.start()
            self._start_jobs(service)
        except Exception as exc:
            self.state.load_error = f"the model failed to load: {exc}"
            log.error("%s", self.state.load_error, exc_info=True)
            raise
        log.info(
            "ready: model %s (%s) on %s, cache %s, moderation %s, in %.1f s",
            version,
            info["name"],
            info["device"],
            service.cache.kind if service.cache is not None else "off",
            f"on ({self.settings.moderation_failure_policy})" if moderation is not None else "off",
            time.monotonic() - started,
        )

    def _start_jobs(self, service: CaptionService) -> None:
        """With ``jobs_redis_url``: the job API's store, and this replica's consumer of the stream."""
        settings = self.settings
        if not settings.jobs_redis_url:
            return
        store = JobStore(settings.jobs_redis_url, settings.jobs_stream, settings.jobs_result_ttl_s)
        fetcher = self.state.fetcher
        worker = JobWorker(
            store,
            service,
            settings,
            fetch=lambda url: fetcher.fetch(url),
            notifier=WebhookSender(settings),
            observer=self.state.metrics,
        )
        worker.start()
        self.state.jobs, self.state.job_worker = store, worker
        log.info("job API on, consuming %s as %s", settings.jobs_stream, worker.consumer)

    async def drain(self) -> int:
        """Stop taking requests, finish the accepted ones within the grace period, stop listening.

        Returns how many accepted requests had to be failed because the grace period ran out.
        """
        grace = self.settings.drain_grace_s
        ends = time.monotonic() + grace
        self.state.draining = True
        if self.state.job_worker is not None:
            self.state.job_worker.stop_reading()  # the items it holds go on; no new ones
        log.info("draining: %d requests in flight, grace %.1f s", self.state.in_flight, grace)
        if self.loading is not None and not self.loading.done():
            self.loading.cancel()
        if self.state.service is not None:
            self.state.service.flush()
        try:
            await asyncio.wait_for(self.state.idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning("grace period over with %d requests in flight", self.state.in_flight)
        if self.state.job_worker is not None:  # its held items run now, as bulk: nothing else waits
            await self.state.job_worker.close(max(0.0, ends - time.monotonic()))
        left = 0
        if self.state.service is not None:
            left = await self.state.service.close(max(0.0, ends - time.monotonic()))
        # Answers written by now reach their clients before the listener closes.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.idle.wait(), timeout=max(1.0, ends - time.monotonic()))
        await self.listener.stop()
        log.info("drained: %d requests were failed with 503 after the grace period", left)
        return left


async def serve_until_signalled(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT, then drain; 0 after a drain, 1 when the model fails to load."""
    server = Server(settings)
    try:
        await server.start(wait_ready=False)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    assert server.loading is not None
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def loaded(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not failed.done():
            failed.set_result(None)

    server.loading.add_done_callback(loaded)

    async def drain(cut_short: asyncio.Event) -> None:
        await server.drain()

    signalled = await serve_edge(server.listener, drain=drain, failed=failed)
    return 0 if signalled else 1
