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
