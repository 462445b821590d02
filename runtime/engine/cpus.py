"""How many CPUs this process may really use, for sizing torch's intra-op thread pool.

torch sizes its pool by the CPUs it sees, which in a container is the node's, not the pod's CPU limit.
A pod limited to 2 CPUs on a 64-core node would run 64 OpenMP threads that spin-wait against the
cgroup quota, and against our own event loop and preprocessing threads: throughput collapses. So the
default is the smaller of the CPU affinity and the cgroup quota (v2 ``cpu.max``, v1 ``cfs_quota_us``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when there is none."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup quota (rounded up), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)
