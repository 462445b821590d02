"""The engine's value types: what a caption request asks for and what it gets back.

These are the contract between the engine, the async data plane, the HTTP server and the training
scripts; they hold no tensors and know nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "scenes-blip-tiny"
"""The bundled model ``serve`` and ``eval`` load when given none: the quality one."""
FAST_MODEL = "scenes-blip-fast"
"""The bundled fast model: the first tier of a cascade (``captionfleet train --preset fast``)."""


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
    no_repeat_ngram_size: int = 5
    """No word n-gram of this size twice in a caption (0: off), for images in distribution or unscored.
    5 is the smallest size that no true scene caption repeats ("a large red circle above a large red
    square" repeats "a large red"), so held-out scenes keep their captions."""
    ood_no_repeat_ngram_size: int = 3
    """The same for images scored out of distribution (the model babbles on those): no trigram twice."""


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
    ood_score: float | None = None
    """How unusual the image is for the model, in [0, 1] (``None``: the model has no reference yet)."""
    in_distribution: bool | None = None
    """``ood_score`` at most the model's threshold (``None`` with no score)."""
