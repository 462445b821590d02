"""The demand poll of one CaptionModel, as a plain async function (a kopf daemon calls it in a loop).

Only for versions that may scale to zero (``coldstart.py``). Every router pod is asked for its stats
(``GET /v1/router/stats``: ``held`` and ``last_request_at`` per version), which gives the router no
write access to anything: the operator decides and applies. A version at zero or waking is polled
every ``demand_poll_ms`` (a held request gets its first replica within one poll and one
reconciliation); an awake one every ``idle_poll_seconds`` (at most a tenth of ``scaleToZeroAfter``),
which is all it takes to see that it has been idle long enough. A change of phase (or of the last
request's second) is written by the same reconciliation as everything else, with an Event per phase.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from captionfleet.operator import coldstart, kube, reconcile, rollout, validation
from captionfleet.operator.builders import runtime
from captionfleet.operator.builders.common import ClusterConfig, FleetContext
from captionfleet.operator.coldstart import ColdState, Demand
from captionfleet.operator.events import REPAIRS, Event, Reason
from captionfleet.operator.figures import RouterStats
from captionfleet.operator.spec import iso

log = logging.getLogger(__name__)

NOTHING_TO_WATCH_S = 5.0  # a CaptionModel with no version that may scale to zero is looked at again
ROUTER_TIMEOUT_S = 1.0  # a router that does not answer within this is left out of one poll
STATS_WINDOW_S = 1  # the figures over a window are not read here, only what is held now


@dataclass(frozen=True)
class Polling:
    """What a poll reads through and how often."""

    api: kube.Api
    config: ClusterConfig
    routers: RouterStats
    fast_s: float  # demand_poll_ms
    idle_s: float  # idle_poll_seconds
    # (namespace, model, version) -> when a poll last saw requests held: a held request is a request
    # until it is answered, so the idle time counts from then (the routers' last_request_at is when it
    # arrived, a whole cold start earlier). In memory: after a restart the status's time stands.
    held_at: dict[tuple[str, str, str], float]


@dataclass
class PollOutcome:
    interval_s: float = NOTHING_TO_WATCH_S
    events: list[Event] = field(default_factory=list)
    model: dict[str, Any] | None = None  # the CaptionModel the events are about
    states: dict[str, ColdState] = field(default_factory=dict)  # as decided


def _context(body: Mapping[str, Any], config: ClusterConfig) -> FleetContext | None:
    meta = body["metadata"]
    spec, problems = validation.check(meta["name"], body.get("spec"), config)
    status = body.get("status") or {}
    if problems or spec is None or status.get("observedGeneration") != meta.get("generation"):
        return None  # invalid, or not reconciled yet: the handlers act first
    canary = spec.canary()
    ready = _ready_replicas(status)
    state = rollout.current(spec, status.get("rollout"))
    return reconcile.fleet_context(
        meta, spec, config, state, canary_ready=canary is not None and ready.get(canary.name, 0) > 0
    )


def _ready_replicas(status: Mapping[str, Any]) -> dict[str, int]:
    return {str(v.get("name")): int(v.get("readyReplicas") or 0) for v in status.get("versions") or []}


def _transition(name: str, before: ColdState, after: ColdState, demand: Demand) -> Event | None:
    if before.phase == after.phase:
        return None
    if after.phase == "Idle":
        return Event.normal(Reason.SCALED_TO_ZERO, f"version {name}: no request for scaleToZeroAfter, 0 pods")
    if after.phase == "Waking":
        return Event.normal(Reason.WAKING, f"version {name}: {demand.held} requests held, scaling from zero")
    return Event.normal(Reason.WOKE, f"version {name}: a pod is ready, the held requests are sent")


def _with_holds(polling: Polling, key: tuple[str, str, str], demand: Demand, now_s: float) -> Demand:
    if demand.held > 0:
        polling.held_at[key] = now_s
    held_at = polling.held_at.get(key)
    if held_at is None or (demand.last_request_at or 0.0) >= held_at:
        return demand
    return Demand(demand.held, held_at, demand.answered)


async def _first_replicas(
    polling: Polling, ctx: FleetContext, before: Mapping[str, ColdState], after: Mapping[str, ColdState]
) -> None:
    """A version waking from zero gets its Deployment's replicas first, before the whole reconciliation
    (a dozen API calls): the held requests wait for the pod, not for the rest of the fleet's objects.
    Only a Deployment the last reconciliation applied is at zero, so it is ours to apply."""
    woken = [
        name for name, state in after.items() if state.phase == "Waking" and before[name].phase == "Idle"
    ]
    awake = ctx.with_cold(coldstart.phases(after))
    for name in woken:
        await polling.api.apply(runtime.deployment(awake, ctx.spec.version(name)))


def _changed(before: ColdState, after: ColdState) -> bool:
    """A new phase, or (awake: polled slowly) a last request the status would show differently."""
    if before.phase != after.phase:
        return True
    return after.phase == "Ready" and iso(before.last_request_at) != iso(after.last_request_at)


async def poll_once(polling: Polling, namespace: str, name: str) -> PollOutcome:
    body = await polling.api.get(kube.CAPTION_MODEL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return PollOutcome()
    ctx = _context(body, polling.config)
    status = body.get("status") or {}
    states = coldstart.current(ctx, status, time.time()) if ctx is not None else {}
    if ctx is None or not states:
        return PollOutcome()
    bodies, problems = await polling.routers.bodies(namespace, name, STATS_WINDOW_S, ROUTER_TIMEOUT_S)
    for problem in problems:
        log.warning("demand poll of %s/%s incomplete: %s", namespace, name, problem)
    ready = _ready_replicas(status)
    idle_after_s = coldstart.idle_after_s(ctx.spec)
    outcome = PollOutcome(model=body)
    now_s = time.time()
    for version, before in states.items():
        demand = _with_holds(polling, (namespace, name, version), coldstart.demand_of(bodies, version), now_s)
        after = coldstart.decide(before, demand, ready.get(version, 0), idle_after_s, now_s)
        outcome.states[version] = after
        if (event := _transition(version, before, after, demand)) is not None:
            log.info("%s/%s: %s", namespace, name, event.message)
            outcome.events.append(event)
    await _first_replicas(polling, ctx, states, outcome.states)
    if any(_changed(states[v], outcome.states[v]) for v in states):
        result = await reconcile.reconcile(polling.api, body, polling.config, cold_states=outcome.states)
        outcome.events += [e for e in result.events if e.reason in REPAIRS]
    cold = any(state.phase != "Ready" for state in outcome.states.values())
    outcome.interval_s = (
        polling.fast_s if cold else max(polling.fast_s, min(polling.idle_s, idle_after_s / 10))
    )
    return outcome
