"""The cascade of a CaptionModel, pure: which version is in which tier, the threshold, the status.

``spec.cascade`` names the fast and the quality version. Tiers (what the routers read from
``status.cascade``):

- the named versions are in their tier;
- the canary (at most one) joins the tier of the version it replaces, the stable one (the non-canary
  version with the most weight, ``spec.stable()``): to roll out a new quality model give the quality
  version the larger weight, and the canary then answers its share of the escalations;
- every other version (an A/B variant) joins the quality tier.

Inside a tier the routers split by the versions' effective weights, as without a cascade, so a weight
is a share of its tier's requests (every request for the fast tier, the escalations for the quality
one); each tier keeps its own Deployments and autoscalers, sized by their weights as before.

The threshold is ``confidenceThreshold`` as given, or resolved from ``targetEscalationRate`` with the
fast model's calibration (``calibration.json`` in its folder, which its runtime shows in
``GET /v1/models``): the r-quantile of its ``confidence_quantiles`` (101 values, q = 0..1, linear
between them) for signal ``confidence``; for signal ``ood`` the (1 - r)-quantile of its
``ood_quantiles``. The operator resolves it, not each router: every router replica then applies the
same number, and the status shows it (``cascade_check.py`` reads the calibration).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from captionfleet.calibration import QUANTILES, threshold_for_rate
from captionfleet.operator.spec import CaptionModelSpec, StatusModel

Signal = Literal["confidence", "ood"]


class TierFigures(StatusModel):
    requests: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None


class CascadeFigures(StatusModel):
    """The cascade's figures over ``rollout.analysis.window``, summed over every router pod."""

    window_s: int = 0
    requests: int = 0
    escalated: int = 0
    escalation_rate: float | None = Field(default=None, description="Escalated share of the requests.")
    skipped_deadline: int = Field(default=0, description="Unsure, but too little budget for the quality hop.")
    skipped_quality_failed: int = 0
    fast: TierFigures = Field(default_factory=TierFigures)
    quality: TierFigures = Field(default_factory=TierFigures)
    updated: str | None = None


class CascadeStatus(StatusModel):
    fast_version: str
    quality_version: str
    fast_versions: list[str] = Field(description="The fast tier: the routers send every request there first.")
    quality_versions: list[str] = Field(description="The quality tier: asked when the fast one is unsure.")
    signal: Signal = "confidence"
    threshold: float | None = Field(
        default=None, description="In use by the routers; unset: not resolved yet, nothing is escalated."
    )
    threshold_source: Literal["confidenceThreshold", "targetEscalationRate"]
    target_escalation_rate: float | None = None
    message: str = ""
    figures: CascadeFigures | None = None


def tiers(spec: CaptionModelSpec) -> tuple[list[str], list[str]]:
    """(fast versions, quality versions), in spec order, by the rule above."""
    cascade = spec.cascade
    assert cascade is not None
    stable = spec.stable()
    fast, quality = [], []
    for version in spec.versions:
        name = version.name
        if name == cascade.fast or (version.canary and stable is not None and stable.name == cascade.fast):
            fast.append(name)
        else:
            quality.append(name)
    return fast, quality


def threshold_from_calibration(calibration: Any, rate: float) -> tuple[float, Signal]:
    """The threshold that escalates ``rate`` of the calibration images, and its signal; ValueError
    naming what is wrong with a calibration that cannot say."""
    if not isinstance(calibration, Mapping):
        raise ValueError("the fast model's runtime shows no calibration in GET /v1/models")
    signal = calibration.get("signal") or "confidence"
    if signal not in ("confidence", "ood"):
        raise ValueError(f"calibration.signal {signal!r} is neither confidence nor ood")
    key = "confidence_quantiles" if signal == "confidence" else "ood_quantiles"
    points = calibration.get(key)
    if (
        not isinstance(points, list)
        or len(points) != QUANTILES
        or not all(
            isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) for p in points
        )
    ):  # NaN would pass the order check below and end as a threshold no JSON status can hold
        raise ValueError(f"calibration.{key} must be {QUANTILES} finite numbers (q = 0..1)")
    if any(b < a for a, b in itertools.pairwise(points)):
        raise ValueError(f"calibration.{key} must not decrease")
    chosen: Signal = "confidence" if signal == "confidence" else "ood"
    return round(threshold_for_rate(points, rate, chosen), 6), chosen


def cascade_status(spec: CaptionModelSpec, previous: Mapping[str, Any]) -> CascadeStatus | None:
    """The cascade's status for ``spec``: its tiers and threshold; a threshold resolved from a target
    rate and the figures are kept from ``previous`` (the status) while they still apply."""
    cascade = spec.cascade
    if cascade is None:
        return None
    fast, quality = tiers(spec)
    before = previous.get("cascade") if isinstance(previous.get("cascade"), Mapping) else None
    kept = CascadeStatus.model_validate(before) if before and before.get("fastVersion") else None
    figures = kept.figures if kept is not None else None
    if cascade.confidence_threshold is not None:
        return CascadeStatus(
            fast_version=cascade.fast,
            quality_version=cascade.quality,
            fast_versions=fast,
            quality_versions=quality,
            threshold=cascade.confidence_threshold,
            threshold_source="confidenceThreshold",
            message=f"escalated below fast confidence {cascade.confidence_threshold}",
            figures=figures,
        )
    same = (
        kept is not None
        and kept.fast_version == cascade.fast
        and kept.target_escalation_rate == cascade.target_escalation_rate
        and kept.threshold_source == "targetEscalationRate"
    )
    return CascadeStatus(
        fast_version=cascade.fast,
        quality_version=cascade.quality,
        fast_versions=fast,
        quality_versions=quality,
        signal=kept.signal if same and kept else "confidence",
        threshold=kept.threshold if same and kept else None,
        threshold_source="targetEscalationRate",
        target_escalation_rate=cascade.target_escalation_rate,
        message=kept.message if same and kept else "waiting for the fast version's calibration",
        figures=figures,
    )


def cascade_problems(spec: CaptionModelSpec) -> list[str]:
    """What the schema cannot say about ``spec.cascade``."""
    cascade = spec.cascade
    if cascade is None:
        return []
    problems = []
    names = {v.name: v for v in spec.versions}
    for field, name in (("fast", cascade.fast), ("quality", cascade.quality)):
        if name not in names:
            problems.append(f"spec.cascade.{field}: {name!r} is not one of the versions ({', '.join(names)})")
        elif names[name].canary:
            problems.append(f"spec.cascade.{field}: {name!r} is the canary; name the version it replaces")
        elif names[name].weight == 0:
            problems.append(f"spec.cascade.{field}: {name!r} has weight 0, so its tier would get no traffic")
    if cascade.fast == cascade.quality:
        problems.append("spec.cascade: fast and quality must be two different versions")
    if (cascade.confidence_threshold is None) == (cascade.target_escalation_rate is None):
        problems.append("spec.cascade: give exactly one of confidenceThreshold and targetEscalationRate")
    return problems
