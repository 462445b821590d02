"""The cascade in the operator: validation, tiers, the threshold from a calibration, the status and
the routers' figures summed."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from captionfleet import names
from captionfleet.operator import cascade, cascade_check, validation
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.settings import OperatorSettings
from captionfleet.operator.spec import parse_spec
from captionfleet.runtime.web.testing import base_url, start_fake_peer

CONFIG = ClusterConfig(OperatorSettings(default_runtime_image="registry.test/runtime:1"))


def v(name: str, weight: int, **more: Any) -> dict[str, Any]:
    return {"name": name, "model": f"hf://org/{name}", "weight": weight, **more}


def spec_of(cascade_spec: dict[str, Any], *versions: dict[str, Any]) -> dict[str, Any]:
    return {"versions": list(versions) or [v("f", 40), v("q", 60)], "cascade": cascade_spec}


@pytest.mark.parametrize(
    ("cascade_spec", "versions", "message"),
    [
        (
            {"fast": "x", "quality": "q", "confidenceThreshold": 0.5},
            (),
            "spec.cascade.fast: 'x' is not one of",
        ),
        (
            {"fast": "f", "quality": "f", "confidenceThreshold": 0.5},
            (),
            "fast and quality must be two different",
        ),
        ({"fast": "f", "quality": "q"}, (), "exactly one of confidenceThreshold and targetEscalationRate"),
        (
            {"fast": "f", "quality": "q", "confidenceThreshold": 0.5, "targetEscalationRate": 0.3},
            (),
            "exactly one of",
        ),
        ({"fast": "f", "quality": "q", "targetEscalationRate": 1.5}, (), "spec.cascade.targetEscalationRate"),
        (
            {"fast": "f", "quality": "q", "confidenceThreshold": 0.5},
            (v("f", 0), v("q", 100)),
            "'f' has weight 0",
        ),
        (
            {"fast": "f", "quality": "q", "confidenceThreshold": 0.5},
            (v("f", 50), v("q", 40), v("c", 10, canary=True)),
            None,
        ),
    ],
)
def test_a_bad_cascade_is_named_in_the_problems(
    cascade_spec: dict[str, Any], versions: tuple[dict[str, Any], ...], message: str | None
) -> None:
    _, problems = validation.check("m", spec_of(cascade_spec, *versions), CONFIG)
    if message is None:
        assert problems == []
    else:
        assert any(message in p for p in problems), problems


@pytest.mark.parametrize(
    ("versions", "tiers"),
    [
        ((v("f", 30), v("q", 50), v("q2", 10, canary=True), v("ab", 10)), (["f"], ["q", "q2", "ab"])),
        ((v("f", 60), v("q", 30), v("f2", 10, canary=True)), (["f", "f2"], ["q"])),
    ],
    ids=["quality canary and a variant", "fast canary"],
)
def test_a_canary_joins_the_tier_of_the_version_it_replaces_and_variants_the_quality_tier(
    versions: tuple[dict[str, Any], ...], tiers: tuple[list[str], list[str]]
) -> None:
    spec = parse_spec(spec_of({"fast": "f", "quality": "q", "confidenceThreshold": 0.5}, *versions))
    assert cascade.tiers(spec) == tiers


def calibration(signal: str = "confidence") -> dict[str, Any]:
    points = [round(i / 100, 2) for i in range(101)]  # a uniform signal: the q-quantile is q
    return {"signal": signal, "confidence_quantiles": points, "ood_quantiles": points, "rows": []}


def test_the_threshold_is_the_quantile_of_the_target_rate() -> None:
    assert cascade.threshold_from_calibration(calibration(), 0.3) == (0.3, "confidence")
    assert cascade.threshold_from_calibration(calibration(), 0.305) == (0.305, "confidence")
    assert cascade.threshold_from_calibration(calibration("ood"), 0.3) == (0.7, "ood")  # above it: escalated
    for bad in (
        None,
        {"signal": "mood"},
        {"confidence_quantiles": [0.1, 0.2]},
        {"confidence_quantiles": [1.0] * 50 + [0.0] * 51},
        {"confidence_quantiles": [float("nan")] * 101},
        {"confidence_quantiles": [0.0] * 100 + [float("inf")]},
    ):
        with pytest.raises(ValueError, match="calibration"):
            cascade.threshold_from_calibration(bad, 0.3)


def test_the_status_keeps_a_resolved_threshold_while_it_applies() -> None:
    spec = parse_spec(spec_of({"fast": "f", "quality": "q", "targetEscalationRate": 0.3}))
    first = cascade.cascade_status(spec, {})
    assert first is not None and first.threshold is None and first.fast_versions == ["f"]
    resolved = first.model_copy(update={"threshold": 0.42}).model_dump(by_alias=True, mode="json")
    assert cascade.cascade_status(spec, {"cascade": resolved}).threshold == 0.42  # type: ignore[union-attr]
    other_rate = parse_spec(spec_of({"fast": "f", "quality": "q", "targetEscalationRate": 0.2}))
    assert cascade.cascade_status(other_rate, {"cascade": resolved}).threshold is None  # type: ignore[union-attr]
    fixed = parse_spec(spec_of({"fast": "f", "quality": "q", "confidenceThreshold": 0.6}))
    assert cascade.cascade_status(fixed, {}).threshold == 0.6  # type: ignore[union-attr]


def router_body(escalated: int, outcome: str, quality_counts: list[int]) -> dict[str, Any]:
    """One router's stats body: 10 requests, all fast within 10 ms, ``escalated`` of them escalated."""
    tiers = {
        "fast": {"requests": 10, "counts": [10, 0, 0, 0]},
        "quality": {"requests": escalated, "counts": quality_counts},
    }
    part = {"requests": 10, "escalated": escalated, "outcomes": {outcome: 1}, "tiers": tiers}
    return {"latency_buckets_ms": [10.0, 100.0, 1000.0], "cascade": part}


def test_the_routers_figures_add_up() -> None:
    one = router_body(3, "deadline", [0, 3, 0, 0])
    two = router_body(1, "quality_failed", [0, 0, 1, 0])
    figures = cascade_check.sum_cascade_figures([one, two], 60, "now")
    assert (figures.requests, figures.escalated, figures.escalation_rate) == (20, 4, 0.2)
    assert (figures.skipped_deadline, figures.skipped_quality_failed) == (1, 1)
    assert figures.fast.requests == 20 and figures.quality.requests == 4
    assert figures.fast.p99_ms is not None and figures.fast.p99_ms <= 10
    assert figures.quality.p99_ms is not None and 100 < figures.quality.p99_ms <= 1000


class StatusApi:
    """The API calls of one look at a cascade: a stored CaptionModel, EndpointSlices by Service, and
    merge patches of its status (a stand-in for the API server, as in test_reconcile.py)."""

    def __init__(self, model: dict[str, Any], slices: dict[str, list[dict[str, Any]]]) -> None:
        self.model = model
        self.slices = slices
        self.patches: list[dict[str, Any]] = []

    async def get(self, kind: Any, namespace: str, name: str) -> dict[str, Any] | None:
        return self.model if name == self.model["metadata"]["name"] else None

    async def list(
        self, kind: Any, namespace: str, labels: Any, *, fields: Any = None
    ) -> list[dict[str, Any]]:
        return self.slices.get(labels.get(names.SERVICE_NAME_LABEL), [])

    async def patch_status(
        self, kind: Any, namespace: str, name: str, status: Any, **_: Any
    ) -> dict[str, Any]:
        self.patches.append(dict(status))
        stored = self.model.setdefault("status", {}).setdefault("cascade", {})
        stored.update(status["cascade"])
        return self.model


def slice_of(url: str) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return {"ports": [{"name": "http", "port": int(port)}], "endpoints": [{"addresses": [host]}]}


async def test_a_target_rate_is_resolved_from_the_fast_runtime_and_the_figures_written() -> None:
    async def models(request: web.Request) -> web.StreamResponse:
        return web.json_response({"models": [{"version": "f", "calibration": calibration()}], "ready": True})

    async def stats(request: web.Request) -> web.StreamResponse:
        assert request.query["window"] == "60"
        return web.json_response(router_body(3, "deadline", [0, 3, 0, 0]))

    runtime = await start_fake_peer([web.get("/v1/models", models)])
    router = await start_fake_peer([web.get("/v1/router/stats", stats)])
    spec = spec_of({"fast": "f", "quality": "q", "targetEscalationRate": 0.25})
    spec["rollout"] = {"analysis": {"interval": "2s", "window": "60s"}}
    pending = cascade.cascade_status(parse_spec(spec), {})
    assert pending is not None
    model = {
        "metadata": {"name": "m", "namespace": "ml", "generation": 1},
        "spec": spec,
        "status": {"cascade": pending.model_dump(by_alias=True, mode="json")},
    }
    api = StatusApi(model, {"m-f": [slice_of(base_url(runtime))], "m": [slice_of(base_url(router))]})
    try:
        async with aiohttp.ClientSession() as http:
            outcome = await cascade_check.refresh(api, http, CONFIG, "ml", "m")  # type: ignore[arg-type]
            again = await cascade_check.refresh(api, http, CONFIG, "ml", "m")  # type: ignore[arg-type]
    finally:
        await runtime.close()
        await router.close()
    shown = model["status"]["cascade"]
    assert shown["threshold"] == 0.25 and shown["signal"] == "confidence"
    assert [e.reason for e in outcome.events] == ["CascadeThreshold"] and again.events == []
    assert shown["figures"]["requests"] == 10 and shown["figures"]["escalationRate"] == 0.3
    assert outcome.interval_s == 2.0
    assert "threshold" not in api.patches[1]["cascade"]  # resolved once, not at every look


async def test_a_missing_calibration_is_said_once() -> None:
    spec = spec_of({"fast": "f", "quality": "q", "targetEscalationRate": 0.25})
    pending = cascade.cascade_status(parse_spec(spec), {})
    assert pending is not None
    model = {
        "metadata": {"name": "m", "namespace": "ml"},
        "spec": spec,
        "status": {"cascade": pending.model_dump(by_alias=True, mode="json")},
    }
    api = StatusApi(model, {})
    async with aiohttp.ClientSession() as http:
        first = await cascade_check.refresh(api, http, CONFIG, "ml", "m")  # type: ignore[arg-type]
        second = await cascade_check.refresh(api, http, CONFIG, "ml", "m")  # type: ignore[arg-type]
    assert [e.reason for e in first.events] == ["CascadeCalibrationUnavailable"] and second.events == []
    assert "no ready pod" in model["status"]["cascade"]["message"]
    assert model["status"]["cascade"]["threshold"] is None and first.interval_s == cascade_check.PENDING_S
