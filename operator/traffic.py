"""Which version is stable, which is the canary, and how much traffic and capacity each gets now.

The spec's ``weight`` is the desired split. The *effective* weights are what the router applies and
``status.versions[].weight`` reports. Without a canary they are the desired ones. With one, the
rollout state (``rollout.py``, kept in ``status.rollout``) decides: the canary holds its rollout
weight (but receives traffic only once it has a ready pod, and has passed its quality gate when it has
one, ``gate.py``) and the stable version the rest of their
pool (in a shadow phase, after the gate, its weight is 0 and it gets ``mirror`` percent of the
requests as copies instead); once rolled back the canary gets 0 and is retired (scaled to zero);
once promoted it becomes the stable version with the whole pool and the old stable is retired.
Retiring waits for ``drained`` (one check after the decision): the weight goes to 0 at once, the pods
only after every router has stopped sending them requests. A/B variants always keep their spec weights.

Capacity (the weight that sizes a version's replica bounds) differs from traffic in two places: a
canary is sized for its rollout weight before it is ready (so it gets its pods), and the stable
version keeps the whole pool's capacity until the canary has passed its first check (so a new canary
never takes the stable's pods away before it has shown it can serve). Everything downstream (router
table, replica bounds, status) reads the weights from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from captionfleet.operator.rollout import CanaryState, pool
from captionfleet.operator.shadow import mirror_percent
from captionfleet.operator.spec import CaptionModelSpec

Role = Literal["stable", "canary", "variant"]


@dataclass(frozen=True)
class Share:
    """One version's role, effective traffic weight and capacity weight (percent); retired: no pods."""

    name: str
    role: Role
    weight: int
    retired: bool = False
    capacity: int | None = None  # the weight its replica bounds are sized for; None: ``weight``
    mirror: int = 0  # percent of the requests copied to it (the canary's shadow phase)
    # An undecided rollout needs this version's pods (the canary; the stable while the quality gate
    # may score it): never below one pod, and never scaled to zero meanwhile (replicas.py).
    judged: bool = False

    @property
    def sized_for(self) -> int:
        return self.weight if self.capacity is None else self.capacity


def _in_rollout(role: Role, rollout: CanaryState, total: int, canary_ready: bool) -> Share:
    """The canary's or the stable version's share while a rollout drives them (name filled in later)."""
    if rollout.phase == "Promoted":
        role, weight = ("stable", total) if role == "canary" else ("variant", 0)
        return Share("", role, weight, retired=weight == 0 and rollout.drained)
    if rollout.phase == "RolledBack":
        weight = total if role == "stable" else 0
        return Share("", role, weight, retired=role == "canary" and rollout.drained)
    canary_weight = rollout.weight if canary_ready and not rollout.awaits_gate else 0
    if role == "canary":  # in its shadow phase (after the gate): sized for the copies it gets
        mirror = 0 if rollout.awaits_gate else mirror_percent(rollout.shadow)
        capacity = rollout.weight or mirror_percent(rollout.shadow)
        return Share("", role, canary_weight, capacity=capacity, mirror=mirror, judged=True)
    capacity = total - rollout.weight if rollout.checked else total
    return Share("", role, total - canary_weight, capacity=capacity, judged=rollout.awaits_gate)


def _promotion_done(rollout: CanaryState, stable: str) -> bool:
    """A promoted canary whose old stable version the spec no longer has (removed after the promotion):
    the version the spec now calls stable is not the one to retire."""
    return rollout.phase == "Promoted" and rollout.stable not in ("", stable)


def shares(
    spec: CaptionModelSpec, rollout: CanaryState | None = None, *, canary_ready: bool = False
) -> list[Share]:
    """Every version, in spec order, with its role and effective weight; ``canary_ready``: the
    canary's Deployment has a ready pod."""
    stable = spec.stable()
    result = []
    total = pool(spec)
    for version in spec.versions:
        role: Role = "canary" if version.canary else "stable" if stable and version is stable else "variant"
        if rollout is not None and _promotion_done(rollout, stable.name if stable else ""):
            # the stable it replaced has left the spec: the promoted canary is the stable, and every
            # version (the spec's new stable too, a variant of before) has its spec weight
            role = "stable" if version.canary else "variant"
            result.append(Share(version.name, role, version.weight))
        elif rollout is not None and role in ("canary", "stable"):
            share = _in_rollout(role, rollout, total, canary_ready)
            result.append(dataclasses.replace(share, name=version.name))
        else:
            result.append(Share(version.name, role, version.weight))
    return result
