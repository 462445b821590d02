"""Which version is stable, which is the canary, and how much traffic each receives now.

The spec's ``weight`` is the desired split. The *effective* weights are what the router applies and
``status.versions[].weight`` reports. Without a canary they are the desired ones. With one, the
rollout state (``rollout.py``, kept in ``status.rollout``) decides: the canary holds its rollout
weight and the stable version the rest of their pool; once rolled back the canary gets 0 and is
retired (scaled to zero); once promoted it becomes the stable version with the whole pool and the
old stable is retired. Retiring waits for ``drained`` (one check after the decision): the weight goes to
0 at once, the pods only after every router has stopped sending them requests. A/B variants always keep
their spec weights. Everything downstream (router table, replica bounds, status) reads the weights
from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from captionfleet.operator.rollout import CanaryState, pool
from captionfleet.operator.spec import CaptionModelSpec

Role = Literal["stable", "canary", "variant"]


@dataclass(frozen=True)
class Share:
    """One version's role and effective weight (percent of traffic); retired: scaled to zero."""

    name: str
    role: Role
    weight: int
    retired: bool = False


def stable_version(spec: CaptionModelSpec) -> str | None:
    """The non-canary version with the most traffic (the first such on ties)."""
    candidates = [v for v in spec.versions if not v.canary]
    if not candidates:
        return None
    return max(candidates, key=lambda v: v.weight).name  # max keeps the first of equals


def shares(spec: CaptionModelSpec, rollout: CanaryState | None = None) -> list[Share]:
    """Every version, in spec order, with its role and effective weight."""
    stable = stable_version(spec)
    result = []
    total = pool(spec)
    for version in spec.versions:
        role: Role = "canary" if version.canary else "stable" if version.name == stable else "variant"
        weight, retired = version.weight, False
        if rollout is not None and role in ("canary", "stable"):
            if rollout.phase == "Promoted":
                role, weight = ("stable", total) if role == "canary" else ("variant", 0)
                retired = weight == 0 and rollout.drained
            elif rollout.phase == "RolledBack":
                weight = total if role == "stable" else 0
                retired = role == "canary" and rollout.drained
            else:
                weight = rollout.weight if role == "canary" else total - rollout.weight
        result.append(Share(version.name, role, weight, retired))
    return result
