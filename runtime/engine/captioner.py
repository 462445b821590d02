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
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from captionfleet.runtime.engine.decoder import BlipDecoder, unsupported_generation_options
from captionfleet.runtime.engine.errors import InvalidOptions
from captionfleet.runtime.engine.loading import bundled_model_dir, load_captioner
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
        self._native = BlipDecoder(model, cuda_graphs=cuda_graphs) if self.decoder == "native" else None

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

    def with_decoder(self, decoder: str, model: Any = None) -> Captioner:
        """The same tokenizer and preprocessor behind another decoder (and, given, other weights):
        for comparing decoders or precisions side by side on one loaded model."""
        return Captioner(
            self.model if model is None else model,
            self.tokenizer,
            self.preprocessor,
            version=self.version,
            model_name=self.model_name,
            device=self.device,
            dtype=self.dtype,
            decoder=decoder,
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
        }

    def caption_images(self, images: Sequence[Image.Image], options: GenerationOptions) -> list[Caption]:
        """Caption PIL images (any mode) with one options value; one result per image, in order."""
        return self.caption_pixels(self.preprocessor.batch(images), options)

    def warmup(self) -> None:
        """Run one tiny generation so the first request does not pay for lazy initialisation."""
        blank = torch.zeros(1, 3, self.preprocessor.height, self.preprocessor.width)
        self.caption_pixels(blank, GenerationOptions(num_beams=1, max_new_tokens=2))

    @torch.inference_mode()
    def caption_pixels(self, pixel_values: torch.Tensor, options: GenerationOptions) -> list[Caption]:
        """Caption a batch ``(N, 3, H, W)`` of preprocessed images with one options value.

        Returns exactly N captions in input order. Suggestions are distinct after
        :func:`normalise_caption`, sorted by confidence, at most ``options.suggestions`` of them (fewer
        only when the beams held fewer distinct captions); the first is the caption itself.
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
            decoded = self._native.generate(
                pixels,
                prompt_ids[:-1],
                num_beams=options.num_beams,
                max_new_tokens=options.max_new_tokens,
                num_return_sequences=returned,
                length_penalty=options.length_penalty,
            )
            generated, token_scores = decoded.tokens, decoded.log_probs
        else:
            generated, token_scores = self._generate(pixels, prompt_ids, options, returned)
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
            captions.append(_caption(candidates, options.suggestions))
        assert len(captions) == count
        return captions

    def _generate(
        self, pixels: torch.Tensor, prompt_ids: list[int], options: GenerationOptions, returned: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``generate``: (generated ids after the prompt, their log-probabilities)."""
        count = int(pixels.shape[0])
        input_ids = torch.tensor([prompt_ids] * count, dtype=torch.long, device=self.device)
        # length_penalty only means something to beam search (greedy decoding logs a complaint).
        beam_only = {"length_penalty": options.length_penalty} if options.num_beams > 1 else {}
        output = self.model.generate(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
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
    sums = (token_scores.to(torch.float64) * mask).sum(dim=1)
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
