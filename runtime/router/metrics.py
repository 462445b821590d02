"""Prometheus metrics of one router, all named ``captionfleet_router_*`` and labelled by version.

A registry per router (not the global one), so several routers in one process (tests) keep their own
counts. ``version`` is ``none`` for requests answered before a version was chosen (401, 413, no route).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from captionfleet.names import LATENCY_BUCKETS_S
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
