"""Saving a trained model as a self-contained folder: weights, tokenizer, image processor, manifest, card.

The folder is Hugging Face ``save_pretrained`` format, so ``BlipForConditionalGeneration`` and
``BlipProcessor.from_pretrained(folder)`` load it offline, plus two files of ours:

- ``captionfleet.json``: name, version (``<name>-<first 12 hex of the engine's content hash>``, what
  the engine would derive anyway), the training settings and timings, and the held-out scores;
- ``README.md``: the model card, generated from the same facts.

A run writes into a fresh sibling folder and swaps it in at the end, so an interrupted run leaves the
previous model intact, and no stale file from an earlier run survives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captionfleet.runtime.engine.loading import MANIFEST, content_hash
from captionfleet.runtime.training import scenes
from captionfleet.runtime.training.model import parameter_count

if TYPE_CHECKING:
    from captionfleet.runtime.training.evaluate import EvalReport
    from captionfleet.runtime.training.settings import TrainSettings
    from captionfleet.runtime.training.train import TrainResult


class OutputDirError(ValueError):
    """The output folder exists and is not a model this command wrote: it is never overwritten."""


def check_output_dir(directory: Path) -> None:
    """Refuse a non-empty folder that holds no ``captionfleet.json`` (someone else's files)."""
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f"output {directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise OutputDirError(
            f"output folder {directory} is not empty and holds no {MANIFEST}: "
            "refusing to replace files `captionfleet train` did not write"
        )


def staging_dir(directory: Path) -> Path:
    """A fresh hidden folder next to ``directory`` to save into before the swap."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))


def save_weights(result: TrainResult, directory: Path) -> None:
    """Model (safetensors), generation config, tokenizer files and ``preprocessor_config.json``."""
    result.model.save_pretrained(directory)
    result.tokenizer.save_pretrained(directory)
    result.image_processor.save_pretrained(directory)


def version_of(name: str, directory: Path) -> str:
    return f"{name}-{content_hash(directory)[:12]}"


def write_manifest(
    directory: Path,
    *,
    settings: TrainSettings,
    result: TrainResult,
    command: str,
    total_seconds: float,
    report: EvalReport | None,
) -> dict[str, Any]:
    import torch
    import transformers

    manifest: dict[str, Any] = {
        "name": settings.name,
        "version": version_of(settings.name, directory),
        "parameters": parameter_count(result.model),
        "training": {
            "command": command,
            "settings": dataclasses.asdict(settings),
            "final_loss": sum(result.losses[-20:]) / max(1, len(result.losses[-20:])),
            "render_seconds": round(result.render_seconds, 1),
            "train_seconds": round(result.train_seconds, 1),
            "total_seconds": round(total_seconds, 1),
            "cpu_seconds": round(cpu_seconds(), 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "evaluation": _evaluation(report),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def cpu_seconds() -> float:
    """User plus system CPU seconds of this process so far, and of its finished children (the
    rendering workers): unlike wall time, a busy shared machine does not inflate it, and on an idle
    machine with one thread it is the wall time a run needs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def swap_into_place(staged: Path, directory: Path) -> None:
    """Replace ``directory`` (a model we wrote, or nothing) by ``staged``."""
    # mkdtemp and some writers create private modes; give the folder the modes the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    staged.chmod(0o777 & ~umask)
    for path in staged.iterdir():
        path.chmod(0o666 & ~umask)
    check_output_dir(directory)
    if directory.exists():
        shutil.rmtree(directory)
    staged.rename(directory)


def folder_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def command_line(settings: TrainSettings) -> str:
    """``captionfleet train`` with the output folder and every option that differs from its default:
    from the preset of the same name when there is one (``--preset fast``), else from ``tiny``'s."""
    from captionfleet.runtime.training.settings import DEFAULT_PRESET, TRAIN_PRESETS

    preset = next(
        (key for key, value in TRAIN_PRESETS.items() if value.name == settings.name), DEFAULT_PRESET
    )
    defaults = TRAIN_PRESETS[preset]
    parts = ["captionfleet", "train", *(["--preset", preset] if preset != DEFAULT_PRESET else [])]
    parts += ["--output-dir", settings.output_dir]
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in ("output_dir", "progress") or value == getattr(defaults, f.name):
            continue
        parts += [
            f"--{f.name.replace('_', '-')}",
            str(value).lower() if isinstance(value, bool) else str(value),
        ]
    return shlex.join(parts)


def _evaluation(report: EvalReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keys = ("dataset", "n", "exact_match", "bleu1", "bleu4", "cider", "num_beams", "max_new_tokens")
    return {key: getattr(report, key) for key in keys}


def write_model_card(
    directory: Path, manifest: dict[str, Any], report: EvalReport | None, *, eval_seed: int
) -> None:
    """``README.md``: what the model is, how it was made, how well it does, how to reproduce it."""
    # The architecture comes from the saved config.json, not from the settings: the card describes
    # the files as they are.
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    settings = manifest["training"]["settings"]
    lines = [
        *_card_introduction(manifest),
        *_card_data(settings),
        *_card_architecture(directory, manifest, config),
        *_card_training(manifest["training"]),
        *_card_patch_loss(settings),
        *_card_evaluation(report, eval_seed),
    ]
    (directory / "README.md").write_text("\n".join(lines), encoding="utf-8")


def _card_introduction(manifest: dict[str, Any]) -> list[str]:
    from captionfleet.runtime.training.settings import BUNDLED_NAME

    if manifest["name"] == BUNDLED_NAME:
        role = [
            "project's synthetic scenes: one or two coloured shapes on a plain background. It is the model",
            "`captionfleet serve` loads by default, so the project serves real captions offline. It knows",
        ]
    else:
        role = [
            "project's synthetic scenes: one or two coloured shapes on a plain background. It is the fast",
            "tier of a cascade (`captionfleet eval --cascade`, `calibration.json`): it answers first, and",
            f"the quality model ({BUNDLED_NAME}) only where its confidence is low. It knows",
        ]
    return [
        f"# {manifest['name']}",
        "",
        "A small BLIP (`BlipForConditionalGeneration`) trained from scratch by `captionfleet train` on the",
        *role,
        "nothing else: on a photo it still answers with shapes and colours, and says so: every caption",
        "gets an `ood_score` against `ood_reference.safetensors` (statistics of the vision encoder's",
        "output on training scenes; `captionfleet eval --model <this folder> --write-reference true`",
        "writes it again).",
        "",
        f"Version `{manifest['version']}`.",
        "",
    ]


def _card_data(settings: dict[str, Any]) -> list[str]:
    # The vocabulary is listed from the scene module itself, so the card cannot fall behind it.
    return [
        "## Data",
        "",
        f"Scenes from `captionfleet.runtime.training.scenes`, drawn per (seed, index) and rendered at "
        f"{scenes.SCENE_SIZE} px:",
        f"shapes {', '.join(scenes.SHAPES)}; colours {', '.join(scenes.OBJECT_COLOURS)}; "
        f"sizes {', '.join(scenes.SIZES)};",
        f"backgrounds {', '.join(scenes.BACKGROUND_COLOURS)}; two shapes are related by "
        f"{' / '.join(repr(words) for words in scenes.RELATIONS.values())}, "
        "the upper or left one named first.",
        "Example captions: *a large red circle above a small blue square on a white background*, *a small",
        "green star on a black background*.",
        "",
        f"Training: {settings['train_scenes']} scenes of seed {settings['seed']}; "
        f"{settings['prompt_fraction']:.0%} of them",
        f"behind a prompt ({', '.join(repr(p) for p in scenes.PROMPTS)}) that is context, not a target, so",
        "prompted captioning (the `photo` and `picture` styles) continues sensibly.",
        f"Held-out evaluation: seed {settings['eval_seed']} (no scene in common with training).",
        "",
    ]


def _card_architecture(directory: Path, manifest: dict[str, Any], config: dict[str, Any]) -> list[str]:
    vision, text = config["vision_config"], config["text_config"]
    size = folder_bytes(directory)
    weights = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    return [
        "## Architecture",
        "",
        "| part | size |",
        "| --- | --- |",
        f"| vision (ViT) | {vision['image_size']} px input, {vision['patch_size']} px patches, "
        f"{vision['num_hidden_layers']} layers, width {vision['hidden_size']}, "
        f"{vision['num_attention_heads']} heads, MLP {vision['intermediate_size']} |",
        f"| text decoder (BERT + cross-attention) | {text['num_hidden_layers']} layers, width "
        f"{text['hidden_size']}, {text['num_attention_heads']} heads, MLP {text['intermediate_size']}, "
        f"{text['max_position_embeddings']} positions |",
        f"| vocabulary | {text['vocab_size']} word-level tokens (BERT specials, `[DEC]` as BOS, "
        f"`[SEP]` ends a caption){_phrases(manifest)} |",
        f"| parameters | {manifest['parameters']:,} |",
        f"| on disk | {size / 1e6:.2f} MB in all, weights {weights / 1e6:.2f} MB (safetensors, fp32) |",
        "",
        "Image processing: BLIP's own (`preprocessor_config.json`): bicubic resize to "
        f"{vision['image_size']} px, rescale 1/255, CLIP mean and std.",
        "",
    ]


def _phrases(manifest: dict[str, Any]) -> str:
    if not manifest["training"]["settings"].get("phrase_tokens"):
        return ""
    return (
        f", {len(scenes.caption_phrases())} of them whole caption phrases ('a large red circle', "
        "'on a white background', 'to the left of'): a caption is 3 to 5 decoder steps"
    )


def _card_training(training: dict[str, Any]) -> list[str]:
    settings = training["settings"]
    return [
        "## Training",
        "",
        "```bash",
        training["command"],
        "```",
        "",
        f"Seed {settings['seed']}, {settings['steps']} AdamW steps of {settings['batch_size']} scenes, "
        f"peak learning rate {settings['learning_rate']:g}",
        f"({settings['warmup_steps']} warm-up steps, cosine decay), "
        f"weight decay {settings['weight_decay']:g}, "
        f"{settings['threads']} torch threads.",
        f"Wall time {training['total_seconds']:.0f} s in all{_cpu(training)}: rendering "
        f"{training['render_seconds']:.0f} s, "
        f"training {training['train_seconds']:.0f} s, then saving and the held-out evaluation",
        f"(torch {training['torch']}, transformers {training['transformers']}, Python {training['python']}). "
        f"Final training loss {training['final_loss']:.4f}.",
        "The same settings, thread count and torch build give the same weights.",
        "",
    ]


def _cpu(training: dict[str, Any]) -> str:
    """``(N CPU seconds)``, for manifests that record it (older ones do not)."""
    seconds = training.get("cpu_seconds")
    return "" if seconds is None else f" ({seconds:.0f} CPU seconds)"


def _card_patch_loss(settings: dict[str, Any]) -> list[str]:
    """A paragraph only when the auxiliary head was on: without it the card has nothing to explain."""
    weight = settings["patch_loss_weight"]
    if not weight:
        return []
    return [
        f"Besides the caption loss, an auxiliary loss (weight {weight:g}) teaches every",
        "image patch which shape covers it, that shape's colour, size and place in the caption (or the",
        "background's colour): a linear head on the vision encoder, dropped after training, so the saved",
        "model is a plain BLIP. It makes the small vision transformer learn shapes several times faster.",
        "",
    ]


def _card_evaluation(report: EvalReport | None, eval_seed: int) -> list[str]:
    lines = ["## Evaluation", ""]
    if report is None:
        return [*lines, "Not evaluated (`--eval-scenes 0`). Run `captionfleet eval --model <folder>`.", ""]
    lines += [
        f"{report.dataset}, through the serving engine with the default generation settings "
        f"({report.num_beams} beams, at most {report.max_new_tokens} new tokens):",
        "",
        "| images | exact match | BLEU-1 | BLEU-4 | CIDEr |",
        "| --- | --- | --- | --- | --- |",
        f"| {report.n} | {report.exact_match:.4f} | {report.bleu1:.4f} | {report.bleu4:.4f} | "
        f"{report.cider:.4f} |",
        "",
        "Captions are lower-cased and stripped of punctuation before scoring; BLEU and CIDEr are",
        "pycocoevalcap's scorers. Reproduce with:",
        "",
        "```bash",
        f"captionfleet eval --model <this folder> --scenes {report.n} --seed {eval_seed} --json",
        "```",
        "",
        "Sample captions (held-out scenes):",
        "",
    ]
    lines += [f"- `{example['caption']}`" for example in report.examples]
    if report.mistakes:
        lines += ["", "Mistakes (caption / expected):", ""]
        lines += [f"- `{m['caption']}` / `{m['references'][0]}`" for m in report.mistakes[:10]]
    return [*lines, ""]
