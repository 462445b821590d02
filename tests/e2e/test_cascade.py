"""The cascade end to end: the real operator, real runtimes of both tiers and the real router.

The CaptionModel starts with a threshold that escalates nothing, the test reads each image's fast
confidence through the router, then sets the threshold between them: the images below it must be
answered by the quality version (marked escalated, with the fast confidence), the others by the fast
one, and the operator must show the per-tier figures in ``status.cascade``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

NAME = "cascaded"
FAST_MODEL = "file:///opt/captionfleet/models/scenes-blip-tiny"
QUALITY_MODEL = "file:///opt/captionfleet/models/scenes-blip-tiny"
CAPM_PATH = f"/apis/captionfleet.io/v1alpha1/namespaces/ml/captionmodels/{NAME}"


def manifest(threshold: float) -> dict[str, Any]:
    return {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": NAME},
        "spec": {
            "versions": [
                {"name": "fast", "model": FAST_MODEL, "weight": 50},
                {"name": "quality", "model": QUALITY_MODEL, "weight": 50},
            ],
            "cascade": {"fast": "fast", "quality": "quality", "confidenceThreshold": threshold},
            "autoscaling": {"provider": "none", "minReplicas": 1, "maxReplicas": 1},
            "router": {"replicas": 1},
            "generation": {"numBeams": 1, "maxNewTokens": 8},
            "rollout": {"analysis": {"interval": "500ms", "window": "60s"}},
        },
    }


async def caption(http: aiohttp.ClientSession, router: str, image: bytes) -> dict[str, Any]:
    async with http.post(
        router + "/v1/caption", data=image, headers={"Content-Type": "image/png"}
    ) as response:
        body = dict(await response.json(content_type=None))
        assert response.status == 200, body
        assert body["model_version"] == response.headers["X-Routed-Version"]
        return body


async def cascade_in_router(fleet: Any, router: str, threshold: float) -> bool:
    try:
        found = (await fleet.routes(router)).get("cascade") or {}
    except (aiohttp.ClientError, ValueError):
        return False
    return bool(found.get("threshold") == threshold)


async def test_unsure_requests_are_answered_by_the_quality_version(fleet: Any, images: list[bytes]) -> None:
    fleet.start_kubelet()
    fleet.operator.start()
    await fleet.create(manifest(0.0))
    router = await fleet.router_url(NAME)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        table = await until(fleet, lambda: _both_ready(fleet, router), 120, "both tiers routed")
        assert table["cascade"] == {
            "fast": ["fast"],
            "quality": ["quality"],
            "threshold": 0.0,
            "signal": "confidence",
        }
        first = [await caption(http, router, image) for image in images]
        assert all(b["model_version"] == "fast" and b["cascade"]["escalated"] is False for b in first)
        confidences = [b["cascade"]["fast_confidence"] for b in first]
        assert confidences == [b["confidence"] for b in first]
        ordered = sorted(confidences)
        threshold = round((ordered[1] + ordered[2]) / 2, 6) if ordered[1] < ordered[2] else ordered[-1] + 1e-3
        await fleet.send(
            "PATCH",
            CAPM_PATH,
            {"spec": {"cascade": {"confidenceThreshold": min(threshold, 1.0)}}},
            content_type="application/merge-patch+json",
        )
        threshold = min(threshold, 1.0)
        await until(fleet, lambda: cascade_in_router(fleet, router, threshold), 60, "the new threshold")
        for image, confidence in zip(images, confidences, strict=True):
            body = await caption(http, router, image)
            unsure = confidence < threshold
            assert body["model_version"] == ("quality" if unsure else "fast"), (confidence, threshold, body)
            assert body["cascade"]["escalated"] is unsure
            assert body["cascade"]["fast_confidence"] == pytest.approx(confidence)
    escalated = sum(c < threshold for c in confidences)

    def figures() -> dict[str, Any] | None:
        shown = (fleet.status(NAME).get("cascade") or {}).get("figures") or {}
        done = shown.get("requests", 0) >= 2 * len(images) and shown.get("escalated", 0) >= escalated
        return shown if done else None

    shown = await fleet.eventually(figures, 60, "the cascade's figures in the status")
    assert shown["fast"]["requests"] >= 2 * len(images) and shown["fast"]["p50Ms"] is not None
    assert shown["quality"]["requests"] >= escalated
    assert fleet.status(NAME)["cascade"]["threshold"] == threshold


async def until(fleet: Any, check: Any, within: float, what: str) -> Any:
    """Poll the coroutine ``check()`` until it returns something truthy, within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        fleet.check()
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")


async def _both_ready(fleet: Any, router: str) -> dict[str, Any] | None:
    try:
        found = await fleet.routes(router)
    except (aiohttp.ClientError, ValueError):
        return None
    ready = {m["version"] for m in found.get("models", []) if m.get("ready")}
    return found if ready == {"fast", "quality"} and found.get("cascade") else None
