"""Prometheus metrics of one router, all named ``captionfleet_router_*`` and labelled by version.

A registry per router (not the global one), so several routers in one process (tests) keep their own
counts. ``version`` is ``none`` for requests answered before a version was chosen (401, 413, no route).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from captionfleet.runtime.router.balancer import Balancer
from captionfleet.runtime.router.shadow import CopyOutcome
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.router.table import RoutingTable
from captionfleet.runtime.web.metrics import Declared, ProcessMetrics

NO_VERSION = "none"
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
COLD_START_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
"""A cold start takes seconds (a cached image, a small model) to minutes (a GPU node, a model download)."""


class RouterMetrics(ProcessMetrics):
    requests = Declared.counter(
        "captionfleet_router_requests",
        "Requests answered by the router, by the version routed to and the status code returned",
        "version",
        "code",
    )
    bulk_requests = Declared.counter(
        "captionfleet_router_bulk_requests",
        "Bulk requests (X-Priority: bulk, the job API) answered, by version and status code: counted "
        "here only, never in captionfleet_router_requests or the latency histogram",
        "version",
        "code",
    )
    errors = Declared.counter(
        "captionfleet_router_upstream_errors",
        "Requests of a version that ended in an error, by kind: status_5xx, timeouts, connect_failures, "
        "bad_responses",
        "version",
        "kind",
    )
    retries = Declared.counter(
        "captionfleet_router_retries",
        "Second attempts on another endpoint, by version and reason (connect, status_503)",
        "version",
        "reason",
    )
    fallbacks = Declared.counter(
        "captionfleet_router_fallbacks",
        "Requests meant for a version without ready endpoints, sent to another version",
        "version",
    )
    latency = Declared.histogram(
        "captionfleet_router_request_duration_seconds",
        "Latency of routed requests as the router sees it, from arrival to answer (retries included)",
        "version",
    )
    in_flight = Declared.gauge("captionfleet_router_requests_in_flight", "Requests being proxied right now")
    weight = Declared.gauge(
        "captionfleet_router_version_weight",
        "Effective weight (percent) of each version in the routing table",
        "version",
        "role",
    )
    endpoints = Declared.gauge(
        "captionfleet_router_version_endpoints",
        "Endpoints (ready runtime pods, or the Service) the router knows per version",
        "version",
    )
    table_updates = Declared.counter(
        "captionfleet_router_table_updates", "Routing tables applied (from the CaptionModel or a file)"
    )
    table_timestamp = Declared.gauge(
        "captionfleet_router_table_updated_timestamp_seconds",
        "Unix time the current routing table was applied",
    )
    held = Declared.gauge(
        "captionfleet_router_held_requests",
        "Requests held now for a cold_start version's first ready pod, by version (the operator scales "
        "a version at zero up on this demand)",
        "version",
    )
    cold_starts = Declared.counter(
        "captionfleet_router_cold_starts",
        "Holds that began while none of the version's requests was held: cold starts seen by this router",
        "version",
    )
    cold_start_rejections = Declared.counter(
        "captionfleet_router_cold_start_rejections",
        "Requests answered 503 cold_start, by version and reason: count (cold_start_max_held), bytes "
        "(cold_start_max_held_bytes), timeout (held cold_start_timeout_ms in vain)",
        "version",
        "reason",
    )
    cold_start_wait = Declared.histogram(
        "captionfleet_router_cold_start_wait_seconds",
        "How long held requests waited, from the hold to being sent to the version's first ready pod",
        "version",
        buckets=COLD_START_BUCKETS_S,
    )
    ready = Declared.gauge(
        "captionfleet_router_ready", "1 when a version can take traffic and the router is not draining"
    )
    confidence = Declared.histogram(
        "captionfleet_router_answer_confidence",
        "Confidence of the 200 caption answers relayed (interactive), by version: its _sum/_count is "
        "the mean that rollout.analysis.maxConfidenceDrop compares",
        "version",
        buckets=CONFIDENCE_BUCKETS,
    )
    shadow_copies = Declared.counter(
        "captionfleet_router_shadow_copies",
        "Shadow copies sent to a canary in its shadow phase and ended, by version and outcome (agree: "
        "the same caption after normalisation, differ, error)",
        "version",
        "outcome",
    )
    shadow_errors = Declared.counter(
        "captionfleet_router_shadow_errors",
        "Shadow copies that failed, by version and kind (as captionfleet_router_upstream_errors)",
        "version",
        "kind",
    )
    shadow_dropped = Declared.counter(
        "captionfleet_router_shadow_dropped",
        "Shadow copies not sent because shadow_max_in_flight copies were out already",
        "version",
    )
    shadow_token_overlap = Declared.histogram(
        "captionfleet_router_shadow_token_overlap",
        "Token overlap (F1 of the words) between a shadow copy's caption and the primary's, by version",
        "version",
        buckets=CONFIDENCE_BUCKETS,
    )
    shadow_latency = Declared.histogram(
        "captionfleet_router_shadow_duration_seconds",
        "Latency of shadow copies, sent to answered (the runtime's bulk wait included)",
        "version",
    )
    shadow_in_flight = Declared.gauge(
        "captionfleet_router_shadow_in_flight", "Shadow copies in flight right now"
    )

    cascade_requests = Declared.counter(
        "captionfleet_router_cascade_requests",
        "Caption requests through the cascade, by outcome: confident (the fast tier was sure), escalated "
        "(the quality tier answered), deadline, quality_failed, no_threshold, no_signal (the fast answer "
        "stood although unsure, and why)",
        "outcome",
    )
    cascade_hop_latency = Declared.histogram(
        "captionfleet_router_cascade_tier_duration_seconds",
        "Latency of each cascade hop by tier (fast, quality), as the router sees it",
        "tier",
    )
    cascade_threshold = Declared.gauge(
        "captionfleet_router_cascade_threshold",
        "The cascade's threshold in use (-1: not resolved yet, nothing escalated)",
    )

    def watch_balancer(self, balancer: Balancer) -> None:
        """Export the balancer's outlier figures, read at each scrape."""
        self.collect_at_scrape(functools.partial(_outlier_figures, balancer))

    def watch_sources(self, holder: TableHolder) -> None:
        """Export the count of failed reads of the table's source (a routes file), read at each scrape."""
        self.collect_at_scrape(functools.partial(_source_figures, holder))

    def copy_ended(self, outcome: CopyOutcome) -> None:
        """One shadow copy's figures (shadow.py)."""
        version = outcome.version
        self.shadow_latency.labels(version=version).observe(outcome.latency_ms / 1000)
        if outcome.error is not None:
            self.shadow_copies.labels(version=version, outcome="error").inc()
            self.shadow_errors.labels(version=version, kind=outcome.error).inc()
            return
        self.shadow_copies.labels(version=version, outcome="agree" if outcome.exact else "differ").inc()
        self.shadow_token_overlap.labels(version=version).observe(outcome.overlap)

    def table_changed(self, table: RoutingTable, timestamp: float) -> None:
        self.weight.clear()
        self.endpoints.clear()
        for version in table.versions:
            self.weight.labels(version=version.name, role=version.role).set(version.weight)
            self.endpoints.labels(version=version.name).set(len(version.endpoints))
        self.table_updates.inc()
        self.table_timestamp.set(timestamp)


def _outlier_figures(balancer: Balancer) -> Iterator[Metric]:
    """Outlier ejection (``router/balancer.py``): counts since start, and the endpoints out now."""
    counts = balancer.counts
    ejections = CounterMetricFamily(
        "captionfleet_router_endpoint_ejections",
        "Endpoints taken out of rotation, by cause (connect: refused or connect timeout; timeout: no answer; "
        "bad_response: answers that could not be relayed)",
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
        value=len(balancer.ejected_endpoints()),
    )


def _source_figures(holder: TableHolder) -> Iterator[Metric]:
    """Reads of the routing table's source that failed (the last good table stayed), since start."""
    yield CounterMetricFamily(
        "captionfleet_router_table_source_errors",
        "Reads of the routing table's source (a routes file) that failed; the last good table stays",
        value=holder.source_errors,
    )
