"""CaptionModel edits in the middle of a rollout, through the real operator on the emulated API server:
the canary edited, the old stable removed after a promotion, a gated canary that never gets ready, and
the CaptionModel deleted while its quality gate runs. The routers are played as in
``test_operator_rollout.py``."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from .test_operator_rollout import (
    DEPLOYMENTS,
    HPAS,
    NAME,
    events,
    fake_routers,
    manifest,
    metrics_port,
    one_event,
    operator,
    publish,
    rollout,
    start,
    weights,
)

__all__ = ["manifest", "metrics_port", "operator"]  # the fixtures, shared with the rollout tests


@pytest.mark.usefixtures("operator")
async def test_a_canary_edited_mid_rollout_starts_again_and_says_so(
    cluster: Any, manifest: dict[str, Any]
) -> None:
    async with fake_routers(1) as routers:
        routers[0].figures = {"v1": (5, 0), "v2": (5, 0)}  # below minRequests: the rollout holds at 20 %
        await start(cluster, manifest, routers)
        before = rollout(cluster, "Progressing", weight=20)
        assert before["stable"] == "v1"
        edited = copy.deepcopy(manifest["spec"])
        edited["versions"][1]["model"] = "file:///models/v2-fixed"
        await cluster.patch_spec(NAME, edited)
        restarted = await cluster.eventually(lambda: one_event(cluster, "RolloutRestarted"))
        assert restarted[0] == "Warning"
        assert restarted[1].startswith("the rollout of canary v2 (Progressing at 20 %, step 1) starts again")
        after = await cluster.eventually(lambda: _rehashed(cluster, before["specHash"]))
        assert (after["weight"], after["step"], after["failedChecks"]) == (20, 1, 0)


def _rehashed(cluster: Any, old_hash: str) -> dict[str, Any]:
    state = rollout(cluster, "Progressing")
    assert state["specHash"] != old_hash, state
    return state


@pytest.mark.usefixtures("operator")
async def test_removing_the_old_stable_after_a_promotion_keeps_every_other_version(
    cluster: Any, manifest: dict[str, Any]
) -> None:
    three = copy.deepcopy(manifest)
    three["spec"]["versions"] = [
        {"name": "v1", "model": "file:///models/v1", "weight": 60},
        {"name": "ab", "model": "file:///models/ab", "weight": 30},
        {"name": "v2", "model": "file:///models/v2", "weight": 10, "canary": True},
    ]
    async with fake_routers(1) as routers:
        routers[0].figures = {"v1": (500, 0), "v2": (80, 0)}
        await cluster.create(three)
        await cluster.eventually(lambda: rollout(cluster, "Progressing", weight=20))
        for deployment in (f"{NAME}-v1", f"{NAME}-ab", f"{NAME}-v2", f"{NAME}-router"):
            await cluster.roll_out(deployment, replicas=1)
        await publish(cluster, routers)
        await cluster.eventually(lambda: rollout(cluster, "Promoted", drained=True), within=20)
        assert weights(cluster) == {"v1": ("variant", 0), "ab": ("variant", 30), "v2": ("stable", 70)}

        cleaned = copy.deepcopy(three["spec"])
        cleaned["versions"] = [cleaned["versions"][1], {**cleaned["versions"][2], "weight": 70}]
        await cluster.patch_spec(NAME, cleaned)
        await cluster.eventually(lambda: _seen(cluster, 2))
        await cluster.eventually(lambda: f"{NAME}-v1" not in cluster.names(DEPLOYMENTS))
        assert weights(cluster) == {"ab": ("variant", 30), "v2": ("stable", 70)}
        assert {f"{NAME}-ab", f"{NAME}-v2"} <= cluster.names(HPAS)  # ab keeps its autoscaler: not retired
        assert cluster.get(DEPLOYMENTS, f"{NAME}-ab")["spec"].get("replicas") != 0
        assert rollout(cluster, "Promoted")["version"] == "v2"
        assert events(cluster, "RolloutRestarted") == []


def _seen(cluster: Any, generation: int) -> None:
    assert cluster.status(NAME).get("observedGeneration") == generation


def gated(manifest: dict[str, Any], **quality: Any) -> dict[str, Any]:
    body = copy.deepcopy(manifest)
    body["spec"]["rollout"]["qualityGate"] = {"dataset": "builtin:scenes", "minScore": 0.0, **quality}
    return body


@pytest.mark.usefixtures("operator")
async def test_a_gated_canary_that_never_gets_ready_is_rolled_back_after_the_timeout(
    cluster: Any, manifest: dict[str, Any]
) -> None:
    await cluster.create(gated(manifest, timeout="1s"))
    await cluster.eventually(lambda: rollout(cluster, "Progressing"))
    await cluster.roll_out(f"{NAME}-v1", replicas=1)
    await cluster.roll_out(f"{NAME}-v2", replicas=1, ready=0)  # its pod never becomes ready
    failed = await cluster.eventually(lambda: one_event(cluster, "QualityGateFailed"), within=15)
    assert failed[0] == "Warning" and "no ready pod to score within timeout 1s" in failed[1]
    state = rollout(cluster, "RolledBack", reason="QualityGateFailed", weight=0)
    assert state["gate"]["phase"] == "Failed" and state["gate"]["waitingSince"]
    condition = cluster.condition(NAME, "QualityGate")
    assert (condition["status"], condition["reason"]) == ("False", "QualityGateFailed")
    assert weights(cluster) == {"v1": ("stable", 100), "v2": ("canary", 0)}
    await cluster.eventually(lambda: cluster.get(DEPLOYMENTS, f"{NAME}-v2")["spec"].get("replicas") == 0)


async def publish_version(cluster: Any, version: str, port: int) -> None:
    """The EndpointSlice of a version's Service with one ready pod on loopback ``port``."""
    service = f"{NAME}-{version}"
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-0",
            "namespace": "ml",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
    }
    await cluster._send("POST", "/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices", slice_)


@contextlib.asynccontextmanager
async def hanging_pod() -> AsyncIterator[tuple[int, asyncio.Event, list[int]]]:
    """A canary pod that never answers (its model wedged): its port, an Event set by the first
    request, and the count of requests still open (a client that goes away ends its request)."""
    asked, open_requests = asyncio.Event(), [0]

    async def hang(request: web.Request) -> web.Response:
        open_requests[0] += 1
        asked.set()
        try:
            await asyncio.Event().wait()
        finally:
            open_requests[0] -= 1
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v1/caption", hang)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1], asked, open_requests
    finally:
        await runner.cleanup()


@pytest.mark.usefixtures("operator")
async def test_deleting_the_model_while_its_gate_runs_removes_everything_and_ends_the_run(
    cluster: Any, manifest: dict[str, Any]
) -> None:
    async with hanging_pod() as (port, asked, open_requests):
        await cluster.create(gated(manifest, timeout="1h"))
        await cluster.eventually(lambda: rollout(cluster, "Progressing"))
        for version in ("v1", "v2"):
            await cluster.roll_out(f"{NAME}-{version}", replicas=1)
            await publish_version(cluster, version, port)
        async with asyncio.timeout(15):
            await asked.wait()  # the gate's run is under way
        await cluster.delete(NAME)
        await cluster.eventually(lambda: cluster.children(NAME) == {}, within=30)
        await cluster.eventually(lambda: open_requests[0] == 0, within=30)  # the run's requests ended
        await cluster.eventually(
            lambda: NAME not in cluster.names("captionfleet.io/v1alpha1/captionmodels"), within=30
        )
