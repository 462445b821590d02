"""Sizing torch's thread pool from the CPU quota a container really has."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captionfleet.runtime.engine.cpus import cgroup_cpu_limit, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (root / "cpu" / "cpu.cfs_period_us").write_text(period)
    return root


@pytest.mark.parametrize(
    ("text", "limit"), [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000", 0.5)]
)
def test_cgroup_v2_quota(tmp_path: Path, text: str, limit: float | None) -> None:
    assert cgroup_cpu_limit(_v2(tmp_path, text)) == limit


@pytest.mark.parametrize(("quota", "limit"), [("-1", None), ("200000", 2.0), ("25000", 0.25)])
def test_cgroup_v1_quota(tmp_path: Path, quota: str, limit: float | None) -> None:
    assert cgroup_cpu_limit(_v1(tmp_path, quota)) == limit


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cpus(tmp_path) == AFFINITY


def test_a_quota_caps_the_affinity_rounding_up_and_never_below_one(tmp_path: Path) -> None:
    assert usable_cpus(_v2(tmp_path, "50000 100000")) == 1
    big = tmp_path / "big"
    big.mkdir()
    assert usable_cpus(_v2(big, f"{(AFFINITY + 8) * 100000} 100000")) == AFFINITY
    if AFFINITY >= 2:
        one_and_a_half = tmp_path / "mid"
        one_and_a_half.mkdir()
        assert usable_cpus(_v2(one_and_a_half, "150000 100000")) == 2
