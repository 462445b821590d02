"""The generation options ``captionfleet serve`` and ``captionfleet eval`` share: one settings mixin.

``serve`` uses them for requests that give none; ``eval`` scores with them. Their defaults are the
engine's ``GenerationOptions()`` (a test checks it); each command turns them into ``GenerationOptions``
with :func:`captionfleet.settings.overlay`, by field name.
"""

from __future__ import annotations

from dataclasses import dataclass

from captionfleet.settings import setting


@dataclass(frozen=True)
class GenerationSettings:
    num_beams: int = setting(3, "Beam width (serve: for requests that give no num_beams).")
    max_new_tokens: int = setting(30, "Most tokens generated per caption (serve: for requests giving none).")
    no_repeat_ngram_size: int = setting(
        5,
        "No word n-gram of this size twice in a caption (0: off), for images in distribution or not "
        "scored; 5: the smallest that no true scene caption repeats.",
    )
    ood_no_repeat_ngram_size: int = setting(
        3, "The same for images scored out of distribution (the model repeats itself on those)."
    )
