"""Replica bounds of each version, from its share of the traffic.

``autoscaling.minReplicas``/``maxReplicas`` size the fleet at 100 % of the traffic; each version gets
its share of them, rounded up, so a 10 % canary runs on a tenth of the stable version's pods (and
GPUs), not on as many. A version keeps at least one pod (zero only when the fleet's floor is zero,
which needs KEDA), and its own ``minReplicas``/``maxReplicas`` override what is derived. A retired
version (a rolled-back canary, or the stable version a promoted canary replaced) gets no pods at all;
a canary whose rollout is undecided (and the stable while a quality gate is pending) at least one,
whatever the floors: it never scales to zero before the rollout has judged it.
"""

from __future__ import annotations

from captionfleet.operator.spec import CaptionModelSpec
from captionfleet.operator.traffic import Share


def replica_bounds(spec: CaptionModelSpec, share: Share) -> tuple[int, int]:
    if share.retired:
        return 0, 0
    fleet = spec.autoscaling
    version = spec.version(share.name)
    floor = 0 if fleet.min_replicas == 0 else 1
    low = max(floor, _share_of(fleet.min_replicas, share.sized_for))
    high = max(low, 1, _share_of(fleet.max_replicas, share.sized_for))
    if version.min_replicas is not None:
        low = version.min_replicas
        high = max(high, low, 1)
    if version.max_replicas is not None:
        high = version.max_replicas
        low = min(low, high)
    if share.judged:  # an idle canary would never be judged (nor a stable the gate compares with)
        low = max(low, 1)
    return low, high


def _share_of(replicas: int, weight: int) -> int:
    """``ceil(replicas * weight / 100)`` in integers (7 % of 100 is 7, not 8)."""
    return -(-replicas * weight // 100)
