"""The operator's settings, in one place: each field is a ``captionfleet operator`` option.

Every option also reads ``CAPTIONFLEET_<OPTION>`` (e.g. ``CAPTIONFLEET_NAMESPACES=ml,ml-staging``).
The Helm chart sets them through the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

from captionfleet.settings import setting

DEFAULT_RUNTIME_IMAGE = "ghcr.io/captionfleet/runtime:0.1.0"


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = setting(
        (),
        "Namespaces whose CaptionModels this operator reconciles, comma-separated; kopf globs such as "
        "'ml-*' work. Empty: the whole cluster (needs the cluster-wide RBAC).",
    )
    default_runtime_image: str = setting(
        DEFAULT_RUNTIME_IMAGE,
        "Image of the model runtime and the router when a CaptionModel names none (spec.image).",
    )
    image_pull_policy: str = setting(
        "IfNotPresent",
        "imagePullPolicy of every container the operator creates.",
        choices=("IfNotPresent", "Always", "Never"),
    )
    prometheus_url: str = setting(
        "",
        "Metrics source: the Prometheus server that KEDA queries for the per-pod queue depth "
        "(autoscaling.provider: keda). Needed only by CaptionModels that use KEDA.",
    )
    queue_depth_metric: str = setting(
        "captionfleet_queue_depth",
        "Metrics source: the per-pod queue-depth metric the runtime exports; the HPA reads it through "
        "the custom metrics API (e.g. prometheus-adapter), KEDA straight from Prometheus.",
    )
    analysis_prometheus_url: str = setting(
        "",
        "Figures source of the rollout analysis: a Prometheus server holding the routers' metrics "
        "(scraped by the chart's ServiceMonitor). Empty: ask every router pod (GET /v1/router/stats).",
    )
    operator_key_file: str = setting(
        "",
        "File holding the operator's master secret (at least 32 characters; the chart mounts it from a "
        "Secret it makes). From it the operator derives one API key per CaptionModel, whose digest it "
        "gives the runtimes of fleets with spec.auth, so the quality gate can caption through them. "
        "Empty: none, and a quality gate of a CaptionModel with spec.auth waits (NoOperatorKey).",
    )
    peering: str = setting(
        "captionfleet",
        "Name of the KopfPeering (or ClusterKopfPeering when watching the whole cluster) used for "
        "leader election between operator replicas.",
    )
    standalone: bool = setting(
        False, "Run without peering (a single replica, no leader election); for development."
    )
    liveness: str = setting(
        "http://0.0.0.0:8081/healthz",
        "URL the operator serves its liveness probe on (kopf's health endpoint). Empty: none.",
    )
    metrics: str = setting(
        "http://0.0.0.0:8082/metrics",
        "URL the operator serves its Prometheus metrics on (captionfleet_rollbacks_total). Empty: none.",
    )
    resync_seconds: float = setting(
        300.0,
        "Every this many seconds each CaptionModel is reconciled again, repairing children changed or "
        "deleted by hand. 0: only on changes and restarts.",
    )
    pod_check_seconds: float = setting(
        15.0,
        "While a CaptionModel is not Ready, every this many seconds its pods (and the FailedMount "
        "Events of pods waiting for their volumes: a missing Secret volume shows only there) are read "
        "again, so the status says why a version does not start. 0: only when a pod or Deployment "
        "of the fleet changes.",
    )
    demand_poll_ms: int = setting(
        250,
        "While a version is at zero or waking, every this many milliseconds the router pods are asked "
        "for the requests they hold, so the first replica is asked for within a second of a request.",
    )
    idle_poll_seconds: float = setting(
        5.0,
        "How often the router pods are asked for the last request of an awake version that may scale "
        "to zero (never less often than a tenth of its scaleToZeroAfter).",
    )
    kubeconfig: str = setting(
        "",
        "Kubeconfig file. Empty: log in like kubectl (the in-cluster service account, else "
        "$KUBECONFIG, else ~/.kube/config).",
    )
    context: str = setting("", "Kubeconfig context to use. Empty: the current context.")
    verbose: bool = setting(False, "Log kopf's debug messages.")
