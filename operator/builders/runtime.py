"""Per model version: the runtime Deployment (``captionfleet serve``) and its Service."""

from __future__ import annotations

from typing import Any

from captionfleet import names
from captionfleet.operator.builders import common
from captionfleet.operator.builders.env import AUTH_MOUNT, MODEL_MOUNT, TMP_MOUNT, runtime_env
from captionfleet.operator.builders.replicas import replica_bounds
from captionfleet.operator.spec import CaptionModelSpec, ModelVersion, parse_model_source

COMPONENT = "runtime"

# Run by the init container with the model's repo id, revision ("" for the default branch) and target
# directory as arguments, never formatted into the code: the spec's text cannot inject anything.
DOWNLOAD_SCRIPT = (
    "import sys; from huggingface_hub import snapshot_download; "
    "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2] or None, local_dir=sys.argv[3])"
)
Wiring = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]


def _resources(spec: CaptionModelSpec) -> dict[str, Any]:
    # No CPU limit: throttling a batch mid-flight only adds latency. Memory is both request and
    # limit, so the scheduler reserves what the pod can use. An extended resource (the GPU, a shared
    # GPU or a MIG slice) must have equal requests and limits; both are written, as the device plugin
    # documents it.
    requests: dict[str, Any] = {"cpu": str(spec.resources.cpu), "memory": str(spec.resources.memory)}
    limits: dict[str, Any] = {"memory": str(spec.resources.memory)}
    if spec.resources.gpu > 0:
        requests[spec.resources.gpu_resource] = limits[spec.resources.gpu_resource] = spec.resources.gpu
    return {"requests": requests, "limits": limits}


def _tolerations(spec: CaptionModelSpec) -> list[dict[str, Any]]:
    """The spec's tolerations, plus one of the GPU resource's taint (GPU nodes are commonly tainted with
    the resource's name, e.g. by the GPU operator or a cloud's GPU node pools) unless one is given."""
    given = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    resource = spec.resources.gpu_resource
    if spec.resources.gpu > 0 and not any(t.key == resource for t in spec.tolerations):
        given.append({"key": resource, "operator": "Exists", "effect": "NoSchedule"})
    return given


def _model_wiring(ctx: common.FleetContext, version: ModelVersion) -> Wiring:
    """(volumes, runtime volume mounts, init containers) that put the weights at the model path."""
    source = parse_model_source(version.model)
    if source.scheme == "pvc":
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": source.location, "readOnly": True}}
        return [volume], [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}], []
    if source.scheme == "file":
        return [], [], []
    fetch = {
        "name": "fetch-model",
        "image": ctx.image(version),
        "imagePullPolicy": ctx.config.settings.image_pull_policy,
        "command": ["python", "-c", DOWNLOAD_SCRIPT],
        "args": [source.location, source.revision or "", f"{MODEL_MOUNT}/weights"],
        "env": [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": common.restricted_container_security(),
        "volumeMounts": [
            {"name": "model", "mountPath": MODEL_MOUNT},
            {"name": "tmp", "mountPath": TMP_MOUNT},
        ],
    }
    volume = {"name": "model", "emptyDir": {}}
    return [volume], [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}], [fetch]


def _container(
    ctx: common.FleetContext, version: ModelVersion, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "name": "runtime",
        "image": ctx.image(version),
        "imagePullPolicy": ctx.config.settings.image_pull_policy,
        "command": ["captionfleet", "serve"],
        "ports": [common.container_port()],
        "env": runtime_env(ctx, version),
        "resources": _resources(ctx.spec),
        # Loading and warming a model can take minutes: the startup probe holds liveness back.
        "startupProbe": common.http_probe("/healthz", period=10, failures=60),
        "livenessProbe": common.http_probe("/healthz", period=10, failures=3),
        "readinessProbe": common.http_probe("/readyz", period=5, failures=2),
        "securityContext": common.restricted_container_security(),
        "volumeMounts": mounts,
    }


def _scheduling(spec: CaptionModelSpec) -> dict[str, Any]:
    """Where the pods may run: the spec's nodeSelector, tolerations and affinity, as given."""
    placement: dict[str, Any] = {}
    if spec.node_selector:
        placement["nodeSelector"] = dict(spec.node_selector)
    if tolerations := _tolerations(spec):
        placement["tolerations"] = tolerations
    if spec.affinity:
        placement["affinity"] = dict(spec.affinity)
    return placement


def pod_spec(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any]:
    spec = ctx.spec
    volumes, mounts, init_containers = _model_wiring(ctx, version)
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": TMP_MOUNT})
    if (auth := common.auth_volume(ctx)) is not None:
        volumes.append(auth)
        mounts.append({"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True})
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the runtime never calls the Kubernetes API
        "enableServiceLinks": False,
        # The runtime drains on SIGTERM (finishes queued batches, /readyz fails) within this time.
        "terminationGracePeriodSeconds": 60,
        "securityContext": common.pod_security(),
        "containers": [_container(ctx, version, mounts)],
        "volumes": volumes,
        **_scheduling(spec),
    }
    if init_containers:
        pod["initContainers"] = init_containers
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = common.image_pull_secrets(ctx)
    return pod


def _replicas(ctx: common.FleetContext, version: ModelVersion) -> int | None:
    """The replica count the operator sets, or None where it is the autoscaler's.

    With an autoscaler the count is its to set and the manifest leaves it out (server-side apply then
    never takes the field from the HPA). A retired version has no autoscaler (an HPA cannot go below
    one pod): it is scaled to zero here. So is a version at zero (Idle, its HPA removed), and one
    waking gets its first pods here: an HPA does nothing for a Deployment at 0 replicas. Once Ready
    the field is left to the autoscaler again. Without KEDA installed a keda fleet keeps at least one
    pod per version.
    """
    share = ctx.share(version.name)
    low = replica_bounds(ctx.spec, share)[0]
    phase = ctx.cold.get(version.name)
    if phase == "Idle" or share.retired:
        return 0
    if phase == "Waking" or (phase == "Ready" and ctx.autoscaler() == "none"):
        return max(low, 1)
    if ctx.autoscaler() == "none":
        keep_one = ctx.spec.autoscaling.provider == "keda"
        return max(low, 1) if keep_one else low
    return None


def deployment(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any]:
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": common.selector_labels(ctx, COMPONENT, version.name)},
        # Never below the serving capacity during an update: one extra pod at a time.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": 900,
        "template": common.pod_template(ctx, COMPONENT, version.name, pod_spec(ctx, version)),
    }
    replicas = _replicas(ctx, version)
    if replicas is not None:
        deployment_spec["replicas"] = replicas
    return {
        **common.head(
            ctx, "apps/v1", "Deployment", common.version_name(ctx, version.name), COMPONENT, version.name
        ),
        "spec": deployment_spec,
    }


def service(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any]:
    """ClusterIP Service of one version; the router balances over its EndpointSlices."""
    return {
        **common.head(ctx, "v1", "Service", common.version_name(ctx, version.name), COMPONENT, version.name),
        "spec": {
            "type": "ClusterIP",
            "selector": common.selector_labels(ctx, COMPONENT, version.name),
            "ports": [common.service_port(names.HTTP_PORT)],
        },
    }
