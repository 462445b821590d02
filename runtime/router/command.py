"""``captionfleet router``: the fleet's public endpoint, splitting traffic between model versions.

Cheap to import (the CLI's rule): the app and its dependencies load inside :func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
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
    are still routed (so endpoints move away; a second signal cuts it short), then in-flight requests
    finish within their budget and the process exits."""
    from captionfleet.runtime.router.app import ROUTER, build_app
    from captionfleet.runtime.router.kube import KubeConfigError
    from captionfleet.runtime.router.table import TableError
    from captionfleet.runtime.web.listener import Listener, serve_until_signalled

    try:
        app = build_app(settings)
    except (TableError, KubeConfigError, ValueError, OSError) as exc:
        print(f"captionfleet router: {exc}", file=sys.stderr)
        return 2
    listener = Listener(app, settings, close_timeout_s=settings.request_timeout_ms / 1000 + 1)
    await listener.start()

    async def drain(cut_short: asyncio.Event) -> None:
        app[ROUTER].start_draining()
        log.info("draining", extra={"grace_s": settings.drain_grace_s})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cut_short.wait(), timeout=settings.drain_grace_s)

    await serve_until_signalled(listener, drain=drain)
    log.info("stopped")
    return 0
