"""BLIP's vision encoder, run by the native path with fused attention.

transformers runs BLIP's ViT attention eagerly: ``q k^T``, a scale, softmax and ``probs v`` as four
kernels with the ``(images, heads, tokens, tokens)`` scores written to memory and read back twice. Here
the same modules of the loaded model are called in the same order (embeddings, then per layer
``layer_norm1``, attention, residual, ``layer_norm2``, MLP, residual, then ``post_layernorm``), and only
the attention's core is one ``scaled_dot_product_attention`` call (torch's fused CPU kernel; flash or
memory-efficient kernels on CUDA), with BLIP's own scale. Measured on ``blip-mini-random`` (224 px, 197
tokens, 6 layers; batch 32, 2 threads, alternating 4 rounds): 18-28 % less time for the encoder, and the
states equal to transformers' within 1e-5 on the CPU (to the last bit on some CPUs, ~2e-6 apart on an AMD
EPYC); with int8 weights such a difference can move an activation by one rounding step
(``tests/runtime/engine/test_vision.py`` bounds it; the agreement tests compare the captions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional


def encode_images(vision_model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``(images, tokens, hidden)``: ``vision_model(pixel_values)[0]``, fused."""
    hidden = vision_model.embeddings(pixel_values)
    for layer in vision_model.encoder.layers:
        hidden = hidden + _attention(layer.self_attn, layer.layer_norm1(hidden))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    states: torch.Tensor = vision_model.post_layernorm(hidden)
    return states


def _attention(attention: Any, hidden: torch.Tensor) -> torch.Tensor:
    images, tokens, width = hidden.shape
    heads = int(attention.num_heads)
    qkv = attention.qkv(hidden).reshape(images, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    context = functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=float(attention.scale))
    projected: torch.Tensor = attention.projection(context.transpose(1, 2).reshape(images, tokens, width))
    return projected
