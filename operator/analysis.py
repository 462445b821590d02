"""One rollout analysis check of one CaptionModel, as a plain async function (the daemon calls it).

Read the CaptionModel afresh, and if its canary's rollout is Progressing, read the canary's figures
over ``window`` (from the routers or Prometheus, ``figures.py``), let ``rollout.check`` decide, and
reconcile with the decided state: weights, replica counts and ``status.rollout`` change together.
A check is skipped while the spec is invalid or not yet reconciled (the status belongs to an older
generation), and when the rollout is paused, promoted or rolled back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from captionfleet.operator import kube, reconcile, rollout, validation
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.figures import Source
from captionfleet.operator.metrics import OperatorMetrics
from captionfleet.operator.reconcile import Event
from captionfleet.operator.spec import seconds

log = logging.getLogger(__name__)

IDLE_INTERVAL_S = 60.0  # how often a CaptionModel that cannot be checked is looked at again
# Reconcile events that a check reports (the rest, e.g. "Reconciled", would repeat every interval).
REPAIRS = {"Created", "Deleted", "ApplyFailed", "Promoted", "RolledBack", "RolloutAction"}


@dataclass
class CheckOutcome:
    interval_s: float = IDLE_INTERVAL_S  # when to check next
    events: list[Event] = field(default_factory=list)
    model: dict[str, Any] | None = None  # the CaptionModel the events are about
    decision: rollout.Decision | None = None


async def check_once(
    api: kube.Kube,
    namespace: str,
    name: str,
    config: ClusterConfig,
    source: Source,
    metrics: OperatorMetrics,
) -> CheckOutcome:
    body = await api.get(kube.CAPTION_MODEL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return CheckOutcome()
    spec, problems = validation.check(name, body.get("spec"), config)
    if problems or spec is None:
        return CheckOutcome()
    analysis = spec.rollout.analysis
    outcome = CheckOutcome(interval_s=seconds(analysis.interval), model=body)
    status = body.get("status") or {}
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        return outcome  # the handlers have not reconciled this spec yet
    state = rollout.current(spec, status.get("rollout"))
    if state is not None and state.phase in ("Promoted", "RolledBack") and not state.drained:
        outcome.decision = rollout.drain(state)
        await reconcile.reconcile(api, body, config, rollout_state=outcome.decision.state)
        return outcome
    if state is None or state.phase != "Progressing":
        return outcome

    window_s = max(1, round(seconds(analysis.window)))
    reading = await source.read(namespace, name, state.version, window_s)
    for problem in reading.problems:
        log.warning(
            "rollout figures incomplete", extra={"captionmodel": f"{namespace}/{name}", "problem": problem}
        )
    decision = rollout.check(analysis, state, reading.figures, total=rollout.pool(spec), now=reconcile.now())
    outcome.decision = decision
    if decision.kind == "hold" and decision.state == state:
        return outcome  # nothing new to write (no figures at all)
    result = await reconcile.reconcile(api, body, config, rollout_state=decision.state)
    outcome.events += [e for e in result.events if e.reason in REPAIRS]
    if decision.kind == "step":
        outcome.events.append(Event("Normal", "CanaryStep", decision.message))
    elif decision.kind == "promote":
        outcome.events.append(Event("Normal", "Promoted", decision.message))
    elif decision.kind == "fail":
        outcome.events.append(Event("Warning", "CheckFailed", decision.message))
    elif decision.kind == "rollback":
        outcome.events.append(Event("Warning", "RolledBack", decision.message))
        metrics.rollbacks.labels(namespace=namespace, captionmodel=name, version=state.version).inc()
    return outcome
