"""Starting the table source that the settings choose, with the app, and stopping it with the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from captionfleet.runtime.router.cascade import static_cascade, with_cascade
from captionfleet.runtime.router.kube import KubeAccess, KubeApi, load_access
from captionfleet.runtime.router.sources import RoutesFile, TableHolder, static_table
from captionfleet.runtime.router.watch import CaptionModelSource
from captionfleet.settings.router import RouterSettings

log = logging.getLogger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def source_context(
    settings: RouterSettings, holder: TableHolder, access: KubeAccess | None = None
) -> CleanupContext:
    """A cleanup context running the source. What can be checked now is checked now: static routes and
    the routes file are applied here (TableError), kube credentials loaded here (KubeConfigError)."""
    source = settings.source()
    routes_file: RoutesFile | None = None
    if source == "static":
        table = static_table(settings.routes, settings.weights, settings.canary)
        holder.publish(with_cascade(table, static_cascade(settings)))
    elif source == "file":
        routes_file = RoutesFile(settings.routes_file, holder, settings.routes_file_poll_ms / 1000)
        routes_file.load()
    else:
        access = access or load_access(settings.kubeconfig)

    async def context(app: web.Application) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[Any]] = []
        session: aiohttp.ClientSession | None = None
        stop = asyncio.Event()
        if routes_file is not None:
            tasks.append(asyncio.create_task(routes_file.run(stop), name="routes-file"))
        elif access is not None:
            namespace = settings.namespace or access.namespace or "default"
            session = aiohttp.ClientSession()
            watcher = CaptionModelSource(
                KubeApi(access, session), namespace, settings.caption_model, holder, settings.service_port
            )
            log.info(
                "watching the CaptionModel",
                extra={
                    "namespace": namespace,
                    "captionmodel": settings.caption_model,
                    "server": access.server,
                },
            )
            tasks.append(asyncio.create_task(watcher.run(), name="captionmodel-watch"))
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if session is not None:
                await session.close()

    return context
