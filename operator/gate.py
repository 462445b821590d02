"""The quality gate as pure decisions: what a run of ``rollout.qualityGate`` measured, and what it means.

A canary whose rollout has a gate starts with the gate ``Pending`` and receives no traffic (its pods run:
they are sized for its first step). Once it has a ready pod, one run captions the gate's dataset through
the canary (and, with ``maxDrop``, through the stable version) and scores both with the scorer of
``captionfleet eval`` (``captionfleet.scoring``); the I/O is ``gate_run.py``. Then:

- every threshold met: the gate ``Passed`` and the rollout continues (shadow checks, weight steps);
- ``minScore`` or ``maxDrop`` missed, the run took longer than ``timeout``, or the canary had no ready pod
  to score for longer than ``timeout`` (``waitingSince``): the gate ``Failed``, and the canary is rolled
  back (weight 0, reason ``QualityGateFailed``) before any client request reached it;
- the run could not be made (the dataset's ConfigMap missing or malformed, no ready stable pod to compare
  with, ``spec.auth`` without an operator key: ``NoOperatorKey``): the gate stays unjudged (``Error``),
  the canary still gets nothing, and the next check tries again; a Warning Event is posted when the
  problem is new.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from captionfleet.operator.events import Reason
from captionfleet.operator.spec import QualityGate, StatusModel, seconds, unix

if TYPE_CHECKING:
    from captionfleet.operator.rollout import CanaryState

GatePhase = Literal["Pending", "Passed", "Failed", "Error"]
GateVerdict = Literal["passed", "failed", "error"]
# The condition's and the Event's reason for each phase.
REASONS: dict[GatePhase, str] = {
    "Pending": "QualityGatePending",
    "Passed": "QualityGatePassed",
    "Failed": "QualityGateFailed",
    "Error": "QualityGateError",
}
# Why an unjudged gate did not run, where more precise than "Error" (the condition's and Event's reason).
NO_OPERATOR_KEY = Reason.NO_OPERATOR_KEY.value


class GateState(StatusModel):
    """The quality gate of the canary's rollout (``status.rollout.gate``)."""

    phase: GatePhase
    dataset: str
    metric: str
    canary_score: float | None = Field(default=None, description="The canary's score on the dataset.")
    stable_score: float | None = Field(
        default=None, description="The stable version's score on the same set (with maxDrop)."
    )
    images: int = Field(default=0, description="Images scored.")
    seconds: float | None = Field(default=None, description="How long the run took.")
    time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    message: str = ""
    reason: str | None = Field(
        default=None,
        description="Why the gate could not run, where more precise than its phase (NoOperatorKey).",
    )
    waiting_since: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When a check first found no ready canary pod to score; past timeout, the gate fails.",
    )

    def condition_reason(self) -> str:
        """The reason of the QualityGate condition (and of the run's Event)."""
        return self.reason or REASONS[self.phase]


@dataclass(frozen=True)
class Measured:
    """What one run measured: the gate's metric for the canary and (with maxDrop) the stable version."""

    images: int
    canary: float
    stable: float | None
    seconds: float
    failed_requests: int = 0  # images whose caption request failed (scored as an empty caption)


@dataclass(frozen=True)
class GateOutcome:
    verdict: GateVerdict
    gate: GateState

    @property
    def message(self) -> str:
        return self.gate.message


def pending(spec: QualityGate) -> GateState:
    return GateState(
        phase="Pending",
        dataset=spec.dataset,
        metric=spec.metric,
        message=f"the canary is scored on {spec.dataset} ({spec.metric}) before it gets any traffic",
    )


def _scores(spec: QualityGate, measured: Measured) -> str:
    text = f"{spec.metric} {measured.canary:.3f}"
    if measured.stable is not None:
        text += f" against the stable version's {measured.stable:.3f}"
    text += f" on {measured.images} images of {spec.dataset} in {measured.seconds:.1f} s"
    if measured.failed_requests:
        text += f" ({measured.failed_requests} caption requests failed, scored as empty captions)"
    return text


def problems(spec: QualityGate, measured: Measured) -> list[str]:
    """The thresholds ``measured`` misses, one sentence each."""
    found = []
    if spec.min_score is not None and measured.canary < spec.min_score:
        found.append(f"{spec.metric} {measured.canary:.3f} < minScore {spec.min_score:g}")
    if spec.max_drop is not None and measured.stable is not None:
        drop = measured.stable - measured.canary
        if drop > spec.max_drop:
            found.append(f"{spec.metric} fell by {drop:.3f} > maxDrop {spec.max_drop:g}")
    return found


def judge(spec: QualityGate, version: str, measured: Measured, now: str) -> GateOutcome:
    """The gate's verdict on one completed run."""
    missed = problems(spec, measured)
    scores = _scores(spec, measured)
    if missed:
        message = f"canary {version} failed the quality gate: {'; '.join(missed)} ({scores})"
    else:
        message = f"canary {version} passed the quality gate: {scores}"
    gate = GateState(
        phase="Failed" if missed else "Passed",
        dataset=spec.dataset,
        metric=spec.metric,
        canary_score=round(measured.canary, 6),
        stable_score=None if measured.stable is None else round(measured.stable, 6),
        images=measured.images,
        seconds=round(measured.seconds, 3),
        time=now,
        message=message,
    )
    return GateOutcome("failed" if missed else "passed", gate)


def timed_out(spec: QualityGate, version: str, now: str) -> GateOutcome:
    message = f"canary {version} failed the quality gate: scoring took longer than timeout {spec.timeout}"
    gate = pending(spec).model_copy(update={"phase": "Failed", "time": now, "message": message})
    return GateOutcome("failed", gate)


def no_ready_pod(spec: QualityGate, gate: GateState, version: str, now: str) -> GateState | GateOutcome:
    """A check that found no ready canary pod to score: the gate starts waiting (the state to store;
    unchanged while it waits), and fails once it has waited longer than ``timeout``: a canary whose
    pods never become ready is rolled back like one that scores too slowly, never left pending."""
    since, current = unix(gate.waiting_since), unix(now)
    if since is None or current is None:  # not waiting yet (or a stored time that does not parse)
        message = f"waiting for a ready pod of canary {version} to score (at most timeout {spec.timeout})"
        return gate.model_copy(update={"waiting_since": now, "message": message})
    if current - since <= seconds(spec.timeout):
        return gate
    message = (
        f"canary {version} failed the quality gate: no ready pod to score within timeout {spec.timeout} "
        f"(waiting since {gate.waiting_since}; the Degraded condition says why its pods do not start)"
    )
    update = {"phase": "Failed", "time": now, "message": message}
    return GateOutcome("failed", gate.model_copy(update=update))


def unjudged(spec: QualityGate, version: str, why: str, now: str) -> GateOutcome:
    message = (
        f"the quality gate of canary {version} could not run: {why}; it is tried again at the next check"
    )
    gate = pending(spec).model_copy(update={"phase": "Error", "time": now, "message": message})
    return GateOutcome("error", gate)


def no_operator_key(spec: QualityGate, version: str, now: str) -> GateOutcome:
    """spec.auth without an operator key: the pods would refuse every request, so none is sent."""
    why = (
        "spec.auth is set and the operator has no key of its own to call the pods with (its "
        "--operator-key-file; the chart's operatorKey), and it never reads the auth Secret"
    )
    outcome = unjudged(spec, version, why, now)
    return replace(outcome, gate=outcome.gate.model_copy(update={"reason": NO_OPERATOR_KEY}))


def apply(state: CanaryState, outcome: GateOutcome) -> CanaryState:
    """The rollout state after a gate run: passed, it continues; failed, the canary is rolled back
    (it never had traffic); unjudged, nothing changes but the gate's message."""
    update: dict[str, Any] = {"gate": outcome.gate, "message": outcome.message}
    if outcome.verdict == "passed":
        update["reason"] = REASONS["Passed"]
    elif outcome.verdict == "failed":
        update |= {"phase": "RolledBack", "weight": 0, "reason": REASONS["Failed"]}
    return state.model_copy(update=update)


def is_new_problem(previous: GateState | None, outcome: GateOutcome) -> bool:
    """Whether an unjudged run says something the last one did not (its Warning is posted once)."""
    return previous is None or previous.phase != "Error" or previous.message != outcome.message
