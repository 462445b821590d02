"""The quality gate's decisions (operator/gate.py), the weights while it runs, its condition, and one
run against real runtime-shaped HTTP peers (operator/gate_run.py)."""

from __future__ import annotations

import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from captionfleet import evalsets
from captionfleet.operator import gate, gate_run
from captionfleet.operator import rollout as r
from captionfleet.operator.spec import CaptionModelSpec, QualityGate, parse_spec, seconds
from captionfleet.operator.status import fleet_status
from captionfleet.operator.traffic import shares

from .conftest import caption_peer

NOW = "2024-01-01T00:00:00Z"


def spec_of(**quality: Any) -> CaptionModelSpec:
    return parse_spec(
        {
            "versions": [
                {"name": "v1", "model": "org/base", "weight": 90},
                {"name": "v2", "model": "org/next", "weight": 10, "canary": True},
            ],
            "rollout": {"analysis": {"stepWeight": 20}, "qualityGate": {"minScore": 0.5, **quality}},
        }
    )


def fresh(spec: CaptionModelSpec) -> r.CanaryState:
    state = r.current(spec, None)
    assert state is not None
    return state


def test_a_gated_canary_has_pods_but_no_traffic_until_the_gate_passes() -> None:
    spec = spec_of()
    state = fresh(spec)
    assert state.gate is not None and state.gate.phase == "Pending" and state.awaits_gate
    waiting = {s.name: (s.weight, s.sized_for) for s in shares(spec, state, canary_ready=True)}
    assert waiting == {"v1": (100, 100), "v2": (0, 20)}
    measured = gate.Measured(images=40, canary=0.9, stable=0.95, seconds=3.0)
    passed = gate.apply(state, gate.judge(spec.rollout.quality_gate, "v2", measured, NOW))  # type: ignore[arg-type]
    assert (passed.phase, passed.reason, passed.weight, passed.awaits_gate) == (
        "Progressing",
        "QualityGatePassed",
        20,
        False,
    )
    assert {s.name: s.weight for s in shares(spec, passed, canary_ready=True)} == {"v1": 80, "v2": 20}


@pytest.mark.parametrize(
    ("quality", "canary", "stable", "missed"),
    [
        ({"minScore": 0.5}, 0.49, None, ["exactMatch 0.490 < minScore 0.5"]),
        ({"minScore": 0.5}, 0.5, None, []),
        ({"minScore": None, "maxDrop": 0.1}, 0.8, 0.95, ["exactMatch fell by 0.150 > maxDrop 0.1"]),
        ({"minScore": None, "maxDrop": 0.1}, 0.9, 0.95, []),
        (
            {"minScore": 0.5, "maxDrop": 0.0},
            0.4,
            0.45,
            ["exactMatch 0.400 < minScore 0.5", "exactMatch fell by 0.050 > maxDrop 0"],
        ),
        ({"minScore": 0.5, "maxDrop": 0.05}, 0.99, 0.6, []),  # better than the stable: no drop
    ],
)
def test_the_thresholds(
    quality: dict[str, Any], canary: float, stable: float | None, missed: list[str]
) -> None:
    spec = QualityGate.model_validate(quality)
    assert gate.problems(spec, gate.Measured(40, canary, stable, 1.0)) == missed


def test_a_failed_gate_rolls_the_canary_back_with_both_scores() -> None:
    spec = spec_of(maxDrop=0.1)
    state = fresh(spec)
    outcome = gate.judge(spec.rollout.quality_gate, "v2", gate.Measured(40, 0.025, 1.0, 7.5, 2), NOW)  # type: ignore[arg-type]
    failed = gate.apply(state, outcome)
    assert (failed.phase, failed.reason, failed.weight) == ("RolledBack", "QualityGateFailed", 0)
    assert failed.gate == outcome.gate
    assert (outcome.gate.canary_score, outcome.gate.stable_score, outcome.gate.seconds) == (0.025, 1.0, 7.5)
    assert "exactMatch 0.025 against the stable version's 1.000 on 40 images" in outcome.message
    assert "2 caption requests failed" in outcome.message
    assert {s.name: s.weight for s in shares(spec, failed, canary_ready=True)} == {"v1": 100, "v2": 0}
    status = fleet_status(
        shares=shares(spec, failed, canary_ready=True),
        deployments={},
        services={},
        router=None,
        generation=1,
        endpoint="http://x",
        previous={},
        now=NOW,
        rollout=failed,
    )
    condition = next(c for c in status.conditions if c.type == "QualityGate")
    assert (condition.status, condition.reason, condition.message) == (
        "False",
        "QualityGateFailed",
        outcome.message,
    )
    assert status.manifest()["rollout"]["gate"]["canaryScore"] == 0.025


def test_an_unjudged_gate_changes_nothing_but_says_why_once() -> None:
    spec = spec_of(dataset="configMap:evalset")
    state = fresh(spec)
    quality = spec.rollout.quality_gate
    assert quality is not None
    outcome = gate.unjudged(
        quality, "v2", "ConfigMap evalset (dataset configMap:evalset) does not exist", NOW
    )
    waiting = gate.apply(state, outcome)
    assert (waiting.phase, waiting.weight, waiting.awaits_gate, waiting.gate.phase) == (  # type: ignore[union-attr]
        "Progressing",
        20,
        True,
        "Error",
    )
    assert gate.is_new_problem(state.gate, outcome)
    assert not gate.is_new_problem(waiting.gate, outcome)
    timed_out = gate.timed_out(quality, "v2", NOW)
    assert timed_out.verdict == "failed" and "longer than timeout 5m" in timed_out.message


@pytest.mark.parametrize("timeout", ["1s", "5m", "1h"])
def test_a_canary_that_never_gets_a_ready_pod_fails_the_gate_after_its_timeout(timeout: str) -> None:
    spec = spec_of(timeout=timeout)
    quality, state = spec.rollout.quality_gate, fresh(spec)
    assert quality is not None and state.gate is not None
    limit_s = int(seconds(timeout))

    def at(offset_s: int) -> str:
        moment = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=offset_s)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    waiting = gate.no_ready_pod(quality, state.gate, "v2", at(0))
    assert isinstance(waiting, gate.GateState)
    assert (waiting.phase, waiting.waiting_since) == ("Pending", at(0))
    assert f"waiting for a ready pod of canary v2 to score (at most timeout {timeout})" in waiting.message
    assert gate.no_ready_pod(quality, waiting, "v2", at(limit_s)) == waiting  # at the limit: still waits
    edited = waiting.model_copy(update={"waiting_since": "yesterday"})  # a status is user-editable
    assert gate.no_ready_pod(quality, edited, "v2", at(limit_s)) == waiting.model_copy(
        update={"waiting_since": at(limit_s)}
    )
    failed = gate.no_ready_pod(quality, waiting, "v2", at(limit_s + 1))
    assert isinstance(failed, gate.GateOutcome) and failed.verdict == "failed"
    assert f"no ready pod to score within timeout {timeout}" in failed.message
    rolled = gate.apply(state.model_copy(update={"gate": waiting}), failed)
    assert (rolled.phase, rolled.reason, rolled.weight, rolled.gate.phase) == (  # type: ignore[union-attr]
        "RolledBack",
        "QualityGateFailed",
        0,
        "Failed",
    )


def test_a_gate_removed_before_its_verdict_lets_the_rollout_go_on_without_it() -> None:
    stored = fresh(spec_of()).model_dump(by_alias=True, mode="json")
    ungated = parse_spec(
        {
            **spec_of().model_dump(by_alias=True, exclude_none=True),
            "rollout": {"analysis": {"stepWeight": 20}},
        }
    )
    state = r.current(ungated, stored)
    assert state is not None and state.gate is None and not state.awaits_gate
    assert (state.phase, state.reason) == ("Progressing", "QualityGateRemoved")
    assert {s.name: s.weight for s in shares(ungated, state, canary_ready=True)} == {"v1": 80, "v2": 20}
    # a gate already passed stays in the record
    passed = fresh(spec_of()).model_copy(
        update={"gate": gate.pending(spec_of().rollout.quality_gate).model_copy(update={"phase": "Passed"})}
    )  # type: ignore[arg-type]
    kept = r.current(ungated, passed.model_dump(by_alias=True, mode="json"))
    assert kept is not None and kept.gate is not None and kept.gate.phase == "Passed"


def test_a_gate_must_judge_something_and_names_a_known_dataset() -> None:
    with pytest.raises(ValueError, match="minScore, maxDrop or both"):
        QualityGate.model_validate({})
    with pytest.raises(ValueError, match="dataset"):
        QualityGate.model_validate({"minScore": 1, "dataset": "s3://bucket"})


class FakeApi:
    """Only the ConfigMap read of the gate (get); the pods are real HTTP servers below."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects

    async def get(self, kind: Any, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind == gate_run.CONFIG_MAP
        return self.objects.get(name)


async def _runtime(captions: dict[bytes, str], seen: list[str]) -> web.AppRunner:
    """A runtime-shaped peer: answers POST /v1/caption with the caption it was told for each image."""

    async def caption(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Priority", ""))
        return web.json_response({"caption": captions.get(await request.read(), "something else")})

    return await caption_peer(caption)


async def test_one_run_scores_canary_and_stable_through_their_pods() -> None:
    images = evalsets.builtin_scenes()
    right = {item.image: item.references[0] for item in images}
    half_wrong = {item.image: item.references[0] for item in images[: len(images) // 2]}
    seen: list[str] = []
    stable, canary = await _runtime(right, seen), await _runtime(half_wrong, seen)
    urls = {
        f"fleet-{version}": [f"http://127.0.0.1:{runner.addresses[0][1]}"]
        for version, runner in (("v1", stable), ("v2", canary))
    }

    async def endpoints(namespace: str, service: str) -> list[str]:
        return urls.get(service, [])

    spec = spec_of(maxDrop=0.2)
    body = {"metadata": {"namespace": "ml", "name": "fleet"}}
    try:
        async with aiohttp.ClientSession() as http:
            outcome = await gate_run.run(gate_run.GateClients(http, endpoints), FakeApi({}), body, spec, NOW)  # type: ignore[arg-type]
    finally:
        await stable.cleanup()
        await canary.cleanup()
    assert outcome is not None and outcome.verdict == "failed"
    assert (outcome.gate.canary_score, outcome.gate.stable_score, outcome.gate.images) == (0.5, 1.0, 40)
    assert seen == ["bulk"] * 80
    assert "fell by 0.500 > maxDrop 0.2" in outcome.message


async def test_a_missing_configmap_or_canary_pod_is_no_verdict() -> None:
    async def no_pods(namespace: str, service: str) -> list[str]:
        return []

    async def some_pods(namespace: str, service: str) -> list[str]:
        return ["http://127.0.0.1:9"]

    spec = spec_of(dataset="configMap:evalset")
    body = {"metadata": {"namespace": "ml", "name": "fleet"}}
    async with aiohttp.ClientSession() as http:
        assert await gate_run.run(gate_run.GateClients(http, no_pods), FakeApi({}), body, spec, NOW) is None  # type: ignore[arg-type]
        outcome = await gate_run.run(gate_run.GateClients(http, some_pods), FakeApi({}), body, spec, NOW)  # type: ignore[arg-type]
    assert outcome is not None and outcome.verdict == "error"
    assert "ConfigMap evalset (dataset configMap:evalset) does not exist" in outcome.message


async def test_a_runtime_that_refuses_the_gate_is_no_verdict() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "unauthorized", "message": "key"}}, status=401)

    runner = await caption_peer(refuse)

    async def pods(namespace: str, service: str) -> list[str]:
        return [f"http://127.0.0.1:{runner.addresses[0][1]}"]

    body = {"metadata": {"namespace": "ml", "name": "fleet"}}
    try:
        async with aiohttp.ClientSession() as http:
            outcome = await gate_run.run(gate_run.GateClients(http, pods), FakeApi({}), body, spec_of(), NOW)  # type: ignore[arg-type]
    finally:
        await runner.cleanup()
    assert outcome is not None and outcome.verdict == "error"
    assert "refused the gate's requests (HTTP 401" in outcome.message
