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
