"""Caption scores: exact match, BLEU-1..4 and CIDEr-D, over normalised text.

BLEU and CIDEr are pycocoevalcap's own scorers (pure Python). The COCO toolkit normally tokenises with
the Stanford PTB tokenizer, which needs Java; instead every caption (candidates and references alike)
is normalised here: lower case, punctuation replaced by spaces, runs of whitespace collapsed. For
plain English captions that gives the same words as PTB tokenisation minus the punctuation tokens,
which the COCO toolkit drops anyway. Numbers are therefore close to, not identical with, published
COCO figures.

Exact match: the normalised candidate equals one of the image's normalised references.

CIDEr weighs n-grams by their rarity across the evaluated set's references, so it is a property of the
whole set (it is 0 for a single image) and is not comparable across sets of different make-up.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalise_text(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: ``"A Red, round ball."`` -> ``a red round ball``."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


@dataclass(frozen=True)
class Scores:
    n: int
    exact_match: float
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    cider: float


def score_captions(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> Scores:
    """Score one candidate per id against that id's references (at least one each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if candidates.keys() != references.keys():
        missing = sorted(set(references) ^ set(candidates))[:5]
        raise ValueError(f"candidates and references must cover the same ids; differing: {missing}")
    if not candidates:
        raise ValueError("nothing to score")
    result: dict[str, list[str]] = {}
    truth: dict[str, list[str]] = {}
    matches = 0
    for key, candidate in candidates.items():
        refs = [normalise_text(ref) for ref in references[key]]
        if not refs:
            raise ValueError(f"image {key!r} has no reference caption")
        hypothesis = normalise_text(candidate)
        matches += hypothesis in refs
        # An empty hypothesis would trip BLEU's sanity checks; a lone space scores zero as it should.
        result[key] = [hypothesis or " "]
        truth[key] = refs
    bleu, _ = Bleu(4).compute_score(truth, result, verbose=0)
    cider, _ = Cider().compute_score(truth, result)
    return Scores(
        n=len(candidates),
        exact_match=matches / len(candidates),
        bleu1=float(bleu[0]),
        bleu2=float(bleu[1]),
        bleu3=float(bleu[2]),
        bleu4=float(bleu[3]),
        cider=float(cider),
    )
