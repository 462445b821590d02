"""The operator's own Prometheus metrics, served on ``--metrics`` (``GET /metrics``).

A registry per operator (not the global one), so several operators in one process (tests) keep their
own counts. ``captionfleet_rollbacks_total`` counts automatic rollbacks (the analysis failed
``threshold`` checks in a row); the chart's ``CaptionFleetRolledBack`` alert fires on it. Rollbacks
by hand (the abort annotation) are not counted: nobody needs to be alerted of their own action.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rollbacks = Counter(
            "captionfleet_rollbacks",
            "Canaries rolled back by the rollout analysis",
            ["namespace", "captionmodel", "version"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: OperatorMetrics, url: str) -> web.AppRunner:
    """Serve ``metrics`` at ``url`` (``http://host:port/path``) until the returned runner is cleaned up."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"metrics URL {url!r} must look like http://host:port/path")

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(parts.path or "/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname, parts.port).start()
    return runner
