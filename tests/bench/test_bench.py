"""``captionfleet bench`` end to end with tiny sizes against the tiny random model, and the GPU script's
CPU smoke path. No timing assertions: only that every figure is measured and every request counted."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from captionfleet.bench.settings import BenchSettings

HEADLINE_KEYS = (
    "preprocess_ratio_12mp",
    "serve_ratio_c32",
    "serve_p99_ms_c32",
    "cache_hit_rps",
    "router_overhead_ms_p50",
    "offline_rps_c32",
    "served_share_of_offline_c32",
    "loadgen_cpu_share_c32",
    "loadgen_ms_per_request_c32",
    "engine_bs1_ms",
    "decoder_speedup_bs32",
    "decoder_speedup_bs1",
    "decoder_agreement",
    "int8_speedup",
    "int8_agreement",
    "fast_speedup_bs8",
    "bulk_p99_ratio_c8",
    "bulk_share_under_load",
    "ood_cost_c32",
)


def _run(argv: list[str], cwd: Path, timeout_s: float = 480) -> dict[str, Any]:
    """The bench's JSON; on a timeout its whole process group is killed, the servers it started too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
    with subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as bench:  # fmt: skip
        try:
            stdout, stderr = bench.communicate(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bench.pid, signal.SIGKILL)  # nothing it started outlives the test
    assert bench.returncode == 0, stderr[-4000:]
    document = json.loads(stdout)
    assert isinstance(document, dict)
    return document


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_bench_json_has_every_headline_figure(tiny_model_dir: Path, tmp_path: Path) -> None:
    argv = [
        "captionfleet", "bench", "--json", "--model", str(tiny_model_dir), "--workdir", str(tmp_path),
        "--larger-model", "false", "--concurrency", "32", "--requests", "1", "--warmup-requests", "2",
        "--preprocess-megapixels", "12", "--preprocess-rounds", "1",
        "--cache-requests", "40", "--cache-concurrency", "8", "--router-requests", "10",
        "--speed-model", "blip-tiny-random", "--agreement-scenes", "8",
        "--engine-rounds", "1", "--speed-rounds", "1",
        "--bulk-requests", "16", "--bulk-items", "8", "--bulk-rounds", "2",
        "--ood-rounds", "2", "--ood-concurrency", "4",
        "--cascade-requests", "0",  # its own test: test_cascade_bench.py
        "--steady-requests", "64",  # the served share's run and each OOD-cost run
    ]  # fmt: skip
    document = _run(argv, cwd=tmp_path, timeout_s=480)  # six servers and a redis-server, in turn

    for key in HEADLINE_KEYS:
        assert _is_number(document[key]), (key, document[key])
    assert document["serve_p99_ms_c32"] > 0 and document["cache_hit_rps"] > 0
    assert document["c1_p50_ms"] is None  # no one-client run was asked for
    assert 0 < document["decoder_agreement"] <= 1 and 0 < document["int8_agreement"] <= 1
    engine = document["engine"]
    assert engine["scenes"] == 8 and engine["offline_images"] == 64, engine
    served = document["served_at_32"]  # the share's numerator: as many requests as offline images
    assert (served["concurrency"], served["sent"], served["ok"]) == (32, 64, 64), served
    [row] = document["serving"]
    assert row["concurrency"] == 32 and _is_number(row["ratio"])
    for server in ("ours", "naive"):
        run = row[server]
        assert run["sent"] == 64, run  # at least twice the concurrency
        answered = sum(run["statuses"].values()) + sum(run["failures"].values())
        assert answered == run["sent"] and run["ok"] == run["sent"], run
    cache = document["cache"]
    assert cache["sent"] == 40 and cache["cached"] == cache["ok"] == 40, cache
    bulk = document["bulk"]
    assert bulk["interactive_idle"]["ok"] == bulk["interactive_busy"]["ok"] == 32, bulk  # 2 rounds
    assert bulk["rounds"] == 2 and len(bulk["round_ratios"]) == 2, bulk
    assert bulk["bulk_idle_rps"] > 0, bulk
    router = document["router"]
    assert router["direct"]["ok"] == router["routed"]["ok"] == 10, router
    ood = document["ood"]
    assert ood["rounds"] == 2 and ood["concurrency"] == 4, ood
    assert ood["scored_rps"] > 0 and ood["unscored_rps"] > 0, ood
    sides = {entry["side"] for entry in document["preprocess"]}
    assert sides == {32, 384}  # the tiny model's input size and BLIP-base's
    assert all(_is_number(entry["ratio"]) for entry in document["preprocess"])


def test_gpu_script_runs_its_cpu_smoke_path(tmp_path: Path) -> None:
    argv = ["captionfleet.bench.gpu", "--tiny", "--json", "--naive-images", "4", "--batches", "2"]
    document = _run(argv, cwd=tmp_path, timeout_s=120)

    assert document["batched_path"] == "captionfleet Captioner.caption_pixels (transformers decoder)"
    assert (
        document["paths"]["graphs"] == "captionfleet Captioner.caption_pixels (native decoder + CUDA graphs)"
    )
    cells = document["cells"]
    assert {(c["mode"], c["path"], c["batch"]) for c in cells} == {
        (mode, "naive", 1) for mode in ("greedy", "beam3")
    } | {
        (mode, path, size)
        for mode in ("greedy", "beam3")
        for path in ("batched", "native", "graphs")
        for size in (1, 4)
    }
    for cell in cells:
        assert cell["status"] == "ok" and cell["images"] > 0, cell
        assert _is_number(cell["images_per_s"]) and _is_number(cell["p99_ms"]), cell
    assert set(document["best"]) == {"greedy", "beam3"}
    assert all(_is_number(best["ratio"]) for best in document["best"].values())
    assert all(_is_number(best["native_over_generate"]) for best in document["best"].values())


def test_a_speed_ratio_is_the_median_of_its_rounds_so_a_burst_on_one_side_is_outvoted() -> None:
    from captionfleet.bench.engine import median_ratio, medians

    rounds = [
        {"slow": 3.0, "fast": 1.0},
        {"slow": 3.3, "fast": 1.1},  # a burst of load hit both timings of this round
        {"slow": 3.0, "fast": 2.9},  # ... and only the fast side of this one
    ]
    assert median_ratio(rounds, "slow", "fast") == pytest.approx(3.0)
    assert medians(rounds, "bs8") == {"slow_bs8": 3.0, "fast_bs8": 1.1}


def test_quick_changes_only_what_was_left_at_its_default() -> None:
    quick = BenchSettings(requests=10).quick()
    assert quick.requests == 10
    assert quick.concurrency == ("1", "32") and quick.larger_model is False
    assert quick.preprocess_megapixels == ("12",)


def test_bad_settings_exit_2_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet", "bench", "--concurrency", "0,x", "--requests", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "concurrency must list integers" in done.stderr and "requests must be >= 1" in done.stderr
