"""``captionfleet eval --cascade FAST QUALITY``: what a cascade of two models gives, per threshold.

Both models caption the whole set once through the serving engine (as plain ``eval`` does); a cascade
with threshold ``t`` answers with the fast model's caption, except where the fast model's signal says
escalate (confidence below ``t``, or OOD score above it), where it answers with the quality model's.
So every threshold is scored from the same two sets of captions, with the plain eval's scorer
(``metrics.score_captions``), and the escalation rate is the share of quality-model calls per image.

The threshold for a target escalation rate ``r`` is the ``r``-quantile of the fast model's confidence
on this set (``captionfleet.calibration``), the same rule the cascade applies to the stored quantiles.
Which signal ranks the fast model's mistakes better is measured, not assumed: the cascade's exact match
at :data:`COMPARE_RATE` escalation for each signal the fast model has (``signals`` in the report).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionfleet.calibration import CALIBRATION_FILE, SIGNALS, escalates, quantiles, threshold_for_rate
from captionfleet.scoring import score_captions

if TYPE_CHECKING:
    from captionfleet.runtime.engine.types import Caption
    from captionfleet.runtime.training.evaluate import EvalSet
    from captionfleet.runtime.training.settings import EvalSettings

SWEEP_RATES = tuple(index / 20 for index in range(21))
"""The escalation rates of the printed and stored rows: 0 %, 5 %, ... 100 %."""
COMPARE_RATE = 0.3
"""The escalation rate at which the signals are compared (the issue's budget)."""


@dataclass(frozen=True)
class CascadeRow:
    threshold: float
    escalation_rate: float
    """Share of images sent on to the quality model: its calls per image."""
    exact_match: float
    bleu4: float
    cider: float


@dataclass(frozen=True)
class TierCaptions:
    """One model's captions of the whole set, in order."""

    model: str
    version: str
    texts: list[str]
    confidences: list[float]
    ood_scores: list[float] | None
    """``None`` when the model has no OOD reference."""

    @classmethod
    def of(cls, model: str, version: str, captions: Sequence[Caption]) -> TierCaptions:
        scores = [caption.ood_score for caption in captions]
        return cls(
            model,
            version,
            [caption.text for caption in captions],
            [caption.confidence for caption in captions],
            None if any(score is None for score in scores) else [float(s) for s in scores if s is not None],
        )

    def signal(self, name: str) -> list[float] | None:
        return self.confidences if name == "confidence" else self.ood_scores


@dataclass(frozen=True)
class CascadeReport:
    fast_model: str
    fast_version: str
    quality_model: str
    quality_version: str
    dataset: str
    n: int
    signal: str
    threshold: float
    """The threshold asked for, or picked for the target rate, or (neither given) the one of
    :data:`COMPARE_RATE`."""
    escalation_rate: float
    exact_match: float
    bleu4: float
    cider: float
    quality_calls_per_image: float
    fast_exact_match: float
    fast_bleu4: float
    fast_cider: float
    quality_exact_match: float
    quality_bleu4: float
    quality_cider: float
    relative_exact_match: float
    """The cascade's exact match over the quality model's."""
    target_escalation_rate: float | None
    signals: dict[str, float]
    """Per signal the fast model has: the cascade's exact match at :data:`COMPARE_RATE` escalation."""
    rows: list[CascadeRow]
    confidence_quantiles: list[float]
    ood_quantiles: list[float] | None
    calibration_file: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def calibration(self, seed: int) -> dict[str, Any]:
        """The content of ``calibration.json``."""
        found: dict[str, Any] = {
            "signal": self.signal,
            "scenes": self.n,
            "seed": seed,
            "confidence_quantiles": self.confidence_quantiles,
        }
        if self.ood_quantiles is not None:
            found["ood_quantiles"] = self.ood_quantiles
        found["rows"] = [asdict(row) for row in self.rows]
        found["fast_version"] = self.fast_version
        found["quality_version"] = self.quality_version
        return found


class CascadeError(ValueError):
    """A cascade cannot be scored as asked (e.g. the OOD signal of a model without a reference)."""


def cascade_row(
    fast: TierCaptions,
    quality: TierCaptions,
    references: Sequence[Sequence[str]],
    signal: str,
    threshold: float,
) -> CascadeRow:
    """The cascade's scores at ``threshold``: the fast caption, or the quality one where it escalates."""
    values = fast.signal(signal)
    assert values is not None
    sent_on = [escalates(value, threshold, signal) for value in values]
    chosen = {
        str(index): (quality.texts[index] if up else fast.texts[index]) for index, up in enumerate(sent_on)
    }
    scores = score_captions(chosen, {str(index): list(refs) for index, refs in enumerate(references)})
    return CascadeRow(threshold, sum(sent_on) / len(sent_on), scores.exact_match, scores.bleu4, scores.cider)


def pick_signal(
    fast: TierCaptions, quality: TierCaptions, references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Per signal the fast model has: the cascade's exact match at :data:`COMPARE_RATE` escalation."""
    compared = {}
    for signal in SIGNALS:
        values = fast.signal(signal)
        if values is not None:
            threshold = threshold_for_rate(quantiles(values), COMPARE_RATE, signal)
            compared[signal] = cascade_row(fast, quality, references, signal, threshold).exact_match
    return compared


def score_cascade(
    fast: TierCaptions,
    quality: TierCaptions,
    dataset: EvalSet,
    *,
    signal: str = "auto",
    threshold: float | None = None,
    target_escalation_rate: float | None = None,
) -> CascadeReport:
    """The cascade of ``fast`` then ``quality`` on ``dataset``: the sweep, and the asked-for point."""
    references = [item.references for item in dataset.items]
    compared = pick_signal(fast, quality, references)
    if signal == "auto":
        signal = max(compared, key=lambda name: (compared[name], name == "confidence"))
    values = fast.signal(signal)
    if values is None:
        raise CascadeError(f"the fast model {fast.model} has no OOD reference, so no {signal!r} signal")
    stored = quantiles(values)
    rows = [
        cascade_row(fast, quality, references, signal, threshold_for_rate(stored, r, signal))
        for r in SWEEP_RATES
    ]
    if threshold is None:
        rate = COMPARE_RATE if target_escalation_rate is None else target_escalation_rate
        threshold = threshold_for_rate(stored, rate, signal)
    point = cascade_row(fast, quality, references, signal, threshold)
    alone = [_alone(tier, references) for tier in (fast, quality)]
    return CascadeReport(
        fast_model=fast.model,
        fast_version=fast.version,
        quality_model=quality.model,
        quality_version=quality.version,
        dataset=dataset.description,
        n=len(references),
        signal=signal,
        threshold=point.threshold,
        escalation_rate=point.escalation_rate,
        exact_match=point.exact_match,
        bleu4=point.bleu4,
        cider=point.cider,
        quality_calls_per_image=point.escalation_rate,
        fast_exact_match=alone[0].exact_match,
        fast_bleu4=alone[0].bleu4,
        fast_cider=alone[0].cider,
        quality_exact_match=alone[1].exact_match,
        quality_bleu4=alone[1].bleu4,
        quality_cider=alone[1].cider,
        relative_exact_match=point.exact_match / alone[1].exact_match if alone[1].exact_match else 0.0,
        target_escalation_rate=target_escalation_rate,
        signals=compared,
        rows=rows,
        confidence_quantiles=quantiles(fast.confidences),
        ood_quantiles=None if fast.ood_scores is None else quantiles(fast.ood_scores),
    )


def _alone(tier: TierCaptions, references: Sequence[Sequence[str]]) -> CascadeRow:
    """One model on its own (escalation rate 0 for the fast one, 1 for the quality one: not used)."""
    scores = score_captions(
        {str(index): text for index, text in enumerate(tier.texts)},
        {str(index): list(refs) for index, refs in enumerate(references)},
    )
    return CascadeRow(0.0, 0.0, scores.exact_match, scores.bleu4, scores.cider)


def write_calibration(report: CascadeReport, fast_dir: Path, seed: int) -> Path:
    """``calibration.json`` into the fast model's folder (written whole, then renamed into place)."""
    path = fast_dir / CALIBRATION_FILE
    staged = path.with_name(f".{CALIBRATION_FILE}.partial")
    staged.write_text(json.dumps(report.calibration(seed), indent=2) + "\n", encoding="utf-8")
    staged.replace(path)
    return path


def format_cascade(report: CascadeReport) -> str:
    """The report for a terminal: each model alone, the signals compared, the sweep, the chosen point."""
    lines = [
        f"fast     {report.fast_model} ({report.fast_version}): exact match {report.fast_exact_match:.4f}, "
        f"BLEU-4 {report.fast_bleu4:.4f}, CIDEr {report.fast_cider:.4f}",
        f"quality  {report.quality_model} ({report.quality_version}): exact match "
        f"{report.quality_exact_match:.4f}, BLEU-4 {report.quality_bleu4:.4f}, "
        f"CIDEr {report.quality_cider:.4f}",
        f"dataset  {report.dataset} ({report.n} images)",
        f"signals  cascade exact match at {COMPARE_RATE:.0%} escalation: "
        + ", ".join(f"{name} {value:.4f}" for name, value in report.signals.items())
        + f" (using {report.signal})",
        "",
        f"{'threshold':>10}  {'escalated':>9}  {'exact':>6}  {'BLEU-4':>6}  {'CIDEr':>7}  "
        "quality calls/image",
    ]
    for row in [*report.rows, None]:
        shown = row or CascadeRow(
            report.threshold, report.escalation_rate, report.exact_match, report.bleu4, report.cider
        )
        mark = "  <- chosen" if row is None else ""
        lines.append(
            f"{shown.threshold:>10.6f}  {shown.escalation_rate:>9.1%}  {shown.exact_match:>6.4f}  "
            f"{shown.bleu4:>6.4f}  {shown.cider:>7.4f}  {shown.escalation_rate:.2f}{mark}"
        )
    lines.append(
        f"cascade at threshold {report.threshold:.6f}: exact match {report.exact_match:.4f} "
        f"({report.relative_exact_match:.1%} of the quality model's) at "
        f"{report.escalation_rate:.1%} escalation"
    )
    if report.calibration_file:
        lines.append(f"calibration written to {report.calibration_file}")
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    return "\n".join(lines)


def run_cascade(settings: EvalSettings, fast_source: str, quality_source: str) -> CascadeReport:
    """``captionfleet eval --cascade``: both models on the set, the cascade scored, calibration written."""
    import torch

    from captionfleet.runtime.engine.errors import ModelLoadError
    from captionfleet.runtime.engine.loading import load_captioner
    from captionfleet.runtime.training.evaluate import caption_set, eval_dataset, generation_options

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    if settings.write_calibration and not Path(fast_source).is_dir():
        raise ModelLoadError(f"--write-calibration needs the fast model's directory, not {fast_source!r}")
    dataset = eval_dataset(settings)
    tiers = []
    for source in (fast_source, quality_source):
        captioner = load_captioner(source, device=settings.device, dtype=settings.precision)
        captioned, _ = caption_set(
            captioner,
            dataset,
            generation_options(settings),
            batch_size=settings.batch_size,
            progress=settings.progress,
        )
        tiers.append(TierCaptions.of(captioner.model_name, captioner.version, captioned))
    report = score_cascade(
        tiers[0],
        tiers[1],
        dataset,
        signal=settings.signal,
        threshold=settings.threshold,
        target_escalation_rate=settings.target_escalation_rate,
    )
    if settings.write_calibration:
        report = replace(
            report, calibration_file=str(write_calibration(report, Path(fast_source), settings.seed))
        )
    return report
