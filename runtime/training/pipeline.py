"""The whole of ``captionfleet train``: train, save, score the saved folder through the engine, swap it in."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionfleet.runtime.training.bundle import (
    check_output_dir,
    command_line,
    folder_bytes,
    save_weights,
    staging_dir,
    swap_into_place,
    write_manifest,
    write_model_card,
)

if TYPE_CHECKING:
    from captionfleet.runtime.training.evaluate import EvalReport
    from captionfleet.runtime.training.settings import TrainSettings
    from captionfleet.runtime.training.train import TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    directory: Path
    manifest: dict[str, Any]
    report: EvalReport | None
    size_bytes: int
    losses: list[float]

    def summary(self) -> str:
        training = self.manifest["training"]
        lines = [
            f"saved {self.manifest['name']} ({self.manifest['version']}) to {self.directory}",
            f"  {self.manifest['parameters']:,} parameters, {self.size_bytes / 1e6:.2f} MB on disk",
            f"  wall time {training['total_seconds']:.0f} s, {training['cpu_seconds']:.0f} CPU seconds "
            f"(rendering {training['render_seconds']:.0f} s, "
            f"training {training['train_seconds']:.0f} s); final loss {training['final_loss']:.4f}",
        ]
        if self.report is not None:
            lines.append(
                f"  held-out: exact match {self.report.exact_match:.4f}, BLEU-4 {self.report.bleu4:.4f}, "
                f"CIDEr {self.report.cider:.4f} on {self.report.n} scenes"
            )
        return "\n".join(lines)


def train_and_save(settings: TrainSettings) -> TrainOutcome:
    """Train with ``settings`` and leave the finished folder at ``settings.output_dir``."""
    import torch

    from captionfleet.runtime.training.train import train

    started = time.perf_counter()
    directory = Path(settings.output_dir).expanduser()
    check_output_dir(directory)  # before minutes of training, not after
    previous_threads = torch.get_num_threads()
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    staged = staging_dir(directory)
    try:
        result = train(settings)
        manifest, report = _save_and_score(staged, settings, result, started)
        swap_into_place(staged, directory)
    except BaseException:
        import shutil

        # Also on Ctrl-C: a half-written staging folder is never worth keeping.
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)
    return TrainOutcome(directory, manifest, report, folder_bytes(directory), result.losses)


def _save_and_score(
    staged: Path, settings: TrainSettings, result: TrainResult, started: float
) -> tuple[dict[str, Any], EvalReport | None]:
    """Weights, manifest, held-out scores and model card into ``staged``; the manifest and the scores."""
    save_weights(result, staged)
    command = command_line(settings)

    def manifest(report: EvalReport | None) -> dict[str, Any]:
        return write_manifest(
            staged,
            settings=settings,
            result=result,
            command=command,
            total_seconds=time.perf_counter() - started,
            report=report,
        )

    # Name and version first, so the engine reports them while scoring the staged folder; written again
    # with the scores (and the time they took) once they are known.
    manifest(None)
    _reference(staged, settings)
    report = _score(staged, settings)
    written = manifest(report)
    write_model_card(staged, written, report, eval_seed=settings.eval_seed)
    return written, report


def _reference(staged: Path, settings: TrainSettings) -> None:
    """The OOD reference from the first training scenes, before scoring (so the scores use it)."""
    if not settings.reference_scenes:
        return
    from captionfleet.runtime.engine.captioner import load_captioner
    from captionfleet.runtime.training.reference import write_scene_reference

    captioner = load_captioner(str(staged), device="cpu", dtype="float32")
    write_scene_reference(captioner, staged, settings.seed, settings.reference_scenes)


def _score(staged: Path, settings: TrainSettings) -> EvalReport | None:
    """Held-out scores of the saved files through the serving engine (what `serve` would load), or
    ``None`` when ``--eval-scenes 0`` skips them."""
    if not settings.eval_scenes:
        return None
    from captionfleet.runtime.engine.captioner import load_captioner
    from captionfleet.runtime.training.evaluate import evaluate, synthetic_set

    captioner = load_captioner(str(staged), device="cpu", dtype="float32")
    return evaluate(
        captioner,
        synthetic_set(settings.eval_seed, settings.eval_scenes),
        progress=settings.progress,
    )
