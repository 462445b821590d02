"""The real kopf operator against the emulated API server: changes, mistakes, restarts and deletion."""

from __future__ import annotations

import copy
import dataclasses
import socket
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from captionfleet.operator.settings import OperatorSettings

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
SCALED_OBJECTS = "keda.sh/v1alpha1/scaledobjects"
EXAMPLES_AB = yaml.safe_load(
    (Path(__file__).resolve().parents[3] / "examples" / "ab-canary.yaml").read_text()
)


def bounds(cluster: Any, name: str) -> tuple[int, int]:
    spec = cluster.get(HPAS, name)["spec"]
    return spec["minReplicas"], spec["maxReplicas"]


def phase(cluster: Any, name: str, expected: str, generation: int | None = None) -> dict[str, Any]:
    status = cluster.status(name)
    assert status.get("phase") == expected, status
    if generation is not None:
        assert status.get("observedGeneration") == generation, status
    return dict(status)


async def acted_on(cluster: Any, name: str, spec: Any, expected: str, generation: int) -> None:
    """Patch ``name``'s spec; wait until the operator has acted on that generation: phase ``expected``."""
    await cluster.patch_spec(name, spec)
    await cluster.eventually(lambda: phase(cluster, name, expected, generation=generation))


def versions_in_status(cluster: Any, name: str, expected: list[tuple[str, int]]) -> None:
    got = [(v["name"], v["weight"]) for v in cluster.status(name).get("versions", [])]
    assert got == expected, got


async def test_weights_added_and_removed_versions_update_and_prune_children(
    cluster: Any, operator: None
) -> None:
    await cluster.apply_example("ab-canary.yaml")
    await cluster.eventually(lambda: phase(cluster, "captions-ab", "Pending", generation=1))
    stable_uid = cluster.get(DEPLOYMENTS, "captions-ab-base")["metadata"]["uid"]

    # Change the weights: the replica bounds follow the new shares, nothing is recreated. The
    # canary's weight is the rollout's (stepWeight 10), not its spec weight.
    spec = copy.deepcopy(EXAMPLES_AB["spec"])
    spec["versions"][0]["weight"], spec["versions"][1]["weight"] = 40, 50
    await acted_on(cluster, "captions-ab", spec, "Pending", generation=2)
    assert bounds(cluster, "captions-ab-base") == (1, 8)  # now an A/B variant at 40 %
    # large is now the stable version: it keeps the capacity of the whole pool (50 + the canary's 10)
    # until the canary has passed a check.
    assert bounds(cluster, "captions-ab-large") == (2, 12)
    assert bounds(cluster, "captions-ab-base-next") == (1, 2)
    assert cluster.status("captions-ab")["canaryWeight"] == 0  # no ready pod yet: no traffic
    assert cluster.get(DEPLOYMENTS, "captions-ab-base")["metadata"]["uid"] == stable_uid

    # Add a version: its Deployment, Service and HPA appear.
    spec["versions"][1]["weight"] = 40
    spec["versions"].append({"name": "tiny", "model": "file:///opt/models/tiny", "weight": 10})
    await acted_on(cluster, "captions-ab", spec, "Pending", generation=3)
    for resource in (DEPLOYMENTS, SERVICES, HPAS):
        assert "captions-ab-tiny" in cluster.names(resource)
    tiny = cluster.get(DEPLOYMENTS, "captions-ab-tiny")["spec"]["template"]["spec"]
    assert "initContainers" not in tiny  # file:// is already in the image

    # Remove two versions: exactly their children go, and Events say so.
    spec["versions"] = [spec["versions"][0] | {"weight": 70}, spec["versions"][3] | {"weight": 30}]
    await acted_on(cluster, "captions-ab", spec, "Pending", generation=4)
    assert cluster.children("captions-ab")[DEPLOYMENTS] == {
        "captions-ab-base",
        "captions-ab-tiny",
        "captions-ab-router",
    }
    assert cluster.children("captions-ab")[HPAS] == {"captions-ab-base", "captions-ab-tiny"}
    assert cluster.children("captions-ab")[SERVICES] == {
        "captions-ab",
        "captions-ab-base",
        "captions-ab-tiny",
    }
    versions_in_status(cluster, "captions-ab", [("base", 70), ("tiny", 30)])
    assert cluster.status("captions-ab").get("canaryVersion") is None
    for removed in ("Deployment captions-ab-large", "HorizontalPodAutoscaler captions-ab-base-next"):
        await cluster.eventually(
            lambda r=removed: _assert_event(
                cluster, "captions-ab", "Normal", "Deleted", f"{r}: no longer in the spec"
            )
        )
    assert cluster.get(DEPLOYMENTS, "captions-ab-base")["metadata"]["uid"] == stable_uid


async def test_an_invalid_spec_is_reported_keeps_what_runs_and_recovers(cluster: Any, operator: None) -> None:
    await cluster.apply_example("ab-canary.yaml")
    await cluster.eventually(lambda: phase(cluster, "captions-ab", "Pending", generation=1))
    before = {
        r: {n: cluster.get(r, n) for n in names} for r, names in cluster.children("captions-ab").items()
    }

    broken = copy.deepcopy(EXAMPLES_AB["spec"])
    broken["versions"][0]["weight"] = 50  # 50 + 30 + 10 = 90
    broken["versions"][1]["canary"] = True  # two versions in rollout
    await acted_on(cluster, "captions-ab", broken, "Invalid", generation=2)
    ready = cluster.condition("captions-ab", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "weights must sum to 100, they sum to 90 (base=50, large=30, base-next=10)" in ready["message"]
    assert (
        "at most one version may be in rollout (canary: true) at a time, got large, base-next"
        in ready["message"]
    )
    await cluster.eventually(
        lambda: _assert_event(cluster, "captions-ab", "Warning", "InvalidSpec", "sum to 90")
    )
    after = {r: {n: cluster.get(r, n) for n in names} for r, names in cluster.children("captions-ab").items()}
    assert after == before  # nothing deleted, nothing changed
    status = cluster.status("captions-ab")
    assert [v["name"] for v in status["versions"]] == ["base", "large", "base-next"]  # what still runs

    fixed = copy.deepcopy(EXAMPLES_AB["spec"])
    fixed["versions"][0]["weight"] = 50
    fixed["versions"][1]["weight"] = 40
    await acted_on(cluster, "captions-ab", fixed, "Pending", generation=3)
    assert bounds(cluster, "captions-ab-large") == (1, 8)
    await cluster.eventually(lambda: _assert_event(cluster, "captions-ab", "Normal", "Recovered", ""))


async def test_an_invalid_new_model_creates_nothing(cluster: Any, operator: None) -> None:
    manifest = {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": "9lives"},
        "spec": {"versions": [{"name": "v1", "model": "hf://a/b", "precision": "fp16"}]},
    }
    await cluster.create(manifest)
    await cluster.eventually(lambda: phase(cluster, "9lives", "Invalid", generation=1))
    message = cluster.condition("9lives", "Ready")["message"]
    assert "metadata.name '9lives' must start with a letter" in message
    assert "spec.versions[0] (v1).precision: fp16 needs a GPU" in message
    assert cluster.children("9lives") == {}


async def test_a_restarted_operator_resumes_without_duplicates(
    cluster: Any, settings: OperatorSettings, start_operator: Any
) -> None:
    async with start_operator(settings):
        await cluster.apply_example("ab-canary.yaml")
        await cluster.apply_example("minimal.yaml")
        await cluster.eventually(lambda: phase(cluster, "captions-ab", "Pending", generation=1))
        await cluster.eventually(lambda: phase(cluster, "captions", "Pending", generation=1))
    children = {name: cluster.children(name) for name in ("captions-ab", "captions")}
    uids = {
        (r, n): cluster.get(r, n)["metadata"]["uid"]
        for c in children.values()
        for r, names in c.items()
        for n in names
    }
    seen = len(cluster.api.seen())

    async with start_operator(settings):
        await cluster.eventually(lambda: _resumed(cluster, seen, "captions-ab", "captions"))
        await cluster.roll_out("captions-router")
        await cluster.roll_out("captions-v1")
        await cluster.eventually(lambda: phase(cluster, "captions", "Ready", generation=1))

    assert {name: cluster.children(name) for name in children} == children
    assert {key: cluster.get(*key)["metadata"]["uid"] for key in uids} == uids  # same objects
    creates = [r for r in cluster.api.seen()[seen:] if r.method == "POST" and "/events" not in str(r.url)]
    assert creates == []


async def test_deleting_the_model_removes_its_children_router_first(cluster: Any, operator: None) -> None:
    await cluster.apply_example("minimal.yaml")
    await cluster.apply_example("gpu-pvc.yaml")
    await cluster.eventually(lambda: phase(cluster, "captions", "Pending", generation=1))
    await cluster.eventually(lambda: phase(cluster, "captions-gpu", "Pending", generation=1))
    assert cluster.model("captions")["metadata"]["finalizers"] == ["captionfleet.io/cleanup"]

    await cluster.delete("captions")
    await cluster.eventually(lambda: _gone(cluster, "captions"))
    assert cluster.children("captions") == {}
    assert cluster.children("captions-gpu") != {}  # the other fleet is untouched
    deletes = [
        str(r.url.path) for r in cluster.api.seen() if r.method == "DELETE" and "captions" in r.url.path
    ]
    assert deletes.index("/api/v1/namespaces/ml/services/captions") < deletes.index(
        "/apis/apps/v1/namespaces/ml/deployments/captions-v1"
    )


async def test_keda_replaces_the_hpa_and_needs_a_prometheus(
    cluster: Any, settings: OperatorSettings, start_operator: Any
) -> None:
    cluster.api.install_keda()
    async with start_operator(settings):
        await cluster.apply_example("ab-canary.yaml")
        await cluster.eventually(lambda: phase(cluster, "captions-ab", "Pending", generation=1))
        spec = copy.deepcopy(EXAMPLES_AB["spec"])
        spec["autoscaling"] |= {"provider": "keda", "minReplicas": 0}
        await acted_on(cluster, "captions-ab", spec, "Pending", generation=2)
        assert cluster.children("captions-ab")[SCALED_OBJECTS] == {
            "captions-ab-base",
            "captions-ab-large",
            "captions-ab-base-next",
        }
        assert HPAS not in cluster.children("captions-ab")
        scaled = cluster.get(SCALED_OBJECTS, "captions-ab-base-next")["spec"]
        # Awake, a version that may scale to zero keeps a pod: the operator, not KEDA's cool-down,
        # decides when it has been idle for scaleToZeroAfter (then minReplicaCount is 0).
        assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 2)
        trigger = scaled["triggers"][0]["metadata"]
        assert trigger["serverAddress"] == "http://prometheus.monitoring.svc:9090"
        assert 'pod=~"captions-ab-base-next-[a-z0-9]+-[a-z0-9]+"' in trigger["query"]

    without_prometheus = dataclasses.replace(settings, prometheus_url="")
    async with start_operator(without_prometheus):
        await cluster.eventually(lambda: phase(cluster, "captions-ab", "Invalid"))
        assert "keda needs a Prometheus" in cluster.condition("captions-ab", "Ready")["message"]
        assert len(cluster.children("captions-ab")[SCALED_OBJECTS]) == 3  # kept


async def test_keda_requested_but_not_installed_is_degraded_and_keeps_a_replica_count(
    cluster: Any, operator: None
) -> None:
    await cluster.apply_example("minimal.yaml")
    await cluster.eventually(lambda: phase(cluster, "captions", "Pending", generation=1))
    await cluster.patch_spec("captions", {"autoscaling": {"provider": "keda"}})
    await cluster.eventually(lambda: phase(cluster, "captions", "Degraded", generation=2))
    degraded = cluster.condition("captions", "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "KedaNotInstalled"
    assert "KEDA (keda.sh/v1alpha1 ScaledObject) is not installed" in degraded["message"]
    assert "resource not found" not in degraded["message"].lower()
    # Without an autoscaler the Deployment has a replica count of its own (at least one pod).
    assert cluster.get(DEPLOYMENTS, "captions-v1")["spec"]["replicas"] == 1
    assert HPAS not in cluster.children("captions")
    await cluster.eventually(
        lambda: _assert_event(cluster, "captions", "Warning", "KedaNotInstalled", "is not installed")
    )
    # The Deployment's pods getting ready does not hide it.
    await cluster.roll_out("captions-v1")
    await cluster.roll_out("captions-router")
    await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "captions-v1")["status"]["readyReplicas"] == 1)
    assert cluster.condition("captions", "Degraded")["reason"] == "KedaNotInstalled"


async def test_the_operator_logs_in_from_the_kubeconfig_and_serves_liveness(
    cluster: Any, settings: OperatorSettings, start_operator: Any
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    live = dataclasses.replace(settings, liveness=f"http://127.0.0.1:{port}/healthz")
    async with start_operator(live):
        await cluster.apply_example("minimal.yaml")
        await cluster.eventually(lambda: phase(cluster, "captions", "Pending"))
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as rsp:
            assert rsp.status == 200
    by_agent: dict[str, set[str | None]] = {}
    for request in cluster.api.seen():
        agent = request.headers.get("User-Agent", "").split("/")[0]
        by_agent.setdefault(agent, set()).add(request.headers.get("Authorization"))
    # kopf's watches and the operator's own calls both use the kubeconfig's credentials.
    assert by_agent["kopf"] == by_agent["OpenAPI-Generator"] == {"Bearer test-token"}


async def test_an_operator_for_chosen_namespaces_leaves_the_others_alone(
    cluster: Any, settings: OperatorSettings, start_operator: Any
) -> None:
    async with start_operator(dataclasses.replace(settings, namespaces=("ml",))):
        await cluster.apply_example("minimal.yaml", namespace="default")
        await cluster.apply_example("minimal.yaml", namespace="ml")
        await cluster.eventually(lambda: phase(cluster, "captions", "Pending"))
    assert cluster.children("captions", "default") == {}
    assert "status" not in cluster.model("captions", "default")
    peering = cluster.api.live("kopf.dev/v1/kopfpeerings", "ml", "captionfleet")
    assert peering is not None and "status" in peering  # leader election went through the namespace


async def test_the_periodic_resync_repairs_children_changed_by_hand(
    cluster: Any, settings: OperatorSettings, start_operator: Any
) -> None:
    async with start_operator(dataclasses.replace(settings, resync_seconds=0.2)):
        await cluster.apply_example("minimal.yaml")
        await cluster.eventually(lambda: phase(cluster, "captions", "Pending"))
        async with cluster.api.delete("/apis/apps/v1/namespaces/ml/deployments/captions-v1") as rsp:
            assert rsp.status == 200
        await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, "captions-v1"))
        await cluster.eventually(lambda: _created_twice(cluster, "Deployment captions-v1"))
    reasons = [r for _, r, _ in cluster.event_reasons("captions")]
    assert reasons.count("Reconciled") == 1  # the resyncs that found nothing to repair stayed quiet


def _created_twice(cluster: Any, what: str) -> None:
    created = [m for _, r, m in cluster.event_reasons("captions") if r == "Created" and m == what]
    assert len(created) == 2, created  # at creation, and again by the resync


def _resumed(cluster: Any, seen: int, *names: str) -> None:
    patched = {str(r.url.path) for r in cluster.api.seen()[seen:] if r.method == "PATCH"}
    for name in names:
        assert f"/apis/captionfleet.io/v1alpha1/namespaces/ml/captionmodels/{name}/status" in patched, patched


def _gone(cluster: Any, name: str) -> None:
    assert cluster.api.live("captionfleet.io/v1alpha1/captionmodels", "ml", name) is None


def _assert_event(cluster: Any, name: str, type_: str, reason: str, text: str) -> None:
    events = cluster.event_reasons(name)
    assert any(t == type_ and r == reason and text in m for t, r, m in events), events
