"""The bundled model's parts: a word-level tokenizer, a tiny BLIP, and its image processor config.

How BLIP starts a caption, and why training must match it: ``BlipForConditionalGeneration.generate``
takes the prompt ids ``[CLS] prompt [SEP]`` (or ``[BOS] [SEP]`` with no prompt), overwrites the first
id with ``text_config.bos_token_id`` and drops the last one, then lets the decoder continue until
``text_config.sep_token_id``. So a training sequence is ``[DEC] words [SEP]`` with ``[DEC]`` as the
BOS token and ``[SEP]`` as the end of the caption (also set as ``eos_token_id`` in the text and
generation configs). The loss shifts labels itself: labels are the input ids, pads set to -100.

The vocabulary is passed to ``BertTokenizer`` as a ``vocab`` dict: with transformers 5 a fresh
``vocab_file`` silently maps every word to ``[UNK]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
BOS_TOKEN = "[DEC]"


@dataclass(frozen=True)
class Tower:
    """One of BLIP's two transformer stacks: the ViT image encoder or the BERT text decoder."""

    hidden: int
    layers: int
    heads: int


@dataclass(frozen=True)
class Architecture:
    """A small BLIP: a ViT over ``image_size`` pixels in ``patch_size`` patches, and a BERT decoder."""

    image_size: int = 96
    patch_size: int = 16
    vision: Tower = Tower(hidden=192, layers=3, heads=4)
    text: Tower = Tower(hidden=192, layers=2, heads=4)
    mlp_ratio: int = 2
    """Feed-forward width as a multiple of the hidden size (BLIP's own is 4; 2 keeps the file small)."""
    max_positions: int = 128
    """Text positions: the longest prompt plus ``max_new_tokens`` must fit."""
    sincos_positions: bool = True
    """Start the vision position embeddings as 2-D sine-cosine waves (as MAE does) instead of noise:
    "which shape is above the other" is then learnable from the first step."""


def build_tokenizer(max_positions: int, *, phrases: bool = False) -> Any:
    """A lower-casing BERT tokenizer whose vocabulary is exactly the scene words plus BERT's specials,
    and with ``phrases`` the caption phrases of :func:`caption_phrases` as added tokens."""
    from transformers import BertTokenizer

    from captionfleet.runtime.training.scenes import caption_phrases, caption_vocabulary

    words = list(SPECIAL_TOKENS) + caption_vocabulary()
    tokenizer = BertTokenizer(
        vocab={word: index for index, word in enumerate(words)},
        do_lower_case=True,
        bos_token=BOS_TOKEN,
        model_max_length=max_positions,
    )
    if phrases:
        # Added tokens are matched in the text before the words are split, longest first, and decode
        # to their own text: a two-shape caption is 4 tokens instead of 13 words. The decoder's steps
        # cost the same whatever their token, so this is what makes the fast model fast.
        tokenizer.add_tokens(caption_phrases())
    return tokenizer


def build_image_processor(image_size: int) -> Any:
    """BLIP's image processor at our size: bicubic resize, rescale, CLIP mean/std (BLIP's own)."""
    from PIL import Image
    from transformers import BlipImageProcessorPil

    from captionfleet.runtime.engine.preprocess import CLIP_MEAN, CLIP_STD

    return BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def blip_config(
    architecture: Architecture, tokenizer: Any, *, vocab_size: int, initializer_range: float | None = None
) -> Any:
    """transformers' ``BlipConfig`` of ``architecture``, with ``tokenizer``'s special tokens.

    ``initializer_range`` of the vision tower: None keeps transformers' default.
    """
    from transformers import BlipConfig

    arch = architecture
    vision = _tower_config(arch.vision, arch.mlp_ratio)
    vision |= {"image_size": arch.image_size, "patch_size": arch.patch_size}
    if initializer_range is not None:
        vision["initializer_range"] = initializer_range
    text = _tower_config(arch.text, arch.mlp_ratio)
    text |= {"vocab_size": vocab_size, "max_position_embeddings": arch.max_positions}
    text |= {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    text |= {"sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id}
    return BlipConfig(vision_config=vision, text_config=text)


def _tower_config(tower: Tower, mlp_ratio: int) -> dict[str, Any]:
    """The sizes a ``BlipVisionConfig`` and a ``BlipTextConfig`` name alike."""
    return {
        "hidden_size": tower.hidden,
        "intermediate_size": tower.hidden * mlp_ratio,
        "num_hidden_layers": tower.layers,
        "num_attention_heads": tower.heads,
    }


def build_model(architecture: Architecture, tokenizer: Any) -> Any:
    """A freshly initialised ``BlipForConditionalGeneration`` (seed torch first for repeatable weights)."""
    from transformers import BlipForConditionalGeneration

    arch = architecture
    if arch.image_size % arch.patch_size:
        raise ValueError(f"image size {arch.image_size} is not a multiple of patch size {arch.patch_size}")
    config = blip_config(arch, tokenizer, vocab_size=len(tokenizer), initializer_range=0.02)
    model = BlipForConditionalGeneration(config)
    if arch.sincos_positions:
        _sincos_positions(
            model.vision_model.embeddings.position_embedding, arch.image_size // arch.patch_size
        )
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.sep_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.decoder_start_token_id = tokenizer.bos_token_id
    return model


def _sincos_positions(embedding: Any, grid: int) -> None:
    """Fill ``(1, 1 + grid*grid, dim)`` with 2-D sine-cosine codes (row, column); the class slot gets 0."""
    import torch

    dim = embedding.shape[-1]
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angles = axis[:, None].double() * frequencies[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    codes = torch.cat(parts, dim=1)
    codes = torch.nn.functional.pad(codes, (0, dim - codes.shape[1]))
    with torch.no_grad():
        embedding.zero_()
        embedding[0, 1:] = codes.to(embedding.dtype)


def parameter_count(model: Any) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
