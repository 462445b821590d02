"""CaptionModels and cluster states the other tests do not use, against the emulated API server with
the real operator: specs at the edges of the schema, mistakes only the operator can see (each with a
condition and an Event, and recovered from once fixed), objects of our names we do not own, edits users
make to our children, and one name in two namespaces."""

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
CAPM_RESOURCE = "captionfleet.io/v1alpha1/captionmodels"
MODEL = "file:///opt/models/v1"
DIGEST = "registry.test/captionfleet/runtime@sha256:" + "a" * 64

pytestmark = pytest.mark.usefixtures("operator")


def version(name: str, weight: int = 100, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model": MODEL, "weight": weight, **fields}


def node_terms(*requirements: dict[str, Any]) -> dict[str, Any]:
    required = {"nodeSelectorTerms": [{"matchExpressions": list(requirements)}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}


def pod_terms(**term: Any) -> dict[str, Any]:
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}


def phase(cluster: Any, name: str, expected: str, namespace: str = "ml") -> dict[str, Any]:
    status = cluster.status(name, namespace)
    assert status.get("phase") == expected, status
    return status


def reconciled(cluster: Any, name: str, generation: int) -> None:
    assert phase(cluster, name, "Pending").get("observedGeneration") == generation


def gone(cluster: Any, name: str, namespace: str = "ml") -> None:
    assert cluster.api.live(CAPM_RESOURCE, namespace, name) is None


def event(cluster: Any, name: str, reason: str, text: str) -> None:
    found = cluster.event_reasons(name)
    assert any(r == reason and text in m for _, r, m in found), found


EVERY_FIELD_AT_ITS_BOUND = {
    "versions": [version("v1", image=DIGEST, minReplicas=1000, maxReplicas=1000)],
    "image": "registry.test:5000/team/captionfleet:1.2.3@sha256:" + "b" * 64,
    "batching": {"maxBatchSize": 256, "maxQueueDelayMs": 10_000, "maxQueueSize": 100_000},
    "generation": {"numBeams": 10, "maxNewTokens": 100, "style": "a" * 40},
    "resources": {"cpu": "64", "memory": "1Ti"},
    "autoscaling": {"minReplicas": 1000, "maxReplicas": 1000, "targetQueueDepth": 10_000},
    "rollout": {"analysis": {"interval": "1h", "window": "24h", "stepWeight": 100, "maxWeight": 100}},
    "router": {"replicas": 100, "port": 65535},
    "nodeSelector": {"a" * 200 + "/" + "b" * 63: "c" * 63},
}
EDGES = {
    "the longest name (its router's name is 63 characters)": ("a" * 56, {"versions": [version("v1")]}),
    "the longest version name": ("m" * 32, {"versions": [version("v" * 30)]}),
    "ten versions": ("ten", {"versions": [version(f"v{i}", 10) for i in range(10)]}),
    "every field at its bound": ("bounds", EVERY_FIELD_AT_ITS_BOUND),
    "a full affinity": (
        "placed",
        {
            "versions": [version("v1")],
            "affinity": {
                **node_terms(
                    {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["g5.xlarge"]},
                    {"key": "cores", "operator": "Gt", "values": ["8"]},
                    {"key": "spot", "operator": "DoesNotExist"},
                ),
                **pod_terms(
                    topologyKey="kubernetes.io/hostname",
                    labelSelector={
                        "matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]
                    },
                    namespaces=["ml", "default"],
                ),
            },
        },
    ),
    "empty optional blocks": (
        "empty",
        {
            "versions": [version("v1")],
            **{block: {} for block in ("batching", "generation", "resources", "autoscaling", "router")},
            "rollout": {"analysis": {}},
            "tolerations": [],
            "nodeSelector": {},
            "affinity": {},
        },
    ),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
async def test_caption_models_at_the_edges_of_the_schema_are_applied(cluster: Any, edge: str) -> None:
    name, spec = EDGES[edge]
    await cluster.create(caption_model(name, **copy.deepcopy(spec)))
    await cluster.eventually(lambda: phase(cluster, name, "Pending"))
    assert not [e for e in cluster.event_reasons(name) if e[0] == "Warning"]
    assert f"{name}-router" in cluster.children(name)[DEPLOYMENTS]
    for deployment in cluster.children(name)[DEPLOYMENTS]:
        assert cluster.get(DEPLOYMENTS, deployment)["metadata"]["labels"]["captionfleet.io/model"] == name


MISTAKES = {
    "a derived name over 63 characters": (
        {"versions": [version("b" * 30)]},
        f"child name 'mistake-{'a' * 30}-{'b' * 30}' is longer than 63 characters",
    ),
    "duplicate version names": (
        {"versions": [version("v1", 50), version("v1", 50)]},
        "names must be unique, v1 repeated",
    ),
    "weights that do not sum to 100": (
        {"versions": [version("v1", 50), version("v2", 40)]},
        "weights must sum to 100, they sum to 90",
    ),
    "fleet minReplicas above maxReplicas": (
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
        "spec.autoscaling: minReplicas 5 is above maxReplicas 2",
    ),
    "a version's minReplicas above its maxReplicas": (
        {"versions": [version("v1", minReplicas=5, maxReplicas=2)]},
        "spec.versions[0] (v1): minReplicas 5 is above maxReplicas 2",
    ),
    "only a canary gets traffic": (
        {"versions": [version("v1", 0), version("v2", 100, canary=True)]},
        "a version that is not a canary must receive traffic",
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
async def test_a_mistake_only_the_operator_sees_is_invalid_and_recovers_when_fixed(
    cluster: Any, mistake: str
) -> None:
    name = "mistake-" + "a" * 30 if "63" in mistake else "mistake"
    spec, text = MISTAKES[mistake]
    await cluster.create(caption_model(name, **copy.deepcopy(spec)))
    await cluster.eventually(lambda: phase(cluster, name, "Invalid"))
    assert text in cluster.condition(name, "Ready")["message"]
    await cluster.eventually(lambda: event(cluster, name, "InvalidSpec", text))
    assert cluster.children(name) == {}

    await cluster.patch_spec(name, {"versions": [version("v1")], "autoscaling": None})
    await cluster.eventually(lambda: phase(cluster, name, "Pending"))
    await cluster.eventually(lambda: event(cluster, name, "Recovered", "the spec is valid again"))
    assert f"{name}-v1" in cluster.children(name)[DEPLOYMENTS]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"versions": [version("v1", maxReplicas=10**12)]}, "spec.versions.0.maxReplicas"),
        ({"versions": [version("v1", minReplicas=1001)]}, "spec.versions.0.minReplicas"),
        ({"auth": {"secretName": "keys", "key": ".."}}, "spec.auth.key"),
        ({"auth": {"secretName": "keys", "key": "..keys"}}, "spec.auth.key"),
        ({"cache": {"redisUrlSecret": {"name": "redis", "key": "."}}}, "spec.cache.redisUrlSecret.key"),
    ],
)
async def test_what_the_api_would_refuse_in_a_child_is_refused_in_the_caption_model(
    cluster: Any, spec: dict[str, Any], field: str
) -> None:
    """Before, these were stored and reconciled into an HPA (int32 replicas) or a Secret volume and
    secretKeyRef the API server refuses: ApplyFailed at every retry instead of a plain answer."""
    body = caption_model("refused", **copy.deepcopy(spec)) | {
        "metadata": {"name": "refused", "namespace": "ml"}
    }
    async with cluster.api.request("POST", CAPMS, json=body) as rsp:
        assert rsp.status == 422, await rsp.text()
        assert field in (await rsp.json())["message"]
    assert cluster.api.live(CAPM_RESOURCE, "ml", "refused") is None


async def test_unknown_fields_are_pruned_as_a_real_server_does_and_the_model_reconciles(cluster: Any) -> None:
    body = caption_model("unknown", futureBlock={"enabled": True}, batching={"maxBatchSize": 4, "turbo": 1})
    await cluster.create(body)
    stored = cluster.model("unknown")["spec"]
    assert "futureBlock" not in stored and stored["batching"] == {"maxBatchSize": 4}
    await cluster.eventually(lambda: phase(cluster, "unknown", "Pending"))
    strict = caption_model("strict", futureBlock={}) | {"metadata": {"name": "strict", "namespace": "ml"}}
    async with cluster.api.request("POST", f"{CAPMS}?fieldValidation=Strict", json=strict) as rsp:
        assert rsp.status == 422 and "unknown field 'spec.futureBlock'" in (await rsp.json())["message"]


async def test_a_child_left_by_another_installation_or_an_earlier_model_is_never_touched(
    cluster: Any,
) -> None:
    """Our labels and a controller reference to a CaptionModel of this very name, but another uid: the
    child of an earlier ``own`` (deleted with its children orphaned) or of another operator's."""
    labels = {"captionfleet.io/model": "own", "app.kubernetes.io/managed-by": "captionfleet"}
    owner = {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "name": "own",
        "uid": "0b5e55ed-0000-4000-8000-000000000000",
        "controller": True,
    }
    leftover = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "own-v1", "namespace": "ml", "labels": labels, "ownerReferences": [owner]},
        "spec": {"selector": {"app": "old"}, "ports": [{"port": 8080}]},
    }
    await cluster._send("POST", "/api/v1/namespaces/ml/services", leftover)
    before = cluster.get(SERVICES, "own-v1")
    await cluster.create(caption_model("own"))
    await cluster.eventually(lambda: phase(cluster, "own", "Degraded"))
    message = cluster.condition("own", "Ready")["message"]
    assert f"Service own-v1 already exists and belongs to CaptionModel own (uid {owner['uid']})" in message
    await cluster.eventually(lambda: event(cluster, "own", "NameConflict", "Service own-v1"))
    assert cluster.children("own") == {SERVICES: {"own-v1"}}  # nothing of ours applied

    await cluster.delete("own")
    await cluster.eventually(lambda: gone(cluster, "own"))
    assert cluster.get(SERVICES, "own-v1") == before  # not ours: never deleted either


async def test_what_users_and_autoscalers_change_in_our_children_is_kept_and_ours_restored(
    cluster: Any,
) -> None:
    await cluster.create(caption_model("edited"))
    await cluster.eventually(lambda: phase(cluster, "edited", "Pending"))
    deployment = cluster.get(DEPLOYMENTS, "edited-v1")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    containers = copy.deepcopy(deployment["spec"]["template"]["spec"]["containers"])
    containers[0]["image"] = "registry.test/someone/else:1"
    edit = {
        "metadata": {"labels": {"team": "vision"}, "annotations": {"other.io/owner": "ml-platform"}},
        "spec": {"replicas": 3, "template": {"spec": {"containers": containers}}},  # the HPA scaled it
    }
    await cluster._send(
        "PATCH", "/apis/apps/v1/namespaces/ml/deployments/edited-v1", edit, "application/merge-patch+json"
    )

    await cluster.patch_spec("edited", {"generation": {"numBeams": 2}})
    await cluster.eventually(lambda: reconciled(cluster, "edited", 2))
    after = cluster.get(DEPLOYMENTS, "edited-v1")
    assert after["metadata"]["labels"]["team"] == "vision"
    assert after["metadata"]["annotations"]["other.io/owner"] == "ml-platform"
    assert after["spec"]["replicas"] == 3  # the autoscaler's, not reset by the operator
    assert after["spec"]["template"]["spec"]["containers"][0]["image"] == image  # ours again


async def test_one_name_in_two_namespaces_makes_two_separate_fleets(cluster: Any) -> None:
    ml = await cluster.create(caption_model("twin"), namespace="ml")
    default = await cluster.create(caption_model("twin"), namespace="default")
    for namespace in ("ml", "default"):
        await cluster.eventually(lambda ns=namespace: phase(cluster, "twin", "Pending", ns))
    for namespace, created in (("ml", ml), ("default", default)):
        for name in ("twin-v1", "twin-router"):
            refs = cluster.get(DEPLOYMENTS, name, namespace)["metadata"]["ownerReferences"]
            assert [ref["uid"] for ref in refs] == [created["metadata"]["uid"]]
    kept = {
        name: cluster.get(DEPLOYMENTS, name, "ml")["metadata"]["resourceVersion"]
        for name in ("twin-v1", "twin-router")
    }

    await cluster.delete("twin", namespace="default")
    await cluster.eventually(lambda: gone(cluster, "twin", "default"))
    assert cluster.children("twin", "default") == {}
    assert {
        name: cluster.get(DEPLOYMENTS, name, "ml")["metadata"]["resourceVersion"] for name in kept
    } == kept
    phase(cluster, "twin", "Pending", "ml")


SECRET = "S3cr3t-9f2"
INLINE_CREDENTIALS = {
    "a Redis password alone": (
        {"cache": {"redisUrl": f"redis://:{SECRET}@redis:6379/0"}},
        "spec.cache.redisUrl",
    ),
    "a Redis password as a query parameter": (
        {"cache": {"redisUrl": f"rediss://redis:6380/0?db=0&password={SECRET}"}},
        "spec.cache.redisUrl",
    ),
    "a moderation API key as a query parameter": (
        {"moderation": {"url": f"https://moderation.example.com/check?API_KEY={SECRET}"}},
        "spec.moderation.url",
    ),
}


@pytest.mark.parametrize("case", sorted(INLINE_CREDENTIALS))
async def test_credentials_inline_in_a_url_are_refused_and_never_repeated(
    cluster: Any, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)
    spec, field = INLINE_CREDENTIALS[case]
    await cluster.create(caption_model("inline", **copy.deepcopy(spec)))
    await cluster.eventually(lambda: phase(cluster, "inline", "Invalid"))
    assert f"{field}: holds credentials" in cluster.condition("inline", "Ready")["message"]
    await cluster.eventually(lambda: event(cluster, "inline", "InvalidSpec", "holds credentials"))
    assert cluster.children("inline") == {}
    model = cluster.model("inline")
    assert SECRET not in json.dumps(model["metadata"]) + json.dumps(model["status"])
    assert SECRET not in json.dumps(cluster.events())
    assert "is in progress" in caplog.text  # kopf's DEBUG line with the body, redacted
    assert SECRET not in caplog.text


async def test_a_name_with_dots_is_invalid_and_deleted_cleanly(cluster: Any) -> None:
    """Legal for a CaptionModel (a DNS subdomain), not for the Service named after it."""
    await cluster.create(caption_model("captions.v2"))
    await cluster.eventually(lambda: phase(cluster, "captions.v2", "Invalid"))
    assert "metadata.name 'captions.v2'" in cluster.condition("captions.v2", "Ready")["message"]
    await cluster.eventually(lambda: event(cluster, "captions.v2", "InvalidSpec", "the router's Service"))
    assert cluster.children("captions.v2") == {}
    await cluster.delete("captions.v2")
    await cluster.eventually(lambda: gone(cluster, "captions.v2"))


async def test_a_users_object_with_our_labels_is_neither_pruned_nor_deleted(cluster: Any) -> None:
    labels = {"captionfleet.io/model": "mine", "app.kubernetes.io/managed-by": "captionfleet"}
    users = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "mine-debug", "namespace": "ml", "labels": labels},
        "spec": {"selector": labels, "ports": [{"port": 9000}]},
    }
    await cluster._send("POST", "/api/v1/namespaces/ml/services", users)
    await cluster.create(caption_model("mine", versions=[version("v1", 90), version("v2", 10)]))
    await cluster.eventually(lambda: phase(cluster, "mine", "Pending"))
    await cluster.patch_spec("mine", {"versions": [version("v1")]})  # v2's children are pruned
    await cluster.eventually(lambda: reconciled(cluster, "mine", 2))
    assert cluster.children("mine")[SERVICES] == {"mine", "mine-v1", "mine-debug"}
    await cluster.delete("mine")
    await cluster.eventually(lambda: gone(cluster, "mine"))
    assert cluster.children("mine") == {SERVICES: {"mine-debug"}}


AFFINITY_MISTAKES = {
    "In without values": (node_terms({"key": "gpu", "operator": "In"}), "matchExpressions[0].values"),
    "Exists with values": (
        node_terms({"key": "gpu", "operator": "Exists", "values": ["a"]}),
        "takes no values",
    ),
    "Gt with a word": (
        node_terms({"key": "cores", "operator": "Gt", "values": ["many"]}),
        "one integer value",
    ),
    "an unknown operator": (node_terms({"key": "gpu", "operator": "Like", "values": ["a"]}), "'Like'"),
    "a key with a space": (node_terms({"key": "gpu type", "operator": "Exists"}), "'gpu type'"),
    "no node selector term": (
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "at least one node selector term",
    ),
    "a weight of 0": (
        {
            "podAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 0, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
                ]
            }
        },
        "weight: 0 is not in 1..100",
    ),
    "an empty topologyKey": (
        pod_terms(topologyKey="", labelSelector={"matchLabels": {"app": "x"}}),
        "topologyKey: required",
    ),
    "a bad label value in a selector": (
        pod_terms(topologyKey="zone", labelSelector={"matchLabels": {"app": "not ok"}}),
        "is not a label value",
    ),
}


@pytest.mark.parametrize("mistake", sorted(AFFINITY_MISTAKES))
async def test_an_affinity_the_api_server_refuses_is_invalid_and_nothing_is_applied(
    cluster: Any, mistake: str
) -> None:
    """The upstream schema in the CRD lets these through; before, the Deployments were refused at every
    retry (ApplyFailed) while the router and the rest were applied."""
    affinity, text = AFFINITY_MISTAKES[mistake]
    await cluster.create(caption_model("affinity", affinity=copy.deepcopy(affinity)))
    await cluster.eventually(lambda: phase(cluster, "affinity", "Invalid"))
    message = cluster.condition("affinity", "Ready")["message"]
    assert "spec.affinity." in message and text in message, message
    assert cluster.children("affinity") == {}
    assert await cluster.create_status({"affinity": affinity}) == 422  # a real server refuses it too
