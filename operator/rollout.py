"""Progressive rollout as pure decisions: the canary's state, and what one analysis check does to it.

The state lives in ``status.rollout`` (never in the spec) and names the canary it is about by version
name and a hash of that version's spec, so a rolled-back or promoted version stays so until its spec
changes, and then a fresh rollout starts. One check reads the canary's figures over the window:

- fewer than ``minRequests`` (or no figures at all; or, with ``maxConfidenceDrop``, no confidence
  figures from a version that answered): hold, neither pass nor fail;
- error rate above ``errorRateThreshold`` percent, p99 above ``latencyP99Ms`` when set, or the mean
  confidence more than ``maxConfidenceDrop`` below the stable's when set: a failed check;
  ``threshold`` failed checks in a row roll the canary back (weight 0, scaled down);
- otherwise a pass, which resets the failed count: weight += ``stepWeight`` up to ``maxWeight``, and
  a pass at ``maxWeight`` promotes the canary (it becomes stable, the old stable scales to zero).

With ``mirror`` the rollout begins with a shadow phase at weight 0 (``shadow.py``): its checks judge
the copies the routers send the canary, and only once they pass does the first weight step come.

Traffic moves only between the canary and the stable version: their two spec weights form the
``pool`` the canary grows into; A/B variants keep their weights. The canary's own spec weight is not
used while a rollout drives it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from captionfleet.names import ROLLOUT_ACTION_ANNOTATION
from captionfleet.operator import shadow as shadow_phase
from captionfleet.operator.figures import Figures, ShadowFigures
from captionfleet.operator.gate import GateState, pending
from captionfleet.operator.shadow import ShadowState
from captionfleet.operator.spec import Analysis, CaptionModelSpec, ModelVersion, StatusModel

ACTIONS = ("abort", "promote")

RolloutPhase = Literal["Progressing", "Paused", "Promoted", "RolledBack"]
Verdict = Literal["pass", "fail", "hold"]
DecisionKind = Literal[
    "hold",
    "step",
    "promote",
    "fail",
    "rollback",
    "drain",
    "idle",
    "gate_passed",
    "gate_failed",
    "gate_error",
    "shadow",
]
NO_ROUTER = "no router answered"
# Fields of a version that do not make it another version: how much traffic and how many pods it gets.
_NOT_HASHED = {"weight", "canary", "min_replicas", "max_replicas"}


class Check(StatusModel):
    """The figures of the canary over the window at one check, and what they meant."""

    time: str = Field(json_schema_extra={"format": "date-time"})
    requests: int = 0
    errors: int = 0
    error_rate: float | None = Field(default=None, description="Percent of the requests that failed.")
    p99_ms: float | None = None
    confidence: float | None = Field(default=None, description="The canary's mean confidence.")
    stable_confidence: float | None = Field(default=None, description="The stable's, with maxConfidenceDrop.")
    verdict: Verdict


class CanaryState(StatusModel):
    """The canary's progress (``status.rollout``)."""

    version: str = Field(description="The canary this rollout is about.")
    spec_hash: str = Field(description="Hash of that version's spec; a change starts a new rollout.")
    stable: str = Field(
        default="",
        description="The version the canary replaces (the stable one when the rollout started); "
        "another stable version before a decision starts a new rollout.",
    )
    phase: RolloutPhase
    weight: int = Field(
        description="The canary's weight in percent; it receives it once it has a ready pod (0 before)."
    )
    step: int = Field(default=1, description="Weight increases so far, the first one included.")
    failed_checks: int = Field(default=0, description="Failed checks in a row.")
    reason: str = ""
    message: str = ""
    last_check: Check | None = None
    shadow: ShadowState | None = Field(
        default=None, description="The shadow phase (rollout.analysis.mirror), before the first weight step."
    )
    drained: bool = Field(
        default=False,
        description="After promotion or rollback: the retiring version's pods are scaled to zero. Set one "
        "check after the decision, so every router has applied the new weights before those pods go.",
    )
    gate: GateState | None = Field(
        default=None, description="The quality gate (rollout.qualityGate), run before any traffic."
    )

    @property
    def awaits_gate(self) -> bool:
        """Whether a quality gate still has to pass: the canary gets no traffic until it has."""
        return self.gate is not None and self.gate.phase != "Passed"

    @property
    def checked(self) -> bool:
        """Whether the canary has passed a check (the stable version keeps its capacity until then)."""
        return self.step > 1


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    state: CanaryState
    message: str


def spec_hash(version: ModelVersion) -> str:
    """What identifies a version's content: everything in its spec but its traffic and pod counts."""
    content = version.model_dump(mode="json", exclude=_NOT_HASHED)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def pool(spec: CaptionModelSpec) -> int:
    """The weight the canary and the stable version share (their spec weights together)."""
    canary, stable = spec.canary(), spec.stable()
    return (canary.weight if canary else 0) + (stable.weight if stable else 0)


def _fresh(spec: CaptionModelSpec, canary: ModelVersion, stable: ModelVersion) -> CanaryState:
    weight = min(spec.rollout.analysis.step_weight, pool(spec))
    quality_gate = spec.rollout.quality_gate
    state = CanaryState(
        version=canary.name,
        spec_hash=spec_hash(canary),
        stable=stable.name,
        phase="Progressing",
        weight=weight,
        reason="Started",
        message=f"canary {canary.name} starts at {weight} % once it has a ready pod",
    )
    shadow = shadow_phase.start(spec.rollout.analysis)
    if shadow is not None:  # after the gate, if any: copies first, weight 0 until the shadow checks pass
        message = f"canary {canary.name} gets copies of {shadow.percent} % of the requests (shadow phase)"
        state = state.model_copy(
            update={"weight": 0, "reason": "Shadow", "message": message, "shadow": shadow}
        )
    if quality_gate is None:
        return state
    message = f"canary {canary.name} starts at {weight} % once it has passed the quality gate"
    if shadow is not None:
        message = f"canary {canary.name} gets copies of requests once it has passed the quality gate"
    update = {"reason": "QualityGatePending", "message": message, "gate": pending(quality_gate)}
    return state.model_copy(update=update)


def current(spec: CaptionModelSpec, previous: Mapping[str, Any] | None) -> CanaryState | None:
    """The rollout state for this spec: the stored one while it is about the same canary (same name
    and spec hash), else a fresh one; None without a canary. ``rollout.paused`` applies here."""
    canary, stable = spec.canary(), spec.stable()
    if canary is None or stable is None:
        return None
    state: CanaryState | None = None
    if previous:
        stored = CanaryState.model_validate(dict(previous))
        if stored.version == canary.name and stored.spec_hash == spec_hash(canary):
            state = None if _stable_moved(stored, stable.name) else stored
    if state is not None and not state.stable:  # stored by an operator that did not record it
        state = state.model_copy(update={"stable": stable.name})
    if state is None:
        state = _fresh(spec, canary, stable)
    state = _follow_spec(spec, state.model_copy(update={"weight": min(state.weight, pool(spec))}))
    if spec.rollout.paused and state.phase == "Progressing":
        return state.model_copy(update={"phase": "Paused", "reason": "Paused", "message": "rollout.paused"})
    if not spec.rollout.paused and state.phase == "Paused":
        return state.model_copy(update={"phase": "Progressing", "reason": "Resumed", "message": "resumed"})
    return state


def _follow_spec(spec: CaptionModelSpec, state: CanaryState) -> CanaryState:
    """An undecided rollout after edits of its phases' settings: a qualityGate removed before its
    verdict is skipped; in the shadow phase, a changed mirror.percent applies at once and a removed
    mirror ends the phase (the first weight step comes, as after passed shadow checks)."""
    if state.phase not in ("Progressing", "Paused"):
        return state
    name, mirror = state.version, spec.rollout.analysis.mirror
    if state.awaits_gate and spec.rollout.quality_gate is None:
        message = f"rollout.qualityGate was removed before canary {name} was judged: it goes on without"
        state = state.model_copy(update={"gate": None, "reason": "QualityGateRemoved", "message": message})
    shadow = state.shadow
    if shadow is None or not shadow_phase.shadowing(shadow):
        return state
    if mirror is None:
        weight = min(spec.rollout.analysis.step_weight, _limit(spec.rollout.analysis, pool(spec)))
        message = (
            f"rollout.analysis.mirror was removed: canary {name}'s shadow phase ends at 0 % -> {weight} %"
        )
        update = {"shadow": shadow.model_copy(update={"done": True}), "weight": weight}
        return state.model_copy(update=update | {"reason": "ShadowRemoved", "message": message})
    if mirror.percent != shadow.percent:
        return state.model_copy(update={"shadow": shadow.model_copy(update={"percent": mirror.percent})})
    return state


def _stable_moved(stored: CanaryState, stable: str) -> bool:
    """Whether an undecided rollout's canary now replaces another version (the one it took its weight
    from left the spec, or a version with more traffic was added): its figures and its promotion would
    be about another pair. A decided one keeps its verdict (removing the retired stable is a cleanup)."""
    undecided = stored.phase in ("Progressing", "Paused")
    return undecided and stored.stable not in ("", stable)


def restart_note(previous: Mapping[str, Any] | None, state: CanaryState | None) -> str | None:
    """What happened to an undecided rollout that the spec no longer continues, in one sentence (the
    RolloutRestarted Event; None when nothing did): as Flagger does on a new revision, a canary whose
    spec changed mid-rollout starts again from the beginning (gate, shadow, first step); a canary flag
    moved to another version starts that one's rollout; a spec without canary or stable ends it."""
    if not previous:
        return None
    stored = CanaryState.model_validate(dict(previous))
    if stored.phase == "Promoted" and state is not None and state.version == stored.version:
        if state.spec_hash == stored.spec_hash:
            return None
        return (  # still marked canary: the edit is rolled out again, against the retired stable
            f"canary {stored.version} changed after its promotion while still marked canary: a new rollout "
            f"against {state.stable} begins ({state.stable} is scaled up again; until it has a ready pod "
            f"the routers send its share to the versions that have one); {state.message}"
        )
    if stored.phase not in ("Progressing", "Paused"):
        return None  # rolled back: a new spec hash is a new rollout, as it always is
    same = (stored.version, stored.spec_hash, stored.stable or (state.stable if state else ""))
    if state is not None and (state.version, state.spec_hash, state.stable) == same:
        return None
    was = f"the rollout of canary {stored.version} ({stored.phase} at {stored.weight} %, step {stored.step})"
    if state is None:
        return f"{was} ended undecided: the spec has no canary in rollout, or no stable version to replace"
    if state.version == stored.version and state.spec_hash != stored.spec_hash:
        return f"{was} starts again: the canary's spec changed; {state.message}"
    if state.version == stored.version:
        return f"{was} starts again: it now replaces {state.stable}, not {stored.stable}; {state.message}"
    return f"{was} ended undecided: the canary is now {state.version}; {state.message}"


def _limit(analysis: Analysis, total: int) -> int:
    return min(analysis.max_weight, total)


def check(
    analysis: Analysis,
    state: CanaryState,
    figures: Figures | None,
    *,
    total: int,
    now: str,
    baseline: Figures | None = None,
    unavailable: str = NO_ROUTER,
) -> Decision:
    """One analysis check of a Progressing rollout; ``total`` is the pool (see :func:`pool`);
    ``baseline``: the stable version's figures (its confidence, for maxConfidenceDrop);
    ``unavailable``: why there are no figures, when ``figures`` is None (said in the status)."""
    if state.phase != "Progressing":
        return Decision("idle", state, f"rollout is {state.phase}: nothing to check")
    if figures is None:
        return _no_figures(state, unavailable)
    if shadow_phase.shadowing(state.shadow):
        return _shadow_check(analysis, state, figures, total, now)
    if figures.requests == 0 or figures.requests < analysis.min_requests:
        return _held(analysis, state, figures, now)
    missing = _confidence_missing(analysis, figures, baseline)
    if missing is not None:
        return _no_figures(state, missing)
    problems = _problems(analysis, figures, baseline)
    if problems:
        return _failed(analysis, state, _check(figures, "fail", now, baseline), problems, figures.describe())
    return _passed(analysis, state, figures, total, now, baseline)


def _shadow_check(analysis: Analysis, state: CanaryState, figures: Figures, total: int, now: str) -> Decision:
    """A check of the shadow phase, on the copies' figures (``shadow.py``)."""
    assert state.shadow is not None
    copies = figures.shadow or ShadowFigures()
    observed = shadow_phase.observed(state.shadow, copies)
    watched = state.model_copy(update={"shadow": observed})
    if copies.copies == 0 or copies.copies < analysis.min_requests:
        message = (
            f"canary {state.version} (shadow): {copies.copies} copies in the window, below minRequests "
            f"{analysis.min_requests}; the check neither passes nor fails"
        )
        last = _check(copies.as_live(), "hold", now)
        return Decision("hold", watched.model_copy(update={"message": message, "last_check": last}), message)
    problems = shadow_phase.problems(analysis, copies)
    described = shadow_phase.describe(copies)
    if problems:
        return _failed(analysis, watched, _check(copies.as_live(), "fail", now), problems, described)
    passed = observed.passed + 1
    checks = analysis.mirror.checks if analysis.mirror is not None else 1
    update: dict[str, Any] = {"failed_checks": 0, "last_check": _check(copies.as_live(), "pass", now)}
    shadow = observed.model_copy(update={"passed": passed, "done": passed >= checks})
    if passed < checks:
        message = f"canary {state.version}: shadow check {passed}/{checks} passed ({described})"
        update |= {"shadow": shadow, "reason": "ShadowHealthy", "message": message}
        return Decision("shadow", watched.model_copy(update=update), message)
    weight = min(analysis.step_weight, _limit(analysis, total))
    message = f"canary {state.version}: 0 % -> {weight} % (shadow checks passed: {described})"
    update |= {"shadow": shadow, "weight": weight, "reason": "ShadowPassed", "message": message}
    return Decision("step", watched.model_copy(update=update), message)


def _no_figures(state: CanaryState, why: str) -> Decision:
    """Hold without figures: missing evidence never promotes, nor rolls back; the status says why."""
    message = f"canary {state.version}: no figures ({why or NO_ROUTER}); the check neither passes nor fails"
    return Decision("hold", state.model_copy(update={"message": message}), message)


def _held(analysis: Analysis, state: CanaryState, figures: Figures, now: str) -> Decision:
    """Hold with fewer requests than minRequests: neither pass nor fail."""
    name = state.version
    message = (
        f"canary {name}: {figures.requests} requests in the window, below minRequests "
        f"{analysis.min_requests}; the check neither passes nor fails"
    )
    held = state.model_copy(update={"last_check": _check(figures, "hold", now), "message": message})
    return Decision("hold", held, message)


def _confidence_missing(analysis: Analysis, figures: Figures, baseline: Figures | None) -> str | None:
    """Why maxConfidenceDrop cannot be judged though both versions answered (missing evidence holds
    the check); None when it can, or is not set. A stable that answered nothing in the window (no
    ``baseline``: the canary has the whole pool) leaves nothing to compare with: not a hold."""
    if analysis.max_confidence_drop is None or baseline is None or baseline.requests <= baseline.errors:
        return None
    if figures.confidence is None and figures.requests > figures.errors:
        return "the canary's answers carry no confidence figures, which maxConfidenceDrop compares"
    if baseline.confidence is None:
        return "the stable's answers carry no confidence figures, which maxConfidenceDrop compares"
    return None


def _problems(analysis: Analysis, figures: Figures, baseline: Figures | None) -> list[tuple[str, str]]:
    """(reason, sentence) for each threshold the figures cross."""
    problems = []
    drop_limit = analysis.max_confidence_drop
    stable = baseline.confidence if baseline is not None else None
    if drop_limit is not None and figures.confidence is not None and stable is not None:
        drop = stable - figures.confidence
        if drop > drop_limit:
            problems.append(
                (
                    "ConfidenceDrop",
                    f"mean confidence {figures.confidence:.3f} is {drop:.3f} below the stable's {stable:.3f} "
                    f"(maxConfidenceDrop {drop_limit:g})",
                )
            )
    rate = figures.error_rate or 0.0
    if rate > analysis.error_rate_threshold:
        problems.append(("ErrorRate", f"error rate {rate:.2f} % > {analysis.error_rate_threshold:g} %"))
    limit = analysis.latency_p99_ms
    if limit is not None and figures.p99_ms is not None and figures.p99_ms > limit:
        problems.append(("Latency", f"p99 {figures.p99_ms:.0f} ms > {limit:g} ms"))
    return problems


def _failed(
    analysis: Analysis, state: CanaryState, last: Check, problems: list[tuple[str, str]], described: str
) -> Decision:
    """A failed check; the ``threshold``-th in a row rolls the canary back."""
    name = state.version
    failed = state.failed_checks + 1
    why = "; ".join(text for _, text in problems)
    update: dict[str, Any] = {"failed_checks": failed, "last_check": last}
    if failed >= analysis.threshold:
        message = f"canary {name} rolled back after {failed} failed checks in a row: {why} ({described})"
        update |= {"phase": "RolledBack", "weight": 0, "reason": problems[0][0], "message": message}
        return Decision("rollback", state.model_copy(update=update), message)
    message = f"canary {name}: check failed ({failed}/{analysis.threshold}): {why}"
    update |= {"reason": "CheckFailed", "message": message}
    return Decision("fail", state.model_copy(update=update), message)


def _passed(
    analysis: Analysis, state: CanaryState, figures: Figures, total: int, now: str, baseline: Figures | None
) -> Decision:
    """A passed check: one step more, or promotion at maxWeight."""
    name = state.version
    passed = _check(figures, "pass", now, baseline)
    if state.weight >= _limit(analysis, total):
        message = f"canary {name} promoted: healthy at {state.weight} % ({figures.describe()})"
        return _promoted(state, total, message, passed)
    weight = min(state.weight + analysis.step_weight, _limit(analysis, total))
    message = f"canary {name}: {state.weight} % -> {weight} % ({figures.describe()})"
    stepped = state.model_copy(
        update={
            "weight": weight,
            "step": state.step + 1,
            "failed_checks": 0,
            "reason": "Healthy",
            "message": message,
            "last_check": passed,
        }
    )
    return Decision("step", stepped, message)


def _promoted(state: CanaryState, total: int, message: str, last_check: Check | None) -> Decision:
    update: dict[str, Any] = {
        "phase": "Promoted",
        "weight": total,
        "failed_checks": 0,
        "reason": "Promoted",
        "message": message,
    }
    if last_check is not None:
        update["last_check"] = last_check
    return Decision("promote", state.model_copy(update=update), message)


def drain(state: CanaryState) -> Decision:
    """The check after a promotion or rollback: the routers have moved the traffic, so the retiring
    version (the old stable, or the rolled-back canary) may now be scaled to zero."""
    if state.phase not in ("Promoted", "RolledBack") or state.drained:
        return Decision("idle", state, f"rollout is {state.phase}: nothing to drain")
    message = f"{state.phase.lower()} rollout of {state.version}: the retiring version is scaled to zero"
    return Decision("drain", state.model_copy(update={"drained": True}), message)


def unknown_action(action: str) -> str:
    return f"unknown rollout action {action!r} ignored; use one of {', '.join(ACTIONS)}"


def act(action: str, state: CanaryState, *, total: int) -> Decision:
    """A manual action (the ``captionfleet.io/rollout-action`` annotation): abort or promote now."""
    name = state.version
    if action not in ACTIONS:
        return Decision("idle", state, unknown_action(action))
    if state.phase in ("Promoted", "RolledBack"):
        return Decision("idle", state, f"canary {name} is already {state.phase}; {action} ignored")
    if action == "promote":
        return _promoted(
            state, total, f"canary {name} promoted by hand ({ROLLOUT_ACTION_ANNOTATION}=promote)", None
        )
    message = f"canary {name} rolled back by hand ({ROLLOUT_ACTION_ANNOTATION}=abort)"
    aborted = state.model_copy(
        update={"phase": "RolledBack", "weight": 0, "reason": "Aborted", "message": message}
    )
    return Decision("rollback", aborted, message)


def _check(figures: Figures, verdict: Verdict, now: str, baseline: Figures | None = None) -> Check:
    rate = figures.error_rate
    stable = baseline.confidence if baseline is not None else None
    return Check(
        time=now,
        requests=figures.requests,
        errors=figures.errors,
        error_rate=None if rate is None else round(rate, 4),
        p99_ms=figures.p99_ms,
        confidence=None if figures.confidence is None else round(figures.confidence, 4),
        stable_confidence=None if stable is None else round(stable, 4),
        verdict=verdict,
    )
