"""Which version is stable, which is the canary, and how much traffic each receives now.

The spec's ``weight`` is the desired split. The *effective* weights are what the router applies and
``status.versions[].weight`` reports. Until the progressive-rollout loop lands (a later issue), the
effective weights are the desired ones; that loop will make them step from the current status toward
the spec, and everything downstream (router config, replica bounds, status) already reads them from
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from captionfleet.operator.spec import CaptionModelSpec

Role = Literal["stable", "canary", "variant"]


@dataclass(frozen=True)
class Share:
    """One version's role and effective weight (percent of traffic)."""

    name: str
    role: Role
    weight: int


def stable_version(spec: CaptionModelSpec) -> str | None:
    """The non-canary version with the most traffic (the first such on ties)."""
    candidates = [v for v in spec.versions if not v.canary]
    if not candidates:
        return None
    return max(candidates, key=lambda v: v.weight).name  # max keeps the first of equals


def shares(spec: CaptionModelSpec) -> list[Share]:
    """Every version, in spec order, with its role and effective weight."""
    stable = stable_version(spec)
    result = []
    for version in spec.versions:
        role: Role = "canary" if version.canary else "stable" if version.name == stable else "variant"
        result.append(Share(version.name, role, version.weight))
    return result
