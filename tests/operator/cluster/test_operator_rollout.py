"""The progressive rollout loop: the real operator, the emulated API server, and the test playing the
router pods (small aiohttp servers answering ``GET /v1/router/stats`` in the router's format, published
as EndpointSlices of the router's Service)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from captionfleet.operator.settings import OperatorSettings

DEPLOYMENTS = "apps/v1/deployments"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
NAME = "captions"


class FakeRouter:
    """One router pod's stats endpoint; ``figures[version] = (requests, errors)`` over any window."""

    def __init__(self) -> None:
        self.figures: dict[str, tuple[int, int]] = {}
        self.windows: list[str] = []
        self.port = 0

    async def stats(self, request: web.Request) -> web.Response:
        self.windows.append(request.query.get("window", ""))
        versions = {}
        for version, (requests, errors) in self.figures.items():
            counts = [0] * (len(BUCKETS_MS) + 1)
            counts[4] = requests  # every request between 50 and 100 ms
            window = {"requests": requests, "errors": errors, "latency_ms": {"counts": counts}}
            versions[version] = {"window": window, "total": window}
        return web.json_response(
            {
                "instance": "test",
                "window_s": int(request.query["window"]),
                "latency_buckets_ms": BUCKETS_MS,
                "versions": versions,
            }
        )


@contextlib.asynccontextmanager
async def fake_routers(count: int) -> AsyncIterator[list[FakeRouter]]:
    routers, runners = [FakeRouter() for _ in range(count)], []
    try:
        for router in routers:
            app = web.Application()
            app.router.add_get("/v1/router/stats", router.stats)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            router.port = runner.addresses[0][1]
            runners.append(runner)
        yield routers
    finally:
        for runner in runners:
            await runner.cleanup()


async def publish(cluster: Any, routers: list[FakeRouter]) -> None:
    """What the EndpointSlice controller does for the router's Service ``captions``: one slice per pod."""
    for index, router in enumerate(routers):
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{NAME}-{index}",
                "namespace": "ml",
                "labels": {"kubernetes.io/service-name": NAME},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": router.port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        }
        await cluster._send("POST", "/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices", slice_)


# The analysis of these tests: checks every 500 ms (the shortest allowed) over a 2 s window.
CHECKS = {"interval": "500ms", "window": "2s", "minRequests": 50, "stepWeight": 20, "maxWeight": 60}
CHECKS |= {"errorRateThreshold": 5, "threshold": 2}


@pytest.fixture
def manifest(canary_model: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return canary_model(NAME, "file:///models/v1", "file:///models/v2", CHECKS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
async def operator(settings: OperatorSettings, metrics_port: int, start_operator: Any) -> AsyncIterator[None]:
    with_metrics = dataclasses.replace(settings, metrics=f"http://127.0.0.1:{metrics_port}/metrics")
    async with start_operator(with_metrics):
        yield


def rollout(cluster: Any, phase: str, **expected: Any) -> dict[str, Any]:
    state = dict(cluster.status(NAME).get("rollout") or {})
    assert state.get("phase") == phase, state
    for key, value in expected.items():
        assert state.get(key) == value, state
    return state


def weights(cluster: Any) -> dict[str, tuple[str, int]]:
    return {v["name"]: (v["role"], v["weight"]) for v in cluster.status(NAME).get("versions", [])}


async def start(cluster: Any, manifest: dict[str, Any], routers: list[FakeRouter]) -> None:
    await cluster.create(copy.deepcopy(manifest))
    await cluster.eventually(lambda: rollout(cluster, "Progressing", weight=20))
    # No traffic for the canary before it has a ready pod.
    assert weights(cluster) == {"v1": ("stable", 100), "v2": ("canary", 0)}
    for deployment in (f"{NAME}-v1", f"{NAME}-v2", f"{NAME}-router"):
        await cluster.roll_out(deployment, replicas=1)
    await cluster.eventually(lambda: _weights_are(cluster, {"v1": ("stable", 80), "v2": ("canary", 20)}))
    await publish(cluster, routers)


def _weights_are(cluster: Any, expected: dict[str, tuple[str, int]]) -> None:
    assert weights(cluster) == expected


def events(cluster: Any, reason: str) -> list[tuple[str, str]]:
    return [(kind, message) for kind, r, message in cluster.event_reasons(NAME) if r == reason]


@pytest.mark.usefixtures("operator")
async def test_a_healthy_canary_steps_up_and_is_promoted(cluster: Any, manifest: dict[str, Any]) -> None:
    async with fake_routers(2) as routers:
        for router in routers:
            router.figures = {"v1": (500, 0), "v2": (40, 0)}  # 80 together: above minRequests
        await start(cluster, manifest, routers)

        await cluster.eventually(lambda: rollout(cluster, "Promoted"), within=15)
        status = cluster.status(NAME)
        assert (status["stableVersion"], status.get("canaryVersion")) == ("v2", None)
        assert weights(cluster) == {"v1": ("variant", 0), "v2": ("stable", 100)}
        assert status["rollout"]["lastCheck"]["requests"] == 80  # both routers' figures, summed
        assert status["rollout"]["lastCheck"]["p99Ms"] == pytest.approx(99.6, abs=0.5)
        promoted = await cluster.eventually(lambda: one_event(cluster, "Promoted"))
        assert promoted[0] == "Normal" and "healthy at 60 %" in promoted[1]
        steps = [message.split(": ")[1].split(" (")[0] for _, message in events(cluster, "CanaryStep")]
        assert steps == ["20 % -> 40 %", "40 % -> 60 %"]
        # the old stable version leaves one check later (the routers move its traffic first): scaled to
        # zero, no autoscaler to bring it back
        await cluster.eventually(lambda: rollout(cluster, "Promoted", drained=True), within=15)
        await cluster.eventually(lambda: _replicas(cluster, f"{NAME}-v1", 0))
        await cluster.eventually(lambda: _no_autoscaler(cluster, f"{NAME}-v1"))
        assert f"{NAME}-v2" in cluster.names(HPAS)
        assert {w for r in routers for w in r.windows} == {"2"}  # the analysis window, in seconds


@pytest.mark.usefixtures("operator")
async def test_an_erroring_canary_is_rolled_back_and_stays_out_until_its_spec_changes(
    cluster: Any, manifest: dict[str, Any], metrics_port: int
) -> None:
    async with fake_routers(2) as routers:
        for router in routers:
            router.figures = {"v1": (500, 0), "v2": (50, 15)}  # 30 % errors
        await start(cluster, manifest, routers)

        await cluster.eventually(lambda: rollout(cluster, "RolledBack", weight=0), within=15)
        status = cluster.status(NAME)
        assert weights(cluster) == {"v1": ("stable", 100), "v2": ("canary", 0)}
        assert status["rollout"]["failedChecks"] == 2
        assert status["rollout"]["lastCheck"] | {"time": None} == {
            "time": None,
            "requests": 100,
            "errors": 30,
            "errorRate": 30.0,
            "p99Ms": pytest.approx(99.5, abs=0.5),
            "verdict": "fail",
        }
        await cluster.eventually(lambda: _phase(cluster, "RolledBack"))
        condition = cluster.condition(NAME, "RolledBack")
        assert (condition["status"], condition["reason"]) == ("True", "ErrorRate")
        assert "error rate 30.00 % > 5 %" in condition["message"]
        rolled_back = await cluster.eventually(lambda: one_event(cluster, "RolledBack"))
        assert rolled_back[0] == "Warning" and "30/100 requests failed" in rolled_back[1]
        assert [kind for kind, _ in events(cluster, "CheckFailed")] == ["Warning"]
        await cluster.eventually(lambda: rollout(cluster, "RolledBack", drained=True), within=15)
        await cluster.eventually(lambda: _replicas(cluster, f"{NAME}-v2", 0))
        await cluster.eventually(lambda: _no_autoscaler(cluster, f"{NAME}-v2"))
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
        assert 'captionfleet_rollbacks_total{captionmodel="captions",namespace="ml",version="v2"} 1.0' in text

        # Still failing, the rolled-back version stays out; a new model for it is a new rollout.
        asked = sum(len(r.windows) for r in routers)
        spec = copy.deepcopy(manifest["spec"])
        spec["versions"][0]["weight"], spec["versions"][1]["weight"] = 80, 20  # not the version's content
        await cluster.patch_spec(NAME, spec)
        await cluster.eventually(lambda: _generation_seen(cluster, 2))
        rollout(cluster, "RolledBack", weight=0)
        assert sum(len(r.windows) for r in routers) <= asked + 1  # no more checks of a rolled-back canary
        for router in routers:
            router.figures = {"v2": (0, 0)}
        spec["versions"][1]["model"] = "file:///models/v2-fixed"
        await cluster.patch_spec(NAME, spec)
        await cluster.eventually(lambda: rollout(cluster, "Progressing", weight=20, failedChecks=0))
        assert weights(cluster) == {"v1": ("stable", 80), "v2": ("canary", 20)}
        assert cluster.condition(NAME, "RolledBack")["status"] == "False"


@pytest.mark.usefixtures("operator")
async def test_low_traffic_never_rolls_back(cluster: Any, manifest: dict[str, Any]) -> None:
    async with fake_routers(1) as routers:
        routers[0].figures = {"v2": (10, 10)}  # every request fails, but 10 < minRequests 50
        await start(cluster, manifest, routers)

        def checked_often() -> None:
            assert len(routers[0].windows) >= 8

        await cluster.eventually(checked_often, within=60)
        state = rollout(cluster, "Progressing", weight=20, failedChecks=0)
        assert state["lastCheck"]["verdict"] == "hold"
        assert "below minRequests 50" in state["message"]
        assert not events(cluster, "RolledBack") and not events(cluster, "CheckFailed")


@pytest.mark.usefixtures("operator")
async def test_the_abort_annotation_rolls_back_at_once_and_is_removed(
    cluster: Any, manifest: dict[str, Any]
) -> None:
    async with fake_routers(1) as routers:
        await start(cluster, manifest, routers)
        path = f"/apis/captionfleet.io/v1alpha1/namespaces/ml/captionmodels/{NAME}"
        patch = {"metadata": {"annotations": {"captionfleet.io/rollout-action": "abort"}}}
        await cluster._send("PATCH", path, patch, "application/merge-patch+json")

        state = await cluster.eventually(lambda: rollout(cluster, "RolledBack", weight=0, reason="Aborted"))
        assert "by hand" in state["message"]
        assert weights(cluster)["v2"] == ("canary", 0)
        annotations = cluster.model(NAME)["metadata"].get("annotations") or {}
        assert "captionfleet.io/rollout-action" not in annotations


def one_event(cluster: Any, reason: str) -> tuple[str, str]:
    found = events(cluster, reason)
    assert len(found) == 1, found
    return found[0]


def _replicas(cluster: Any, name: str, expected: int) -> None:
    assert cluster.get(DEPLOYMENTS, name)["spec"].get("replicas") == expected


def _no_autoscaler(cluster: Any, name: str) -> None:
    assert name not in cluster.names(HPAS)


def _phase(cluster: Any, expected: str) -> None:
    assert cluster.status(NAME).get("phase") == expected, cluster.status(NAME)


def _generation_seen(cluster: Any, generation: int) -> None:
    assert cluster.status(NAME).get("observedGeneration") == generation


@pytest.mark.usefixtures("operator")
async def test_step_weight_100_waits_for_a_ready_canary_and_the_stable_keeps_its_capacity(
    cluster: Any, canary_model: Callable[..., dict[str, Any]]
) -> None:
    checks = CHECKS | {"stepWeight": 100, "maxWeight": 100}
    await cluster.create(canary_model(NAME, "file:///models/v1", "file:///models/v2", checks))
    await cluster.eventually(lambda: rollout(cluster, "Progressing", weight=100))
    # Before the canary has a ready pod, it gets nothing and the stable all of the pool.
    assert weights(cluster) == {"v1": ("stable", 100), "v2": ("canary", 0)}
    ceiling = cluster.get(HPAS, f"{NAME}-v1")["spec"]["maxReplicas"]
    assert ceiling == 4  # autoscaling.maxReplicas (the default) at 100 %
    for deployment in (f"{NAME}-v1", f"{NAME}-v2", f"{NAME}-router"):
        await cluster.roll_out(deployment, replicas=1)
    await cluster.eventually(lambda: _weights_are(cluster, {"v1": ("stable", 0), "v2": ("canary", 100)}))
    # No check has passed yet (no router reports figures): the stable keeps its replica bounds.
    assert cluster.get(HPAS, f"{NAME}-v1")["spec"]["maxReplicas"] == ceiling
    assert rollout(cluster, "Progressing")["step"] == 1  # the first step only


@pytest.mark.usefixtures("operator")
async def test_an_unknown_rollout_action_is_named_as_unknown_and_removed(
    cluster: Any, manifest: dict[str, Any]
) -> None:
    await cluster.create(copy.deepcopy(manifest))
    await cluster.eventually(lambda: rollout(cluster, "Progressing", weight=20))
    path = f"/apis/captionfleet.io/v1alpha1/namespaces/ml/captionmodels/{NAME}"
    patch = {"metadata": {"annotations": {"captionfleet.io/rollout-action": "Restart"}}}
    await cluster._send("PATCH", path, patch, "application/merge-patch+json")

    await cluster.eventually(lambda: one_event(cluster, "RolloutAction"))
    kind, message = one_event(cluster, "RolloutAction")
    assert kind == "Warning" and "unknown rollout action 'restart' ignored" in message, message
    annotations = cluster.model(NAME)["metadata"].get("annotations") or {}
    assert "captionfleet.io/rollout-action" not in annotations
    rollout(cluster, "Progressing", weight=20)  # nothing happened to the rollout
