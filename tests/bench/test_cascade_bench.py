"""The cascade row against real runtimes and routers (a tiny random model in both tiers): every
request answered and counted on both sides, and the threshold from a calibration file escalates."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from captionfleet.bench.cascade import calibrated_threshold, measure_cascade
from captionfleet.bench.report import headline
from captionfleet.bench.settings import BenchSettings
from captionfleet.bench.suite import BenchResults
from captionfleet.settings.serve import ServeSettings


async def test_the_cascade_row_answers_every_request_on_both_sides(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fast = tmp_path / "fast"
    shutil.copytree(tiny_model_dir, fast)
    # Every confidence is below 2.0: the calibration's 0.3-quantile escalates every request.
    (fast / "calibration.json").write_text(
        json.dumps({"signal": "confidence", "confidence_quantiles": [2.0] * 101, "rows": []})
    )
    assert calibrated_threshold(fast, 0.3) == 2.0
    settings = BenchSettings(cascade_clients=4, cascade_requests=16, cascade_scenes=4)
    base = ServeSettings(host="127.0.0.1", num_beams=1, max_new_tokens=4, request_timeout_ms=0.0)
    result = await measure_cascade(fast, tiny_model_dir, tmp_path, base, settings)
    summary = result.summary()
    assert result.threshold_from == "calibration.json"
    assert summary["cascade"]["answered"] == summary["quality_only"]["answered"] == 16, summary
    assert summary["cascade"]["failed"] == summary["quality_only"]["failed"] == 0
    assert summary["cascade"]["escalation_rate"] == 1.0 and summary["quality_only"]["escalation_rate"] == 0.0
    assert math.isfinite(result.ratio) and result.ratio > 0
    figures = headline(BenchResults(settings=settings, quick=True, cascade=result))
    assert figures["cascade_throughput_ratio_c32"] is not None and figures["cascade_escalation_rate"] == 1.0
