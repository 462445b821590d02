"""A tiny random BLIP in ``save_pretrained`` format, for fast tests of code that loads a real model.

It goes through exactly the loading path the bundled model does (config, safetensors weights,
tokenizer files, ``preprocessor_config.json``), in well under a second. Its captions are gibberish
from a small vocabulary, of varied lengths, but they depend on the image (weights are initialised
with a large spread so the image's cross-attention matters), so batch order and per-image results
can be tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from captionfleet.runtime.engine.types import Caption

TINY_WORDS = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "an", "the", "of", "on", "in", "and", "with", "picture", "photography", "photo",
    "red", "green", "blue", "yellow", "white", "black", "circle", "square", "triangle", "star",
    "dog", "cat", "small", "large", "left", "right", "top", "bottom", ".", ",",
)  # fmt: skip
"""The tiny model's vocabulary (BERT-style, lower case); ``[DEC]`` is added as the BOS token."""


def save_tiny_blip(directory: Path, *, image_size: int = 32, seed: int = 0, eos_bias: float = 5.0) -> Path:
    """Write a random BLIP captioning model with tokenizer and image processor config to ``directory``.

    ``eos_bias`` is added to the end-of-caption logit so that some captions end before
    ``max_new_tokens`` and some do not, as with a trained model.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(TINY_WORDS)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
            "initializer_range": 0.5,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "initializer_range": 0.5,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tokenizer.sep_token_id] += eos_bias
    model.decoder_input_ids = tokenizer.bos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def check_ranked_suggestions(caption: Caption, wanted: int) -> None:
    """The contract of ``suggestions``: 1 to ``wanted``, the caption first, sorted by confidence in
    (0, 1], no two the same once normalised."""
    from captionfleet.runtime.engine.captioner import normalise_caption

    assert 1 <= len(caption.suggestions) <= wanted
    assert caption.suggestions[0].text == caption.text
    confidences = [s.confidence for s in caption.suggestions]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0 < c <= 1 for c in confidences)
    keys = [normalise_caption(s.text) for s in caption.suggestions]
    assert len(set(keys)) == len(keys)
