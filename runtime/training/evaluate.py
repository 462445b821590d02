"""Scoring a caption model on held-out synthetic scenes or on a COCO-style captioned image folder.

The model is scored through the serving engine (:class:`Captioner`: its preprocessing, its beam
search, its caption text), so the numbers describe what ``captionfleet serve`` returns. Image files
go through the engine's byte decoding too, exactly as uploads do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionfleet.evalsets import DatasetError, coco_captions
from captionfleet.runtime.engine.images import DEFAULT_MAX_PIXELS
from captionfleet.runtime.engine.types import GenerationOptions
from captionfleet.runtime.training.calibration import Calibration, calibration
from captionfleet.runtime.training.scenes import SCENE_SIZE, scene_at
from captionfleet.scoring import Scores, normalise_text, score_captions
from captionfleet.settings import overlay

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from captionfleet.runtime.engine.captioner import Captioner
    from captionfleet.runtime.engine.types import Caption
    from captionfleet.runtime.training.settings import EvalSettings


@dataclass(frozen=True)
class EvalItem:
    key: str
    references: tuple[str, ...]
    image: Image.Image | None = None
    """A ready image (synthetic scenes)..."""
    path: Path | None = None
    """...or a file, decoded by the engine like an upload."""


@dataclass(frozen=True)
class EvalSet:
    description: str
    items: list[EvalItem]
    skipped: int = 0
    """Listed images left out: file missing from the folder, or no caption."""


@dataclass(frozen=True)
class EvalReport(Scores):
    """The scores, and what was scored how."""

    model: str
    version: str
    dataset: str
    seconds: float
    """Wall time of decoding, preprocessing and generation (not model loading or scene rendering)."""
    images_per_second: float
    num_beams: int
    max_new_tokens: int
    batch_size: int
    device: str
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The first few images: id, caption, references."""
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    """Up to 20 images whose caption matched no reference."""
    calibration: Calibration | None = None
    """How well the confidence predicts an exact match (``calibration.py``)."""
    reference: str = ""
    """The OOD reference file written by ``--write-reference`` (empty: none written)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


def synthetic_set(seed: int, count: int) -> EvalSet:
    """Scenes ``0 .. count-1`` of ``seed``, rendered at the standard scene size."""
    items = []
    for index in range(count):
        scene = scene_at(seed, index)
        items.append(EvalItem(key=str(index), references=(scene.caption,), image=scene.render(SCENE_SIZE)))
    return EvalSet(f"synthetic scenes, seed {seed}, scenes 0-{count - 1}", items)


def coco_set(images_dir: Path, captions_file: Path, limit: int = 0) -> EvalSet:
    """The images of a COCO captions file (``images[{id, file_name}]``, ``annotations[{image_id, caption}]``)
    found in ``images_dir``, in the file's order; ``limit`` > 0 keeps the first ``limit`` of them.

    Listed images missing from the folder, or without a caption, are skipped and counted (a folder may
    hold a subset of a big captions file); malformed JSON or entries are errors.
    """
    if not images_dir.is_dir():
        raise DatasetError(f"image folder {images_dir} does not exist")
    try:
        data = json.loads(captions_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"captions file {captions_file} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"captions file {captions_file} is not readable JSON: {exc}") from exc
    captions = coco_captions(data, str(captions_file))
    items: list[EvalItem] = []
    skipped = 0
    seen: set[str] = set()
    for position, image in enumerate(data["images"]):
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("id"), (int, str))
            or not isinstance(image.get("file_name"), str)
            or not image["file_name"]
        ):
            raise DatasetError(f"{captions_file}: images[{position}] needs an 'id' and a 'file_name'")
        key = str(image["id"])
        if key in seen:
            raise DatasetError(f"{captions_file}: image id {key} is listed twice")
        seen.add(key)
        path = images_dir / image["file_name"]
        references = captions.get(key, [])
        if not path.is_file() or not references:
            skipped += 1
            continue
        items.append(EvalItem(key=key, references=tuple(references), path=path))
    if limit > 0:
        items = items[:limit]
    if not items:
        raise DatasetError(
            f"none of the {len(data['images'])} images listed in {captions_file} "
            f"is both in {images_dir} and captioned"
        )
    return EvalSet(f"{captions_file.name} with images from {images_dir}", items, skipped)


def evaluate(
    captioner: Captioner,
    dataset: EvalSet,
    options: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, so sharing it is safe
    *,
    batch_size: int = 32,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> EvalReport:
    """Caption every item through the engine and score the captions."""
    captioned, seconds = caption_set(
        captioner, dataset, options, batch_size=batch_size, progress=progress, max_pixels=max_pixels
    )
    candidates = {item.key: caption.text for item, caption in zip(dataset.items, captioned, strict=True)}
    confidences = [caption.confidence for caption in captioned]
    flags = [caption.in_distribution for caption in captioned]
    references = {item.key: list(item.references) for item in dataset.items}
    correct = [is_exact(candidates[item.key], item.references) for item in dataset.items]
    scores = score_captions(candidates, references)
    examples = [
        {"id": item.key, "caption": candidates[item.key], "references": list(item.references)}
        for item in dataset.items[:5]
    ]
    mistakes = [
        {"id": item.key, "caption": candidates[item.key], "references": list(item.references)}
        for item, right in zip(dataset.items, correct, strict=True)
        if not right
    ][:20]
    return EvalReport(
        **asdict(scores),
        model=captioner.model_name,
        version=captioner.version,
        dataset=dataset.description,
        seconds=seconds,
        images_per_second=scores.n / seconds if seconds > 0 else 0.0,
        num_beams=options.num_beams,
        max_new_tokens=options.max_new_tokens,
        batch_size=batch_size,
        device=str(captioner.device),
        skipped=dataset.skipped,
        examples=examples,
        mistakes=mistakes,
        calibration=calibration(confidences, correct, flags),
    )


def caption_set(
    captioner: Captioner,
    dataset: EvalSet,
    options: GenerationOptions,
    *,
    batch_size: int = 32,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[Caption], float]:
    """Every item's caption through the engine, in order, and the seconds it took (decoding,
    preprocessing and generation)."""
    from tqdm import tqdm

    captioned: list[Caption] = []
    seconds = 0.0
    batches = range(0, len(dataset.items), batch_size)
    for start in tqdm(batches, desc="captioning", unit="batch", disable=not progress, dynamic_ncols=True):
        batch = dataset.items[start : start + batch_size]
        began = time.perf_counter()
        pixels = _pixels(captioner, batch, max_pixels)
        captioned += captioner.caption_pixels(pixels, options)
        seconds += time.perf_counter() - began
    return captioned, seconds


def is_exact(caption: str, references: Sequence[str]) -> bool:
    """The scorer's exact match for one image (``metrics.score_captions`` counts the same way)."""
    return normalise_text(caption) in {normalise_text(reference) for reference in references}


def _pixels(captioner: Captioner, batch: Sequence[EvalItem], max_pixels: int) -> torch.Tensor:
    import torch

    from captionfleet.runtime.engine.errors import EngineError

    tensors = []
    for item in batch:
        if item.image is not None:
            tensors.append(captioner.preprocessor(item.image))
            continue
        assert item.path is not None
        try:
            data = item.path.read_bytes()
            tensors.append(captioner.preprocessor.decode_and_preprocess(data, max_pixels=max_pixels))
        except (OSError, EngineError) as exc:
            raise DatasetError(f"image {item.path} (id {item.key}) cannot be used: {exc}") from exc
    return torch.stack(tensors)


def format_table(report: EvalReport) -> str:
    """The report for a terminal: scores, speed, a few examples and mistakes."""
    rows = [
        ("model", f"{report.model} ({report.version})"),
        (
            "dataset",
            report.dataset + (f" ({report.skipped} listed images skipped)" if report.skipped else ""),
        ),
        ("images", str(report.n)),
        ("exact match", f"{report.exact_match:.4f}"),
        ("BLEU-1", f"{report.bleu1:.4f}"),
        ("BLEU-4", f"{report.bleu4:.4f}"),
        ("CIDEr", f"{report.cider:.4f}"),
        (
            "speed",
            f"{report.images_per_second:.1f} images/s ({report.seconds:.2f} s on {report.device}, "
            f"batch {report.batch_size}, beams {report.num_beams})",
        ),
    ]
    rows += _calibration_rows(report)
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if report.calibration is not None:
        lines.append("reliability (confidence bin: images, mean confidence, exact match):")
        lines += [
            f"  {row.low:.1f}-{row.high:.1f}: {row.count:>5}  {row.mean_confidence:.4f}  {row.accuracy:.4f}"
            for row in report.calibration.table
        ]
    for title, entries in (("examples", report.examples), ("mistakes", report.mistakes[:5])):
        if entries:
            lines.append(f"{title}:")
            for entry in entries:
                lines.append(f"  [{entry['id']}] {entry['caption']!r}")
                lines.append(f"  {'':>{len(str(entry['id'])) + 2}} expected {entry['references'][0]!r}")
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    return "\n".join(lines)


def _calibration_rows(report: EvalReport) -> list[tuple[str, str]]:
    rows = [("OOD reference", f"written to {report.reference}")] if report.reference else []
    found = report.calibration
    if found is None:
        return rows
    rows.append(("ECE", f"{found.ece:.4f}"))
    if found.ece_with_ood_gate is not None:
        accuracy = found.accuracy_out_of_distribution
        shown = "" if accuracy is None else f", exact match among them {accuracy:.4f}"
        rows.append(
            (
                "ECE, OOD gate",
                f"{found.ece_with_ood_gate:.4f} ({found.out_of_distribution} images OOD{shown})",
            )
        )
    return rows


def score_model(settings: EvalSettings) -> EvalReport:
    """``captionfleet eval``: load the model through the engine, build the set, score it."""
    import torch

    from captionfleet.runtime.engine.errors import ModelLoadError
    from captionfleet.runtime.engine.loading import bundled_model_dir, load_captioner, read_manifest

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    source = settings.model or str(bundled_model_dir())
    if settings.write_reference and not Path(source).is_dir():
        raise ModelLoadError(f"--write-reference needs a model directory, not {source!r}")
    captioner = load_captioner(source, device=settings.device, dtype=settings.precision)
    dataset = eval_dataset(settings)
    written = _write_reference(captioner, source, settings) if settings.write_reference else ""
    options = generation_options(settings)
    report = evaluate(captioner, dataset, options, batch_size=settings.batch_size, progress=settings.progress)
    report = replace(report, reference=written)
    if not settings.images:
        trained_on = read_manifest(Path(source)).get("training", {}) if Path(source).is_dir() else {}
        if trained_on.get("settings", {}).get("seed") == settings.seed:
            report.warnings.append(
                f"seed {settings.seed} is this model's training seed: these scenes are not held out"
            )
    return report


def eval_dataset(settings: EvalSettings) -> EvalSet:
    """The held-out scenes, or the ``--images`` folder with its ``--captions``."""
    if settings.images:
        return coco_set(Path(settings.images), Path(settings.captions), settings.limit)
    return synthetic_set(settings.seed, settings.scenes)


def generation_options(settings: EvalSettings) -> GenerationOptions:
    """The serving defaults with the generation options given to ``eval``."""
    return overlay(GenerationOptions(), settings)


def _write_reference(captioner: Captioner, source: str, settings: EvalSettings) -> str:
    """``--write-reference``: the model directory's OOD reference, from scenes or the image folder."""
    from captionfleet.runtime.training.reference import write_reference, write_scene_reference

    directory = Path(source)
    if not settings.images:
        seed, count = settings.reference_seed, settings.reference_scenes
        return str(write_scene_reference(captioner, directory, seed, count))
    folder = coco_set(Path(settings.images), Path(settings.captions), settings.limit)
    images = (_image(captioner, item) for item in folder.items)
    return str(write_reference(captioner, directory, images, folder.description))


def _image(captioner: Captioner, item: EvalItem) -> Image.Image:
    assert item.path is not None
    return captioner.preprocessor.decode(item.path.read_bytes(), max_pixels=DEFAULT_MAX_PIXELS)
