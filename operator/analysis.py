"""One rollout analysis check of one CaptionModel, as a plain async function (the daemon calls it).

Read the CaptionModel afresh, and if its canary's rollout is Progressing, read the canary's figures
over ``window`` (from the routers or Prometheus, ``figures.py``), let ``rollout.check`` decide, and
reconcile with the decided state: weights, replica counts and ``status.rollout`` change together.
A check is skipped while the spec is invalid or not yet reconciled (the status belongs to an older
generation), and when the rollout is paused, promoted or rolled back. Without a canary in rollout
nothing is read at all and the next look is ``IDLE_INTERVAL_S`` away (or the next reconciliation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from captionfleet.operator import gate, gate_run, kube, reconcile, rollout, validation
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.events import REPAIRS, Event, Reason
from captionfleet.operator.figures import Source, Wanted
from captionfleet.operator.metrics import OperatorMetrics
from captionfleet.operator.shadow import shadowing
from captionfleet.operator.spec import seconds

log = logging.getLogger(__name__)

IDLE_INTERVAL_S = 60.0  # how often a CaptionModel without a canary in rollout is looked at again
# Reconcile events that a check reports (the rest, e.g. "Reconciled", would repeat every interval).
CHECK_REPORTS = REPAIRS | {Reason.PROMOTED, Reason.ROLLED_BACK, Reason.ROLLOUT_ACTION}
DECISION_EVENTS = {
    "step": (Event.normal, Reason.CANARY_STEP),
    "promote": (Event.normal, Reason.PROMOTED),
    "fail": (Event.warning, Reason.CHECK_FAILED),
    "rollback": (Event.warning, Reason.ROLLED_BACK),
    "shadow": (Event.normal, Reason.SHADOW_CHECK_PASSED),
    "gate_passed": (Event.normal, Reason.QUALITY_GATE_PASSED),
    "gate_failed": (Event.warning, Reason.QUALITY_GATE_FAILED),
    "gate_error": (Event.warning, Reason.QUALITY_GATE_ERROR),
}
GATE_DECISIONS: dict[gate.GateVerdict, rollout.DecisionKind] = {
    "passed": "gate_passed",
    "failed": "gate_failed",
    "error": "gate_error",
}


@dataclass
class CheckOutcome:
    interval_s: float = IDLE_INTERVAL_S  # when to check next
    events: list[Event] = field(default_factory=list)
    model: dict[str, Any] | None = None  # the CaptionModel the events are about
    decision: rollout.Decision | None = None


@dataclass(frozen=True)
class Tools:
    """What a check reads and reports through."""

    api: kube.Api
    config: ClusterConfig
    source: Source
    metrics: OperatorMetrics
    gate: gate_run.GateClients | None = None  # how the quality gate reaches the versions' pods
    # The CaptionModel's lock (by uid) let go of while a gate run waits on pods: none in plain calls.
    unlocked: Callable[[str], AbstractAsyncContextManager[None]] = lambda uid: contextlib.nullcontext()


async def check_once(tools: Tools, namespace: str, name: str) -> CheckOutcome:
    body = await tools.api.get(kube.CAPTION_MODEL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return CheckOutcome()
    spec, problems = validation.check(name, body.get("spec"), tools.config)
    if problems or spec is None:
        return CheckOutcome()
    status = body.get("status") or {}
    state = rollout.current(spec, status.get("rollout"))
    if state is None:
        return CheckOutcome()  # no canary: nothing to check until the spec changes
    outcome = CheckOutcome(interval_s=seconds(spec.rollout.analysis.interval), model=body)
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return outcome  # the handlers have not reconciled this spec yet
    if state.phase in ("Promoted", "RolledBack") and not state.drained:
        outcome.decision = rollout.drain(state)
        await reconcile.reconcile(tools.api, body, tools.config, rollout_state=outcome.decision.state)
        return outcome
    if state.phase != "Progressing":
        outcome.interval_s = IDLE_INTERVAL_S
        return outcome
    if state.awaits_gate:
        return await _gate(tools, body, spec, state, outcome)
    return await _check(tools, body, spec, state, outcome)


def _wanted(spec: Any, state: rollout.CanaryState) -> Wanted:
    """The shadow figures in the shadow phase; the stable's figures too with maxConfidenceDrop."""
    if shadowing(state.shadow):
        return Wanted(shadow=True)
    stable = spec.stable()
    wants_baseline = spec.rollout.analysis.max_confidence_drop is not None and stable is not None
    return Wanted(baseline=stable.name if wants_baseline else None)


async def _gate(
    tools: Tools, body: dict[str, Any], spec: Any, state: rollout.CanaryState, outcome: CheckOutcome
) -> CheckOutcome:
    """Run the quality gate once the canary has a ready pod, and reconcile with its verdict."""
    if tools.gate is None:
        return outcome
    # A run takes up to qualityGate.timeout: meanwhile edits, actions and deletion are reconciled.
    async with tools.unlocked(body["metadata"]["uid"]):
        result = await gate_run.run(tools.gate, tools.api, body, spec, reconcile.now())
    body = await _still_gated(tools, body, spec, state)
    if not body:
        message = (
            f"the quality gate run of canary {state.version} is discarded: the canary, its rollout or "
            "rollout.qualityGate changed (or the CaptionModel went away) during the run"
        )
        log.info(message)
        outcome.interval_s = 0.0  # the next check starts what the changed spec asks for
        return outcome
    if result is None:
        return await _no_ready_pod(tools, body, spec, state, outcome)
    return await _verdict(tools, body, state, result, outcome)


async def _no_ready_pod(
    tools: Tools, body: dict[str, Any], spec: Any, state: rollout.CanaryState, outcome: CheckOutcome
) -> CheckOutcome:
    """No ready canary pod to score yet: wait (said in the gate's state once), up to the timeout."""
    assert state.gate is not None
    waited = gate.no_ready_pod(spec.rollout.quality_gate, state.gate, state.version, reconcile.now())
    if isinstance(waited, gate.GateOutcome):
        return await _verdict(tools, body, state, waited, outcome)
    if waited != state.gate:
        waiting = state.model_copy(update={"gate": waited})
        await reconcile.reconcile(tools.api, body, tools.config, rollout_state=waiting)
    return outcome


async def _verdict(
    tools: Tools,
    body: dict[str, Any],
    state: rollout.CanaryState,
    result: gate.GateOutcome,
    outcome: CheckOutcome,
) -> CheckOutcome:
    """Reconcile with a gate run's verdict, and report it."""
    new_state = gate.apply(state, result)
    outcome.decision = rollout.Decision(GATE_DECISIONS[result.verdict], new_state, result.message)
    reconciled = await reconcile.reconcile(tools.api, body, tools.config, rollout_state=new_state)
    outcome.events += [e for e in reconciled.events if e.reason in CHECK_REPORTS]
    if result.verdict != "error" or gate.is_new_problem(state.gate, result):
        make, reason = DECISION_EVENTS[outcome.decision.kind]
        outcome.events.append(make(Reason(result.gate.reason or reason), result.message))
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    tools.metrics.record_gate(namespace, name, state.version, result)
    if result.verdict == "failed":
        tools.metrics.rollbacks.labels(namespace=namespace, captionmodel=name, version=state.version).inc()
    return outcome


async def _still_gated(
    tools: Tools, body: dict[str, Any], spec: Any, state: rollout.CanaryState
) -> dict[str, Any]:
    """The CaptionModel as stored after a gate run, if its verdict still applies: the same canary
    (name and spec hash), still awaiting its gate with the same qualityGate, in a reconciled spec; else
    {} (an edit's own reconciliation starts what follows)."""
    meta = body["metadata"]
    found = await tools.api.get(kube.CAPTION_MODEL, meta["namespace"], meta["name"])
    if (
        found is None
        or found["metadata"].get("uid") != meta["uid"]
        or found["metadata"].get("deletionTimestamp")
    ):
        return {}
    now_spec, problems = validation.check(meta["name"], found.get("spec"), tools.config)
    if problems or now_spec is None or now_spec.rollout.quality_gate != spec.rollout.quality_gate:
        return {}
    status = found.get("status") or {}
    if status.get("observedGeneration") != found["metadata"].get("generation"):
        return {}
    now_state = rollout.current(now_spec, status.get("rollout"))
    if now_state is None or (now_state.version, now_state.spec_hash) != (state.version, state.spec_hash):
        return {}
    return found if now_state.phase == "Progressing" and now_state.awaits_gate else {}


async def _check(
    tools: Tools, body: dict[str, Any], spec: Any, state: rollout.CanaryState, outcome: CheckOutcome
) -> CheckOutcome:
    """Read the figures, decide, and reconcile with the decision."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    analysis = spec.rollout.analysis
    window_s = max(1, round(seconds(analysis.window)))
    wanted = _wanted(spec, state)
    # Without shadow or baseline, the call of a source that predates them (a plugged-in one).
    extra = () if wanted == Wanted() else (wanted,)
    reading = await tools.source.read(namespace, name, state.version, window_s, *extra)
    for problem in reading.problems:
        log.warning(
            "rollout figures incomplete", extra={"captionmodel": f"{namespace}/{name}", "problem": problem}
        )
    decision = rollout.check(
        analysis,
        state,
        reading.figures,
        total=rollout.pool(spec),
        now=reconcile.now(),
        baseline=reading.baseline,
        unavailable="; ".join(reading.problems),
    )
    outcome.decision = decision
    if decision.kind == "hold" and decision.state == state:
        return outcome  # nothing new to write (no figures, for the reason already in the status)
    if reading.figures is None:  # said once per cause: the state changed only by its message
        outcome.events.append(Event.warning(Reason.FIGURES_UNAVAILABLE, decision.message))
    result = await reconcile.reconcile(tools.api, body, tools.config, rollout_state=decision.state)
    outcome.events += [e for e in result.events if e.reason in CHECK_REPORTS]
    if decision.kind in DECISION_EVENTS:
        make, reason = DECISION_EVENTS[decision.kind]
        outcome.events.append(make(reason, decision.message))
    if decision.kind == "rollback":
        tools.metrics.rollbacks.labels(namespace=namespace, captionmodel=name, version=state.version).inc()
    return outcome
