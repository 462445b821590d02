"""What issue 12 found, against the emulated API server with the real operator: the operator touches
only what it owns, keeps secrets out of plain text, bounds what users can ask for, and refuses what a
real API server would refuse before applying anything."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest

from .conftest import caption_model

DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
CAPMS = "/apis/captionfleet.io/v1alpha1/namespaces/ml/captionmodels"
SECRET = "S3cr3t"

pytestmark = pytest.mark.usefixtures("operator")


def phase(cluster: Any, name: str, expected: str) -> dict[str, Any]:  # in namespace ml
    status = cluster.status(name)
    assert status.get("phase") == expected, status
    return status


def event(cluster: Any, name: str, reason: str, text: str) -> None:
    found = cluster.event_reasons(name)
    assert any(r == reason and text in m for _, r, m in found), found


async def test_an_existing_object_of_the_same_name_is_left_alone_and_reported(cluster: Any) -> None:
    user_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "pg", "namespace": "ml"},
        "spec": {"selector": {"app": "postgres"}, "ports": [{"port": 5432}]},
    }
    await cluster._send("POST", "/api/v1/namespaces/ml/services", user_service)
    before = cluster.get(SERVICES, "pg")

    await cluster.create(caption_model("pg"))
    await cluster.eventually(lambda: phase(cluster, "pg", "Degraded"))
    ready = cluster.condition("pg", "Ready")
    assert ready["reason"] == "NameConflict"
    assert "Service pg already exists and belongs to no CaptionModel" in ready["message"]
    await cluster.eventually(lambda: event(cluster, "pg", "NameConflict", "Service pg already exists"))
    assert cluster.get(SERVICES, "pg") == before  # not overwritten, no owner reference
    assert cluster.children("pg") == {}  # nothing else applied either

    await cluster.delete("pg")
    await cluster.eventually(
        lambda: cluster.api.live("captionfleet.io/v1alpha1/captionmodels", "ml", "pg") is None
    )
    assert cluster.get(SERVICES, "pg") == before  # deleting the CaptionModel never deletes it


async def test_colliding_derived_names_are_detected_not_fought_over(cluster: Any) -> None:
    first = await cluster.create(caption_model("coll-x"))
    await cluster.eventually(lambda: phase(cluster, "coll-x", "Pending"))
    await cluster.create(caption_model("coll", versions=[{"name": "x-router", "model": "file:///opt/m"}]))
    await cluster.eventually(lambda: phase(cluster, "coll", "Degraded"))
    message = cluster.condition("coll", "Ready")["message"]
    assert "Deployment coll-x-router already exists and belongs to CaptionModel coll-x" in message
    owner = cluster.get(DEPLOYMENTS, "coll-x-router")["metadata"]["ownerReferences"][0]
    assert owner["uid"] == first["metadata"]["uid"]
    assert cluster.children("coll") == {}  # no HPA of coll targets coll-x's router
    # Reconciling both again changes nothing: no takeover, no flip-flop.
    version = cluster.get(DEPLOYMENTS, "coll-x-router")["metadata"]["resourceVersion"]
    await cluster.patch_spec("coll", {"generation": {"numBeams": 2}})
    await cluster.patch_spec("coll-x", {"generation": {"numBeams": 2}})
    await cluster.eventually(lambda: cluster.status("coll")["observedGeneration"] == 2)
    await cluster.eventually(lambda: cluster.status("coll-x")["observedGeneration"] == 2)
    deployment = cluster.get(DEPLOYMENTS, "coll-x-router")
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
    assert deployment["metadata"]["resourceVersion"] == version  # applied unchanged


async def test_a_redis_password_is_refused_and_a_secret_reference_is_used_instead(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await cluster.create(caption_model("cache", cache={"redisUrl": f"redis://admin:{SECRET}@redis:6379/0"}))
    await cluster.eventually(lambda: phase(cluster, "cache", "Invalid"))
    message = cluster.condition("cache", "Ready")["message"]
    assert "spec.cache.redisUrl: holds credentials" in message and "redisUrlSecret" in message
    await cluster.eventually(lambda: event(cluster, "cache", "InvalidSpec", "holds credentials"))
    assert cluster.children("cache") == {}
    model = cluster.model("cache")
    assert SECRET not in json.dumps(model["metadata"]) + json.dumps(model["status"])
    assert SECRET not in json.dumps(cluster.events())
    assert "is in progress" in caplog.text  # kopf's DEBUG line with the body was written, redacted
    assert SECRET not in caplog.text

    await cluster.patch_spec(
        "cache", {"cache": {"redisUrl": None, "redisUrlSecret": {"name": "redis", "key": "url"}}}
    )
    await cluster.eventually(lambda: phase(cluster, "cache", "Pending"))
    env = cluster.get(DEPLOYMENTS, "cache-v1")["spec"]["template"]["spec"]["containers"][0]["env"]
    entry = next(e for e in env if e["name"] == "CAPTIONFLEET_REDIS_URL")
    assert entry == {
        "name": "CAPTIONFLEET_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}},
    }


async def test_env_values_are_escaped_for_kubernetes_expansion(cluster: Any) -> None:
    await cluster.create(
        caption_model("dollars", versions=[{"name": "v1", "model": "file:///opt/$(HOME)/m"}])
    )
    await cluster.eventually(lambda: phase(cluster, "dollars", "Pending"))
    env = cluster.get(DEPLOYMENTS, "dollars-v1")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"]: e.get("value") for e in env}["CAPTIONFLEET_MODEL"] == "/opt/$$(HOME)/m"


@pytest.mark.parametrize(
    ("analysis", "field"),
    [
        ({"interval": "1ms"}, "spec.rollout.analysis.interval: Value error, 1ms is outside 500ms..1h"),
        ({"interval": "2h"}, "spec.rollout.analysis.interval: Value error, 2h is outside 500ms..1h"),
        ({"window": "10000h"}, "spec.rollout.analysis.window: Value error, 10000h is outside 1s..24h"),
    ],
)
async def test_analysis_intervals_and_windows_are_bounded(
    cluster: Any, analysis: dict[str, str], field: str
) -> None:
    await cluster.create(caption_model("bounded", rollout={"analysis": analysis}))
    await cluster.eventually(lambda: phase(cluster, "bounded", "Invalid"))
    assert field in cluster.condition("bounded", "Ready")["message"]
    assert cluster.children("bounded") == {}


POD_SPEC_MISTAKES = {
    "toleration Exists with a value": (
        {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "v"}]},
        "spec.tolerations[0]: Value error, value must be empty when operator is Exists",
    ),
    "empty toleration": ({"tolerations": [{}]}, "spec.tolerations[0]: Value error, operator must be Exists"),
    "tolerationSeconds without NoExecute": (
        {"tolerations": [{"key": "k", "value": "v", "tolerationSeconds": 30}]},
        "spec.tolerations[0]: Value error, tolerationSeconds needs effect NoExecute",
    ),
    "nodeSelector key with a space": ({"nodeSelector": {"gpu type": "a100"}}, "spec.nodeSelector.gpu type"),
}


@pytest.mark.parametrize("mistake", sorted(POD_SPEC_MISTAKES))
async def test_pod_spec_content_the_api_server_refuses_is_invalid_and_nothing_is_applied(
    cluster: Any, mistake: str
) -> None:
    spec, field = POD_SPEC_MISTAKES[mistake]
    await cluster.create(caption_model("pods", **copy.deepcopy(spec)))
    await cluster.eventually(lambda: phase(cluster, "pods", "Invalid"))
    assert field in cluster.condition("pods", "Ready")["message"]
    assert cluster.children("pods") == {}
    # The emulated API server would indeed refuse such a pod template.
    assert await cluster.create_status(spec) == 422


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"tolerations": [{"key": "bad key!", "operator": "Exists"}]}, "spec.tolerations.0.key"),
        ({"resources": {"memory": "-1Gi"}}, "spec.resources.memory"),
        ({"resources": {"cpu": "-500m"}}, "spec.resources.cpu"),
        ({"image": "my image:1"}, "spec.image"),
        ({"affinity": {"nodeAffinity": "please"}}, "spec.affinity.nodeAffinity"),
    ],
)
async def test_what_the_crd_schema_refuses_never_gets_stored(
    cluster: Any, spec: dict[str, Any], field: str
) -> None:
    body = caption_model("schema", **spec) | {"metadata": {"name": "schema", "namespace": "ml"}}
    async with cluster.api.request("POST", CAPMS, json=body) as rsp:
        assert rsp.status == 422
        assert field in (await rsp.json())["message"]
    assert cluster.api.live("captionfleet.io/v1alpha1/captionmodels", "ml", "schema") is None


async def test_a_caption_model_named_kubernetes_leaves_the_api_servers_service_alone(cluster: Any) -> None:
    kubernetes = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver"}},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 6443}]},
    }
    await cluster._send("POST", "/api/v1/namespaces/default/services", kubernetes)
    before = cluster.get(SERVICES, "kubernetes", "default")
    await cluster.create(caption_model("kubernetes"), namespace="default")
    await cluster.eventually(lambda: phase_in(cluster, "kubernetes", "default", "Degraded"))
    assert (
        "Service kubernetes already exists" in cluster.condition("kubernetes", "Ready", "default")["message"]
    )
    await cluster.delete("kubernetes", namespace="default")
    await cluster.eventually(
        lambda: cluster.api.live("captionfleet.io/v1alpha1/captionmodels", "default", "kubernetes") is None
    )
    assert cluster.get(SERVICES, "kubernetes", "default") == before


async def test_a_version_service_and_another_models_public_service_do_not_fight(cluster: Any) -> None:
    first = await cluster.create(caption_model("svc-a"))  # its public (router) Service is svc-a
    await cluster.eventually(lambda: phase(cluster, "svc-a", "Pending"))
    await cluster.create(caption_model("svc", versions=[{"name": "a", "model": "file:///opt/m"}]))
    await cluster.eventually(lambda: phase(cluster, "svc", "Degraded"))
    message = cluster.condition("svc", "Ready")["message"]
    assert "Service svc-a already exists and belongs to CaptionModel svc-a" in message
    await cluster.eventually(lambda: event(cluster, "svc", "NameConflict", "Service svc-a"))
    service = cluster.get(SERVICES, "svc-a")
    assert service["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    assert cluster.children("svc") == {}


def phase_in(cluster: Any, name: str, namespace: str, expected: str) -> None:
    assert cluster.status(name, namespace).get("phase") == expected, cluster.status(name, namespace)


async def test_the_router_asks_for_the_memory_its_window_needs_and_the_server_takes_it(cluster: Any) -> None:
    for name, window in (("short", "10m"), ("long", "24h")):
        await cluster.create(caption_model(name, rollout={"analysis": {"window": window}}))
    for name in ("short", "long"):
        await cluster.eventually(lambda n=name: phase(cluster, n, "Pending"))

    def memory(name: str) -> tuple[str, str]:
        resources = cluster.get(DEPLOYMENTS, f"{name}-router")["spec"]["template"]["spec"]["containers"][0]
        return resources["resources"]["requests"]["memory"], resources["resources"]["limits"]["memory"]

    short, long = memory("short"), memory("long")
    mebibytes = [int(value.removesuffix("Mi")) for value in (*short, *long)]
    assert mebibytes[2] > mebibytes[0] and mebibytes[3] > mebibytes[1], (short, long)
    assert mebibytes[3] - mebibytes[2] == mebibytes[1] - mebibytes[0]  # the same headroom above
