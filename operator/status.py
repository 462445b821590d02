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

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from captionfleet.operator.rollout import CanaryState
from captionfleet.operator.traffic import Role, Share

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Invalid", "RolledBack"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "RolledBack"]
CONDITION_TYPES: tuple[ConditionType, ...] = ("Ready", "Progressing", "Degraded", "RolledBack")


class _StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_StatusModel):
    """A metav1.Condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(max_length=32768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class VersionStatus(_StatusModel):
    name: str
    role: Role = Field(description="stable: most traffic; canary: being rolled out; variant: an A/B arm.")
    weight: int = Field(description="Effective share of traffic now, in percent (what the router applies).")
    service: str | None = Field(default=None, description="The version's Service, which the router uses.")
    replicas: int = 0
    ready_replicas: int = 0


class CaptionModelStatus(_StatusModel):
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

    def manifest(self) -> dict[str, Any]:
        """The status as written into the CR."""
        return self.model_dump(by_alias=True, mode="json")


@dataclass(frozen=True)
class RolloutState:
    """What one Deployment says about its rollout."""

    replicas: int
    ready_replicas: int
    ready: bool
    waiting: str | None  # why it is not ready yet
    failure: str | None  # why it will not get ready without help


def rollout_state(name: str, deployment: Mapping[str, Any] | None) -> RolloutState:
    if deployment is None:
        return RolloutState(0, 0, False, f"{name}: not created yet", None)
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
    return RolloutState(replicas, ready, waiting is None and failure is None, waiting, failure)


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
) -> CaptionModelStatus:
    """The status of a valid spec, from the version Deployments and Service names (by version name),
    the router's Deployment and the rollout state."""
    before = list(previous.get("conditions") or [])
    versions, waiting, failures = [], [], []
    for share in shares:
        state = rollout_state(f"version {share.name}", deployments.get(share.name))
        versions.append(
            VersionStatus(
                name=share.name,
                role=share.role,
                weight=share.weight,
                service=services.get(share.name),
                replicas=state.replicas,
                ready_replicas=state.ready_replicas,
            )
        )
        if state.failure:
            failures.append(state.failure)
        elif share.weight > 0 and state.waiting:  # versions without traffic do not hold the fleet back
            waiting.append(state.waiting)
    router_state = rollout_state("router", router)
    if router_state.failure:
        failures.append(router_state.failure)
    elif router_state.waiting:
        waiting.append(router_state.waiting)

    serving = router_state.ready_replicas > 0 and any(v.ready_replicas for v in versions if v.weight)
    phase: Phase
    if failures:
        phase = "Degraded"
    elif not waiting:
        phase = "Ready"
    elif serving:
        phase = "Progressing"
    else:
        phase = "Pending"
    canary = next((s for s in shares if s.role == "canary"), None)

    def cond(type_: ConditionType, status: bool, reason: str, message: str) -> Condition:
        return _condition(type_, status, reason, message, previous=before, generation=generation, now=now)

    if phase == "Ready":
        ready = cond("Ready", True, "AllReplicasReady", f"serving on {endpoint}")
    else:
        ready = cond("Ready", False, phase, "; ".join(failures + waiting))
    rolled_back = rollout is not None and rollout.phase == "RolledBack"
    if rolled_back and phase in ("Ready", "Progressing"):
        phase = "RolledBack"  # serving on the stable version; the canary is out
    if waiting:
        progressing = cond("Progressing", True, "RollingOut", "; ".join(waiting))
    elif rollout is not None and rollout.phase != "Progressing":
        progressing = cond("Progressing", False, rollout.phase, rollout.message or rollout.phase)
    elif canary is not None:
        progressing = cond(
            "Progressing", True, "CanaryInRollout", f"canary {canary.name} receives {canary.weight} %"
        )
    else:
        progressing = cond("Progressing", False, "Stable", "every version is rolled out")
    if failures:
        degraded = cond("Degraded", True, "DeploymentFailed", "; ".join(failures))
    else:
        degraded = cond("Degraded", False, "AsExpected", "no Deployment reports a failure")

    return CaptionModelStatus(
        phase=phase,
        observed_generation=generation,
        endpoint=endpoint,
        stable_version=next((s.name for s in shares if s.role == "stable"), None),
        canary_version=canary.name if canary else None,
        canary_weight=canary.weight if canary else None,
        replicas=sum(v.replicas for v in versions),
        ready_replicas=sum(v.ready_replicas for v in versions),
        versions=versions,
        conditions=[ready, progressing, degraded, _rolled_back(rollout, cond)],
        rollout=rollout,
    )


def _rolled_back(rollout: CanaryState | None, cond: Callable[..., Condition]) -> Condition:
    if rollout is not None and rollout.phase == "RolledBack":
        return cond("RolledBack", True, rollout.reason or "RolledBack", rollout.message)
    return cond("RolledBack", False, "NoRollback", "no canary is rolled back")


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
                else cond("Degraded", False, "AsExpected", "no Deployment reports a failure"),
                _kept_rolled_back(before, generation, now),
            ],
        }
    )
