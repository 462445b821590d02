"""Start, serve and drain one runtime.

Start: listen first (``/healthz`` answers, ``/readyz`` says "loading"), load the model in a thread,
run a warm-up batch, then ``/readyz`` turns true. A model that fails to load ends the process with a
non-zero status, so Kubernetes restarts it and shows why.

Drain (SIGTERM, SIGINT): readiness goes false and new caption requests get 503 at once; requests
already accepted finish (their queue is flushed without waiting for companions) within
``drain_grace_s``; whatever is left after that is answered 503 and logged; then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from aiohttp import web

from captionfleet.runtime.engine.captioner import Captioner
from captionfleet.runtime.server.app import ServerState, build_app
from captionfleet.runtime.server.fetch import UrlFetcher
from captionfleet.runtime.server.metrics import ServerMetrics
from captionfleet.runtime.serving.keys import ApiKeys, RateLimiter
from captionfleet.runtime.serving.service import CaptionService, build_cache
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
    )


class Server:
    """One runtime: the HTTP listener, the model and its data plane."""

    def __init__(self, settings: ServeSettings, *, captioner: Captioner | None = None) -> None:
        self.settings = settings
        self._captioner = captioner
        self.state = ServerState(
            settings=settings,
            metrics=ServerMetrics(settings.model_version or "loading", settings.max_batch_size),
            keys=ApiKeys.load(settings.api_keys, settings.api_keys_file),
            limiter=RateLimiter(settings.rate_limit_rps, settings.resolved_rate_limit_burst()),
            fetcher=UrlFetcher(
                allow_private=settings.allow_private_urls,
                timeout_s=settings.url_timeout_s,
                max_bytes=settings.url_max_bytes,
                max_redirects=settings.url_max_redirects,
            ),
        )
        self._runner: web.AppRunner | None = None
        self.loading: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self, *, wait_ready: bool = True) -> None:
        """Listen, then load and warm the model (in the background unless ``wait_ready``)."""
        # handler_cancellation: a client that hangs up cancels its handler, so the batcher skips it.
        self._runner = web.AppRunner(build_app(self.state), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
        log.info("listening on %s:%s", self.settings.host, self.port)
        if self.state.keys.open:
            log.warning("no API keys configured: the caption API is open to anyone who can reach it")
        else:
            log.info("API keys required (%d configured)", len(self.state.keys))
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
            service = CaptionService(captioner, self.settings, metrics, build_cache(self.settings))
            self.state.service = service
            await service.start()
        except Exception as exc:
            self.state.load_error = f"the model failed to load: {exc}"
            log.error("%s", self.state.load_error, exc_info=True)
            raise
        log.info(
            "ready: model %s (%s) on %s, cache %s, in %.1f s",
            version,
            info["name"],
            info["device"],
            service.cache.kind if service.cache is not None else "off",
            time.monotonic() - started,
        )

    async def drain(self) -> int:
        """Stop taking requests, finish the accepted ones within the grace period, stop listening.

        Returns how many accepted requests had to be failed because the grace period ran out.
        """
        grace = self.settings.drain_grace_s
        ends = time.monotonic() + grace
        self.state.draining = True
        log.info("draining: %d requests in flight, grace %.1f s", self.state.in_flight, grace)
        if self.loading is not None and not self.loading.done():
            self.loading.cancel()
        if self.state.service is not None:
            self.state.service.flush()
        try:
            await asyncio.wait_for(self.state.idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning("grace period over with %d requests in flight", self.state.in_flight)
        left = 0
        if self.state.service is not None:
            left = await self.state.service.close(max(0.0, ends - time.monotonic()))
        # Answers written by now reach their clients before the listener closes.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.idle.wait(), timeout=max(1.0, ends - time.monotonic()))
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("drained: %d requests were failed with 503 after the grace period", left)
        return left


async def serve_until_signalled(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT, then drain; 0 after a drain, 1 when the model fails to load."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = Server(settings)
    try:
        await server.start(wait_ready=False)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    assert server.loading is not None
    stopped = loop.create_task(stop.wait())
    await asyncio.wait((stopped, server.loading), return_when=asyncio.FIRST_COMPLETED)
    if server.loading.done() and not server.loading.cancelled() and server.loading.exception() is not None:
        stopped.cancel()
        await server.drain()
        return 1
    await stopped
    log.info("signal received, draining")
    await server.drain()
    return 0
