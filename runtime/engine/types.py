"""The engine's value types: what a caption request asks for and what it gets back.

These are the contract between the engine, the async data plane, the HTTP server and the training
scripts; they hold no tensors and know nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate captions. Equal options may share one ``generate`` call."""

    num_beams: int = 3
    """Beam width; >= the number of suggestions."""
    max_new_tokens: int = 30
    """Upper bound on generated tokens after the prompt."""
    suggestions: int = 1
    """How many distinct captions to return (1-5), best first."""
    prompt: str | None = None
    """A caption prefix (BLIP's conditional captioning); style presets resolve to one."""
    length_penalty: float = 1.0
    """Beam search's length normalisation exponent: > 1 favours longer captions, < 1 shorter ones."""


@dataclass(frozen=True)
class Suggestion:
    text: str
    confidence: float
    """exp(mean per-token log-probability) of this caption, in (0, 1]."""


@dataclass(frozen=True)
class Caption:
    """The result for one image: the best caption and the distinct alternatives, best first."""

    text: str
    confidence: float
    suggestions: tuple[Suggestion, ...]
