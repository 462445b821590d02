"""Status computed from the Deployments: phases, conditions and their transition times."""

from __future__ import annotations

from typing import Any

from captionfleet.operator.events import Reason
from captionfleet.operator.pods import PodProblem
from captionfleet.operator.status import deployment_progress, fleet_status, invalid_status
from captionfleet.operator.traffic import Share

SHARES = [Share("a", "stable", 90), Share("b", "canary", 10)]
SERVICES = {"a": "f-a", "b": "f-b"}


def deployment(ready: int, replicas: int = 2, generation: int = 1, **conditions: Any) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "conditions": [{"type": t, **c} for t, c in conditions.items()],
        },
    }


def compute(
    a: Any, b: Any, router: Any, previous: dict[str, Any] | None = None, now: str = "T1", **extra: Any
) -> Any:
    return fleet_status(
        shares=SHARES,
        deployments={"a": a, "b": b},
        services=SERVICES,
        router=router,
        generation=3,
        endpoint="http://f.ml.svc",
        previous=previous or {},
        now=now,
        **extra,
    )


def conditions(status: Any) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_ready_when_every_weighted_version_and_the_router_are() -> None:
    status = compute(deployment(2), deployment(1, replicas=1), deployment(2))
    assert status.phase == "Ready"
    assert (status.ready_replicas, status.replicas) == (3, 3)
    assert (status.stable_version, status.canary_version, status.canary_weight) == ("a", "b", 10)
    assert conditions(status) == {
        "Ready": ("True", "AllReplicasReady"),
        "Progressing": ("True", "CanaryInRollout"),
        "Degraded": ("False", "AsExpected"),
        "RolledBack": ("False", "NoRollback"),
    }
    assert status.manifest()["versions"][1] == {
        "name": "b",
        "role": "canary",
        "weight": 10,
        "service": "f-b",
        "replicas": 1,
        "readyReplicas": 1,
    }


def test_pending_progressing_and_degraded() -> None:
    assert compute(None, None, None).phase == "Pending"
    assert compute(deployment(0), deployment(0), deployment(1)).phase == "Pending"
    progressing = compute(deployment(2), deployment(0), deployment(1))
    assert progressing.phase == "Progressing"
    assert conditions(progressing)["Progressing"] == ("True", "RollingOut")
    failed = {"status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}
    degraded = compute(deployment(2), deployment(0, Progressing=failed), deployment(1))
    assert degraded.phase == "Degraded"
    assert conditions(degraded)["Degraded"] == ("True", "DeploymentFailed")
    assert "version b: timed out" in next(c.message for c in degraded.conditions if c.type == "Degraded")


def test_a_version_without_traffic_does_not_hold_the_fleet_back() -> None:
    shares = [Share("a", "stable", 100), Share("b", "variant", 0)]
    status = fleet_status(
        shares=shares,
        deployments={"a": deployment(2), "b": deployment(0)},
        services=SERVICES,
        router=deployment(1),
        generation=1,
        endpoint="e",
        previous={},
        now="T",
    )
    assert status.phase == "Ready"


def test_a_rolling_update_is_not_ready_until_observed_and_updated() -> None:
    assert (
        deployment_progress("x", deployment(2, generation=2)).waiting
        == "x: the new pod template is not rolled out yet"
    )
    half = deployment(2, replicas=3)
    half["status"]["updatedReplicas"] = 1
    assert deployment_progress("x", half).waiting == "x: 1/3 replicas updated"


def test_transition_times_change_only_with_the_condition_status() -> None:
    first = compute(deployment(0), deployment(0), deployment(0), now="T1").manifest()
    same = compute(deployment(0), deployment(0), deployment(0), previous=first, now="T2")
    assert {c.last_transition_time for c in same.conditions} == {"T1"}
    ready = compute(deployment(2), deployment(1), deployment(1), previous=first, now="T3")
    times = {c.type: c.last_transition_time for c in ready.conditions}
    assert times == {"Ready": "T3", "Progressing": "T1", "Degraded": "T1", "RolledBack": "T1"}


def test_invalid_keeps_what_runs_and_the_rollback_record() -> None:
    running = compute(deployment(2), deployment(1), deployment(1), now="T1").manifest()
    running["conditions"][3] |= {"status": "True", "reason": "AnalysisFailed", "message": "rolled back b"}
    invalid = invalid_status(message="weights must sum to 100", generation=4, previous=running, now="T2")
    assert invalid.phase == "Invalid" and invalid.observed_generation == 4
    assert [v.name for v in invalid.versions] == ["a", "b"]
    assert invalid.endpoint == "http://f.ml.svc"
    assert conditions(invalid) == {
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
        "Degraded": ("False", "AsExpected"),
        "RolledBack": ("True", "AnalysisFailed"),
    }


def test_pods_that_cannot_start_make_the_fleet_degraded_with_their_reason() -> None:
    missing = PodProblem(Reason.SECRET_MISSING, "Secret redis not found (cache.redisUrlSecret)")
    pull = PodProblem(Reason.IMAGE_PULL_FAILED, "image x cannot be pulled", "denied")
    problems = {"b": [pull], "router": [missing], "gone": [pull]}
    status = compute(deployment(2), deployment(0), deployment(2), pod_problems=problems)
    assert status.phase == "Degraded"
    assert conditions(status)["Ready"] == ("False", "SecretMissing")  # the most telling reason
    assert conditions(status)["Degraded"] == ("True", "SecretMissing")
    message = next(c.message for c in status.conditions if c.type == "Degraded")
    assert message == (
        "router: Secret redis not found (cache.redisUrlSecret); its pods cannot start; "
        "version b: image x cannot be pulled: denied; its pods cannot start"
    )  # a version no longer in the spec is not reported
