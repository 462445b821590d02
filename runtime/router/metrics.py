"""Prometheus metrics of one router, all named ``captionfleet_router_*`` and labelled by version.

A registry per router (not the global one), so several routers in one process (tests) keep their own
counts. ``version`` is ``none`` for requests answered before a version was chosen (401, 413, no route).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from captionfleet.names import LATENCY_BUCKETS_S
from captionfleet.runtime.router.balancer import Balancer
from captionfleet.runtime.router.table import RoutingTable

NO_VERSION = "none"


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "captionfleet_router_requests",
            "Requests answered by the router, by the version routed to and the status code returned",
            ["version", "code"],
            registry=r,
        )
        self.errors = Counter(
            "captionfleet_router_upstream_errors",
            "Requests of a version that ended in an error, by kind: status_5xx, timeouts, connect_failures, "
            "bad_responses",
            ["version", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "captionfleet_router_retries",
            "Second attempts on another endpoint, by version and reason (connect, status_503)",
            ["version", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "captionfleet_router_fallbacks",
            "Requests meant for a version without ready endpoints, sent to another version",
            ["version"],
            registry=r,
        )
        self.latency = Histogram(
            "captionfleet_router_request_duration_seconds",
            "Latency of routed requests as the router sees it, from arrival to answer (retries included)",
            ["version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "captionfleet_router_requests_in_flight", "Requests being proxied right now", registry=r
        )
        self.weight = Gauge(
            "captionfleet_router_version_weight",
            "Effective weight (percent) of each version in the routing table",
            ["version", "role"],
            registry=r,
        )
        self.endpoints = Gauge(
            "captionfleet_router_version_endpoints",
            "Endpoints (ready runtime pods, or the Service) the router knows per version",
            ["version"],
            registry=r,
        )
        self.table_updates = Counter(
            "captionfleet_router_table_updates",
            "Routing tables applied (from the CaptionModel or a file)",
            registry=r,
        )
        self.table_timestamp = Gauge(
            "captionfleet_router_table_updated_timestamp_seconds",
            "Unix time the current routing table was applied",
            registry=r,
        )
        self.ready = Gauge(
            "captionfleet_router_ready",
            "1 when a version can take traffic and the router is not draining",
            registry=r,
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

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
