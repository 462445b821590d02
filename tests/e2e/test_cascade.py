"""The cascade end to end: the real operator, real runtimes of both bundled models and the real router.

The CaptionModel asks for a target escalation rate: the operator must resolve the threshold from the
fast model's calibration (read from its runtime) and the router apply it; then held-out scenes through
the router must be answered by the quality version when the fast confidence is below the threshold
(marked escalated, with the fast confidence) and by the fast one otherwise, and the operator must show
the per-tier figures in ``status.cascade``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from captionfleet.bench.cascade import held_out_scenes
from captionfleet.operator.cascade import threshold_from_calibration

pytestmark = pytest.mark.e2e

NAME = "cascaded"
MODELS = Path(__file__).resolve().parents[2] / "runtime" / "models"
RATE = 0.3
SCENES = 16


def manifest() -> dict[str, Any]:
    return {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": NAME},
        "spec": {
            "versions": [
                {"name": "fast", "model": "file:///opt/captionfleet/models/scenes-blip-fast", "weight": 50},
                {
                    "name": "quality",
                    "model": "file:///opt/captionfleet/models/scenes-blip-tiny",
                    "weight": 50,
                },
            ],
            "cascade": {"fast": "fast", "quality": "quality", "targetEscalationRate": RATE},
            "autoscaling": {"provider": "none", "minReplicas": 1, "maxReplicas": 1},
            "router": {"replicas": 1},
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


async def test_unsure_requests_are_answered_by_the_quality_model(fleet: Any) -> None:
    calibration = json.loads((MODELS / "scenes-blip-fast" / "calibration.json").read_text())
    expected, _ = threshold_from_calibration(calibration, RATE)
    fleet.start_kubelet()
    fleet.operator.start()
    await fleet.create(manifest())
    router = await fleet.router_url(NAME)

    async def resolved() -> dict[str, Any] | None:
        try:
            found = await fleet.routes(router)
        except (aiohttp.ClientError, ValueError):
            return None
        ready = {m["version"] for m in found.get("models", []) if m.get("ready")}
        cascade = found.get("cascade") or {}
        return found if ready == {"fast", "quality"} and cascade.get("threshold") is not None else None

    table = await until(fleet, resolved, 180, "both tiers routed and the threshold resolved")
    threshold = table["cascade"]["threshold"]
    assert threshold == pytest.approx(expected) and fleet.status(NAME)["cascade"]["threshold"] == threshold

    async def threshold_events() -> list[str]:  # posted after the status patch the router reads
        return [e[2] for e in fleet.events(NAME, "CascadeThreshold")]

    assert str(threshold) in (await until(fleet, threshold_events, 30, "the CascadeThreshold Event"))[0]
    outcomes = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for image, _ in held_out_scenes(SCENES):
            body = await caption(http, router, image)
            marker = body["cascade"]
            unsure = marker["fast_confidence"] < threshold
            assert marker["escalated"] is unsure, body
            assert body["model_version"] == ("quality" if unsure else "fast"), body
            if not unsure:
                assert body["confidence"] == marker["fast_confidence"]  # the fast model's own answer
            outcomes.append(unsure)
    assert any(outcomes) and not all(outcomes), outcomes  # both paths taken
    escalated = sum(outcomes)

    def figures() -> dict[str, Any] | None:
        shown = (fleet.status(NAME).get("cascade") or {}).get("figures") or {}
        return (
            shown if shown.get("requests", 0) >= SCENES and shown.get("escalated", 0) >= escalated else None
        )

    shown = await fleet.eventually(figures, 60, "the cascade's figures in the status")
    assert shown["escalated"] == escalated and shown["escalationRate"] == pytest.approx(escalated / SCENES)
    assert shown["fast"]["requests"] == SCENES and shown["fast"]["p50Ms"] is not None
    assert shown["quality"]["requests"] == escalated and shown["quality"]["p99Ms"] is not None
