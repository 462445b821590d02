"""Caption scores: exact match, BLEU-1..4 and CIDEr-D, over normalised text, in plain Python.

One scorer for ``captionfleet eval`` (the runtime) and the rollout's quality gate (the operator, whose
image has no torch and no numpy): so this module imports nothing outside the standard library.

BLEU and CIDEr-D follow pycocoevalcap's scorers line for line (BLEU with the ``closest`` reference
length and its smoothing constants; CIDEr-D with sigma 6, clipping, the mean over n = 1..4 and the
factor 10); ``tests/runtime/training/test_eval.py`` holds them to pycocoevalcap's own numbers. The COCO
toolkit normally tokenises with the Stanford PTB tokenizer, which needs Java; instead every caption
(candidates and references alike) is normalised here: lower case, punctuation replaced by spaces, runs of
whitespace collapsed. For plain English captions that gives the same words as PTB tokenisation minus
the punctuation tokens, which the COCO toolkit drops anyway.

Exact match: the normalised candidate equals one of the image's normalised references.

CIDEr weighs n-grams by their rarity across the evaluated set's references, so it is a property of the
whole set (it is 0 for a single image) and is not comparable across sets of different make-up.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_PUNCTUATION = re.compile(r"[^\w\s]|_")
NGRAMS = 4
CIDER_SIGMA = 6.0
# pycocoevalcap's BLEU smoothing: a zero count gives 0, never a division by zero.
_TINY, _SMALL = 1e-15, 1e-9

Ngrams = Counter[tuple[str, ...]]


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


def _ngrams(words: Sequence[str]) -> Ngrams:
    counts: Ngrams = Counter()
    for size in range(1, NGRAMS + 1):
        for start in range(len(words) - size + 1):
            counts[tuple(words[start : start + size])] += 1
    return counts


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Corpus BLEU-1..4 of one hypothesis per image (pycocoevalcap's ``Bleu(4)``, option closest)."""
    guess, correct = [0] * NGRAMS, [0] * NGRAMS
    test_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        words = hypothesis.split()
        clip: dict[tuple[str, ...], int] = {}
        for ref in refs:
            for gram, count in _ngrams(ref.split()).items():
                clip[gram] = max(clip.get(gram, 0), count)
        test_length += len(words)
        reference_length += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
        for gram, count in _ngrams(words).items():
            correct[len(gram) - 1] += min(clip.get(gram, 0), count)
        for k in range(NGRAMS):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(NGRAMS):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + _TINY) / (reference_length + _SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def _tfidf(
    counts: Ngrams, frequency: Counter[tuple[str, ...]], log_images: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """pycocoevalcap's ``counts2vec``: tf-idf vectors per n-gram size, their norms, and its 'length'
    (the count of bigrams: pycocoevalcap's quirk, kept so that the numbers agree)."""
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(NGRAMS)]
    norms = [0.0] * NGRAMS
    length = 0
    for gram, count in counts.items():
        size = len(gram) - 1
        value = float(count) * (log_images - math.log(max(1.0, frequency[gram])))
        vectors[size][gram] = value
        norms[size] += value**2
        if size == 1:
            length += count
    return vectors, [math.sqrt(norm) for norm in norms], length


def _similarity(
    hyp: tuple[list[dict[tuple[str, ...], float]], list[float], int],
    ref: tuple[list[dict[tuple[str, ...], float]], list[float], int],
) -> float:
    """Sum over n-gram sizes of the clipped cosine similarity with the length penalty."""
    (hyp_vectors, hyp_norms, hyp_length), (ref_vectors, ref_norms, ref_length) = hyp, ref
    penalty = math.exp(-(float(hyp_length - ref_length) ** 2) / (2 * CIDER_SIGMA**2))
    total = 0.0
    for size in range(NGRAMS):
        value = sum(
            min(v, ref_vectors[size].get(g, 0.0)) * ref_vectors[size].get(g, 0.0)
            for g, v in hyp_vectors[size].items()
        )
        if hyp_norms[size] != 0 and ref_norms[size] != 0:
            value /= hyp_norms[size] * ref_norms[size]
        total += value * penalty
    return total


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap's ``Cider``): document frequencies from the references."""
    reference_counts = [[_ngrams(ref.split()) for ref in refs] for refs in references]
    frequency: Counter[tuple[str, ...]] = Counter()
    for counts in reference_counts:
        frequency.update({gram for ref in counts for gram in ref})
    log_images = math.log(float(len(references)))
    scores = []
    for hypothesis, counts in zip(hypotheses, reference_counts, strict=True):
        hyp = _tfidf(_ngrams(hypothesis.split()), frequency, log_images)
        total = sum(_similarity(hyp, _tfidf(ref, frequency, log_images)) for ref in counts)
        scores.append(total / NGRAMS / len(counts) * 10.0)
    return sum(scores) / len(scores)


def score_captions(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> Scores:
    """Score one candidate per id against that id's references (at least one each)."""
    if candidates.keys() != references.keys():
        missing = sorted(set(references) ^ set(candidates))[:5]
        raise ValueError(f"candidates and references must cover the same ids; differing: {missing}")
    if not candidates:
        raise ValueError("nothing to score")
    hypotheses, truths = [], []
    matches = 0
    for key, candidate in candidates.items():
        refs = [normalise_text(ref) for ref in references[key]]
        if not refs:
            raise ValueError(f"image {key!r} has no reference caption")
        hypothesis = normalise_text(candidate)
        matches += hypothesis in refs
        # An empty hypothesis would trip pycocoevalcap's sanity checks; a lone space scores zero there.
        hypotheses.append(hypothesis or " ")
        truths.append(refs)
    bleus = bleu(hypotheses, truths)
    return Scores(
        n=len(candidates),
        exact_match=matches / len(candidates),
        bleu1=bleus[0],
        bleu2=bleus[1],
        bleu3=bleus[2],
        bleu4=bleus[3],
        cider=cider(hypotheses, truths),
    )


def metric_value(scores: Scores, metric: str) -> float:
    """One figure of ``scores`` by the quality gate's metric name (exactMatch, bleu4, cider)."""
    return {"exactMatch": scores.exact_match, "bleu4": scores.bleu4, "cider": scores.cider}[metric]
