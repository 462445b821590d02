"""``GET /healthz``, ``GET /readyz`` and ``GET /metrics``: the same routes and shapes in both processes.

``/healthz`` answers while the process runs. ``/readyz`` answers 200 ``{"ready": true, ...}`` when the
process should get traffic, else 503 ``{"ready": false, "reason": ...}`` (loading, draining, no
version or endpoint to route to). ``/metrics`` is the process's own Prometheus registry.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Probed(Protocol):
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether to send traffic here, and what ``/readyz`` says besides ``ready``."""
        ...

    def render_metrics(self) -> bytes: ...


PROBED: web.AppKey[Probed] = web.AppKey("probed")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, details = request.app[PROBED].readiness()
    return web.json_response({"ready": ready, **details}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[PROBED].render_metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_probe_routes(app: web.Application, probed: Probed) -> None:
    app[PROBED] = probed
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
