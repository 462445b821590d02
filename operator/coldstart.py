"""Scale to zero: where each version whose replica floor is 0 stands, and what moves it (pure).

A version may scale to zero when its floor (``replica_bounds``: ``autoscaling.minReplicas`` 0 fleet-wide,
or the version's own ``minReplicas: 0``) is 0. It is in one of three phases, kept in
``status.versions[].state`` and read back at every reconciliation (as ``status.rollout`` is):

- ``Ready``: awake, in its autoscaler's range (at least one pod). Idle for ``scaleToZeroAfter`` (no
  request on any router pod: the latest ``last_request_at`` of all of them, or the time it woke when
  none came since) and no request held -> ``Idle``.
- ``Idle``: 0 pods and no HPA (KEDA: ``minReplicaCount: 0``). A request held by any router -> ``Waking``.
- ``Waking``: the operator sets the first replicas (an HPA does nothing at 0). A ready pod -> ``Ready``.
  While any router holds a request it stays, however long its pod is Pending (a GPU node being
  added); only with nothing held and idle for ``scaleToZeroAfter`` does it go back to ``Idle``.

No router answering means no figures: nothing is decided on silence (a version never goes to zero
because its routers could not be asked). The routers only report (``held``, ``last_request_at`` on
``GET /v1/router/stats``); the operator, which may write to the cluster, acts (``operator/demand.py``).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from captionfleet.operator.builders.common import ColdPhase, FleetContext
from captionfleet.operator.builders.replicas import replica_bounds
from captionfleet.operator.spec import CaptionModelSpec, seconds, unix
from captionfleet.operator.traffic import Share

PHASES: tuple[ColdPhase, ...] = typing.get_args(ColdPhase)


@dataclass(frozen=True)
class ColdState:
    """One version's phase, since when (unix s), and the latest request any router saw (unix s)."""

    phase: ColdPhase
    since: float
    last_request_at: float | None = None


@dataclass(frozen=True)
class Demand:
    """One version's demand, summed over the router pods that answered."""

    held: int = 0  # requests held now, waiting for a ready pod
    last_request_at: float | None = None  # the latest of any router
    answered: bool = False  # at least one router pod answered


def scales_to_zero(spec: CaptionModelSpec, share: Share) -> bool:
    """Whether the version's replica floor is 0 (a retired version has no pods anyway)."""
    return not share.retired and replica_bounds(spec, share)[0] == 0


def current(ctx: FleetContext, previous: Mapping[str, Any], now_s: float) -> dict[str, ColdState]:
    """The phases as the last status left them, for the versions that may scale to zero now. A version
    new to this (just created, or its floor just lowered to 0) starts ``Ready``: it is idle from now."""
    stored = {str(v.get("name")): v for v in previous.get("versions") or [] if isinstance(v, Mapping)}
    states = {}
    for share in ctx.shares:
        if not scales_to_zero(ctx.spec, share):
            continue
        before = stored.get(share.name) or {}
        phase = before.get("state")
        since = unix(before.get("stateSince"))
        if phase in PHASES and since is not None:
            states[share.name] = ColdState(phase, since, unix(before.get("lastRequestAt")))
        else:
            states[share.name] = ColdState("Ready", now_s, unix(before.get("lastRequestAt")))
    return states


def demand_of(bodies: Sequence[Mapping[str, Any]], version: str) -> Demand:
    """``version``'s demand from the routers' stats bodies (``versions.<name>.held``/``last_request_at``)."""
    held, latest = 0, None
    for body in bodies:
        figures = (body.get("versions") or {}).get(version) or {}
        held += max(0, int(figures.get("held") or 0))
        at = figures.get("last_request_at")
        if isinstance(at, int | float) and not isinstance(at, bool):
            latest = float(at) if latest is None else max(latest, float(at))
    return Demand(held, latest, answered=bool(bodies))


def decide(
    state: ColdState, demand: Demand, ready_replicas: int, idle_after_s: float, now_s: float
) -> ColdState:
    """The next state of one version (the same object when nothing changes but the last request)."""
    latest = state.last_request_at
    if demand.last_request_at is not None:
        latest = demand.last_request_at if latest is None else max(latest, demand.last_request_at)
    state = replace(state, last_request_at=latest) if latest != state.last_request_at else state
    if not demand.answered:
        return state
    idle = now_s - max(latest or 0.0, state.since) >= idle_after_s
    if state.phase == "Idle":
        return ColdState("Waking", now_s, latest) if demand.held > 0 else state
    if state.phase == "Waking" and ready_replicas > 0:
        return ColdState("Ready", now_s, latest)
    if idle and demand.held == 0:
        return ColdState("Idle", now_s, latest)
    return state


def idle_after_s(spec: CaptionModelSpec) -> float:
    return seconds(spec.autoscaling.scale_to_zero_after)


def phases(states: Mapping[str, ColdState]) -> dict[str, ColdPhase]:
    return {name: state.phase for name, state in states.items()}
