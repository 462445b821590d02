"""``captionfleet router``'s settings: one frozen dataclass, one documented default per field.

Every field is also a command-line option (``--caption-model``) and an environment variable
(``CAPTIONFLEET_CAPTION_MODEL``); the operator sets some of these in the router's Deployment,
deriving each name from the field (``captionfleet.settings.env_entries``). The edge's fields come
from :class:`EdgeSettings`.

The routing table comes from exactly one source: the CaptionModel named by ``caption_model`` (watched
through the Kubernetes API), a ``routes_file``, or the ``routes``/``weights`` options.
"""

from __future__ import annotations

from dataclasses import dataclass

from captionfleet.settings import setting
from captionfleet.settings.edge import MB, EdgeSettings


@dataclass(frozen=True)
class RouterSettings(EdgeSettings):
    caption_model: str = setting(
        "", "Name of the CaptionModel whose status.versions[] is the routing table (watched, read-only)."
    )
    namespace: str = setting(
        "", "Namespace of the CaptionModel; empty: the pod's own namespace, else the kubeconfig context's."
    )
    kubeconfig: str = setting(
        "",
        "Kubeconfig file; empty: the pod's service account in a pod, else $KUBECONFIG or ~/.kube/config.",
    )
    routes: tuple[str, ...] = setting(
        (),
        "Static routes instead of a CaptionModel: version=URL, comma-separated; repeat a version for several "
        "endpoints (v1=http://127.0.0.1:8081,v2=http://127.0.0.1:8082).",
    )
    weights: tuple[str, ...] = setting(
        (), "Weights of the static routes in percent: v1=90,v2=10; empty: all traffic to the first version."
    )
    canary: str = setting(
        "", "Static routes only: the version being rolled out (placed for monotonic moves)."
    )
    routes_file: str = setting(
        "",
        "JSON or YAML routing table ({versions: [{name, weight, role, endpoints}]}), reloaded on change.",
    )
    routes_file_poll_ms: float = setting(1000.0, "How often the routes file is checked for changes.")
    service_port: int = setting(
        8080, "Port of the version Services, used when their endpoints are not known."
    )
    connect_timeout_ms: float = setting(
        1000.0, "Longest wait for a connection to a runtime before trying elsewhere."
    )
    retry: bool = setting(True, "Retry once on another endpoint after a connection failure or a 503.")
    max_response_bytes: int = setting(
        32 * MB,
        "Largest runtime answer relayed whole; larger gets 502. A job's results (JSON Lines) are streamed "
        "instead, whatever their size.",
    )
    drain_grace_s: float = setting(
        5.0,
        "On SIGTERM: /readyz turns 503 at once and requests are still routed for this long (a second "
        "signal cuts it short), so endpoints move away first; then requests in flight finish.",
    )
    stats_window_s: int = setting(
        900, "Seconds of per-second figures kept per version for GET /v1/router/stats (the longest window)."
    )
    stats_max_slots: int = setting(
        3600,
        "Most slots of figures kept per version: a window longer than this many seconds gets slots of "
        "ceil(stats_window_s / stats_max_slots) seconds (memory stays bounded; windows are rounded up "
        "to whole slots).",
    )
    outlier_connect_failures: int = setting(
        1,
        "Failed connection attempts in a row (refused, connect timeout) that take an endpoint out of "
        "rotation until a probe of its /readyz succeeds; 0: never. A connection dropped once the request "
        "went out is retried and does not count.",
    )
    outlier_timeouts: int = setting(
        2,
        "Requests in a row that got no answer from an endpoint within their budget that take it out of "
        "rotation (one may be a slow batch; two with no answer in between is a hung pod); 0: never.",
    )
    outlier_bad_responses: int = setting(
        3,
        "Answers in a row from an endpoint that could not be relayed (not HTTP, cut short, a status or "
        "body no runtime sends: 502 bad_upstream_response) that take it out of rotation; 0: never. "
        "Well-formed errors (a busy runtime's 503) do not count.",
    )
    outlier_timeout_min_budget_ms: float = setting(
        1000.0,
        "A timeout counts against an endpoint only when the attempt had at least this long (a client's "
        "short X-Request-Timeout-Ms says nothing about the endpoint).",
    )
    outlier_base_ejection_s: float = setting(
        2.0,
        "How long an ejected endpoint stays out before its /readyz is probed; doubled on each ejection "
        "in a row (a failed probe included), up to outlier_max_ejection_s.",
    )
    outlier_max_ejection_s: float = setting(
        60.0,
        "Longest time out of rotation before the next probe; an endpoint that stays in this long "
        "starts again from outlier_base_ejection_s.",
    )
    outlier_probe_timeout_ms: float = setting(
        1000.0, "Time limit of the GET /readyz probe of an ejected endpoint (a hung one fails it)."
    )
    shadow_max_in_flight: int = setting(
        16,
        "Shadow copies (to a canary in its shadow phase) in flight at once per router; a copy beyond "
        "is dropped and counted, so a hung canary costs at most this many copies and their bodies.",
    )
    shadow_timeout_ms: float = setting(
        10000.0, "Longest wait for a canary's answer to a shadow copy; later counts as a timeout."
    )
    shadow_max_answer_bytes: int = setting(
        64 * 1024,
        "Largest caption answer (a single one, or a whole batch's) the router parses for its captions "
        "and confidences (shadow comparison, confidence figures); a larger one is relayed unparsed.",
    )
    cold_start_max_held: int = setting(
        100,
        "Requests held at once (all versions) while a cold_start version has no ready pod (scaled to "
        "zero, starting); more get 503 cold_start with Retry-After at once. 0: none held.",
    )
    cold_start_max_held_bytes: int = setting(
        64 * MB,
        "Request-body bytes held at once over all held requests; a body that does not fit gets 503 "
        "cold_start at once. At most max_body_bytes_in_flight (held bodies count against it too).",
    )
    redis_url: str = setting(
        "",
        "redis://host:port/db of the runtimes' shared result cache (their redis_url): a caption for a "
        "version with no ready pod whose image was captioned before (same bytes, same options) is "
        "answered from it, cached: true, without waking a pod. Empty: every such request is held.",
    )
    cold_start_timeout_ms: float = setting(
        60000.0,
        "Longest a request is held for a version's first ready pod (its own deadline still counts: "
        "whichever ends first); then 503 cold_start with Retry-After.",
    )

    cascade_fast: tuple[str, ...] = setting(
        (),
        "Static routes only: the versions of the cascade's fast tier (every caption request goes there "
        "first); with a CaptionModel, its status.cascade says.",
    )
    cascade_quality: tuple[str, ...] = setting(
        (),
        "Static routes only: the versions of the cascade's quality tier (asked when the fast one is unsure).",
    )
    cascade_threshold: float = setting(
        -1.0, "Static routes only: escalate below this fast confidence (above it for signal ood); < 0: never."
    )
    cascade_signal: str = setting(
        "confidence", "Static routes only: what the threshold applies to.", choices=("confidence", "ood")
    )
    cascade_latency_samples: int = setting(
        64, "Recent quality-tier answers whose latency estimates what an escalation takes (deadline rule)."
    )
    cascade_latency_quantile: float = setting(
        0.9, "Quantile of those latencies an escalation must have budget for, else the fast answer stands."
    )
    cascade_reserve_ms: float = setting(
        20.0,
        "Budget kept back from an escalation to return the fast answer should the quality tier fail or "
        "run out of time.",
    )

    def source(self) -> str:
        """Which table source these settings choose: ``captionmodel``, ``file`` or ``static``."""
        if self.routes_file:
            return "file"
        if self.routes:
            return "static"
        return "captionmodel"

    def check(self) -> list[str]:
        """Problems that make these settings unusable, as messages (empty: fine)."""
        problems = super().check()
        chosen = [
            name
            for name, value in (
                ("caption_model", self.caption_model),
                ("routes_file", self.routes_file),
                ("routes", self.routes),
            )
            if value
        ]
        if len(chosen) != 1:
            problems.append(
                "give exactly one source of routes: caption_model, routes_file or routes "
                f"(got {', '.join(chosen) or 'none'})"
            )
        if self.weights and not self.routes:
            problems.append("weights apply to routes; give routes too")
        if (self.cascade_fast or self.cascade_quality) and not self.routes:
            problems.append("cascade_fast and cascade_quality apply to routes (a routes file has cascade:)")
        if bool(self.cascade_fast) != bool(self.cascade_quality):
            problems.append("give both cascade_fast and cascade_quality, or neither")
        if not 0 < self.cascade_latency_quantile <= 1:
            problems.append("cascade_latency_quantile must be in (0, 1]")
        if self.cascade_latency_samples <= 0 or self.cascade_reserve_ms < 0:
            problems.append("cascade_latency_samples must be > 0 and cascade_reserve_ms >= 0")
        if self.canary and not self.routes:
            problems.append("canary applies to routes (a routes file names roles itself)")
        for name in ("request_timeout_ms", "connect_timeout_ms", "routes_file_poll_ms"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in (
            *("max_response_bytes", "stats_window_s", "stats_max_slots"),
            *("shadow_max_in_flight", "shadow_timeout_ms", "shadow_max_answer_bytes"),
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("outlier_base_ejection_s", "outlier_max_ejection_s", "outlier_probe_timeout_ms"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in (
            *("outlier_connect_failures", "outlier_timeouts", "outlier_bad_responses"),
            "outlier_timeout_min_budget_ms",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.cold_start_max_held < 0 or self.cold_start_max_held_bytes < 0:
            problems.append("cold_start_max_held and cold_start_max_held_bytes must be >= 0")
        if self.cold_start_max_held_bytes > self.max_body_bytes_in_flight:
            problems.append("cold_start_max_held_bytes must be <= max_body_bytes_in_flight")
        if self.cold_start_timeout_ms <= 0:
            problems.append("cold_start_timeout_ms must be > 0")
        if self.outlier_max_ejection_s < self.outlier_base_ejection_s:
            problems.append("outlier_max_ejection_s must be >= outlier_base_ejection_s")
        if not 0 < self.service_port < 65536:
            problems.append("service_port must be in 1..65535")
        return problems
