"""Randomly initialised BLIP models of chosen sizes, for measuring speed without downloading weights.

Random weights caption gibberish, and they would stop at random lengths; so their generation config
sets ``min_new_tokens = max_new_tokens``: every caption is exactly that long, for ours and the baseline
alike, and the comparison measures the same work. Needs only torch and transformers (``gpu.py`` uses
it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionfleet.runtime.training.model import Architecture, Tower, blip_config

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BOS_TOKEN = "[DEC]"


@dataclass(frozen=True)
class BlipSpec:
    """A BLIP captioning architecture: a ViT image encoder and a BERT-style decoder with cross-attention."""

    name: str
    architecture: Architecture
    vocab_size: int = 30524
    """BLIP-base's (BERT's 30522 plus [DEC] and one more)."""

    @property
    def image_size(self) -> int:
        return self.architecture.image_size

    def describe(self) -> str:
        arch, vision, text = self.architecture, self.architecture.vision, self.architecture.text
        return (
            f"{self.name}: ViT {vision.layers}x{vision.hidden} ({vision.heads} heads) over "
            f"{arch.image_size} px in {arch.patch_size} px patches; decoder {text.layers}x"
            f"{text.hidden} ({text.heads} heads); MLP x{arch.mlp_ratio}; "
            f"vocabulary {self.vocab_size}"
        )


def _blip(image_size: int, patch_size: int, vision: Tower, text: Tower, mlp_ratio: int = 4) -> Architecture:
    """A randomly initialised BLIP's architecture: 512 text positions, BLIP's own."""
    return Architecture(image_size, patch_size, vision, text, mlp_ratio, max_positions=512)


BLIP_BASE = BlipSpec("blip-base", _blip(384, 16, Tower(768, 12, 12), Tower(768, 12, 12)))
"""The architecture of ``Salesforce/blip-image-captioning-base`` (transformers' BlipConfig defaults)."""

BLIP_MINI = BlipSpec("blip-mini-random", _blip(224, 16, Tower(256, 6, 4), Tower(256, 4, 4)))
"""BLIP-base's shape scaled down for CPUs: a third of the width, half the encoder depth, a third of the
decoder depth, 224 px and BLIP's full vocabulary. About 10x the bundled model's compute per caption, so
the model rather than HTTP dominates, yet small enough for a benchmark run on 2 cores."""

BLIP_TINY = BlipSpec(
    "blip-tiny-random", _blip(32, 8, Tower(32, 1, 2), Tower(32, 2, 2), mlp_ratio=2), vocab_size=64
)
"""For smoke tests of the benchmark scripts."""


def build_tokenizer(spec: BlipSpec) -> Any:
    """A BERT tokenizer whose vocabulary has the special tokens, filler words and [DEC] last."""
    from transformers import BertTokenizer

    fillers = [f"w{index}" for index in range(spec.vocab_size - len(SPECIAL_TOKENS) - 1)]
    words = [*SPECIAL_TOKENS, *fillers, BOS_TOKEN]
    return BertTokenizer(
        vocab={word: index for index, word in enumerate(words)}, do_lower_case=True, bos_token=BOS_TOKEN
    )


def build_model(spec: BlipSpec, tokenizer: Any, new_tokens: int) -> Any:
    """A random ``BlipForConditionalGeneration`` whose captions are exactly ``new_tokens`` long.

    Built on the current default device (``with torch.device("cuda"):`` initialises on the GPU)."""
    from transformers import BlipForConditionalGeneration

    config = blip_config(spec.architecture, tokenizer, vocab_size=spec.vocab_size)
    model = BlipForConditionalGeneration(config)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.sep_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.decoder_start_token_id = tokenizer.bos_token_id
    generation.min_new_tokens = new_tokens
    generation.max_new_tokens = new_tokens
    model.train(False)
    return model


def save_random_blip(directory: Path, spec: BlipSpec, new_tokens: int, seed: int = 0) -> Path:
    """Write a random model of ``spec`` with tokenizer and image processor config (save_pretrained)."""
    import torch
    from transformers import BlipImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec, tokenizer, new_tokens)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = {"height": spec.image_size, "width": spec.image_size}
    BlipImageProcessorPil(size=size).save_pretrained(directory)
    return directory
