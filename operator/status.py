"""The CaptionModel status: its schema (pydantic, for the CRD) and pure functions that compute it.

Status is computed from the spec, the effective traffic shares, the rollout state and the observed
Deployments; it is never read back as input except for the times of condition transitions, the
rollout state (``status.rollout``, owned by the rollout loop) and the last known versions while the
spec is invalid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from captionfleet.operator.builders.common import ColdPhase
from captionfleet.operator.cascade import CascadeStatus
from captionfleet.operator.coldstart import ColdState
from captionfleet.operator.events import Reason
from captionfleet.operator.gate import GateState
from captionfleet.operator.pods import POD_REASONS, ROUTER_KEY, PodProblem
from captionfleet.operator.rollout import CanaryState
from captionfleet.operator.spec import StatusModel, iso
from captionfleet.operator.traffic import Role, Share

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid", "RolledBack"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "RolledBack", "QualityGate"]
# Reasons of a Degraded condition that the operator found (not a Deployment): they stand until a
# reconciliation clears them, whatever the Deployments report meanwhile.
OPERATOR_TROUBLES = ("ApplyFailed", "NameConflict", "KedaNotInstalled")
# Fields of a version's status written only when set (VersionStatus), by either of their names.
OPTIONAL_FIELDS = frozenset(
    {"cold_start", "coldStart", "state", "state_since", "stateSince", "last_request_at", "lastRequestAt"}
    | {"reason", "message", "mirror"}
)
IDLE_MESSAGE = "no request for scaleToZeroAfter: 0 pods until one arrives (the routers hold it meanwhile)"


@dataclass(frozen=True)
class Trouble:
    """Something that keeps the fleet from being what the spec says: the reason and a sentence."""

    reason: str
    message: str


class Condition(StatusModel):
    """A metav1.Condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(max_length=32768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class VersionStatus(StatusModel):
    name: str
    role: Role = Field(description="stable: most traffic; canary: being rolled out; variant: an A/B arm.")
    weight: int = Field(description="Effective share of traffic now, in percent (what the router applies).")
    service: str | None = Field(default=None, description="The version's Service, which the router uses.")
    replicas: int = 0
    ready_replicas: int = 0
    mirror: int | None = Field(
        default=None, description="Percent of the requests the routers copy to it (a canary's shadow phase)."
    )
    cold_start: bool = Field(
        default=False,
        description="The version may scale to zero: while it has no ready pod the routers hold its "
        "requests (router.coldStart) instead of sending them to another version.",
    )
    state: ColdPhase | None = Field(
        default=None,
        description="Only for a version that may scale to zero: Ready (in its autoscaler's range), "
        "Idle (0 pods after scaleToZeroAfter without requests), Waking (requests held, pods starting).",
    )
    state_since: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    last_request_at: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="The latest request any router pod received for this version (scale to zero only).",
    )
    reason: str | None = Field(
        default=None, description="Why the version has no ready pod, e.g. Unschedulable, ImagePullFailed."
    )
    message: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The scale-to-zero and not-ready fields only where they say something: a version that
        cannot scale to zero and is ready reads as before."""
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if key not in OPTIONAL_FIELDS or value}


class CaptionModelStatus(StatusModel):
    phase: Phase | None = None
    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the router.")
    stable_version: str | None = None
    canary_version: str | None = None
    canary_weight: int | None = None
    replicas: int = 0
    ready_replicas: int = Field(default=0, description="Ready runtime pods over all versions.")
    versions: list[VersionStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    rollout: CanaryState | None = Field(
        default=None, description="Progress of the canary's rollout: weight, failed checks, last figures."
    )
    cascade: CascadeStatus | None = Field(
        default=None, description="The cascade's tiers, threshold, figures."
    )

    def manifest(self) -> dict[str, Any]:
        """The status as written into the CR."""
        return self.model_dump(by_alias=True, mode="json")


@dataclass(frozen=True)
class DeploymentProgress:
    """What one Deployment says about its progress (its rollout of the current pod template)."""

    replicas: int
    ready_replicas: int
    ready: bool
    waiting: str | None  # why it is not ready yet
    failure: str | None  # why it will not get ready without help


def deployment_progress(name: str, deployment: Mapping[str, Any] | None) -> DeploymentProgress:
    if deployment is None:
        return DeploymentProgress(0, 0, False, f"{name}: not created yet", None)
    meta = deployment.get("metadata") or {}
    st = deployment.get("status") or {}
    replicas = int(st.get("replicas") or 0)
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    failure = None
    progressing = conditions.get("Progressing") or {}
    replica_failure = conditions.get("ReplicaFailure") or {}
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        failure = f"{name}: {progressing.get('message') or 'progress deadline exceeded'}"
    elif replica_failure.get("status") == "True":
        failure = f"{name}: {replica_failure.get('message') or 'cannot create pods'}"
    waiting = None
    if int(st.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        waiting = f"{name}: the new pod template is not rolled out yet"
    elif ready == 0:
        waiting = f"{name}: no ready replicas"
    elif updated < replicas:
        waiting = f"{name}: {updated}/{replicas} replicas updated"
    return DeploymentProgress(replicas, ready, waiting is None and failure is None, waiting, failure)


def _condition(
    type_: ConditionType,
    status: bool,
    reason: str,
    message: str,
    *,
    previous: Sequence[Mapping[str, Any]],
    generation: int,
    now: str,
) -> Condition:
    value: Literal["True", "False"] = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    changed = before is None or before.get("status") != value
    since = now if changed or not before else str(before.get("lastTransitionTime") or now)
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def _kept_rolled_back(previous: Sequence[Mapping[str, Any]], generation: int, now: str) -> Condition:
    """RolledBack belongs to the rollout loop: keep what it wrote, else say that nothing happened."""
    before = next((c for c in previous if c.get("type") == "RolledBack"), None)
    if before is not None:
        return Condition.model_validate(before)
    return _condition(
        "RolledBack",
        False,
        "NoRollback",
        "no automatic rollback has happened",
        previous=previous,
        generation=generation,
        now=now,
    )


def problem_subject(key: str, problem: PodProblem) -> str:
    """``version v1: Secret redis not found``: the stable part of a pod problem's line in the status."""
    who = "router" if key == ROUTER_KEY else f"version {key}"
    return f"{who}: {problem.subject}"


def problem_line(key: str, problem: PodProblem) -> str:
    """A pod problem as the conditions and its Event say it."""
    detail = f": {problem.detail}" if problem.detail else ""
    return f"{problem_subject(key, problem)}{detail}; its pods cannot start"


def _problem_lines(problems: Mapping[str, Sequence[PodProblem]]) -> list[tuple[str, str]]:
    """(reason, line) of every pod problem, most telling reason first."""
    order = {reason: i for i, reason in enumerate(POD_REASONS)}
    found = [(problem, key) for key, listed in problems.items() for problem in listed]
    found.sort(key=lambda item: order[item[0].reason])
    return [(str(problem.reason), problem_line(key, problem)) for problem, key in found]


@dataclass(frozen=True)
class _Observed:
    """The versions and what holds the fleet back, from its Deployments and pods."""

    versions: list[VersionStatus]
    waiting: list[str]
    failures: list[str]
    serving: bool
    problems: list[tuple[str, str]]  # (reason, line): why pods do not start (pods.py)


def _observe(
    shares: Sequence[Share],
    deployments: Mapping[str, Mapping[str, Any] | None],
    services: Mapping[str, str],
    router: Mapping[str, Any] | None,
    problems: Mapping[str, Sequence[PodProblem]],
    cold: Mapping[str, ColdState],
) -> _Observed:
    versions, waiting, failures = [], [], []
    for share in shares:
        progress = deployment_progress(f"version {share.name}", deployments.get(share.name))
        state = cold.get(share.name)
        versions.append(
            VersionStatus(
                name=share.name,
                role=share.role,
                weight=share.weight,
                service=services.get(share.name),
                replicas=progress.replicas,
                ready_replicas=progress.ready_replicas,
                mirror=share.mirror or None,
                **_cold_fields(share.name, state, progress, problems.get(share.name) or ()),
            )
        )
        if progress.failure:
            failures.append(progress.failure)
        elif state is not None and state.phase == "Idle":
            continue  # at zero on purpose: nothing to wait for
        elif share.weight > 0 and progress.waiting:  # versions without traffic do not hold the fleet back
            waiting.append(progress.waiting)
    router_progress = deployment_progress("router", router)
    if router_progress.failure:
        failures.append(router_progress.failure)
    elif router_progress.waiting:
        waiting.append(router_progress.waiting)
    serving = router_progress.ready_replicas > 0 and any(v.ready_replicas for v in versions if v.weight)
    known = {share.name for share in shares} | {ROUTER_KEY}
    lines = _problem_lines({key: listed for key, listed in problems.items() if key in known})
    return _Observed(versions, waiting, failures, serving, lines)


def _cold_fields(
    name: str, state: ColdState | None, progress: DeploymentProgress, problems: Sequence[PodProblem]
) -> dict[str, Any]:
    """A version's scale-to-zero fields, and why it has no ready pod (the pods' own reason first)."""
    fields: dict[str, Any] = {}
    if state is not None:
        fields = {
            "cold_start": True,
            "state": state.phase,
            "state_since": iso(state.since),
            "last_request_at": iso(state.last_request_at),
        }
    if progress.ready_replicas > 0:
        return fields
    if problems:
        first = min(problems, key=lambda problem: POD_REASONS.index(problem.reason))
        return fields | {"reason": str(first.reason), "message": problem_line(name, first)}
    if state is not None and state.phase == "Idle":
        return fields | {"reason": str(Reason.SCALED_TO_ZERO), "message": IDLE_MESSAGE}
    if state is not None and state.phase == "Waking":
        return fields | {
            "reason": str(Reason.WAKING),
            "message": f"waking from zero: {progress.waiting or 'starting'}",
        }
    return fields


def _phase(observed: _Observed, rollout: CanaryState | None, trouble: Trouble | None) -> Phase:
    if observed.failures or observed.problems or trouble is not None:
        return "Degraded"
    if not observed.waiting:
        phase: Phase = "Ready"
    else:
        phase = "Progressing" if observed.serving else "Pending"
    if rollout is not None and rollout.phase == "RolledBack" and phase in ("Ready", "Progressing"):
        return "RolledBack"  # serving on the stable version; the canary is out
    return phase


def fleet_status(
    *,
    shares: Sequence[Share],
    deployments: Mapping[str, Mapping[str, Any] | None],
    services: Mapping[str, str],
    router: Mapping[str, Any] | None,
    generation: int,
    endpoint: str,
    previous: Mapping[str, Any],
    now: str,
    rollout: CanaryState | None = None,
    trouble: Trouble | None = None,
    pod_problems: Mapping[str, Sequence[PodProblem]] | None = None,
    cold: Mapping[str, ColdState] | None = None,
) -> CaptionModelStatus:
    """The status of a valid spec, from the version Deployments and Service names (by version name),
    the router's Deployment, the rollout state, what the operator found wrong (``trouble``) and why
    pods do not start (``pod_problems``, by version name or ``pods.ROUTER_KEY``)."""
    observed = _observe(shares, deployments, services, router, pod_problems or {}, cold or {})
    before = list(previous.get("conditions") or [])

    def cond(type_: ConditionType, status: bool, reason: str, message: str) -> Condition:
        return _condition(type_, status, reason, message, previous=before, generation=generation, now=now)

    phase = _phase(observed, rollout, trouble)
    canary = next((s for s in shares if s.role == "canary"), None)
    conditions = [
        _ready(cond, observed, phase, endpoint, trouble),
        _progressing(cond, observed, rollout, canary),
        _degraded(cond, observed, trouble),
        _rolled_back(rollout, cond),
    ]
    if rollout is not None and rollout.gate is not None:
        conditions.append(_quality_gate(rollout.gate, cond))
    return CaptionModelStatus(
        phase=phase,
        observed_generation=generation,
        endpoint=endpoint,
        stable_version=next((s.name for s in shares if s.role == "stable"), None),
        canary_version=canary.name if canary else None,
        canary_weight=canary.weight if canary else None,
        replicas=sum(v.replicas for v in observed.versions),
        ready_replicas=sum(v.ready_replicas for v in observed.versions),
        versions=observed.versions,
        conditions=conditions,
        rollout=rollout,
    )


Cond = Callable[[ConditionType, bool, str, str], Condition]


def _ready(
    cond: Cond, observed: _Observed, phase: Phase, endpoint: str, trouble: Trouble | None
) -> Condition:
    if trouble is not None:
        return cond("Ready", False, trouble.reason, trouble.message)
    if observed.problems:
        lines = [line for _, line in observed.problems]
        return cond("Ready", False, observed.problems[0][0], "; ".join(lines + observed.failures))
    if phase in ("Ready", "RolledBack") and not observed.waiting:
        return cond("Ready", True, "AllReplicasReady", f"serving on {endpoint}")
    reason = "Progressing" if phase == "RolledBack" else phase
    return cond("Ready", False, reason, "; ".join(observed.failures + observed.waiting))


def _progressing(
    cond: Cond, observed: _Observed, rollout: CanaryState | None, canary: Share | None
) -> Condition:
    if observed.waiting:
        return cond("Progressing", True, "RollingOut", "; ".join(observed.waiting))
    if rollout is not None and rollout.phase != "Progressing":
        return cond("Progressing", False, rollout.phase, rollout.message or rollout.phase)
    if canary is not None:
        return cond(
            "Progressing", True, "CanaryInRollout", f"canary {canary.name} receives {canary.weight} %"
        )
    return cond("Progressing", False, "Stable", "every version is rolled out")


def _degraded(cond: Cond, observed: _Observed, trouble: Trouble | None) -> Condition:
    if trouble is not None:
        return cond("Degraded", True, trouble.reason, trouble.message)
    if observed.problems:
        lines = [line for _, line in observed.problems]
        return cond("Degraded", True, observed.problems[0][0], "; ".join(lines + observed.failures))
    if observed.failures:
        return cond("Degraded", True, "DeploymentFailed", "; ".join(observed.failures))
    return cond("Degraded", False, "AsExpected", "no Deployment or pod reports a failure")


def _rolled_back(rollout: CanaryState | None, cond: Callable[..., Condition]) -> Condition:
    if rollout is not None and rollout.phase == "RolledBack":
        return cond("RolledBack", True, rollout.reason or "RolledBack", rollout.message)
    return cond("RolledBack", False, "NoRollback", "no canary is rolled back")


def _quality_gate(gate: GateState, cond: Cond) -> Condition:
    """True once the canary's quality gate has passed; its last run's scores in the message."""
    return cond("QualityGate", gate.phase == "Passed", gate.condition_reason(), gate.message)


def invalid_status(
    *, message: str, generation: int, previous: Mapping[str, Any], now: str
) -> CaptionModelStatus:
    """Phase Invalid; what runs keeps running, so the last known versions and endpoint stay."""
    before = list(previous.get("conditions") or [])
    kept = CaptionModelStatus.model_validate(dict(previous))

    def cond(type_: ConditionType, status: bool, reason: str, text: str) -> Condition:
        return _condition(type_, status, reason, text, previous=before, generation=generation, now=now)

    degraded = next((c for c in before if c.get("type") == "Degraded"), None)
    return kept.model_copy(
        update={
            "phase": "Invalid",
            "observed_generation": generation,
            "conditions": [
                cond("Ready", False, "InvalidSpec", message),
                cond("Progressing", False, "InvalidSpec", "nothing is changed until the spec is fixed"),
                Condition.model_validate(degraded)
                if degraded
                else cond("Degraded", False, "AsExpected", "no Deployment or pod reports a failure"),
                _kept_rolled_back(before, generation, now),
            ],
        }
    )
