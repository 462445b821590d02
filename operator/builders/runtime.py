"""Per model version: the runtime Deployment (``captionfleet serve``) and its Service."""

from __future__ import annotations

from typing import Any

from captionfleet.operator import spec as s
from captionfleet.operator.builders import common as c
from captionfleet.operator.builders.env import AUTH_MOUNT, MODEL_MOUNT, TMP_MOUNT, runtime_env
from captionfleet.operator.builders.replicas import replica_bounds

COMPONENT = "runtime"
GPU_RESOURCE = "nvidia.com/gpu"

# Run by the init container with the model's repo id, revision ("" for the default branch) and target
# directory as arguments, never formatted into the code: the spec's text cannot inject anything.
DOWNLOAD_SCRIPT = (
    "import sys; from huggingface_hub import snapshot_download; "
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2] or None, local_dir=sys.argv[3])"
)


def _resources(spec: s.CaptionModelSpec) -> dict[str, Any]:
    # No CPU limit: throttling a batch mid-flight only adds latency. Memory is both request and
    # limit, so the scheduler reserves what the pod can use.
    requests: dict[str, Any] = {"cpu": str(spec.resources.cpu), "memory": str(spec.resources.memory)}
    limits: dict[str, Any] = {"memory": str(spec.resources.memory)}
    if spec.resources.gpu > 0:
        limits[GPU_RESOURCE] = spec.resources.gpu
    return {"requests": requests, "limits": limits}


def _model_wiring(
    ctx: c.FleetContext, version: s.ModelVersion
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, runtime volume mounts, init containers) that put the weights at the model path."""
    source = s.parse_model_source(version.model)
    if source.scheme == "pvc":
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": source.location, "readOnly": True}}
        return [volume], [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}], []
    if source.scheme == "file":
        return [], [], []
    fetch = {
        "name": "fetch-model",
        "image": ctx.image(version),
        "imagePullPolicy": ctx.config.pull_policy,
        "command": ["python", "-c", DOWNLOAD_SCRIPT],
        "args": [source.location, source.revision or "", f"{MODEL_MOUNT}/weights"],
        "env": [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": c.restricted_container_security(),
        "volumeMounts": [
            {"name": "model", "mountPath": MODEL_MOUNT},
            {"name": "tmp", "mountPath": TMP_MOUNT},
        ],
    }
    volume = {"name": "model", "emptyDir": {}}
    return [volume], [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}], [fetch]


def deployment(ctx: c.FleetContext, version: s.ModelVersion) -> dict[str, Any]:
    spec = ctx.spec
    name = c.version_name(ctx, version.name)
    volumes, mounts, init_containers = _model_wiring(ctx, version)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": TMP_MOUNT})
    if spec.auth is not None:
        volumes.append({"name": "auth", "secret": {"secretName": spec.auth.secret_name}})
        mounts.append({"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True})
    container = {
        "name": "runtime",
        "image": ctx.image(version),
        "imagePullPolicy": ctx.config.pull_policy,
        "command": ["captionfleet", "serve"],
        "ports": [{"name": "http", "containerPort": c.RUNTIME_PORT, "protocol": "TCP"}],
        "env": runtime_env(ctx, version),
        "resources": _resources(spec),
        # Loading and warming a model can take minutes: the startup probe holds liveness back.
        "startupProbe": c.http_probe("/healthz", period=10, failures=60),
        "livenessProbe": c.http_probe("/healthz", period=10, failures=3),
        "readinessProbe": c.http_probe("/readyz", period=5, failures=2),
        "securityContext": c.restricted_container_security(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the runtime never calls the Kubernetes API
        "enableServiceLinks": False,
        # The runtime drains on SIGTERM (finishes queued batches, /readyz fails) within this time.
        "terminationGracePeriodSeconds": 60,
        "securityContext": c.pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = c.image_pull_secrets(ctx)
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": c.selector_labels(ctx, COMPONENT, version.name)},
        # Never below the serving capacity during an update: one extra pod at a time.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": 900,
        "template": {
            "metadata": {
                "labels": c.labels(ctx, COMPONENT, version.name),
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(c.RUNTIME_PORT),
                    "prometheus.io/path": c.PROMETHEUS_PATH,
                },
            },
            "spec": pod_spec,
        },
    }
    if spec.autoscaling.provider == "none" or ctx.share(version.name).retired:
        # With an autoscaler the replica count is its to set; the operator leaves it alone. A retired
        # version has no autoscaler (an HPA cannot go below one pod): it is scaled to zero here.
        deployment_spec["replicas"] = replica_bounds(spec, ctx.share(version.name))[0]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.metadata(ctx, name, COMPONENT, version.name),
        "spec": deployment_spec,
    }


def service(ctx: c.FleetContext, version: s.ModelVersion) -> dict[str, Any]:
    """ClusterIP Service of one version; the router balances over its EndpointSlices."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(ctx, c.version_name(ctx, version.name), COMPONENT, version.name),
        "spec": {
            "type": "ClusterIP",
            "selector": c.selector_labels(ctx, COMPONENT, version.name),
            "ports": [{"name": "http", "port": c.RUNTIME_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
