"""The operator's own Prometheus metrics, served on ``--metrics`` (``GET /metrics``).

A registry per operator (not the global one), so several operators in one process (tests) keep their
own counts. ``captionfleet_rollbacks_total`` counts automatic rollbacks (the analysis failed
``threshold`` checks in a row); the chart's ``CaptionFleetRolledBack`` alert fires on it. Rollbacks
by hand (the abort annotation) are not counted: nobody needs to be alerted of their own action. A
canary failing its quality gate counts as a rollback too; the gate's runs and scores have their own
series (``captionfleet_quality_gate_runs_total``, ``captionfleet_quality_gate_score``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from captionfleet.operator.gate import GateOutcome


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rollbacks = Counter(
            "captionfleet_rollbacks",
            "Canaries rolled back by the rollout analysis",
            ["namespace", "captionmodel", "version"],
            registry=self.registry,
        )
        self.gate_runs = Counter(
            "captionfleet_quality_gate_runs",
            "Quality gate runs, by verdict (passed, failed, error: could not run)",
            ["namespace", "captionmodel", "version", "verdict"],
            registry=self.registry,
        )
        self.gate_score = Gauge(
            "captionfleet_quality_gate_score",
            "The last quality gate's score of a canary (role canary) and of the stable version it was "
            "compared with (role stable), in the gate's metric",
            ["namespace", "captionmodel", "version", "role", "metric"],
            registry=self.registry,
        )

    def record_gate(self, namespace: str, model: str, version: str, outcome: GateOutcome) -> None:
        labels = {"namespace": namespace, "captionmodel": model, "version": version}
        self.gate_runs.labels(**labels, verdict=outcome.verdict).inc()
        result = outcome.gate
        for role, score in (("canary", result.canary_score), ("stable", result.stable_score)):
            if score is not None:
                self.gate_score.labels(**labels, role=role, metric=result.metric).set(score)

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
