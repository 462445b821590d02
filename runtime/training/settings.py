"""Settings of ``captionfleet train`` and ``captionfleet eval``: frozen dataclasses, one default per field.

Each field is also an option (``--train-scenes``) and an environment variable
(``CAPTIONFLEET_TRAIN_SCENES``). The training defaults are the ones that built the bundled model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from captionfleet.calibration import SIGNALS
from captionfleet.runtime.engine.types import DEFAULT_MODEL, FAST_MODEL
from captionfleet.runtime.training.model import Architecture, Tower
from captionfleet.settings import overlay, setting
from captionfleet.settings.generation import GenerationSettings

TRAIN_SEED = 0
"""The bundled model's training seed: scenes, initial weights and batch order all follow from it."""
HELD_OUT_SEED = 1_000_003
"""The evaluation scenes' seed. Scenes are drawn per (seed, index), so other seeds share no scene."""
BUNDLED_NAME = DEFAULT_MODEL
FAST_NAME = FAST_MODEL

_ARCH = Architecture()


@dataclass(frozen=True)
class TrainSettings:
    output_dir: str = setting(
        f"out/{BUNDLED_NAME}", "Where to save the model (save_pretrained format); created if missing."
    )
    name: str = setting(BUNDLED_NAME, "Model name recorded in captionfleet.json and the model card.")
    seed: int = setting(TRAIN_SEED, "Seed of the training scenes, the initial weights and the batch order.")
    train_scenes: int = setting(100_000, "Distinct training scenes, rendered once before training.")
    steps: int = setting(3_000, "Optimiser steps.")
    batch_size: int = setting(64, "Scenes per step.")
    learning_rate: float = setting(1e-3, "Peak AdamW learning rate (linear warm-up, then cosine decay to 0).")
    warmup_steps: int = setting(150, "Steps of linear learning-rate warm-up.")
    weight_decay: float = setting(0.01, "AdamW weight decay (not applied to biases and norms).")
    prompt_fraction: float = setting(
        0.15, "Share of training captions behind a prompt such as 'a picture of' (prompt not scored)."
    )
    patch_loss_weight: float = setting(
        1.0,
        "Weight of the auxiliary loss that teaches every image patch which shape covers it (its shape, "
        "colour, size, and whether it is named first); the head is dropped after training. 0: off.",
    )
    threads: int = setting(
        2, "Torch intra-op threads for training (also scene-rendering processes); 0: torch's default."
    )
    eval_scenes: int = setting(
        500, "Held-out scenes scored after training (recorded in the model card); 0: skip."
    )
    eval_seed: int = setting(HELD_OUT_SEED, "Seed of the held-out scenes scored after training.")
    reference_scenes: int = setting(
        3000,
        "Training scenes the out-of-distribution reference (ood_reference.safetensors) is built from; "
        "0: none.",
    )
    progress: bool = setting(True, "Show a progress bar on stderr.")
    image_size: int = setting(_ARCH.image_size, "Model input size in pixels (square).")
    patch_size: int = setting(_ARCH.patch_size, "Vision transformer patch size in pixels.")
    vision_hidden: int = setting(_ARCH.vision.hidden, "Vision transformer width.")
    vision_layers: int = setting(_ARCH.vision.layers, "Vision transformer layers.")
    vision_heads: int = setting(_ARCH.vision.heads, "Vision transformer attention heads.")
    text_hidden: int = setting(_ARCH.text.hidden, "Text decoder width.")
    text_layers: int = setting(_ARCH.text.layers, "Text decoder layers.")
    text_heads: int = setting(_ARCH.text.heads, "Text decoder attention heads.")
    mlp_ratio: int = setting(_ARCH.mlp_ratio, "Feed-forward width as a multiple of the hidden size.")
    phrase_tokens: bool = setting(
        False,
        "Add each caption phrase ('a large red circle', 'on a white background', 'to the left of') to the "
        "vocabulary as one token: a caption takes 3-5 decoder steps instead of 8-14.",
    )

    def architecture(self) -> Architecture:
        """The architecture these options give: each of its fields that is an option here, by name, and
        its two towers from ``--vision-*`` and ``--text-*``."""
        return replace(
            overlay(_ARCH, self),
            vision=Tower(self.vision_hidden, self.vision_layers, self.vision_heads),
            text=Tower(self.text_hidden, self.text_layers, self.text_heads),
        )

    def check(self) -> list[str]:
        """What is wrong with these settings, as messages naming the option; empty when fine."""
        problems = []
        positive = (
            *("train_scenes", "steps", "batch_size", "image_size", "patch_size", "vision_hidden"),
            *("vision_layers", "vision_heads", "text_hidden", "text_layers", "text_heads", "mlp_ratio"),
        )
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("warmup_steps", "threads", "eval_scenes"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if not self.learning_rate > 0:
            problems.append("--learning-rate must be positive")
        if self.patch_loss_weight < 0:
            problems.append("--patch-loss-weight must not be negative")
        if not 0 <= self.prompt_fraction < 1:
            problems.append("--prompt-fraction must be in [0, 1)")
        if self.patch_size >= 1 and self.image_size % self.patch_size:
            problems.append("--image-size must be a multiple of --patch-size")
        for hidden, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
            if getattr(self, heads) >= 1 and getattr(self, hidden) % getattr(self, heads):
                problems.append(
                    f"--{hidden.replace('_', '-')} must be a multiple of --{heads.replace('_', '-')}"
                )
        if self.reference_scenes != 0 and self.reference_scenes < 30:
            problems.append("--reference-scenes must be 0 or at least 30")
        if self.eval_scenes and self.eval_seed == self.seed:
            problems.append("--eval-seed must differ from --seed (held-out scenes)")
        if not self.output_dir.strip():
            problems.append("--output-dir must not be empty")
        return problems


TRAIN_PRESETS: dict[str, TrainSettings] = {
    "tiny": TrainSettings(),
    # The cascade's fast tier: 96 px in 6x6 patches, two vision layers, one decoder layer, a phrase
    # vocabulary (a caption in 3-5 decoder steps). 96 px, not 64 px: that model was underfit (held-out
    # exact match 0.566, confusing small shapes). Steps are what it lacked: on one thread 2200 steps of
    # 64 gave 0.874 held out and 3300 gave 0.940 (the cascade then 0.976 at 30 % escalation, against
    # 0.966), but 800 CPU seconds; on the two cores (threads=2) the 3300 fit in 10 minutes.
    # Fewer scenes a step did worse at the same budget: 32 per step (3400 steps) 0.704, 96 per step
    # at 3e-3 (1400) 0.732.
    "fast": TrainSettings(
        output_dir=f"out/{FAST_NAME}",
        name=FAST_NAME,
        seed=TRAIN_SEED,
        train_scenes=30_000,
        steps=3_300,
        batch_size=64,
        learning_rate=2e-3,
        warmup_steps=100,
        threads=2,
        image_size=96,
        vision_hidden=128,
        vision_layers=2,
        text_hidden=128,
        text_layers=1,
        phrase_tokens=True,
    ),
}
"""``captionfleet train --preset NAME``: named sets of defaults, each explicit and seeded; the options
given on the command line (or in the environment) override them. ``tiny`` is ``TrainSettings()``."""
DEFAULT_PRESET = "tiny"


@dataclass(frozen=True)
class EvalSettings(GenerationSettings):
    model: str = setting(
        "", "Model to score: a save_pretrained directory or a Hugging Face id; empty: the bundled model."
    )
    images: str = setting("", "Folder of images to score instead of synthetic scenes (needs --captions).")
    captions: str = setting(
        "",
        "COCO-style captions JSON for --images: images[{id, file_name}], annotations[{image_id, caption}].",
    )
    limit: int = setting(0, "With --images: score only the first LIMIT captioned images found; 0: all.")
    scenes: int = setting(500, "Held-out synthetic scenes to score (without --images).")
    seed: int = setting(HELD_OUT_SEED, "Seed of the held-out synthetic scenes (differs from training's).")
    batch_size: int = setting(32, "Images per generate call.")
    device: str = setting("auto", "Torch device (cpu, cuda, cuda:1); auto: CUDA when available, else CPU.")
    precision: str = setting(
        "auto",
        "Weights dtype; auto: bf16 on CUDA (else fp16), fp32 on CPU.",
        choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
    )
    threads: int = setting(0, "Torch intra-op threads; 0: torch's default.")
    progress: bool = setting(True, "Show a progress bar on stderr.")
    write_reference: bool = setting(
        False,
        "Write the model directory's out-of-distribution reference (ood_reference.safetensors) before "
        "scoring: from --reference-scenes scenes of --reference-seed, or from the --images folder.",
    )
    reference_scenes: int = setting(
        3000, "Synthetic scenes the reference is fitted on (2/3) and calibrated on."
    )
    reference_seed: int = setting(
        TRAIN_SEED, "Seed of the reference scenes (the training seed: the distribution learnt)."
    )
    threshold: float | None = setting(
        None, "With --cascade: score the cascade at this threshold of the signal (default: 30 % escalation)."
    )
    target_escalation_rate: float | None = setting(
        None, "With --cascade: pick the threshold that sends this share of the images to the quality model."
    )
    signal: str = setting(
        "auto",
        "With --cascade: what escalates, the fast model's confidence (below the threshold) or its OOD score "
        "(above it); auto: the one whose cascade has the higher exact match at 30 % escalation.",
        choices=("auto", *SIGNALS),
    )
    write_calibration: bool = setting(
        False,
        "With --cascade: write calibration.json (the signal's quantiles and the sweep) into the fast "
        "model's folder, where `serve` shows it in GET /v1/models.",
    )

    def check(self) -> list[str]:
        problems = self._cascade_problems()
        if self.write_reference and not self.images and self.reference_scenes < 30:
            problems.append("--reference-scenes must be at least 30")
        if bool(self.images) != bool(self.captions):
            problems.append("--images and --captions go together")
        if not self.images and self.scenes < 1:
            problems.append("--scenes must be at least 1")
        for name in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("threads", "limit"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must not be negative")
        return problems

    def cascade_options_given(self) -> bool:
        """Whether an option that only a cascade uses differs from its default."""
        return (
            self.threshold is not None
            or self.target_escalation_rate is not None
            or self.signal != "auto"
            or self.write_calibration
        )

    def _cascade_problems(self) -> list[str]:
        problems = []
        if self.threshold is not None and self.target_escalation_rate is not None:
            problems.append("--threshold and --target-escalation-rate exclude each other")
        rate = self.target_escalation_rate
        if rate is not None and not 0 <= rate <= 1:
            problems.append("--target-escalation-rate must be in [0, 1]")
        if self.write_calibration and self.images:
            problems.append("--write-calibration calibrates on the held-out scenes, not --images")
        return problems
