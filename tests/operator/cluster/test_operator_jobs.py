"""The real kopf operator against the emulated API server: a fleet with the job API, its queue handed
to the runtimes by reference and its backlog watched by KEDA, and both taken away again."""

from __future__ import annotations

from typing import Any

DEPLOYMENTS = "apps/v1/deployments"
SCALED_OBJECTS = "keda.sh/v1alpha1/scaledobjects"
TRIGGER_AUTHENTICATIONS = "keda.sh/v1alpha1/triggerauthentications"
JOBS = {
    "redisUrlSecret": {"name": "queue", "key": "url"},
    "redisAddress": "redis.data.svc:6379",
    "redisPasswordSecret": {"name": "queue", "key": "password"},
}


def observed(cluster: Any, name: str, generation: int) -> None:
    status = cluster.status(name)
    assert status.get("observedGeneration") == generation and status.get("phase") == "Pending", status


def runtime_env(cluster: Any, name: str) -> dict[str, Any]:
    container = cluster.get(DEPLOYMENTS, name)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


async def test_jobs_reach_the_runtimes_and_keda_watches_their_backlog(cluster: Any, operator: None) -> None:
    cluster.api.install_keda()
    await cluster.apply_example("minimal.yaml")
    await cluster.eventually(lambda: observed(cluster, "captions", 1))
    await cluster.patch_spec("captions", {"autoscaling": {"provider": "keda"}, "jobs": JOBS})
    await cluster.eventually(lambda: observed(cluster, "captions", 2))

    env = runtime_env(cluster, "captions-v1")
    assert env["CAPTIONFLEET_JOBS_REDIS_URL"] == {"secretKeyRef": {"name": "queue", "key": "url"}}
    assert env["CAPTIONFLEET_JOBS_STREAM"] == "captionfleet:jobs:ml:captions:v1"
    triggers = cluster.get(SCALED_OBJECTS, "captions-v1")["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus", "cpu", "redis-streams"]
    assert triggers[2]["metadata"]["stream"] == env["CAPTIONFLEET_JOBS_STREAM"]
    assert triggers[2]["authenticationRef"] == {"name": "captions-v1"}
    auth = cluster.get(TRIGGER_AUTHENTICATIONS, "captions-v1")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "queue", "key": "password"}]
    assert auth["metadata"]["ownerReferences"][0]["kind"] == "CaptionModel"

    # No password: KEDA's credentials are pruned, the trigger stays without them.
    await cluster.patch_spec("captions", {"jobs": {"redisPasswordSecret": None}})
    await cluster.eventually(lambda: observed(cluster, "captions", 3))
    assert TRIGGER_AUTHENTICATIONS not in cluster.children("captions")
    assert "authenticationRef" not in cluster.get(SCALED_OBJECTS, "captions-v1")["spec"]["triggers"][2]

    # No jobs: neither the runtimes' variables nor the backlog trigger are left behind.
    await cluster.patch_spec("captions", {"jobs": None})
    await cluster.eventually(lambda: observed(cluster, "captions", 4))
    assert not any(name.startswith("CAPTIONFLEET_JOBS") for name in runtime_env(cluster, "captions-v1"))
    assert len(cluster.get(SCALED_OBJECTS, "captions-v1")["spec"]["triggers"]) == 2


async def test_jobs_with_keda_but_no_address_are_invalid_and_change_nothing(
    cluster: Any, operator: None
) -> None:
    cluster.api.install_keda()
    await cluster.apply_example("minimal.yaml")
    await cluster.eventually(lambda: observed(cluster, "captions", 1))
    before = runtime_env(cluster, "captions-v1")
    await cluster.patch_spec(
        "captions", {"autoscaling": {"provider": "keda"}, "jobs": {"redisUrlSecret": JOBS["redisUrlSecret"]}}
    )

    def invalid() -> None:
        assert cluster.status("captions").get("phase") == "Invalid"
        assert "spec.jobs.redisAddress" in cluster.condition("captions", "Ready")["message"]

    await cluster.eventually(invalid)
    assert runtime_env(cluster, "captions-v1") == before
