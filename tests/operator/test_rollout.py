"""The rollout decisions (operator/rollout.py) and the weights they give (traffic.shares), exhaustively."""

from __future__ import annotations

from typing import Any

import pytest

from captionfleet.operator import rollout as r
from captionfleet.operator.builders.replicas import replica_bounds
from captionfleet.operator.spec import CaptionModelSpec, parse_spec
from captionfleet.operator.traffic import shares

NOW = "2024-01-01T00:00:00Z"
HEALTHY = r.Figures(requests=200, errors=0, p99_ms=120.0)


def spec_of(
    analysis: dict[str, Any] | None = None, *, paused: bool = False, **canary: Any
) -> CaptionModelSpec:
    return parse_spec(
        {
            "versions": [
                {"name": "v1", "model": "org/base", "weight": 60},
                {"name": "ab", "model": "org/large", "weight": 30},
                {"name": "v2", "model": "org/next", "weight": 10, "canary": True, **canary},
            ],
            "rollout": {
                "paused": paused,
                "analysis": {
                    "minRequests": 100,
                    "stepWeight": 20,
                    "maxWeight": 50,
                    "threshold": 2,
                    "errorRateThreshold": 1,
                    **(analysis or {}),
                },
            },
        }
    )


def run(spec: CaptionModelSpec, state: r.CanaryState, figures: r.Figures | None) -> r.Decision:
    return r.check(spec.rollout.analysis, state, figures, total=r.pool(spec), now=NOW)


def weights(
    spec: CaptionModelSpec, state: r.CanaryState | None, *, canary_ready: bool = True
) -> dict[str, tuple[str, int, bool]]:
    return {s.name: (s.role, s.weight, s.retired) for s in shares(spec, state, canary_ready=canary_ready)}


def bounds_of(spec: CaptionModelSpec, state: r.CanaryState, name: str) -> tuple[int, int]:
    """The replica bounds of version ``name`` in ``state``."""
    return replica_bounds(spec, next(s for s in shares(spec, state) if s.name == name))


def test_a_new_canary_starts_at_step_weight_taking_it_from_the_stable_version_only() -> None:
    spec = spec_of()
    state = r.current(spec, None)
    assert state is not None
    assert (state.version, state.phase, state.weight, state.failed_checks) == ("v2", "Progressing", 20, 0)
    assert r.pool(spec) == 70  # v1 + v2; the A/B arm keeps its 30
    assert weights(spec, state) == {
        "v1": ("stable", 50, False),
        "ab": ("variant", 30, False),
        "v2": ("canary", 20, False),
    }


@pytest.mark.parametrize("step", [20, 50, 100])
def test_a_canary_gets_traffic_only_once_ready_and_the_stable_keeps_its_capacity_until_a_check_passed(
    step: int,
) -> None:
    spec = spec_of({"stepWeight": step, "maxWeight": 100}, maxReplicas=None)
    spec = spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(update={"max_replicas": 8})})
    state = r.current(spec, None)
    assert state is not None and state.weight == min(step, 70)
    before = {s.name: s for s in shares(spec, state, canary_ready=False)}
    assert (before["v2"].weight, before["v1"].weight) == (0, 70)  # no traffic before a ready pod
    assert replica_bounds(spec, before["v2"])[1] == -(-8 * min(step, 70) // 100)  # but its pods
    ready = {s.name: s for s in shares(spec, state, canary_ready=True)}
    assert ready["v2"].weight == min(step, 70)
    # The stable version keeps the ceiling of the whole pool (70 % of 8 -> 6) until a check passed.
    assert replica_bounds(spec, before["v1"]) == replica_bounds(spec, ready["v1"]) == (1, 6)
    stepped = run(spec, state, HEALTHY)
    if stepped.kind == "step":
        after = {s.name: s for s in shares(spec, stepped.state, canary_ready=True)}
        assert replica_bounds(spec, after["v1"])[1] == max(1, -(-8 * (70 - stepped.state.weight) // 100))


def test_no_canary_no_rollout_and_the_spec_weights_apply() -> None:
    spec = parse_spec({"versions": [{"name": "v1", "model": "org/base"}]})
    assert r.current(spec, None) is None
    assert weights(spec, None) == {"v1": ("stable", 100, False)}


def test_healthy_checks_step_up_to_max_weight_then_promote() -> None:
    spec = spec_of()
    state = r.current(spec, None)
    assert state is not None
    seen = []
    for _ in range(10):
        decision = run(spec, state, HEALTHY)
        seen.append((decision.kind, decision.state.weight))
        state = decision.state
        if decision.kind == "promote":
            break
    assert seen == [("step", 40), ("step", 50), ("promote", 70)]
    assert state.phase == "Promoted" and state.step == 3
    assert state.last_check is not None and state.last_check.verdict == "pass"
    # the canary is the stable version now; the old stable gets no traffic but keeps its pods until the
    # next check, so that every router has moved its requests first; then it is scaled to zero
    assert weights(spec, state) == {
        "v1": ("variant", 0, False),
        "ab": ("variant", 30, False),
        "v2": ("stable", 70, False),
    }
    drained = r.drain(state)
    assert drained.kind == "drain" and r.drain(drained.state).kind == "idle"
    state = drained.state
    assert weights(spec, state) == {
        "v1": ("variant", 0, True),
        "ab": ("variant", 30, False),
        "v2": ("stable", 70, False),
    }
    assert bounds_of(spec, state, "v1") == (0, 0)
    assert run(spec, state, HEALTHY).kind == "idle"  # nothing moves after promotion


def test_max_weight_is_capped_by_the_pool() -> None:
    spec = spec_of({"maxWeight": 100, "stepWeight": 50})
    state = r.current(spec, None)
    assert state is not None and state.weight == 50
    decision = run(spec, state, HEALTHY)
    assert (decision.kind, decision.state.weight) == ("step", 70)
    assert run(spec, decision.state, HEALTHY).kind == "promote"


@pytest.mark.parametrize(
    "figures",
    [None, r.Figures(0, 0), r.Figures(99, 99, 90000.0)],
    ids=["no-figures", "no-requests", "below-min-requests-all-failing"],
)
def test_below_min_requests_a_check_neither_passes_nor_fails(figures: r.Figures | None) -> None:
    spec = spec_of({"latencyP99Ms": 500})
    state = r.current(spec, None)
    assert state is not None
    state = state.model_copy(update={"failed_checks": 1})
    for _ in range(5):
        decision = run(spec, state, figures)
        assert decision.kind == "hold"
        assert (decision.state.weight, decision.state.failed_checks, decision.state.phase) == (
            20,
            1,
            "Progressing",
        )
        state = decision.state
    if figures is not None:
        assert state.last_check is not None and state.last_check.verdict == "hold"
        assert "below minRequests 100" in state.message


def test_threshold_consecutive_failures_roll_back_with_the_figures_and_reason() -> None:
    spec = spec_of({"threshold": 3})
    state = r.current(spec, None)
    assert state is not None
    failing = r.Figures(requests=400, errors=40, p99_ms=100.0)
    first = run(spec, state, failing)
    assert (first.kind, first.state.failed_checks, first.state.weight) == ("fail", 1, 20)
    second = run(spec, first.state, failing)
    assert (second.kind, second.state.failed_checks) == ("fail", 2)
    third = run(spec, second.state, failing)
    assert third.kind == "rollback"
    rolled = third.state
    assert (rolled.phase, rolled.weight, rolled.reason, rolled.failed_checks) == (
        "RolledBack",
        0,
        "ErrorRate",
        3,
    )
    assert "error rate 10.00 % > 1 %" in rolled.message and "40/400" in rolled.message
    assert rolled.last_check is not None
    assert (rolled.last_check.error_rate, rolled.last_check.verdict) == (10.0, "fail")
    assert weights(spec, rolled) == {
        "v1": ("stable", 70, False),
        "ab": ("variant", 30, False),
        "v2": ("canary", 0, False),  # no traffic at once; its pods go one check later
    }
    rolled = r.drain(rolled).state
    assert weights(spec, rolled) == {
        "v1": ("stable", 70, False),
        "ab": ("variant", 30, False),
        "v2": ("canary", 0, True),
    }
    assert bounds_of(spec, rolled, "v2") == (0, 0)


def test_a_pass_resets_the_failed_count_so_only_consecutive_failures_count() -> None:
    spec = spec_of({"threshold": 2})
    state = r.current(spec, None)
    assert state is not None
    failing = r.Figures(requests=200, errors=10)
    state = run(spec, state, failing).state
    assert state.failed_checks == 1
    state = run(spec, state, HEALTHY).state
    assert (state.failed_checks, state.weight) == (0, 40)
    decision = run(spec, state, failing)
    assert decision.kind == "fail"  # 1 of 2 again, not a rollback


def test_an_error_rate_at_the_threshold_passes() -> None:
    spec = spec_of({"errorRateThreshold": 5})
    state = r.current(spec, None)
    assert state is not None
    assert run(spec, state, r.Figures(requests=100, errors=5)).kind == "step"
    assert run(spec, state, r.Figures(requests=100, errors=6)).kind == "fail"


def test_latency_fails_a_check_only_when_latency_p99_ms_is_set() -> None:
    slow = r.Figures(requests=500, errors=0, p99_ms=2500.0)
    unchecked = spec_of({"threshold": 1})
    state = r.current(unchecked, None)
    assert state is not None
    assert run(unchecked, state, slow).kind == "step"
    checked = spec_of({"threshold": 1, "latencyP99Ms": 1000})
    decision = run(checked, state, slow)
    assert (decision.kind, decision.state.reason) == ("rollback", "Latency")
    assert "p99 2500 ms > 1000 ms" in decision.state.message


def test_a_rolled_back_version_stays_out_until_its_spec_changes() -> None:
    spec = spec_of({"threshold": 1})
    state = r.current(spec, None)
    assert state is not None
    rolled = run(spec, state, r.Figures(requests=200, errors=200)).state
    stored = rolled.model_dump(by_alias=True, mode="json")
    assert "specHash" in stored and "failedChecks" in stored and "lastCheck" in stored

    again = r.current(spec, stored)
    assert again is not None and (again.phase, again.weight) == ("RolledBack", 0)
    # weight or replica changes do not make it another version
    assert r.current(spec_of({"threshold": 1}, minReplicas=2), stored) == again
    # a new model does: a fresh rollout at stepWeight
    fresh = r.current(spec_of({"threshold": 1}, model="org/next@fixed"), stored)
    assert fresh is not None and (fresh.phase, fresh.weight, fresh.failed_checks) == ("Progressing", 20, 0)


def test_paused_freezes_the_rollout_and_resuming_continues_where_it_was() -> None:
    running = r.current(spec_of(), None)
    assert running is not None
    stepped = run(spec_of(), running, HEALTHY).state
    stored = stepped.model_dump(by_alias=True, mode="json")

    paused_spec = spec_of(paused=True)
    paused = r.current(paused_spec, stored)
    assert paused is not None and (paused.phase, paused.weight) == ("Paused", 40)
    failing = r.Figures(requests=1000, errors=1000)
    assert run(paused_spec, paused, failing).kind == "idle"  # no rollback either
    assert weights(paused_spec, paused)["v2"] == ("canary", 40, False)

    resumed = r.current(spec_of(), paused.model_dump(by_alias=True, mode="json"))
    assert resumed is not None and (resumed.phase, resumed.weight) == ("Progressing", 40)


def test_the_abort_and_promote_actions() -> None:
    spec = spec_of()
    state = r.current(spec, None)
    assert state is not None
    aborted = r.act("abort", state, total=r.pool(spec))
    assert (aborted.kind, aborted.state.phase, aborted.state.weight, aborted.state.reason) == (
        "rollback",
        "RolledBack",
        0,
        "Aborted",
    )
    promoted = r.act("promote", state, total=r.pool(spec))
    assert (promoted.kind, promoted.state.phase, promoted.state.weight) == ("promote", "Promoted", 70)
    # works while paused too, and does nothing once the rollout is over
    paused = r.current(spec_of(paused=True), None)
    assert paused is not None
    assert r.act("promote", paused, total=70).kind == "promote"
    assert r.act("abort", promoted.state, total=70).kind == "idle"
    assert r.act("restart", state, total=70).kind == "idle"
    assert "unknown rollout action" in r.act("restart", state, total=70).message


def test_the_spec_hash_ignores_traffic_and_replicas_only() -> None:
    base = spec_of().version("v2")
    assert r.spec_hash(base) == r.spec_hash(spec_of(weight=10, minReplicas=3).version("v2"))
    assert r.spec_hash(base) != r.spec_hash(spec_of(precision="bf16").version("v2"))
    assert r.spec_hash(base) != r.spec_hash(spec_of(image="registry/x:2").version("v2"))


def test_figures_describe_themselves() -> None:
    assert r.Figures(200, 3, 812.4).describe() == "3/200 requests failed (1.50 %), p99 812 ms"
    assert r.Figures(0, 0).error_rate is None


def stored(state: r.CanaryState) -> dict[str, Any]:
    return state.model_dump(by_alias=True, mode="json")


def test_a_canary_edited_mid_rollout_starts_again_and_says_so() -> None:
    state = r.current(spec_of(), None)
    assert state is not None
    stepped = run(spec_of(), state, HEALTHY).state
    assert (
        stepped.weight == 40
        and r.restart_note(stored(stepped), r.current(spec_of(), stored(stepped))) is None
    )

    edited = r.current(spec_of(image="registry.test/runtime:2"), stored(stepped))
    assert edited is not None and (edited.phase, edited.weight, edited.step) == ("Progressing", 20, 1)
    note = r.restart_note(stored(stepped), edited)
    assert note is not None
    assert note.startswith("the rollout of canary v2 (Progressing at 40 %, step 2) starts again")
    assert "the canary's spec changed" in note

    # traffic or replica edits are not a new canary: nothing restarts
    assert r.restart_note(stored(stepped), r.current(spec_of(minReplicas=2), stored(stepped))) is None


def test_a_rollout_ended_undecided_says_so_and_a_decided_one_is_quiet() -> None:
    state = r.current(spec_of(), None)
    assert state is not None
    note = r.restart_note(stored(state), None)
    assert note is not None and "ended undecided: the spec has no canary in rollout" in note
    paused = r.current(spec_of(paused=True), stored(state))
    assert paused is not None
    assert "Paused at" in (r.restart_note(stored(paused), None) or "")

    other = state.model_copy(update={"version": "v3", "message": "canary v3 starts at 20 %"})
    moved = r.restart_note(stored(state), other)
    assert moved is not None and "the canary is now v3; canary v3 starts at 20 %" in moved

    rolled = run(spec_of({"threshold": 1}), state, r.Figures(requests=200, errors=200)).state
    assert rolled.phase == "RolledBack" and r.restart_note(stored(rolled), None) is None
    assert r.restart_note(None, state) is None and r.restart_note({}, state) is None


@pytest.mark.parametrize("mirror", [None, {"percent": 100, "checks": 1}])
def test_no_figures_hold_and_the_state_says_why(mirror: dict[str, Any] | None) -> None:
    """Missing evidence neither promotes nor rolls back, in the shadow phase too; the message names why."""
    spec = spec_of({"minRequests": 0, "threshold": 1, "mirror": mirror})
    state = r.current(spec, None)
    assert state is not None
    why = "Prometheus http://prom:9090: ValueError: sample '+Inf' is no count or latency"
    decision = r.check(spec.rollout.analysis, state, None, total=r.pool(spec), now=NOW, unavailable=why)
    assert decision.kind == "hold"
    assert decision.state.model_copy(update={"message": state.message}) == state  # nothing else moved
    assert decision.state.message == f"canary v2: no figures ({why}); the check neither passes nor fails"
    assert "(no router answered)" in run(spec, state, None).message


def spec_with(versions: list[dict[str, Any]]) -> CaptionModelSpec:
    return parse_spec({"versions": versions, "rollout": {"analysis": {"stepWeight": 20, "minRequests": 100}}})


CANARY_V2 = {"name": "v2", "model": "org/next", "weight": 10, "canary": True}


@pytest.mark.parametrize(
    "after",
    [
        # a version with more traffic than v1 added mid-rollout: the canary would take its weight from it
        [{"name": "v1", "model": "org/base", "weight": 40}, {"name": "v3", "model": "org/x", "weight": 50}],
        # v1 removed mid-rollout: ab becomes the stable
        [{"name": "ab", "model": "org/large", "weight": 90}],
    ],
    ids=["bigger version added", "stable removed"],
)
def test_a_canary_that_now_replaces_another_version_starts_again(after: list[dict[str, Any]]) -> None:
    before = spec_with(
        [
            {"name": "v1", "model": "org/base", "weight": 60},
            {"name": "ab", "model": "org/large", "weight": 30},
            CANARY_V2,
        ]
    )
    state = r.current(before, None)
    assert state is not None and state.stable == "v1"
    stepped = run(before, state, HEALTHY).state
    assert (stepped.weight, stepped.step) == (40, 2)
    moved_spec = spec_with([*after, CANARY_V2])
    moved = r.current(moved_spec, stored(stepped))
    stable = moved_spec.stable()
    assert moved is not None and stable is not None and stable.name != "v1"
    assert (moved.stable, moved.weight, moved.step) == (stable.name, 20, 1)
    note = r.restart_note(stored(stepped), moved)
    assert note is not None and f"starts again: it now replaces {stable.name}, not v1" in note
    # decided rollouts keep their verdict: removing the retired stable after a promotion is a cleanup
    promoted = r.act("promote", stepped, total=r.pool(before)).state
    kept = r.current(moved_spec, stored(promoted))
    assert kept is not None and kept.phase == "Promoted" and r.restart_note(stored(promoted), kept) is None


def test_a_rollout_stored_without_its_stable_keeps_going_and_learns_it() -> None:
    state = r.current(spec_of(), None)
    assert state is not None
    old = {key: value for key, value in stored(state).items() if key != "stable"}
    resumed = r.current(spec_of(), old)
    assert resumed is not None and resumed.stable == "v1" and r.restart_note(old, resumed) is None


def test_removing_the_old_stable_after_a_promotion_retires_nobody_else() -> None:
    """The spec's stable is then the biggest variant: it must keep its traffic and pods, not be retired."""
    spec = spec_of()
    state = r.current(spec, None)
    assert state is not None
    promoted = r.drain(r.act("promote", state, total=r.pool(spec)).state).state
    assert weights(spec, promoted) == {
        "v1": ("variant", 0, True),
        "ab": ("variant", 30, False),
        "v2": ("stable", 70, False),
    }
    cleaned = spec_with([{"name": "ab", "model": "org/large", "weight": 30}, {**CANARY_V2, "weight": 70}])
    kept = r.current(cleaned, stored(promoted))
    assert kept is not None and kept.phase == "Promoted"
    assert weights(cleaned, kept) == {"ab": ("variant", 30, False), "v2": ("stable", 70, False)}
    assert [s.sized_for for s in shares(cleaned, kept, canary_ready=True)] == [30, 70]


def test_a_promoted_canary_edited_while_still_marked_canary_starts_a_rollout_and_says_so() -> None:
    spec = spec_of()
    state = r.current(spec, None)
    assert state is not None
    promoted = r.drain(r.act("promote", state, total=r.pool(spec)).state).state
    assert r.restart_note(stored(promoted), r.current(spec, stored(promoted))) is None  # unchanged
    edited_spec = spec_of(model="org/base")  # back to the old model
    again = r.current(edited_spec, stored(promoted))
    assert again is not None and (again.phase, again.weight, again.drained) == ("Progressing", 20, False)
    note = r.restart_note(stored(promoted), again)
    assert note is not None and note.startswith("canary v2 changed after its promotion while still marked")
    assert "a new rollout against v1 begins (v1 is scaled up again" in note
    assert weights(edited_spec, again)["v1"] == ("stable", 50, False)  # no longer retired
