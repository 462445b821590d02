"""Batch captioning with BLIP: one ``generate`` call per batch of images that share options.

Why one options value per call: BLIP's ``generate`` takes the prompt as token ids and drops their last
column (assumed to be the tokenizer's [SEP]). Prompts of unequal length need padding, and with padding
that column is a pad token for the shorter prompts, so their [SEP] stays inside the prompt; a decoder
also cannot continue right-padded rows correctly. Equal options (hence equal prompts) sidestep all of
it, and the batcher groups requests by options anyway.

Decoders: ``native`` (the default) is our own batched decoder (``decoder.py``): the same captions as
``generate`` (a test holds it to that on the bundled model and real photos), several times faster per
batch. ``transformers`` calls ``model.generate``. A model whose generation config asks for logits
processors the native decoder lacks (repetition penalty and the like) gets ``transformers``, with a
warning at load.

The image goes through the vision encoder once per call: its last hidden states feed the decoder
(native: ``generate_from_states``; transformers: ``text_decoder.generate`` with them as
``encoder_hidden_states``, what ``BlipForConditionalGeneration.generate`` does inside) and the
out-of-distribution score (``ood.py``), which also picks each image's ``no_repeat_ngram_size``
(``ood_no_repeat_ngram_size`` for images out of distribution).

Confidence: ``exp(mean log-probability)`` of the generated tokens, the end-of-caption token included
and the prompt's tokens excluded, from ``compute_transition_scores`` (with beam indices for beam
search, which scores each token under the beam it was chosen in). It lies in (0, 1]. The
probabilities are those generation chose under: the model's own, unless its generation config adds
logits processors (repetition penalty and the like), whose adjusted distribution then counts.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from captionfleet.runtime.engine.decoder import BlipDecoder, unsupported_generation_options
from captionfleet.runtime.engine.errors import InvalidOptions
from captionfleet.runtime.engine.loading import bundled_model_dir, load_captioner
from captionfleet.runtime.engine.ood import OodReference, ReferenceBuilder, image_features
from captionfleet.runtime.engine.options import check_options
from captionfleet.runtime.engine.preprocess import ImagePreprocessor
from captionfleet.runtime.engine.types import Caption, GenerationOptions, Suggestion

__all__ = ["DECODERS", "Captioner", "bundled_model_dir", "load_captioner", "normalise_caption"]

DECODERS = ("native", "transformers")
"""The caption decoders a Captioner can use (see the module docstring)."""

log = logging.getLogger(__name__)

_NOT_WORD = re.compile(r"[^\w\s]+")
_PROMPT_CACHE_SIZE = 256


def normalise_caption(text: str) -> str:
    """The key under which near-duplicate captions collide: case, punctuation and spacing ignored."""
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


@dataclass(frozen=True)
class _Candidate:
    text: str
    confidence: float


class Captioner:
    """A loaded BLIP model with its tokenizer and preprocessor.

    Calls are synchronous and meant to come from one thread at a time (the batcher's worker); the
    model itself holds no per-call state.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        preprocessor: ImagePreprocessor,
        *,
        version: str,
        model_name: str,
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
        decoder: str = "native",
        cuda_graphs: bool = False,
        precision: str = "",
        reference: OodReference | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.version = version
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.source = source
        text_config = model.config.text_config
        self._eos_id = int(text_config.sep_token_id)
        self._pad_id = int(text_config.pad_token_id)
        self._max_positions = int(getattr(text_config, "max_position_embeddings", 512))
        self._prompt_cache: dict[str | None, list[int]] = {}
        self.precision = precision or str(dtype).removeprefix("torch.")
        """What ``info()`` reports as the dtype: ``int8`` for a dynamically quantised model."""
        self.decoder = self._pick_decoder(decoder)
        self.cuda_graphs = cuda_graphs
        self._native = BlipDecoder(model, cuda_graphs=cuda_graphs) if self.decoder == "native" else None
        self.reference = reference.to(device) if reference is not None else None
        """The out-of-distribution reference (``ood.py``); ``None``: no scores."""
        self.ood_threshold = 0.99
        """Images scoring above it are out of distribution."""
        self.score_ood = True
        """Off: no features, no scores (the benchmark's row without them)."""
        self._builder: ReferenceBuilder | None = None
        self.calibration = calibration
        """The model folder's ``calibration.json`` (``captionfleet.calibration``), as a cascade's fast
        tier; ``None``: none."""

    def build_reference_from_requests(self, count: int) -> None:
        """With no reference, fit one from the next ``count`` images captioned with ``learn``."""
        if self.reference is None and count > 0:
            self._builder = ReferenceBuilder(count)

    def ood_info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about out-of-distribution scoring."""
        if not self.score_ood:
            return {"enabled": False}
        info: dict[str, Any] = {"enabled": True, "threshold": self.ood_threshold}
        if self.reference is not None:
            info |= {"reference": "ready", "source": self.reference.metadata.get("source", "")}
            info["reference_images"] = self.reference.metadata.get("fitted", 0) + int(
                self.reference.calibration.shape[0]
            )
        elif self._builder is not None:
            info |= {"reference": "building", "collected": self._builder.collected}
            info["needed"] = self._builder.target
        else:
            info["reference"] = "none"
        return info

    def _pick_decoder(self, decoder: str) -> str:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        unsupported = unsupported_generation_options(self.model) if decoder == "native" else []
        if unsupported:
            log.warning(
                "the model's generation config sets %s, which the native decoder does not implement; "
                "using transformers' generate",
                ", ".join(unsupported),
            )
            return "transformers"
        return decoder

    def __repr__(self) -> str:
        return (
            f"Captioner({self.model_name!r}, version={self.version!r}, "
            f"device={self.device}, dtype={self.precision}, decoder={self.decoder})"
        )

    def with_decoder(self, decoder: str, model: Any = None, *, precision: str = "") -> Captioner:
        """The same tokenizer and preprocessor behind another decoder (and, given, other weights of
        ``precision``, e.g. ``int8``): for comparing decoders or precisions side by side on one loaded
        model. Source and CUDA graphs stay as they are."""
        return Captioner(
            self.model if model is None else model,
            self.tokenizer,
            self.preprocessor,
            version=self.version,
            model_name=self.model_name,
            device=self.device,
            dtype=self.dtype,
            source=self.source,
            decoder=decoder,
            cuda_graphs=self.cuda_graphs,
            precision=precision or (self.precision if model is None else ""),
            reference=self.reference,
            calibration=self.calibration,
        )

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` reports about this model."""
        return {
            "name": self.model_name,
            "version": self.version,
            "source": self.source,
            "device": str(self.device),
            "dtype": self.precision,
            "decoder": self.decoder,
            "image_size": [self.preprocessor.height, self.preprocessor.width],
            "ood": self.ood_info(),
            **({"calibration": self.calibration} if self.calibration is not None else {}),
        }

    def caption_images(self, images: Sequence[Image.Image], options: GenerationOptions) -> list[Caption]:
        """Caption PIL images (any mode) with one options value; one result per image, in order."""
        return self.caption_pixels(self.preprocessor.batch(images), options)

    def warmup(self) -> None:
        """Run one tiny generation so the first request does not pay for lazy initialisation."""
        blank = torch.zeros(1, 3, self.preprocessor.height, self.preprocessor.width)
        self.caption_pixels(blank, GenerationOptions(num_beams=1, max_new_tokens=2), learn=False)

    @torch.inference_mode()
    def caption_pixels(
        self, pixel_values: torch.Tensor, options: GenerationOptions, *, learn: bool = True
    ) -> list[Caption]:
        """Caption a batch ``(N, 3, H, W)`` of preprocessed images with one options value.

        Returns exactly N captions in input order. Suggestions are distinct after
        :func:`normalise_caption`, sorted by confidence, at most ``options.suggestions`` of them (fewer
        only when the beams held fewer distinct captions); the first is the caption itself. ``learn``:
        the images may join a reference being built from requests (not warm-up's blank).
        """
        check_options(options)
        expected = (3, self.preprocessor.height, self.preprocessor.width)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be (N, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}"
            )
        count = int(pixel_values.shape[0])
        if count == 0:
            return []
        prompt_ids = self._prompt_ids(options.prompt)
        prompt_len = len(prompt_ids) - 1  # generate() drops the trailing [SEP]
        if prompt_len + options.max_new_tokens > self._max_positions:
            raise InvalidOptions(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({options.max_new_tokens}) exceed "
                f"the model's {self._max_positions} positions"
            )
        # More returned beams than suggestions leave room to drop near-duplicates.
        returned = options.num_beams if options.suggestions > 1 else 1
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        if self._native is not None:
            states = self._native.encode_images(pixels)
        else:
            states = self.model.vision_model(pixel_values=pixels)[0]
        scores = self._ood_scores(states, learn)
        ngrams = [
            options.ood_no_repeat_ngram_size
            if score is not None and score > self.ood_threshold
            else options.no_repeat_ngram_size
            for score in scores
        ]
        if self._native is not None:
            decoded = self._native.generate_from_states(
                states,
                prompt_ids[:-1],
                num_beams=options.num_beams,
                max_new_tokens=options.max_new_tokens,
                num_return_sequences=returned,
                length_penalty=options.length_penalty,
                no_repeat_ngram_sizes=ngrams,
            )
            generated, token_scores = decoded.tokens, decoded.log_probs
        else:
            generated, token_scores = self._generate_groups(states, prompt_ids, options, returned, ngrams)
        return self._captions(generated, token_scores, prompt_ids, options, returned, scores)

    def _ood_scores(self, states: torch.Tensor, learn: bool) -> list[float | None]:
        """Each image's score (``None`` with no reference); with ``learn``, feed a reference in the making."""
        count = int(states.shape[0])
        if not self.score_ood or (self.reference is None and self._builder is None):
            return [None] * count
        features = image_features(states)
        if self.reference is None:
            assert self._builder is not None
            built = self._builder.add(features) if learn else None
            if built is not None:
                log.info("OOD reference built from the first %d requests", self._builder.target)
                self.reference, self._builder = built.to(self.device), None
            return [None] * count
        scores: list[float | None] = [*self.reference.scores(features)]
        return scores

    def _captions(
        self,
        generated: torch.Tensor,
        token_scores: torch.Tensor,
        prompt_ids: list[int],
        options: GenerationOptions,
        returned: int,
        scores: list[float | None],
    ) -> list[Caption]:
        count = len(scores)
        assert generated.shape[0] == count * returned, (generated.shape, count, returned)
        lengths = self._lengths(generated)
        confidences = _confidences(token_scores, lengths)
        prompt_body = prompt_ids[1:-1]  # no [BOS]/[SEP]
        texts = [
            self._text(prompt_body, row[: int(length)].tolist(), options.prompt)
            for row, length in zip(generated, lengths, strict=True)
        ]
        captions = []
        for index in range(count):
            group = slice(index * returned, (index + 1) * returned)
            candidates = [
                _Candidate(text, confidence)
                for text, confidence in zip(texts[group], confidences[group], strict=True)
            ]
            caption = _caption(candidates, options.suggestions)
            score = scores[index]
            if score is not None:
                caption = replace(caption, ood_score=score, in_distribution=score <= self.ood_threshold)
            captions.append(caption)
        assert len(captions) == count
        return captions

    def _generate_groups(
        self,
        states: torch.Tensor,
        prompt_ids: list[int],
        options: GenerationOptions,
        returned: int,
        ngrams: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``generate``, one call per n-gram size (its processor takes one), rows put back
        in image order: (generated ids after the prompt, their log-probabilities)."""
        parts: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        for size in sorted(set(ngrams)):
            images = [index for index, wanted in enumerate(ngrams) if wanted == size]
            tokens, scores = self._generate(states[images], prompt_ids, options, returned, size)
            parts.append((images, tokens, scores))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        steps = max(tokens.shape[1] for _, tokens, _ in parts)
        rows = len(ngrams) * returned
        generated = torch.full((rows, steps), self._pad_id, dtype=torch.long, device=states.device)
        token_scores = torch.zeros((rows, steps), dtype=parts[0][2].dtype, device=parts[0][2].device)
        for images, tokens, scores in parts:
            index = torch.tensor(
                [image * returned + beam for image in images for beam in range(returned)],
                device=states.device,
            )
            generated[index, : tokens.shape[1]] = tokens
            token_scores[index.to(token_scores.device), : scores.shape[1]] = scores
        return generated, token_scores

    def _generate(
        self,
        states: torch.Tensor,
        prompt_ids: list[int],
        options: GenerationOptions,
        returned: int,
        no_repeat_ngram_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_decoder.generate`` on image states, as ``BlipForConditionalGeneration.generate`` does."""
        count = int(states.shape[0])
        input_ids = torch.tensor([prompt_ids[:-1]] * count, dtype=torch.long, device=self.device)
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        # length_penalty only means something to beam search (greedy decoding logs a complaint).
        beam_only = {"length_penalty": options.length_penalty} if options.num_beams > 1 else {}
        output = self.model.text_decoder.generate(
            input_ids=input_ids,
            eos_token_id=self._eos_id,
            pad_token_id=self._pad_id,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=states,
            encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long, device=states.device),
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_beams=options.num_beams,
            num_return_sequences=returned,
            max_new_tokens=options.max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **beam_only,
        )
        generated = output.sequences[:, len(prompt_ids) - 1 :]  # generate() drops the trailing [SEP]
        return generated, self._token_scores(output, generated.shape[1], options.num_beams > 1)

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        """[CLS] prompt [SEP] as the tokenizer makes them; BLIP's generate turns [CLS] into [BOS].

        Prompts are user text: one that spells a special token ("[SEP]") is refused rather than
        allowed to end or restructure the decoder's input. Unknown words ([UNK]) are fine.
        """
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        ids = list(self.tokenizer(prompt or "", add_special_tokens=True)["input_ids"])
        forbidden = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        if forbidden.intersection(ids[1:-1]):
            raise InvalidOptions("prompt must not contain the model's special tokens such as [SEP]")
        if len(self._prompt_cache) < _PROMPT_CACHE_SIZE:  # user prompts are unbounded; presets repeat
            self._prompt_cache[prompt] = ids
        return ids

    def _token_scores(self, output: Any, steps: int, beams: bool) -> torch.Tensor:
        """(rows, steps) log-probabilities of each generated token, 0 past a beam's end."""
        scores = self.model.text_decoder.compute_transition_scores(
            output.sequences,
            output.scores,
            beam_indices=output.beam_indices if beams else None,
            normalize_logits=True,  # greedy scores are logits; for beams it is a no-op re-normalisation
        )
        if scores.shape[1] < steps:  # beams shorter than the longest are padded on the right
            scores = torch.nn.functional.pad(scores, (0, steps - scores.shape[1]))
        return torch.as_tensor(scores)[:, :steps]

    def _lengths(self, generated: torch.Tensor) -> torch.Tensor:
        """Generated tokens per row up to and including the first [SEP]; all of them when none."""
        is_eos = generated == self._eos_id
        has_eos = is_eos.any(dim=1)
        first_eos = is_eos.int().argmax(dim=1)
        return torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, generated.shape[1]))

    def _text(self, prompt_body: list[int], continuation: list[int], prompt: str | None) -> str:
        """The caption text; with a prompt, it starts with the prompt exactly as the user wrote it."""
        if prompt is None:
            return str(self.tokenizer.decode(continuation, skip_special_tokens=True)).strip()
        full = str(self.tokenizer.decode(prompt_body + continuation, skip_special_tokens=True)).strip()
        head = str(self.tokenizer.decode(prompt_body, skip_special_tokens=True)).strip()
        if full.startswith(head):
            return (prompt + full[len(head) :]).strip()
        return full  # the tokenizer merged across the boundary; its text still begins like the prompt


def _confidences(token_scores: torch.Tensor, lengths: torch.Tensor) -> list[float]:
    """exp(mean log-probability) over each row's first ``length`` tokens, in (0, 1]."""
    positions = torch.arange(token_scores.shape[1], device=token_scores.device)[None, :]
    mask = positions < lengths[:, None]
    # where, not a product: past a row's end transformers may score a banned pad token -inf (0 * -inf = nan)
    sums = torch.where(mask, token_scores.to(torch.float64), 0.0).sum(dim=1)
    means = sums / lengths.clamp(min=1).to(torch.float64)
    return [min(1.0, max(math.exp(value), sys.float_info.min)) for value in means.tolist()]


def _caption(candidates: list[_Candidate], wanted: int) -> Caption:
    ranked = sorted(candidates, key=lambda candidate: candidate.confidence, reverse=True)
    seen: set[str] = set()
    chosen: list[Suggestion] = []
    for candidate in ranked:
        key = normalise_caption(candidate.text)
        if key in seen:
            continue
        seen.add(key)
        chosen.append(Suggestion(text=candidate.text, confidence=candidate.confidence))
        if len(chosen) == wanted:
            break
    best = chosen[0]
    return Caption(text=best.text, confidence=best.confidence, suggestions=tuple(chosen))
