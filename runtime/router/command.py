"""``captionfleet router``: the fleet's public endpoint, splitting traffic between model versions.

Cheap to import (the CLI's rule): the app and its dependencies load inside :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from captionfleet.settings import add_options, from_args
from captionfleet.settings.router import RouterSettings

HELP = "Route caption requests to model versions by weight, sticky per X-User-Id (the fleet's endpoint)."

log = logging.getLogger("captionfleet.runtime.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The routing table comes from the CaptionModel's status (--caption-model, watched through the "
        "Kubernetes API), a --routes-file, or --routes/--weights. Example without a cluster: "
        "captionfleet router --port 8000 --routes v1=http://127.0.0.1:8081,v2=http://127.0.0.1:8082 "
        "--weights v1=90,v2=10 --canary v2"
    )
    add_options(parser, RouterSettings)


def run(args: argparse.Namespace) -> int:
    settings = from_args(RouterSettings, args)
    problems = settings.check()
    if problems:
        for problem in problems:
            print(f"captionfleet router: {problem}", file=sys.stderr)
        return 2
    from captionfleet.runtime.web.logs import configure_logging

    configure_logging(settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130


async def serve(settings: RouterSettings) -> int:
    """Serve until SIGTERM or SIGINT, then drain: /readyz turns 503 for ``drain_grace_s`` while requests
    are still served (so endpoints move away), then in-flight requests finish and the process exits."""
    from aiohttp import web

    from captionfleet.runtime.router.app import ROUTER, build_app
    from captionfleet.runtime.router.kube import KubeConfigError
    from captionfleet.runtime.router.table import TableError

    try:
        app = build_app(settings)
    except (TableError, KubeConfigError, ValueError, OSError) as exc:
        print(f"captionfleet router: {exc}", file=sys.stderr)
        return 2
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=settings.request_timeout_ms / 1000 + 1
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    addresses = [f"{host}:{port}" for host, port, *_ in runner.addresses]
    log.info("listening", extra={"addresses": addresses, "port": runner.addresses[0][1]})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("draining", extra={"delay_s": settings.drain_grace_s})
        app[ROUTER].start_draining()
        if settings.drain_grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_second_signal(loop), timeout=settings.drain_grace_s)
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


async def _second_signal(loop: asyncio.AbstractEventLoop) -> None:
    """Resolves on another SIGTERM/SIGINT: cut the drain delay short."""
    again = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, again.set)
    await again.wait()
