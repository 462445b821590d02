"""The one mapping from a fleet's pods (and the kubelet's FailedMount Events) to why a version does not
start (operator/pods.py), with the kubelet's and the scheduler's own words as input."""

from __future__ import annotations

from typing import Any

import pytest

from captionfleet.names import COMPONENT_LABEL, VERSION_LABEL
from captionfleet.operator import events, pods, spec
from captionfleet.operator.pods import PodProblem, SecretUse

IMAGE = "registry.test/runtime:1"
USES = [
    SecretUse("api-keys", "keys", "auth.secretName", volume="auth"),
    SecretUse("redis", "url", "cache.redisUrlSecret"),
]


def pod(
    name: str = "fleet-v1-abc",
    version: str | None = "v1",
    *,
    containers: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    scheduled: dict[str, Any] | None = None,
    ready: bool = False,
    **meta: Any,
) -> dict[str, Any]:
    labels = {COMPONENT_LABEL: "runtime" if version else "router"}
    if version:
        labels[VERSION_LABEL] = version
    conditions = [scheduled or {"type": "PodScheduled", "status": "True"}]
    conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    status: dict[str, Any] = {"phase": "Pending", "conditions": conditions}
    if containers is not None:
        status["containerStatuses"] = containers
    if init is not None:
        status["initContainerStatuses"] = init
    return {"metadata": {"name": name, "labels": labels, **meta}, "status": status}


def waiting(reason: str, message: str = "", name: str = "runtime") -> dict[str, Any]:
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    return {"name": name, "image": IMAGE, "ready": False, "restartCount": 0, "state": state}


CASES = {
    **{  # the kubelet's words, and the API server's
        f"env Secret missing ({noun})": (
            waiting("CreateContainerConfigError", f'{noun} "redis" not found'),
            PodProblem(pods.SECRET_MISSING, "Secret redis not found (cache.redisUrlSecret) (key url)"),
        )
        for noun in ("secret", "secrets")
    },
    "env Secret key missing": (
        waiting("CreateContainerConfigError", "couldn't find key url in Secret ml/redis"),
        PodProblem(pods.SECRET_MISSING, "Secret redis has no key url (cache.redisUrlSecret)"),
    ),
    "a Secret no field of the spec names": (
        waiting("CreateContainerConfigError", 'secret "other" not found'),
        PodProblem(pods.SECRET_MISSING, "Secret other not found"),
    ),
    "a missing ConfigMap": (
        waiting("CreateContainerConfigError", 'configmap "settings" not found'),
        PodProblem(pods.CONTAINER_CONFIG_ERROR, "container runtime", 'configmap "settings" not found'),
    ),
    "image pull refused": (
        waiting("ErrImagePull", "rpc error: code = NotFound desc = not found"),
        PodProblem(
            pods.IMAGE_PULL_FAILED,
            f"image {IMAGE} cannot be pulled",
            "rpc error: code = NotFound desc = not found",
        ),
    ),
    "image pull backing off": (
        waiting("ImagePullBackOff", f'Back-off pulling image "{IMAGE}"'),
        PodProblem(pods.IMAGE_PULL_FAILED, f"image {IMAGE} cannot be pulled"),
    ),
    "a container that is only starting": (waiting("ContainerCreating"), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_waiting_reason_maps_to_one_problem_naming_what_is_wrong(case: str) -> None:
    container, expected = CASES[case]
    assert pods.container_problem(container, USES) == expected
    assert pods.pod_problems(pod(containers=[container]), (), USES) == ([expected] if expected else [])


def test_a_crashing_model_download_and_a_crashing_runtime() -> None:
    terminated = {"exitCode": 1, "reason": "Error", "message": "401 Client Error: repository not found\n"}
    crash = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": terminated}}
    found = pods.pod_problems(
        pod(init=[{"name": "fetch-model", **crash}], containers=[waiting("PodInitializing")])
    )
    assert found == [
        PodProblem(
            pods.MODEL_DOWNLOAD_FAILING,
            "container fetch-model keeps failing (exit code 1)",
            "401 Client Error: repository not found",
        )
    ]
    oom = {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    }
    assert pods.pod_problems(pod(containers=[{"name": "runtime", **oom}])) == [
        PodProblem(pods.CONTAINER_FAILING, "container runtime keeps failing (exit code 137)", "OOMKilled")
    ]


def test_an_unschedulable_pod_says_what_the_scheduler_said() -> None:
    said = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": said}
    assert pods.pod_problems(pod(scheduled=condition)) == [
        PodProblem(pods.UNSCHEDULABLE, "pods cannot be scheduled", said)
    ]
    # Not yet looked at by the scheduler: nothing to say.
    assert pods.pod_problems(pod(scheduled={"type": "PodScheduled", "status": "False"})) == []


MOUNTS = {
    'MountVolume.SetUp failed for volume "auth" : secret "api-keys" not found': PodProblem(
        pods.SECRET_MISSING, "Secret api-keys not found (auth.secretName) (key keys)"
    ),
    'MountVolume.SetUp failed for volume "auth" : references non-existent secret key: keys': PodProblem(
        pods.SECRET_MISSING, "Secret api-keys has no key keys (auth.secretName)"
    ),
    'MountVolume.SetUp failed for volume "model" : mount failed: exit status 32': PodProblem(
        pods.VOLUME_MOUNT_FAILED,
        "volume model cannot be mounted",
        'MountVolume.SetUp failed for volume "model" : mount failed: exit status 32',
    ),
}


@pytest.mark.parametrize("message", sorted(MOUNTS))
def test_a_volume_that_cannot_be_mounted_is_named_from_the_kubelets_events(message: str) -> None:
    creating = pod(containers=[waiting("ContainerCreating")])
    events = [
        {
            "involvedObject": {"kind": "Pod", "name": "fleet-v1-abc"},
            "reason": "FailedMount",
            "message": message,
        },
        {
            "involvedObject": {"kind": "Pod", "name": "fleet-v1-abc"},
            "reason": "FailedMount",
            "message": message,
        },
        {
            "involvedObject": {"kind": "Pod", "name": "fleet-v1-abc"},
            "reason": "FailedMount",
            "message": "Unable to attach or mount volumes: unmounted volumes=[auth]: timed out waiting",
        },
        {"involvedObject": {"kind": "Pod", "name": "other"}, "reason": "FailedMount", "message": "x"},
        {"involvedObject": {"kind": "Pod", "name": "fleet-v1-abc"}, "reason": "Pulled", "message": "y"},
    ]
    failures = pods.mount_failures(events)
    assert failures["fleet-v1-abc"] == [message]  # once, without the summary line
    assert pods.needs_mount_events([creating])
    assert pods.problems_by_version([creating], failures, USES) == {"v1": [MOUNTS[message]]}
    # Once a container ran, the volumes were mounted: old Events say nothing any more.
    started = pod(containers=[{"name": "runtime", "state": {"running": {}}}])
    assert not pods.needs_mount_events([started])
    assert pods.problems_by_version([started], failures, USES) == {}


def test_ready_and_terminating_pods_have_no_problem() -> None:
    broken = [waiting("ErrImagePull", "denied")]
    assert pods.pod_problems(pod(containers=broken, ready=True)) == []
    assert pods.pod_problems(pod(containers=broken, deletionTimestamp="2026-01-01T00:00:00Z")) == []


def test_problems_are_grouped_by_version_once_each_the_router_apart_most_telling_first() -> None:
    secret = waiting("CreateContainerConfigError", 'secret "redis" not found')
    listed = [
        pod("a", containers=[waiting("ImagePullBackOff"), secret]),
        pod("b", containers=[waiting("ErrImagePull", "manifest unknown"), secret]),
        pod(
            "c",
            version="v2",
            scheduled={"type": "PodScheduled", "status": "False", "reason": "Unschedulable"},
        ),
        pod("r", version=None, containers=[waiting("ErrImagePull", "denied", name="router")]),
        {"metadata": {"name": "stray", "labels": {}}, "status": {}},
    ]
    found = pods.problems_by_version(listed, {}, USES)
    assert found == {
        "router": [PodProblem(pods.IMAGE_PULL_FAILED, f"image {IMAGE} cannot be pulled", "denied")],
        "v1": [
            PodProblem(pods.SECRET_MISSING, "Secret redis not found (cache.redisUrlSecret) (key url)"),
            PodProblem(pods.IMAGE_PULL_FAILED, f"image {IMAGE} cannot be pulled", "manifest unknown"),
        ],
        "v2": [PodProblem(pods.UNSCHEDULABLE, "pods cannot be scheduled")],
    }


def test_the_secrets_a_spec_uses_by_the_field_that_names_them() -> None:
    parsed = spec.parse_spec(
        {
            "versions": [{"name": "v1", "model": "file:///m"}],
            "auth": {"secretName": "api-keys", "key": "keys"},
            "cache": {"redisUrlSecret": {"name": "redis", "key": "url"}},
        }
    )
    assert pods.secret_uses(parsed) == USES


def test_every_problem_reason_is_an_event_reason_a_resync_or_check_reports() -> None:
    assert set(pods.POD_REASONS) == events.POD_PROBLEMS <= events.REPAIRS
