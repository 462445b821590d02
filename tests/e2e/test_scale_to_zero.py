"""Scale to zero, end to end: the real operator, router and runtime processes of the harness.

One version of the bundled model with ``minReplicas: 0`` and a short ``scaleToZeroAfter``. The test
watches it go to 0 pods when idle, wakes it with 20 concurrent requests (all answered with their own
captions; the time from the first request to its answer is printed), then, with the kubelet playing
a slow node, sends more requests than ``maxHeld``: the excess is refused at once with 503
``cold_start`` and a Retry-After, and the version is not scaled back to zero while its pod stays
Pending longer than ``scaleToZeroAfter`` with requests waiting for it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiohttp
import pytest

harness = sys.modules["captionfleet_e2e_harness"]

pytestmark = pytest.mark.e2e

NAME = "captions"
VERSION = f"{NAME}-v1"
IDLE_S = 3
MAX_HELD = 24
HPAS = "autoscaling/v2/horizontalpodautoscalers"
DEPLOYMENTS = "apps/v1/deployments"


def model(**more: Any) -> dict[str, Any]:
    spec = {
        "versions": [{"name": "v1", "model": "file:///opt/captionfleet/models/scenes-blip-tiny"}],
        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": f"{IDLE_S}s"},
        # Two shared CPUs start a runtime process (torch's import, the model) in tens of seconds: the
        # router's deadline (30 s by default; X-Request-Timeout-Ms can only shorten it) is longer, and
        # a request held through the cold start keeps counting it.
        "router": {
            "replicas": 1,
            "requestTimeout": "4m",
            "coldStart": {"maxHeld": MAX_HELD, "timeout": "3m"},
        },
        "generation": {"numBeams": 1, "maxNewTokens": 8},
        **more,
    }
    return {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": NAME},
        "spec": spec,
    }


def version_status(fleet: Any) -> dict[str, Any]:
    return next((v for v in fleet.status(NAME).get("versions") or [] if v["name"] == "v1"), {})


def replicas(fleet: Any) -> Any:
    return (fleet.get(DEPLOYMENTS, VERSION) or {}).get("spec", {}).get("replicas")


def at_zero(fleet: Any) -> bool:
    deployment = fleet.get(DEPLOYMENTS, VERSION) or {}
    return (
        version_status(fleet).get("state") == "Idle"
        and deployment.get("spec", {}).get("replicas") == 0
        and not fleet.kubelet.pods.get(VERSION)
        and fleet.get(HPAS, VERSION) is None
    )


async def router_sees_zero(fleet: Any, router: str) -> None:
    """Until the router's table has no ready endpoint of v1 (it watches the EndpointSlices)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        table = {v["version"]: bool(v.get("ready")) for v in (await fleet.routes(router)).get("models", [])}
        if table.get("v1") is False:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the router still routes to a pod of v1")


async def caption(http: aiohttp.ClientSession, router: str, image: bytes) -> tuple[int, dict[str, Any], Any]:
    async with http.post(router + "/v1/caption", data=image, headers={"Content-Type": "image/png"}) as answer:
        return answer.status, dict(await answer.json(content_type=None)), answer.headers.get("Retry-After")


async def start(fleet: Any, manifest: dict[str, Any]) -> str:
    """The fleet's router URL, once its version has been scaled to zero (never ready: it is idle)."""
    fleet.start_kubelet()
    fleet.operator.start()
    await fleet.create(manifest)
    return str(await fleet.router_url(NAME))


async def test_idle_to_zero_woken_by_held_requests_bounded_and_kept_while_pending(fleet: Any) -> None:
    from captionfleet.runtime.server.testing import encode, shapes_image

    images = [encode(shapes_image(index)) for index in range(MAX_HELD + 6)]
    router = await start(fleet, model())

    # idle: 0 pods, no HPA, and the status says so
    await fleet.eventually(lambda: at_zero(fleet), 180, "the idle version at 0 pods")
    assert version_status(fleet)["reason"] == "ScaledToZero"
    await fleet.eventually(lambda: fleet.events(NAME, "ScaledToZero"), 30, "the ScaledToZero Event")
    await router_sees_zero(fleet, router)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        # 20 concurrent requests at zero: all held, then answered with their own captions
        started = time.monotonic()
        first = asyncio.ensure_future(caption(http, router, images[0]))
        rest = [asyncio.ensure_future(caption(http, router, image)) for image in images[1:20]]
        await fleet.eventually(lambda: replicas(fleet) == 1, 30, "the first replica asked for")
        asked_s = time.monotonic() - started
        status, body, _ = await first
        first_answer_s = time.monotonic() - started
        answers = [(status, body, None), *await asyncio.gather(*rest)]
        print(
            f"\ncold start: first replica asked for after {asked_s:.2f} s, "
            f"first answer after {first_answer_s:.2f} s"
        )
        assert [s for s, _, _ in answers] == [200] * 20, answers
        warm = [await caption(http, router, image) for image in images[:20]]
        assert [b["caption"] for _, b, _ in answers] == [b["caption"] for _, b, _ in warm]
        await fleet.eventually(lambda: version_status(fleet).get("state") == "Ready", 30, "the version Ready")

        # back to zero, then a slow node: the pod stays Pending for 4 x scaleToZeroAfter
        await fleet.eventually(lambda: at_zero(fleet), 120, "the version at 0 pods again")
        await router_sees_zero(fleet, router)
        fleet.kubelet.start_delays[VERSION] = 4 * IDLE_S
        sent = time.monotonic()
        tasks = [asyncio.ensure_future(caption(http, router, image)) for image in images]
        done_first, _ = await asyncio.wait(tasks, timeout=IDLE_S * 2)
        refused = [t.result() for t in done_first]
        assert len(refused) == len(images) - MAX_HELD, refused
        for status, body, retry_after in refused:
            assert status == 503 and body["error"]["code"] == "cold_start" and int(retry_after) >= 1
        # Pending longer than scaleToZeroAfter while requests wait: never scaled back to zero
        while time.monotonic() - sent < 3 * IDLE_S:
            assert version_status(fleet).get("state") != "Idle"
            assert replicas(fleet) == 1
            await asyncio.sleep(0.1)
        held = await asyncio.gather(*(t for t in tasks if t not in done_first))
        assert [s for s, _, _ in held] == [200] * MAX_HELD, held


async def test_with_redis_a_repeat_is_answered_at_zero_and_wakes_no_pod(fleet: Any, tmp_path: Any) -> None:
    from captionfleet.runtime.server.testing import RedisProcess, encode, shapes_image

    redis = RedisProcess(tmp_path)
    try:
        router = await start(fleet, model(cache={"redisUrl": redis.url}))
        image = encode(shapes_image(7))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            await fleet.eventually(lambda: at_zero(fleet), 180, "the idle version at 0 pods")
            await router_sees_zero(fleet, router)
            status, first, _ = await caption(http, router, image)  # wakes it: captioned by a pod
            assert status == 200 and first["cached"] is False, first
            await fleet.eventually(lambda: at_zero(fleet), 120, "the version at 0 pods again")
            await router_sees_zero(fleet, router)
            pods_started = fleet.kubelet.started[VERSION]
            status, repeat, _ = await caption(http, router, image)
        assert status == 200 and repeat["cached"] is True, repeat
        assert repeat["caption"] == first["caption"] and repeat["model_version"] == "v1"
        # a few demand polls (250 ms) later, still at zero: nothing was held, nothing woken
        until = time.monotonic() + 2
        while time.monotonic() < until:
            assert version_status(fleet)["state"] == "Idle" and replicas(fleet) == 0
            await asyncio.sleep(0.1)
        assert fleet.kubelet.started[VERSION] == pods_started
    finally:
        redis.stop()
