"""The real kopf operator against the emulated API server: the examples, from creation to Ready."""

from __future__ import annotations

from typing import Any

import pytest

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
ROLES = "rbac.authorization.k8s.io/v1/roles"
ROLE_BINDINGS = "rbac.authorization.k8s.io/v1/rolebindings"
SERVICE_ACCOUNTS = "v1/serviceaccounts"

pytestmark = pytest.mark.usefixtures("operator")


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


async def test_minimal_example_creates_every_child_with_owner_references(cluster: Any) -> None:
    model = await cluster.apply_example("minimal.yaml")
    uid = model["metadata"]["uid"]

    children = await cluster.eventually(lambda: _all_children(cluster, "captions"))
    assert children == {
        DEPLOYMENTS: {"captions-v1", "captions-router"},
        SERVICES: {"captions-v1", "captions"},
        HPAS: {"captions-v1"},
        SERVICE_ACCOUNTS: {"captions-router"},
        ROLES: {"captions-router"},
        ROLE_BINDINGS: {"captions-router"},
    }
    for resource, names in children.items():
        for name in names:
            refs = cluster.get(resource, name)["metadata"]["ownerReferences"]
            assert refs == [
                {
                    "apiVersion": "captionfleet.io/v1alpha1",
                    "kind": "CaptionModel",
                    "name": "captions",
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ], (resource, name)

    runtime = cluster.get(DEPLOYMENTS, "captions-v1")
    pod = runtime["spec"]["template"]["spec"]
    serve = container(runtime, "runtime")
    assert serve["image"] == "registry.test/captionfleet/runtime:1.2.3"  # the operator's default
    assert serve["command"] == ["captionfleet", "serve"]
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "nvidia.com/gpu" not in serve["resources"]["limits"]
    assert env(serve)["CAPTIONFLEET_MODEL"] == "/models/weights"
    assert env(serve)["CAPTIONFLEET_MODEL_VERSION"] == "v1"
    assert env(serve)["CAPTIONFLEET_MAX_BATCH_SIZE"] == "8"
    assert "replicas" not in runtime["spec"]  # the HPA owns the replica count
    assert runtime["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    (fetch,) = pod["initContainers"]
    assert fetch["args"] == ["Salesforce/blip-image-captioning-base", "", "/models/weights"]
    hpa = cluster.get(HPAS, "captions-v1")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    assert [m["type"] for m in hpa["metrics"]] == ["Pods", "Resource"]

    router = cluster.get(DEPLOYMENTS, "captions-router")
    assert container(router, "router")["command"] == ["captionfleet", "router"]
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == "captions-router"
    assert cluster.get(SERVICES, "captions")["spec"]["selector"] == {
        "captionfleet.io/model": "captions",
        "app.kubernetes.io/component": "router",
    }
    rules = cluster.get(ROLES, "captions-router")["rules"]
    assert {verb for rule in rules for verb in rule["verbs"]} == {"get", "list", "watch"}

    status = await cluster.eventually(lambda: _phase(cluster, "captions", "Pending"))
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://captions.ml.svc"
    assert status["versions"] == [
        {
            "name": "v1",
            "role": "stable",
            "weight": 100,
            "service": "captions-v1",
            "replicas": 0,
            "readyReplicas": 0,
        }
    ]
    assert cluster.condition("captions", "Ready")["status"] == "False"


async def test_the_fleet_becomes_ready_when_its_deployments_are_and_degraded_when_one_fails(
    cluster: Any,
) -> None:
    await cluster.apply_example("minimal.yaml")
    await cluster.eventually(lambda: _phase(cluster, "captions", "Pending"))

    await cluster.roll_out("captions-v1", ready=2, replicas=2)
    await cluster.eventually(lambda: _ready_replicas(cluster, "captions", 2))
    assert cluster.status("captions")["phase"] == "Pending"  # nothing serves without the router
    assert (
        cluster.condition("captions", "Ready")["message"]
        == "router: the new pod template is not rolled out yet"
    )
    await cluster.roll_out("captions-router")

    status = await cluster.eventually(lambda: _phase(cluster, "captions", "Ready"))
    assert status["readyReplicas"] == 2
    assert cluster.condition("captions", "Ready") | {"lastTransitionTime": None} == {
        "type": "Ready",
        "status": "True",
        "reason": "AllReplicasReady",
        "message": "serving on http://captions.ml.svc",
        "lastTransitionTime": None,
        "observedGeneration": 1,
    }
    await cluster.eventually(lambda: _has_event(cluster, "captions", "Normal", "Ready"))

    deadline = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "captions-v1-5d9" has timed out progressing.'}  # fmt: skip
    await cluster.roll_out("captions-v1", ready=0, conditions=[deadline])
    await cluster.eventually(lambda: _phase(cluster, "captions", "Degraded"))
    degraded = cluster.condition("captions", "Degraded")
    assert degraded["status"] == "True"
    assert "timed out progressing" in degraded["message"]
    await cluster.eventually(lambda: _has_event(cluster, "captions", "Warning", "Degraded"))


async def test_ab_canary_example_splits_replicas_by_traffic_share(cluster: Any) -> None:
    await cluster.apply_example("ab-canary.yaml")
    status = await cluster.eventually(lambda: _phase(cluster, "captions-ab", "Pending"))

    bounds = {
        name: (cluster.get(HPAS, f"captions-ab-{name}")["spec"]["minReplicas"],
               cluster.get(HPAS, f"captions-ab-{name}")["spec"]["maxReplicas"])
        for name in ("base", "large", "base-next")
    }  # fmt: skip
    # Fleet-wide 2..20 at 100 %: 30 % -> 1..6, the 10 % canary -> 1..2, and the stable version keeps
    # the capacity of the whole pool (its 60 % and the canary's 10 %: 2..14) until the canary passed a check.
    assert bounds == {"base": (2, 14), "large": (1, 6), "base-next": (1, 2)}
    assert status["stableVersion"] == "base"
    assert status["canaryVersion"] == "base-next"
    assert status["canaryWeight"] == 0  # no traffic before the canary has a ready pod
    assert [(v["name"], v["role"], v["weight"]) for v in status["versions"]] == [
        ("base", "stable", 70),
        ("large", "variant", 30),
        ("base-next", "canary", 0),
    ]
    await cluster.roll_out("captions-ab-base-next", replicas=1)
    await cluster.eventually(lambda: _canary_weight(cluster, "captions-ab", 10))
    assert cluster.condition("captions-ab", "Progressing")["reason"] in {"RollingOut", "CanaryInRollout"}

    serve = container(cluster.get(DEPLOYMENTS, "captions-ab-large"), "runtime")
    variables = env(serve)
    assert variables["CAPTIONFLEET_REDIS_URL"] == "redis://redis.captions.svc:6379/0"
    assert variables["CAPTIONFLEET_API_KEYS_FILE"] == "/etc/captionfleet/auth/api-keys"
    assert variables["CAPTIONFLEET_STYLE"] == "concise"
    assert variables["CAPTIONFLEET_MAX_QUEUE_DELAY_MS"] == "20"
    router = cluster.get(DEPLOYMENTS, "captions-ab-router")
    assert router["spec"]["replicas"] == 3
    assert {v["name"] for v in router["spec"]["template"]["spec"]["volumes"]} == {"tmp", "auth"}
    assert cluster.get(SERVICES, "captions-ab")["spec"]["type"] == "LoadBalancer"
    fetch = cluster.get(DEPLOYMENTS, "captions-ab-base-next")["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["args"][:2] == ["Salesforce/blip-image-captioning-base", "main"]


def _canary_weight(cluster: Any, name: str, weight: int) -> None:
    assert cluster.status(name)["canaryWeight"] == weight


async def test_gpu_example_gets_gpus_tolerations_affinity_and_the_pvc(cluster: Any) -> None:
    await cluster.apply_example("gpu-pvc.yaml")
    await cluster.eventually(lambda: _phase(cluster, "captions-gpu", "Pending"))

    deployment = cluster.get(DEPLOYMENTS, "captions-gpu-large")
    pod = deployment["spec"]["template"]["spec"]
    serve = container(deployment, "runtime")
    assert serve["image"] == "registry.example.com/captionfleet/runtime:0.1.0-cuda"
    assert serve["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
    }
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "gpu-pool"}
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert "initContainers" not in pod  # nothing to download
    model_volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert model_volume["persistentVolumeClaim"] == {"claimName": "caption-models", "readOnly": True}
    assert env(serve)["CAPTIONFLEET_MODEL"] == "/models/blip-image-captioning-large"
    assert env(serve)["CAPTIONFLEET_PRECISION"] == "fp16"
    assert env(serve)["CAPTIONFLEET_DECODER"] == "native"  # the default decoder reaches the runtime
    assert env(serve)["CAPTIONFLEET_DEVICE"] == "cuda"


def _all_children(cluster: Any, name: str) -> dict[str, set[str]]:
    children = cluster.children(name)
    assert children.get(SERVICES, set()) >= {name}, children  # the router's Service comes last
    return dict(children)


def _phase(cluster: Any, name: str, phase: str) -> dict[str, Any]:
    status = cluster.status(name)
    assert status.get("phase") == phase, status
    return dict(status)


def _has_event(cluster: Any, name: str, type_: str, reason: str) -> None:
    events = cluster.event_reasons(name)
    assert any(t == type_ and r == reason for t, r, _ in events), events


def _ready_replicas(cluster: Any, name: str, count: int) -> None:
    status = cluster.status(name)
    assert status.get("readyReplicas") == count, status
