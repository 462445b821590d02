"""The shadow phase (operator/shadow.py) and maxConfidenceDrop in the rollout decisions, and what the
routers and the status get from them (traffic.shares, the router stats summed)."""

from __future__ import annotations

from typing import Any

import pytest

from captionfleet.operator import rollout as r
from captionfleet.operator.figures import ShadowFigures, sum_router_stats
from captionfleet.operator.spec import CaptionModelSpec, parse_spec
from captionfleet.operator.traffic import shares

NOW = "2024-01-01T00:00:00Z"
MIRROR = {"percent": 20, "checks": 2, "minAgreement": 0.9}
GOOD_COPIES = ShadowFigures(copies=150, compared=150, exact=145, overlap_sum=148.0, p99_ms=100.0)


def spec_of(**analysis: Any) -> CaptionModelSpec:
    return parse_spec(
        {
            "versions": [
                {"name": "v1", "model": "org/base", "weight": 90},
                {"name": "v2", "model": "org/next", "weight": 10, "canary": True},
            ],
            "rollout": {
                "analysis": {
                    "minRequests": 100,
                    "stepWeight": 20,
                    "maxWeight": 60,
                    "threshold": 2,
                    **analysis,
                }
            },
        }
    )


def copies(shadow: ShadowFigures) -> r.Figures:
    """Figures of a shadowed canary: no live requests, the copies."""
    return r.Figures(requests=0, errors=0, shadow=shadow)


def run(spec: CaptionModelSpec, state: r.CanaryState, figures: r.Figures | None, **kw: Any) -> r.Decision:
    return r.check(spec.rollout.analysis, state, figures, total=r.pool(spec), now=NOW, **kw)


def started() -> tuple[CaptionModelSpec, r.CanaryState]:
    spec = spec_of(mirror=MIRROR)
    state = r.current(spec, None)
    assert state is not None
    return spec, state


def test_with_mirror_a_canary_starts_at_weight_0_with_copies_and_its_pods() -> None:
    spec, state = started()
    assert (state.weight, state.reason, state.shadow and state.shadow.percent) == (0, "Shadow", 20)
    by_name = {s.name: s for s in shares(spec, state, canary_ready=True)}
    assert (by_name["v2"].weight, by_name["v2"].mirror, by_name["v2"].sized_for) == (0, 20, 20)
    assert (by_name["v1"].weight, by_name["v1"].mirror) == (100, 0)


def test_shadow_checks_pass_then_the_first_weight_step_comes_and_the_mirror_stops() -> None:
    spec, state = started()
    first = run(spec, state, copies(GOOD_COPIES))
    assert first.kind == "shadow" and first.state.weight == 0 and first.state.shadow is not None
    assert (first.state.shadow.passed, first.state.shadow.agreement) == (
        1,
        pytest.approx(145 / 150, abs=1e-4),
    )
    second = run(spec, first.state, copies(GOOD_COPIES))
    assert second.kind == "step" and second.state.weight == 20 and second.state.step == 1
    assert "0 % -> 20 %" in second.message and "agreement 0.967" in second.message
    assert not second.state.checked  # the stable keeps its capacity until a live check passed
    by_name = {s.name: s for s in shares(spec, second.state, canary_ready=True)}
    assert (by_name["v2"].weight, by_name["v2"].mirror) == (20, 0)
    # From then on the live figures decide, as without a shadow phase.
    live = run(spec, second.state, r.Figures(requests=200, errors=0))
    assert live.kind == "step" and live.state.weight == 40


@pytest.mark.parametrize(
    ("shadow", "reason"),
    [
        (ShadowFigures(copies=150, compared=150, exact=120, overlap_sum=140.0), "ShadowAgreement"),
        (ShadowFigures(copies=150, errors=30, compared=120, exact=120, overlap_sum=120.0), "ShadowErrorRate"),
        (ShadowFigures(copies=150, errors=150), "ShadowErrorRate"),  # and none compared: no agreement
        (
            ShadowFigures(copies=150, compared=150, exact=150, overlap_sum=150.0, p99_ms=900.0),
            "ShadowLatency",
        ),
    ],
)
def test_failed_shadow_checks_roll_back_a_canary_that_never_served(
    shadow: ShadowFigures, reason: str
) -> None:
    spec = spec_of(mirror=MIRROR, latencyP99Ms=500)
    state = r.current(spec, None)
    assert state is not None
    failed = run(spec, state, copies(shadow))
    assert failed.kind == "fail" and failed.state.weight == 0
    rolled = run(spec, failed.state, copies(shadow))
    assert (rolled.kind, rolled.state.phase, rolled.state.reason) == ("rollback", "RolledBack", reason)
    by_name = {s.name: s for s in shares(spec, rolled.state, canary_ready=True)}
    assert (by_name["v2"].weight, by_name["v2"].mirror) == (0, 0)


def test_too_few_copies_hold_however_bad_they_are() -> None:
    spec, state = started()
    bad = ShadowFigures(copies=50, compared=50, exact=0)
    for figures in (copies(bad), None, r.Figures(requests=500, errors=0)):  # live requests do not count
        held = run(spec, state, figures)
        assert held.kind == "hold" and held.state.failed_checks == 0 and held.state.weight == 0


def test_a_confidence_drop_fails_a_check_at_error_rate_0_only_when_max_confidence_drop_is_set() -> None:
    stable = r.Figures(requests=900, errors=0, confidence=0.92)
    collapsed = r.Figures(requests=200, errors=0, confidence=0.41)
    unchecked = spec_of()
    state = r.current(unchecked, None)
    assert state is not None
    assert run(unchecked, state, collapsed, baseline=stable).kind == "step"
    spec = spec_of(maxConfidenceDrop=0.1)
    failed = run(spec, state, collapsed, baseline=stable)
    assert failed.kind == "fail" and "0.510 below the stable's 0.920" in failed.message
    assert failed.state.last_check is not None
    assert (failed.state.last_check.confidence, failed.state.last_check.stable_confidence) == (0.41, 0.92)
    rolled = run(spec, failed.state, collapsed, baseline=stable)
    assert (rolled.kind, rolled.state.reason) == ("rollback", "ConfidenceDrop")
    # A drop within the limit, or no confidence seen on either side, is no problem.
    near = r.Figures(requests=200, errors=0, confidence=0.85)
    assert run(spec, state, near, baseline=stable).kind == "step"
    assert run(spec, state, collapsed, baseline=None).kind == "step"  # the stable answered nothing


def test_max_confidence_drop_holds_when_an_answering_side_has_no_confidence_figures() -> None:
    """Missing evidence never promotes: with maxConfidenceDrop set, figures without confidence hold."""
    spec = spec_of(maxConfidenceDrop=0.1)
    state = r.current(spec, None)
    assert state is not None
    stable = r.Figures(requests=900, errors=0, confidence=0.92)
    unscored = r.Figures(requests=200, errors=0)
    for canary, baseline in ((unscored, stable), (r.Figures(200, 0, confidence=0.9), r.Figures(900, 0))):
        held = run(spec, state, canary, baseline=baseline)
        assert held.kind == "hold" and held.state.weight == state.weight, held.message
        assert "no confidence figures" in held.message and held.state.failed_checks == 0
    assert run(spec_of(), state, unscored, baseline=r.Figures(900, 0)).kind == "step"  # not asked for
    failing = r.Figures(requests=200, errors=200)  # no answer to score: the error rate decides
    assert run(spec, state, failing, baseline=stable).kind == "fail"


def test_router_stats_sum_the_confidence_and_the_shadow_figures_of_every_router() -> None:
    def body(confidence: tuple[int, float], shadow: dict[str, Any] | None) -> dict[str, Any]:
        window: dict[str, Any] = {
            "requests": 10,
            "errors": 0,
            "confidence": {"count": confidence[0], "sum": confidence[1]},
        }
        if shadow is not None:
            window["shadow"] = shadow
        return {"latency_buckets_ms": [10.0, 100.0], "versions": {"v2": {"window": window}}}

    shadow = {
        "copies": 10,
        "errors": 1,
        "dropped": 2,
        "compared": 9,
        "exact_matches": 8,
        "token_overlap_sum": 8.5,
        "latency_ms": {"counts": [0, 10, 0]},
    }
    figures = sum_router_stats(
        [body((10, 9.0), shadow), body((30, 15.0), shadow), body((0, 0.0), None)], "v2"
    )
    assert figures.requests == 30 and figures.confidence == pytest.approx(24.0 / 40)
    assert figures.shadow is not None
    assert (figures.shadow.copies, figures.shadow.errors, figures.shadow.dropped) == (20, 2, 4)
    assert figures.shadow.agreement == pytest.approx(16 / 18)
    assert figures.shadow.token_overlap == pytest.approx(17 / 18)
    assert figures.shadow.p99_ms is not None and 10 < figures.shadow.p99_ms <= 100
    none = sum_router_stats([body((0, 0.0), None)], "v2")
    assert none.shadow is None and none.confidence is None


def test_with_a_quality_gate_the_copies_begin_only_once_the_gate_has_passed() -> None:
    body = spec_of(mirror=MIRROR).model_dump(by_alias=True)
    body["rollout"]["qualityGate"] = {"dataset": "builtin:scenes", "metric": "exactMatch", "minScore": 0.5}
    spec = parse_spec(body)
    state = r.current(spec, None)
    assert state is not None and state.awaits_gate and state.weight == 0
    canary = {s.name: s for s in shares(spec, state, canary_ready=True)}["v2"]
    assert (canary.weight, canary.mirror) == (0, 0)  # the gate first: no copies, no traffic
    assert state.gate is not None
    passed = state.model_copy(update={"gate": state.gate.model_copy(update={"phase": "Passed"})})
    canary = {s.name: s for s in shares(spec, passed, canary_ready=True)}["v2"]
    assert (canary.weight, canary.mirror) == (0, 20)  # then the shadow phase


def test_mirror_edited_mid_shadow_applies_at_once_and_removed_it_ends_the_phase() -> None:
    spec, state = started()
    once = run(spec, state, copies(GOOD_COPIES)).state
    stored = once.model_dump(by_alias=True, mode="json")

    wider = r.current(spec_of(mirror=MIRROR | {"percent": 50}), stored)
    assert wider is not None and wider.shadow is not None
    assert (wider.shadow.percent, wider.shadow.passed, wider.weight) == (50, 1, 0)  # the same phase, wider
    assert {s.name: s.mirror for s in shares(spec_of(mirror=MIRROR), wider, canary_ready=True)}["v2"] == 50

    unmirrored = spec_of()
    ended = r.current(unmirrored, stored)
    assert ended is not None and ended.shadow is not None and ended.shadow.done
    assert (ended.phase, ended.weight, ended.reason) == ("Progressing", 20, "ShadowRemoved")
    assert {s.name: (s.weight, s.mirror) for s in shares(unmirrored, ended, canary_ready=True)} == {
        "v1": (80, 0),
        "v2": (20, 0),
    }
    assert run(unmirrored, ended, r.Figures(requests=200, errors=0)).kind == "step"  # live checks now
