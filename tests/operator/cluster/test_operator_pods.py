"""Why a version does not start, read from its pods against the emulated API server with the real
operator (issue 12: a missing API-key or cache Secret showed only Pending). The tests' ``Cluster``
plays the Deployment controller, the scheduler and the kubelet: it creates the pods and reports their
state and Events; the operator reads pods and Events, never a Secret."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from captionfleet.operator.settings import OperatorSettings

from .conftest import caption_model

pytestmark = pytest.mark.usefixtures("operator")


@pytest.fixture
def settings(settings: OperatorSettings) -> OperatorSettings:
    """The operator reads a not-Ready fleet's pods again every 0.5 s (a FailedMount changes no pod)."""
    return dataclasses.replace(settings, pod_check_seconds=0.5)


IMAGE = "registry.test/captionfleet/runtime:1.2.3"


def phase(cluster: Any, name: str, expected: str) -> None:
    assert cluster.status(name).get("phase") == expected, cluster.status(name)


def one_warning(cluster: Any, name: str, reason: str) -> None:
    assert warnings(cluster, name, reason), cluster.event_reasons(name)


def degraded_by(cluster: Any, name: str, reason: str, text: str) -> None:
    status = cluster.status(name)
    assert status.get("phase") == "Degraded", status
    for type_, value in (("Ready", "False"), ("Degraded", "True")):
        condition = cluster.condition(name, type_)
        assert (condition["status"], condition["reason"]) == (value, reason), condition
        assert text in condition["message"], condition


def warnings(cluster: Any, name: str, reason: str) -> list[str]:
    return [m for t, r, m in cluster.event_reasons(name) if t == "Warning" and r == reason]


def pod_lists(cluster: Any) -> int:
    return sum(1 for r in cluster.api.seen() if r.method == "GET" and str(r.url.path).endswith("/pods"))


def no_text(message: str, text: str) -> None:
    assert text not in message, message


def polled_again(cluster: Any, at_least: int) -> None:
    assert pod_lists(cluster) >= at_least


def looked_for_events(cluster: Any, times: int) -> None:
    lists = [r for r in cluster.api.seen() if r.method == "GET" and str(r.url.path).endswith("/events")]
    assert len(lists) >= times


def one_event(cluster: Any, name: str, reason: str) -> None:
    assert any(r == reason for _, r, _ in cluster.event_reasons(name)), cluster.event_reasons(name)


def no_secret_was_read(cluster: Any) -> None:
    touched = [f"{r.method} {r.url.path}" for r in cluster.api.seen() if "secrets" in str(r.url.path)]
    assert touched == []


@pytest.mark.parametrize(
    ("kubelet_says", "expected"),
    [
        ('secret "redis" not found', "version v1: Secret redis not found (cache.redisUrlSecret) (key url)"),
        (
            "couldn't find key url in Secret ml/redis",
            "version v1: Secret redis has no key url (cache.redisUrlSecret)",
        ),
    ],
)
async def test_a_missing_cache_secret_is_named_warned_once_and_cleared_when_the_pods_start(
    cluster: Any, kubelet_says: str, expected: str
) -> None:
    await cluster.create(caption_model("cached", cache={"redisUrlSecret": {"name": "redis", "key": "url"}}))
    await cluster.eventually(lambda: phase(cluster, "cached", "Pending"))
    pods = await cluster.create_pods(
        "cached-v1", cluster.pod_waiting("CreateContainerConfigError", kubelet_says), 2
    )

    await cluster.eventually(lambda: degraded_by(cluster, "cached", "SecretMissing", expected))
    await cluster.eventually(lambda: one_warning(cluster, "cached", "SecretMissing"))
    # The operator goes on reading the pods (the fleet is not Ready), yet warns only once.
    polled = pod_lists(cluster)
    await cluster.eventually(lambda: polled_again(cluster, polled + 3))
    assert len(warnings(cluster, "cached", "SecretMissing")) == 1
    assert expected in warnings(cluster, "cached", "SecretMissing")[0]

    for pod in pods:  # the Secret was created: the kubelet starts the containers
        await cluster.set_pod_status(pod, cluster.pod_running())
    await cluster.roll_out("cached-v1")
    await cluster.roll_out("cached-router")
    await cluster.eventually(lambda: phase(cluster, "cached", "Ready"))
    assert cluster.condition("cached", "Degraded")["status"] == "False"
    no_secret_was_read(cluster)


@pytest.mark.parametrize(
    ("mount_failure", "expected"),
    [
        (
            'MountVolume.SetUp failed for volume "auth" : secret "api-keys" not found',
            "Secret api-keys not found (auth.secretName) (key keys)",
        ),
        (
            'MountVolume.SetUp failed for volume "auth" : references non-existent secret key: keys',
            "Secret api-keys has no key keys (auth.secretName)",
        ),
    ],
)
async def test_a_missing_auth_secret_volume_is_named_from_the_kubelets_events(
    cluster: Any, mount_failure: str, expected: str
) -> None:
    await cluster.create(caption_model("keyed", auth={"secretName": "api-keys", "key": "keys"}))
    await cluster.eventually(lambda: phase(cluster, "keyed", "Pending"))
    await cluster.eventually(lambda: one_event(cluster, "keyed", "Reconciled"))  # the handler is done
    (pod,) = await cluster.create_pods(
        "keyed-router", cluster.pod_waiting("ContainerCreating", container="router")
    )
    # The operator looks at the new pod (created, then its status: two changes, so at most two looks)
    # and finds no Event yet. The pod changes no more: the kubelet says why only in Events, which the
    # operator reads again while the fleet is not Ready.
    await cluster.eventually(lambda: looked_for_events(cluster, times=2))
    await cluster.kubelet_event(pod, "FailedMount", mount_failure)
    summary = (
        "Unable to attach or mount volumes: unmounted volumes=[auth]: timed out waiting for the condition"
    )
    await cluster.kubelet_event(pod, "FailedMount", summary)

    await cluster.eventually(lambda: degraded_by(cluster, "keyed", "SecretMissing", f"router: {expected}"))
    assert "Unable to attach" not in cluster.condition("keyed", "Ready")["message"]
    await cluster.eventually(lambda: one_warning(cluster, "keyed", "SecretMissing"))
    no_secret_was_read(cluster)


async def test_image_pulls_scheduling_and_model_downloads_say_why_a_version_is_not_ready(
    cluster: Any,
) -> None:
    versions = [
        {"name": "v1", "model": "file:///opt/models/v1", "weight": 50},
        {"name": "v2", "model": "hf://org/blip@main", "weight": 30},
        {"name": "v3", "model": "file:///opt/models/v3", "weight": 20},
    ]
    await cluster.create(caption_model("why", versions=versions))
    await cluster.eventually(lambda: phase(cluster, "why", "Pending"))
    pull = 'rpc error: code = NotFound desc = failed to pull and unpack image "registry.test/x:1": not found'
    await cluster.create_pods("why-v1", cluster.pod_waiting("ErrImagePull", pull, image=IMAGE))
    await cluster.create_pods(
        "why-v2", cluster.pod_crashing("fetch-model", 1, "401 Client Error: repository not found", init=True)
    )
    gpu = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"
    await cluster.create_pods("why-v3", cluster.pod_unschedulable(gpu))

    def reported() -> None:
        degraded_by(cluster, "why", "ImagePullFailed", f"version v1: image {IMAGE} cannot be pulled: {pull}")
        message = cluster.condition("why", "Degraded")["message"]
        assert "version v2: container fetch-model keeps failing (exit code 1): 401 Client Error" in message
        assert f"version v3: pods cannot be scheduled: {gpu}" in message

    await cluster.eventually(reported)
    for reason in ("ImagePullFailed", "ModelDownloadFailing", "Unschedulable"):
        await cluster.eventually(lambda r=reason: one_warning(cluster, "why", r))

    # ErrImagePull and ImagePullBackOff alternate at every retry: still one Warning.
    (pod,) = {name for name in cluster.names("v1/pods") if name.startswith("why-v1-")}
    await cluster.set_pod_status(
        pod, cluster.pod_waiting("ImagePullBackOff", f'Back-off pulling image "{IMAGE}"', image=IMAGE)
    )
    await cluster.eventually(lambda: no_text(cluster.condition("why", "Ready")["message"], pull))
    assert len(warnings(cluster, "why", "ImagePullFailed")) == 1


# (Here because this file's operator reads pods on a timer, the clock below.)
async def test_without_a_canary_the_analysis_asks_nobody_for_figures(cluster: Any) -> None:
    await cluster.create(caption_model("quiet", rollout={"analysis": {"interval": "500ms"}}))
    await cluster.eventually(lambda: phase(cluster, "quiet", "Pending"))
    # The pod check, every 0.5 s while the fleet is not Ready, is the clock: six of them are at least
    # six analysis intervals.
    start = pod_lists(cluster)
    await cluster.eventually(lambda: polled_again(cluster, start + 6), within=30)
    asked = [str(r.url.path) for r in cluster.api.seen() if "endpointslices" in str(r.url.path)]
    assert asked == []  # the router pods whose figures a check would read were never looked up
