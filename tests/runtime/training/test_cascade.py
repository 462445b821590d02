"""`captionfleet eval --cascade`: the two bundled models, the calibrated threshold and calibration.json."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy
import pytest
import torch

from captionfleet.calibration import CALIBRATION_FILE, QUANTILES, escalates, quantile, threshold_for_rate
from captionfleet.cli import main
from captionfleet.runtime.engine.captioner import bundled_model_dir, load_captioner
from captionfleet.runtime.engine.types import FAST_MODEL
from captionfleet.runtime.training.cascade import TierCaptions, score_cascade
from captionfleet.runtime.training.evaluate import EvalItem, EvalSet
from captionfleet.runtime.training.settings import HELD_OUT_SEED

SCENES = 300
"""Enough held-out scenes that a quantile's escalation rate is within 1/300 of its target, ties aside."""
TARGET = 0.3
CALIBRATION_KEYS = {"signal", "scenes", "seed", "confidence_quantiles", "rows"}
ROW_KEYS = {"threshold", "escalation_rate", "exact_match", "bleu4", "cider"}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """`eval --cascade FAST QUALITY --target-escalation-rate 0.3 --write-calibration --json` on a copy of
    the fast model's folder (the shipped calibration.json is not rewritten by tests)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    fast = tmp_path_factory.mktemp("cascade") / FAST_MODEL
    shutil.copytree(bundled_model_dir(FAST_MODEL), fast)
    (fast / CALIBRATION_FILE).unlink()
    argv = ["eval", "--cascade", str(fast), str(bundled_model_dir()), "--scenes", str(SCENES)]
    argv += ["--target-escalation-rate", str(TARGET), "--write-calibration", "true"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([*argv, "--json", "--progress", "false"]) == 0
    [line] = buffer.getvalue().strip().splitlines()
    return json.loads(line), fast


def test_a_target_escalation_rate_is_met_on_the_held_out_set(calibrated: tuple[dict[str, Any], Path]) -> None:
    report, _ = calibrated
    assert report["n"] == SCENES and f"seed {HELD_OUT_SEED}" in report["dataset"]
    assert abs(report["escalation_rate"] - TARGET) <= 0.03, report["escalation_rate"]
    assert report["quality_calls_per_image"] == report["escalation_rate"]
    assert report["target_escalation_rate"] == TARGET
    # The fast model is clearly worse alone (at least half as many errors again); escalating its least
    # confident answers recovers most of it.
    assert 1 - report["fast_exact_match"] >= 1.5 * (1 - report["quality_exact_match"])
    assert report["exact_match"] > report["fast_exact_match"]
    assert set(report["signals"]) == {"confidence", "ood"}  # both measured, the better one used
    assert report["signal"] == max(report["signals"], key=report["signals"].get)


def test_the_calibration_file_resolves_the_same_threshold(calibrated: tuple[dict[str, Any], Path]) -> None:
    report, fast = calibrated
    found = json.loads((fast / CALIBRATION_FILE).read_text())
    assert set(found) >= CALIBRATION_KEYS
    assert found["scenes"] == SCENES and found["seed"] == HELD_OUT_SEED
    assert found["signal"] == report["signal"]
    stored = found[f"{found['signal']}_quantiles"]
    assert len(found["confidence_quantiles"]) == QUANTILES == len(stored)
    assert found["confidence_quantiles"] == sorted(found["confidence_quantiles"])
    assert threshold_for_rate(stored, TARGET, found["signal"]) == pytest.approx(report["threshold"])
    rates = [row["escalation_rate"] for row in found["rows"]]
    assert all(set(row) == ROW_KEYS for row in found["rows"])
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] >= 0.95
    assert found["fast_version"] == load_captioner(str(fast)).version


async def test_serve_shows_the_fast_model_calibration_in_v1_models(
    calibrated: tuple[dict[str, Any], Path], start_server: Any, http: aiohttp.ClientSession
) -> None:
    _, fast = calibrated
    server = await start_server(captioner=load_captioner(str(fast)), model=str(fast))
    async with http.get(server.url + "/v1/models") as response:
        assert response.status == 200
        [model] = (await response.json())["models"]
    assert model["calibration"] == json.loads((fast / CALIBRATION_FILE).read_text())
    assert "calibration" not in load_captioner(str(bundled_model_dir())).info()  # the quality model has none


def test_the_shipped_calibration_is_of_the_shipped_models() -> None:
    found = json.loads((bundled_model_dir(FAST_MODEL) / CALIBRATION_FILE).read_text())
    assert set(found) >= CALIBRATION_KEYS
    assert found["fast_version"] == load_captioner(str(bundled_model_dir(FAST_MODEL))).version
    assert found["quality_version"] == load_captioner(str(bundled_model_dir())).version


def test_quantiles_interpolate_as_numpy_does() -> None:
    draws = random.Random(7)
    values = sorted(draws.random() for _ in range(37))
    for q in (0.0, 0.013, 0.3, 0.5, 0.77, 1.0):
        assert quantile(values, q) == pytest.approx(float(numpy.quantile(values, q)))
    assert threshold_for_rate([i / 100 for i in range(101)], 0.3) == pytest.approx(0.3)
    assert threshold_for_rate([i / 100 for i in range(101)], 0.3, "ood") == pytest.approx(0.7)
    assert escalates(0.2, 0.3) and not escalates(0.4, 0.3)
    assert escalates(0.8, 0.7, "ood") and not escalates(0.6, 0.7, "ood")
    with pytest.raises(ValueError, match="signal"):
        threshold_for_rate([0.5], 0.3, "loss")


def _set(count: int) -> EvalSet:
    return EvalSet("made up", [EvalItem(str(i), (f"caption {i}",)) for i in range(count)])


def test_the_cascade_answers_with_the_quality_model_below_the_threshold() -> None:
    # The fast model is wrong on its three least confident images; the quality model is always right.
    count = 10
    right = [f"caption {i}" for i in range(count)]
    fast_texts = ["wrong"] * 3 + right[3:]
    confidences = [0.1, 0.2, 0.3, *(0.5 + i / 100 for i in range(7))]
    fast = TierCaptions("fast", "f1", fast_texts, confidences, None)
    quality = TierCaptions("quality", "q1", right, [0.9] * count, None)
    report = score_cascade(fast, quality, _set(count), target_escalation_rate=0.3)
    assert report.signal == "confidence" and report.signals == {"confidence": 1.0}
    assert report.threshold == pytest.approx(0.44)  # the 0.3-quantile, between 0.3 and 0.5
    assert report.escalation_rate == pytest.approx(0.3)
    assert report.fast_exact_match == 0.7 and report.quality_exact_match == 1.0
    assert report.exact_match == 1.0 and report.relative_exact_match == 1.0
    at = score_cascade(fast, quality, _set(count), threshold=0.25)
    assert at.escalation_rate == pytest.approx(0.2) and at.exact_match == pytest.approx(0.9)


def test_auto_picks_the_signal_that_ranks_the_fast_models_mistakes_better() -> None:
    count = 20
    right = [f"caption {i}" for i in range(count)]
    wrong = {2, 9, 15}
    fast_texts = ["wrong" if i in wrong else right[i] for i in range(count)]
    confidences = [0.5 + (i % 7) / 20 for i in range(count)]  # unrelated to the mistakes
    ood = [0.9 if i in wrong else i / 100 for i in range(count)]  # high exactly on them
    fast = TierCaptions("fast", "f1", fast_texts, confidences, ood)
    quality = TierCaptions("quality", "q1", right, [0.9] * count, [0.0] * count)
    report = score_cascade(fast, quality, _set(count))
    assert report.signal == "ood" and report.signals["ood"] == 1.0 > report.signals["confidence"]
    assert report.exact_match == 1.0 and report.escalation_rate == pytest.approx(0.3)
    assert len(report.ood_quantiles or []) == QUANTILES
    forced = score_cascade(fast, quality, _set(count), signal="confidence")
    assert forced.signal == "confidence" and forced.exact_match < 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--cascade", "a", "b", "--threshold", "0.5", "--target-escalation-rate", "0.3"],
            "exclude each other",
        ),
        (["--cascade", "a", "b", "--target-escalation-rate", "1.5"], "must be in [0, 1]"),
        (["--write-calibration", "true"], "need --cascade"),
        (["--target-escalation-rate", "0.3"], "need --cascade"),
    ],
)
def test_cascade_options_that_cannot_work_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", *argv])
    assert message in str(exited.value.code)
