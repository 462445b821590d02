"""The emulated API server itself: where the operator relies on a real server's behaviour."""

from typing import Any

from .conftest import NAMESPACE

APPLY = "application/apply-patch+yaml"
PATH = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/reader?fieldManager=test"


def service_account(mount_token: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "reader", "namespace": NAMESPACE},
        "automountServiceAccountToken": mount_token,
    }


async def test_an_apply_that_changes_nothing_writes_nothing(cluster: Any) -> None:
    created = await cluster._send("PATCH", PATH, service_account(False), APPLY)
    again = await cluster._send("PATCH", PATH, service_account(False), APPLY)
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    changed = await cluster._send("PATCH", PATH, service_account(True), APPLY)
    assert changed["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
    assert cluster.get("v1/serviceaccounts", "reader")["automountServiceAccountToken"] is True


def pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "registry.test/i:1"}], **spec},
    }


def secret_env(key: str) -> dict[str, Any]:
    return {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": key}}}


async def test_pods_are_validated_like_a_real_servers(cluster: Any) -> None:
    pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
    await cluster._send("POST", pods, pod("good"))
    for bad in (
        pod("no-image", containers=[{"name": "c"}]),
        pod("bad-toleration", tolerations=[{"operator": "Exists", "value": "v"}]),
        pod("bad-selector", nodeSelector={"gpu type": "a100"}),
        pod(
            "dot-key",
            volumes=[{"name": "k", "secret": {"secretName": "s", "items": [{"key": "..", "path": ".."}]}}],
        ),
        pod(
            "dot-env-key", containers=[{"name": "c", "image": "registry.test/i:1", "env": [secret_env(".")]}]
        ),
        pod(
            "int32",
            containers=[{"name": "c", "image": "registry.test/i:1", "ports": [{"containerPort": 2**31}]}],
        ),
    ):
        async with cluster.api.request("POST", pods, json=bad) as response:
            assert response.status == 422, (bad["metadata"]["name"], await response.text())
    assert cluster.names("v1/pods") == {"good"}


async def test_lists_select_by_the_fields_the_kind_allows_and_refuse_others(cluster: Any) -> None:
    events = f"/api/v1/namespaces/{NAMESPACE}/events"
    for name, reason in (("a", "FailedMount"), ("b", "Pulled")):
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": NAMESPACE},
            "reason": reason,
        }
        await cluster._send("POST", events, body)
    listed = await cluster._send(
        "GET", f"{events}?fieldSelector=involvedObject.kind=Pod,reason=FailedMount", None
    )
    assert [item["metadata"]["name"] for item in listed["items"]] == ["a"]
    listed = await cluster._send("GET", f"{events}?fieldSelector=reason!=FailedMount", None)
    assert [item["metadata"]["name"] for item in listed["items"]] == ["b"]
    async with cluster.api.request("GET", f"{events}?fieldSelector=message=x") as response:
        assert response.status == 400
        assert "field label not supported" in (await response.json())["message"]


async def send(cluster: Any, path: str, body: Any) -> tuple[int, str]:
    async with cluster.api.request("PATCH", path, json=body, headers={"Content-Type": APPLY}) as response:
        return response.status, await response.text()


async def test_kedas_kinds_are_checked_against_their_schemas(cluster: Any) -> None:
    cluster.api.install_keda()
    base = f"/apis/keda.sh/v1alpha1/namespaces/{NAMESPACE}"
    trigger = {
        "type": "redis-streams",
        "metadata": {"address": "redis:6379", "stream": "s", "streamLength": 5},
    }
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "so", "namespace": NAMESPACE},
        "spec": {"scaleTargetRef": {"name": "web"}, "triggers": [trigger]},
    }
    path = f"{base}/scaledobjects/so?fieldManager=test"
    status, text = await send(cluster, path, scaled)
    assert status == 422 and "is not of type 'string'" in text  # KEDA's trigger metadata: strings only
    trigger["metadata"]["streamLength"] = "5"
    assert (await send(cluster, path, scaled))[0] in (200, 201)
    auth = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "ta", "namespace": NAMESPACE},
        "spec": {"secretTargetRef": [{"parameter": "password", "name": "queue"}]},  # no key
    }
    status, text = await send(cluster, f"{base}/triggerauthentications/ta?fieldManager=test", auth)
    assert status == 422 and "'key' is a required property" in text


async def test_server_side_apply_keeps_other_managers_fields_and_drops_the_appliers_own(cluster: Any) -> None:
    account = service_account(False)
    account["metadata"]["labels"] = {"ours": "1", "dropped-later": "1"}
    await cluster._send("PATCH", PATH, account, APPLY)
    user_edit = {"metadata": {"labels": {"team": "vision"}, "annotations": {"other.io/note": "keep"}}}
    await cluster._send(
        "PATCH", PATH.split("?")[0], user_edit, "application/merge-patch+json"
    )  # kubectl label / annotate
    account["metadata"]["labels"] = {"ours": "2"}
    stored = await cluster._send("PATCH", PATH, account, APPLY)
    assert stored["metadata"]["labels"] == {"ours": "2", "team": "vision"}
    assert stored["metadata"]["annotations"] == {"other.io/note": "keep"}
    # Another applier's fields are its own: this one's earlier apply does not remove them.
    other = PATH.replace("fieldManager=test", "fieldManager=other")
    await cluster._send(
        "PATCH",
        other,
        {**service_account(False), "metadata": {**account["metadata"], "labels": {"x": "1"}}},
        APPLY,
    )
    assert cluster.get("v1/serviceaccounts", "reader")["metadata"]["labels"] == {
        "ours": "2",
        "team": "vision",
        "x": "1",
    }


async def test_a_deployments_selector_cannot_change(cluster: Any) -> None:
    deployments = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
    labels = {"app": "a"}
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    await cluster._send("PATCH", f"{deployments}/d?fieldManager=test", body, APPLY)
    body["spec"]["selector"] = {"matchLabels": {"app": "a", "extra": "1"}}
    body["spec"]["template"]["metadata"]["labels"] = {"app": "a", "extra": "1"}
    async with cluster.api.request(
        "PATCH", f"{deployments}/d?fieldManager=test", json=body, headers={"Content-Type": APPLY}
    ) as response:
        assert response.status == 422 and "field is immutable" in await response.text()


async def test_a_json_patch_that_does_not_apply_is_422_as_kopf_expects(cluster: Any) -> None:
    """kopf removes its finalizer with a JSON patch testing the resourceVersion first; a real server
    answers a failed test with 422 (kopf: try again next cycle), never a 500 (kopf: retry for a minute)."""
    created = await cluster._send("PATCH", PATH, service_account(False), APPLY)
    path = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/reader"
    stale = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": created["metadata"]["resourceVersion"] + "0",
        },
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
    ]
    missing = [{"op": "replace", "path": "/metadata/annotations/nothing", "value": "x"}]
    for ops in (stale, missing):
        async with cluster.api.request(
            "PATCH", path, json=ops, headers={"Content-Type": "application/json-patch+json"}
        ) as response:
            body = await response.json()
        assert (response.status, body.get("reason")) == (422, "Invalid"), body
    assert "labels" not in cluster.get("v1/serviceaccounts", "reader")["metadata"]
    fresh = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]}
    ]
    await cluster._send("PATCH", path, [*fresh, *stale[1:]], "application/json-patch+json")
    assert cluster.get("v1/serviceaccounts", "reader")["metadata"]["labels"] == {"a": "b"}
