"""Training the bundled BLIP on synthetic scenes, on the CPU, repeatably.

Everything follows from the seed: the scenes (drawn per index), which captions get a prompt, the
initial weights and the batch order. With the same settings, thread count and torch build a run gives
the same weights; other thread counts change the order of float sums, so the weights (not the
quality) differ slightly.

The images are rendered once, resized to the model's input size with the reference's filter (the
engine's :class:`ImagePreprocessor` settings, PIL bicubic; serving shrinks with torch's port of that
filter, within two grey levels), and kept as uint8; each batch is normalised through a lookup table
with the image processor's own arithmetic.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from captionfleet.runtime.engine.preprocess import ImagePreprocessor
from captionfleet.runtime.training.model import (
    Architecture,
    build_image_processor,
    build_model,
    build_tokenizer,
)
from captionfleet.runtime.training.scenes import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    PROMPTS,
    SCENE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    scene_at,
)

if TYPE_CHECKING:
    from captionfleet.runtime.training.settings import TrainSettings

IGNORE = -100
"""Label value the loss skips: padding and prompt tokens."""

PATCH_TARGETS: tuple[tuple[str, int], ...] = (
    ("part", 3),  # background, the first shape named, the second
    ("shape", 1 + len(SHAPES)),  # none, then SHAPES
    ("colour", len(OBJECT_COLOURS) + len(BACKGROUND_COLOURS)),  # the shape's colour, else the background's
    ("size", 1 + len(SIZES)),  # none, then SIZES
)
"""What the auxiliary head predicts for every image patch (see :func:`patch_labels`)."""
COVERED = 0.15
"""A patch belongs to a shape when the shape covers at least this share of it."""


@dataclass(frozen=True)
class TrainingData:
    pixels: torch.Tensor
    """(N, 3, H, W) uint8, already resized to the model's input size."""
    input_ids: torch.Tensor
    """(N, L): ``[DEC] [prompt] caption [SEP]`` then padding."""
    attention_mask: torch.Tensor
    labels: torch.Tensor
    """``input_ids`` with padding and prompt tokens set to -100 (the model shifts them itself)."""
    patch_labels: torch.Tensor
    """(N, patches, 4) targets of the auxiliary head, in :data:`PATCH_TARGETS` order."""
    captions: list[str]


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    image_processor: Any
    losses: list[float] = field(default_factory=list)
    """Caption loss (the model's own) per step."""
    patch_losses: list[float] = field(default_factory=list)
    """Auxiliary per-patch loss per step (empty without the auxiliary head)."""
    render_seconds: float = 0.0
    train_seconds: float = 0.0


def patch_labels(scene: Scene, image_size: int, patch_size: int) -> np.ndarray:
    """(patches, 4) int64: per patch (row-major, as the ViT orders them), which shape covers it and
    that shape's attributes, or the background's colour; see :data:`PATCH_TARGETS`."""
    grid = image_size // patch_size
    mask = np.asarray(scene.mask(image_size))
    blocks = mask.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(blocks == index + 1).sum(axis=1) for index in range(len(scene.objects))], axis=1)
    part = np.where(counts.max(axis=1) >= COVERED * patch_size**2, counts.argmax(axis=1) + 1, 0)
    colours, backgrounds = list(OBJECT_COLOURS), list(BACKGROUND_COLOURS)
    rows = [(0, 0, len(colours) + backgrounds.index(scene.background), 0)]
    rows += [
        (i + 1, 1 + SHAPES.index(o.shape), colours.index(o.colour), 1 + list(SIZES).index(o.size))
        for i, o in enumerate(scene.objects)
    ]
    return np.asarray(rows, dtype=np.int64)[part]


def render_scenes(
    seed: int, start: int, stop: int, preprocessor: ImagePreprocessor, patch_size: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scenes ``start .. stop-1`` of ``seed``: (n, 3, H, W) uint8 pixels at the model's input size,
    (n, patches, 4) uint8 patch labels, and the captions."""
    count = stop - start
    pixels = np.empty((count, 3, preprocessor.height, preprocessor.width), dtype=np.uint8)
    patches = np.empty((count, (preprocessor.height // patch_size) ** 2, 4), dtype=np.uint8)
    captions = []
    for row, index in enumerate(range(start, stop)):
        scene = scene_at(seed, index)
        image = scene.render(SCENE_SIZE)
        if preprocessor.do_resize and image.size != preprocessor.size:
            image = image.resize(preprocessor.size, resample=preprocessor.resample)
        pixels[row] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        patches[row] = patch_labels(scene, preprocessor.height, patch_size)
        captions.append(scene.caption)
    return pixels, patches, captions


def _render_chunk(
    arguments: tuple[int, int, int, ImagePreprocessor, int],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return render_scenes(*arguments)


def prepare_data(
    seed: int,
    count: int,
    preprocessor: ImagePreprocessor,
    tokenizer: Any,
    prompt_fraction: float,
    patch_size: int = 16,
    workers: int = 1,
    progress: bool = False,
) -> TrainingData:
    """Render and tokenise scenes ``0 .. count-1`` of ``seed`` (in ``workers`` processes)."""
    from tqdm import tqdm

    chunk = 500
    ranges = [
        (seed, start, min(count, start + chunk), preprocessor, patch_size) for start in range(0, count, chunk)
    ]
    parts = []
    with tqdm(total=count, desc="rendering", unit="scene", disable=not progress, dynamic_ncols=True) as bar:
        if workers > 1 and len(ranges) > 1 and "fork" in multiprocessing.get_all_start_methods():
            # Forked workers only draw with PIL and numpy; imap hands the chunks back in order.
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for part in pool.imap(_render_chunk, ranges):
                    parts.append(part)
                    bar.update(len(part[2]))
        else:
            for arguments in ranges:
                parts.append(render_scenes(*arguments))
                bar.update(len(parts[-1][2]))
    pixels = torch.from_numpy(np.concatenate([part[0] for part in parts]))
    patches = torch.from_numpy(np.concatenate([part[1] for part in parts]))
    captions = [caption for part in parts for caption in part[2]]

    sequences: list[list[int]] = []
    prompt_lengths: list[int] = []
    prompt_rng = random.Random(f"captionfleet-prompts:{seed}")
    bos, sep = int(tokenizer.bos_token_id), int(tokenizer.sep_token_id)
    prompt_ids = {prompt: _words(tokenizer, prompt) for prompt in PROMPTS}
    for caption in captions:
        prefix = prompt_ids[prompt_rng.choice(PROMPTS)] if prompt_rng.random() < prompt_fraction else []
        sequences.append([bos, *prefix, *_words(tokenizer, caption), sep])
        prompt_lengths.append(len(prefix))
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((count, length), int(tokenizer.pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((count, length), dtype=torch.long)
    labels = torch.full((count, length), IGNORE, dtype=torch.long)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        # Position 0 ([DEC]) is never a target; prompt words are context, not something to predict.
        labels[row, 1 + prompt_length : len(sequence)] = input_ids[row, 1 + prompt_length : len(sequence)]
    return TrainingData(pixels, input_ids, attention_mask, labels, patches, captions)


def normalisation_table(preprocessor: ImagePreprocessor) -> torch.Tensor:
    """(3, 256) float32: each 8-bit level after rescale and normalise, the serving preprocessor's own table
    (so training sees exactly the pixel values serving will)."""
    return torch.from_numpy(preprocessor.lookup_table())


def normalise(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 pixel values."""
    channels = torch.arange(3)[None, :, None, None]
    return table[channels, pixels.long()]


def learning_rate_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    settings: TrainSettings,
    *,
    architecture: Architecture | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Build and train a model as ``settings`` say; returns it in eval mode with its tokenizer and image
    processor. ``architecture`` replaces the one the settings' options give (e.g. fewer text positions)."""
    architecture = architecture or settings.architecture()
    tokenizer, image_processor, preprocessor, model = _untrained(
        settings.seed, architecture, settings.phrase_tokens
    )

    started = time.perf_counter()
    data = prepare_data(
        settings.seed,
        settings.train_scenes,
        preprocessor,
        tokenizer,
        settings.prompt_fraction,
        patch_size=architecture.patch_size,
        workers=max(1, torch.get_num_threads()),
        progress=settings.progress,
    )
    render_seconds = time.perf_counter() - started

    stepper = _Stepper.build(model, architecture, data, normalisation_table(preprocessor), settings)
    started = time.perf_counter()
    steps, peak = settings.steps, settings.learning_rate
    schedule = [learning_rate_at(step, steps, peak, settings.warmup_steps) for step in range(steps)]
    losses, patch_losses = stepper.run(
        _batch_order(settings.seed, settings.train_scenes, settings.batch_size),
        schedule,
        progress=settings.progress,
        on_step=on_step,
    )
    train_seconds = time.perf_counter() - started
    model.train(False)
    return TrainResult(model, tokenizer, image_processor, losses, patch_losses, render_seconds, train_seconds)


def _untrained(
    seed: int, architecture: Architecture, phrase_tokens: bool = False
) -> tuple[Any, Any, ImagePreprocessor, Any]:
    """Tokenizer, image processor (and the engine's preprocessor of its settings) and the model with
    its initial weights, the first draws after seeding torch's global generator."""
    # Reproducibility rests on the order of the draws from that generator: the model's initial
    # weights, then the auxiliary head's (made even when unused, see _Stepper.build), then what the
    # steps draw. Keep it.
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(architecture.max_positions, phrases=phrase_tokens)
    image_processor = build_image_processor(architecture.image_size)
    preprocessor = ImagePreprocessor.from_config(image_processor.to_dict())
    model = build_model(architecture, tokenizer)
    return tokenizer, image_processor, preprocessor, model


def _batch_order(seed: int, train_scenes: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Endless batches of scene indices: a fresh permutation per epoch, from a generator of its own
    (so the order depends on the seed alone, not on what else draws from torch's global one); the
    scenes left over at an epoch's end are skipped."""
    order = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(train_scenes, generator=order)
    cursor = 0
    while True:
        if cursor + batch_size > train_scenes:  # a new epoch: a new order
            permutation = torch.randperm(train_scenes, generator=order)
            cursor = 0
        yield permutation[cursor : cursor + batch_size]
        cursor += batch_size


@dataclass
class _Stepper:
    """The model being trained, with the auxiliary head, the optimiser and the data one step needs."""

    model: Any
    patch_head: torch.nn.Linear
    trained: torch.nn.ModuleList
    optimizer: torch.optim.Optimizer
    data: TrainingData
    table: torch.Tensor
    patch_loss_weight: float

    @classmethod
    def build(
        cls,
        model: Any,
        architecture: Architecture,
        data: TrainingData,
        table: torch.Tensor,
        settings: TrainSettings,
    ) -> _Stepper:
        # The auxiliary head is trained with the model and then dropped: the saved model is a plain BLIP.
        # Made even when off, which keeps the later draws the same whether the head is on or not.
        patch_head = torch.nn.Linear(architecture.vision.hidden, sum(n for _, n in PATCH_TARGETS))
        weight = settings.patch_loss_weight
        trained = torch.nn.ModuleList([model, patch_head] if weight else [model])
        groups = _parameter_groups(trained, settings.weight_decay)
        # Fused: one kernel per step instead of a dozen per parameter list (a few % of a fast-model step).
        optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, fused=True)
        return cls(model, patch_head, trained, optimizer, data, table, weight)

    def run(
        self,
        batches: Iterator[torch.Tensor],
        schedule: list[float],
        *,
        progress: bool,
        on_step: Callable[[int, float], None] | None,
    ) -> tuple[list[float], list[float]]:
        """One step per learning rate of ``schedule``; the caption and auxiliary losses per step."""
        from tqdm import tqdm

        losses: list[float] = []
        patch_losses: list[float] = []
        self.trained.train()
        bar = tqdm(
            total=len(schedule), desc="training", unit="step", disable=not progress, dynamic_ncols=True
        )
        try:
            # Schedule first: it ends the loop, so no batch is drawn beyond the last step.
            for step, (rate, batch) in enumerate(zip(schedule, batches, strict=False)):
                loss, patch_loss = self.step(batch, rate)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training diverged at step {step}: loss {loss}")
                losses.append(loss)
                if patch_loss is not None:
                    patch_losses.append(patch_loss)
                if on_step is not None:
                    on_step(step, loss)
                bar.update(1)
                if step % 10 == 0 or step == len(schedule) - 1:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        finally:
            bar.close()
        return losses, patch_losses

    def step(self, batch: torch.Tensor, learning_rate: float) -> tuple[float, float | None]:
        """One optimiser step on ``batch``: its caption loss, and its auxiliary loss when the head is on."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        data = self.data
        # Trim the batch's columns to its longest caption: most of the cost is per token.
        width = int(data.attention_mask[batch].sum(dim=1).max())
        output = self.model(
            pixel_values=normalise(data.pixels[batch], self.table),
            input_ids=data.input_ids[batch, :width],
            attention_mask=data.attention_mask[batch, :width],
            labels=data.labels[batch, :width],
        )
        total = output.loss
        patch_value = None
        if self.patch_loss_weight:
            patch_loss = _patch_loss(
                self.patch_head(output.last_hidden_state[:, 1:]), data.patch_labels[batch]
            )
            patch_value = float(patch_loss.detach())
            total = total + self.patch_loss_weight * patch_loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), 1.0)
        self.optimizer.step()
        return float(output.loss.detach()), patch_value


def _patch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the :data:`PATCH_TARGETS` of every patch; logits (B, P, sum of sizes)."""
    losses = []
    start = 0
    for column, (_, size) in enumerate(PATCH_TARGETS):
        part = logits[..., start : start + size].reshape(-1, size)
        losses.append(torch.nn.functional.cross_entropy(part, labels[..., column].reshape(-1).long()))
        start += size
    return torch.stack(losses).mean()


def _words(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a caption or prompt, as the tokenizer splits it (words, or the phrase tokens first)."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if int(tokenizer.unk_token_id) in ids:
        raise ValueError(f"{text!r} has words outside the vocabulary")
    return ids


def _parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and embeddings' 1-D parameters are left alone."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "norm" not in name.lower() else plain).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
