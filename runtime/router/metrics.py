"""Prometheus metrics of one router, all named ``captionfleet_router_*`` and labelled by version.

A registry per router (not the global one), so several routers in one process (tests) keep their own
counts. ``version`` is ``none`` for requests answered before a version was chosen (401, 413, no route).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from captionfleet.runtime.router.balancer import Balancer
from captionfleet.runtime.router.table import RoutingTable
from captionfleet.runtime.web.metrics import ProcessMetrics

NO_VERSION = "none"


class RouterMetrics(ProcessMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "captionfleet_router_requests",
            "Requests answered by the router, by the version routed to and the status code returned",
            ["version", "code"],
        )
        self.bulk_requests = self.counter(
            "captionfleet_router_bulk_requests",
            "Bulk requests (X-Priority: bulk, the job API) answered, by version and status code: counted "
            "here only, never in captionfleet_router_requests or the latency histogram",
            ["version", "code"],
        )
        self.errors = self.counter(
            "captionfleet_router_upstream_errors",
            "Requests of a version that ended in an error, by kind: status_5xx, timeouts, connect_failures, "
            "bad_responses",
            ["version", "kind"],
        )
        self.retries = self.counter(
            "captionfleet_router_retries",
            "Second attempts on another endpoint, by version and reason (connect, status_503)",
            ["version", "reason"],
        )
        self.fallbacks = self.counter(
            "captionfleet_router_fallbacks",
            "Requests meant for a version without ready endpoints, sent to another version",
            ["version"],
        )
        self.latency = self.histogram(
            "captionfleet_router_request_duration_seconds",
            "Latency of routed requests as the router sees it, from arrival to answer (retries included)",
            ["version"],
        )
        self.in_flight = self.gauge(
            "captionfleet_router_requests_in_flight", "Requests being proxied right now"
        )
        self.weight = self.gauge(
            "captionfleet_router_version_weight",
            "Effective weight (percent) of each version in the routing table",
            ["version", "role"],
        )
        self.endpoints = self.gauge(
            "captionfleet_router_version_endpoints",
            "Endpoints (ready runtime pods, or the Service) the router knows per version",
            ["version"],
        )
        self.table_updates = self.counter(
            "captionfleet_router_table_updates",
            "Routing tables applied (from the CaptionModel or a file)",
        )
        self.table_timestamp = self.gauge(
            "captionfleet_router_table_updated_timestamp_seconds",
            "Unix time the current routing table was applied",
        )
        self.ready = self.gauge(
            "captionfleet_router_ready",
            "1 when a version can take traffic and the router is not draining",
        )

    def watch_balancer(self, balancer: Balancer) -> None:
        """Export the balancer's outlier figures, read at each scrape."""
        self.registry.register(_OutlierCollector(balancer))

    def table_changed(self, table: RoutingTable, timestamp: float) -> None:
        self.weight.clear()
        self.endpoints.clear()
        for version in table.versions:
            self.weight.labels(version=version.name, role=version.role).set(version.weight)
            self.endpoints.labels(version=version.name).set(len(version.endpoints))
        self.table_updates.inc()
        self.table_timestamp.set(timestamp)


class _OutlierCollector(Collector):
    """Outlier ejection (``router/balancer.py``): counts since start, and the endpoints out now."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def describe(self) -> list[Metric]:
        return []  # no fixed description: the registry then calls collect() at scrape time only

    def collect(self) -> Iterator[Metric]:
        counts = self.balancer.counts
        ejections = CounterMetricFamily(
            "captionfleet_router_endpoint_ejections",
            "Endpoints taken out of rotation, by cause (connect: refused or reset; timeout: no answer)",
            labels=["cause"],
        )
        for cause, count in counts.ejections.items():
            ejections.add_metric([cause], count)
        yield ejections
        yield CounterMetricFamily(
            "captionfleet_router_endpoint_probe_failures",
            "Probes (GET /readyz) of ejected endpoints that failed",
            value=counts.probe_failures,
        )
        yield CounterMetricFamily(
            "captionfleet_router_endpoint_returns", "Ejected endpoints back in rotation", value=counts.returns
        )
        yield GaugeMetricFamily(
            "captionfleet_router_endpoints_ejected",
            "Endpoints out of rotation now",
            value=len(self.balancer.ejected_endpoints()),
        )
