"""BLIP's caption decoder, run by us: a preallocated key/value cache and batched beam search.

Why not transformers' ``generate``: for a small captioning decoder most of each of its steps is Python
bookkeeping (a growing ``DynamicCache``, logits processors, output tuples), and its beam search
expands the image features to every beam and reorders the cross-attention cache with the
self-attention cache at every step. Here:

- the image is encoded once, the vision encoder's attention fused (:mod:`vision`: transformers runs
  it as four eager kernels); each decoder layer's cross-attention keys and values are computed once
  per *image*, and the queries of all of an image's beams attend to them in one batched matmul;
- the self-attention cache is preallocated at its final length (prompt + ``max_new_tokens``), written in
  place, and reordered along the beam dimension only over the positions already written;
- beam search and greedy decoding are whole-batch tensor operations: the best ``2 x beams`` candidates
  of every image's ``beams x vocabulary`` in two ``topk`` stages (each beam's best tokens, then the best
  of those with the beam scores added), no per-beam or per-image Python loop; the loop stops when every
  beam of every image has finished (one host sync per step);
- the vocabulary projection, the largest matmul of a step, runs on a weight packed once for oneDNN
  (:class:`VocabularyProjection`), and the n-gram bans are set sparsely, in place.

Where a CPU step's time goes (``torch.profiler``, ``blip-mini-random``, batch 32, beam 3, one thread):
the vocabulary projection first, then the cross-attention's small batched matmuls and the 4 layers'
linears, then ``log_softmax`` and ``topk`` over the vocabulary; the beam bookkeeping and the cache
reorder are a few per cent. Those are the same arithmetic as transformers'; what transformers does
besides is reorder every beam's cross-attention cache at every step and compute per beam what is
per image.

The math mirrors ``transformers.models.blip.modeling_blip_text`` exactly: the same ``nn.Linear``,
``LayerNorm`` and head modules of the loaded model are called (so int8-quantised linears work too),
only the attention and the cache are ours: scores ``q k^T / sqrt(head_dim)``, the causal mask, softmax.
Beam search follows ``GenerationMixin._beam_search`` (transformers 5) step for step: top ``2 x beams``
candidates, the running beams are the best non-finished ones, finished hypotheses are scored with
``length_penalty`` over the generated length (EOS included), the ``early_stopping`` heuristic of the
model's generation config, and ``num_return_sequences`` takes the best finished hypotheses in order.

No repeated n-grams (``no_repeat_ngram_sizes``, one size per image, 0 = off): transformers'
``NoRepeatNGramLogitsProcessor`` over the whole sequence (BOS and prompt included), applied where
transformers applies it: to the logits before greedy's argmax, to the log-probabilities before beam
search adds them up; a token's recorded log-probability is then renormalised over the tokens left,
as ``compute_transition_scores`` does with the processed scores.

Static mode (``static=True``): every step has the same shapes (attention over the whole preallocated
cache under a mask, positions as tensors), so that on CUDA one step can be captured in a CUDA graph
and replayed (``cuda_graphs=True``). On the CPU it runs eagerly (the tests check it agrees).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional

from captionfleet.runtime.engine.vision import encode_images

NEG = -1.0e9
"""transformers' beam search marks excluded candidates with this score; the same value keeps ties equal."""

_UNSUPPORTED = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "bad_words_ids",
    "force_words_ids",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "num_beam_groups",
    "diversity_penalty",
)
"""Generation-config fields that add logits processors or search variants this decoder does not have."""


def unsupported_generation_options(model: Any) -> list[str]:
    """The text decoder's generation-config fields (set away from their defaults) we cannot honour.

    ``BlipForConditionalGeneration.generate`` hands over to ``text_decoder.generate``, so the text
    decoder's own generation config is the one that applies."""
    from transformers import GenerationConfig

    config = model.text_decoder.generation_config
    defaults = GenerationConfig()  # type: ignore[no-untyped-call]  # transformers is untyped here
    return [
        name
        for name in _UNSUPPORTED
        if getattr(config, name, None) != getattr(defaults, name, None)
        and getattr(config, name, None) not in (None, 0, 1.0, [], False)
    ]


@dataclass
class DecodeOutput:
    """``tokens`` (rows, max_new_tokens): the generated ids after the prompt, pad after a row's end;
    ``log_probs`` (rows, max_new_tokens): each token's log-probability, 0 past the end. Rows are
    image-major: image ``i``'s ``returned`` sequences are rows ``i * returned ...``, best first."""

    tokens: torch.Tensor
    log_probs: torch.Tensor


@dataclass
class _Cache:
    """Per layer: self-attention keys/values (rows, heads, max_len, head_dim), cross-attention keys
    (images, heads, head_dim, image_tokens) and values (images, heads, image_tokens, head_dim), both
    contiguous: batched matmuls read them as they are, with no copy per step; ``beams`` rows per image."""

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]
    beams: int
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """0..max_len-1 (static mode's mask is built from it)."""


PACKED_MIN_VOCABULARY = 1024
"""Smallest vocabulary whose projection goes through the packed oneDNN weight (see below)."""


class VocabularyProjection:
    """The head's last ``Linear`` (hidden -> vocabulary): the largest matmul of every step.

    On the CPU in fp32 it runs through oneDNN on a weight packed once at load
    (``torch.ops.mkldnn``, what ``torch.compile`` uses for CPU linears): measured on this project's
    2-core AMD EPYC box, (96 x 256) @ (256 x 30524) takes 27 ms against MKL's 50 ms in ``nn.Linear``,
    and (3 x 256) @ (256 x 30524) 4 ms against 16 ms. The packed copy costs the weight's size again
    in memory. Results differ from ``nn.Linear``'s in the last bits only (another summation order).
    Anything else (CUDA, half precision, an int8-quantised module, a torch without oneDNN) calls the
    module itself, and so does a vocabulary under :data:`PACKED_MIN_VOCABULARY`: there the matmul is
    small and oneDNN's call costs more than it saves (measured served, 32 clients: the bundled
    34-token model 25 req/s packed against 29 unpacked; ``blip-mini-random``'s 30524 tokens 9.2
    against 8.3)."""

    def __init__(self, linear: Any) -> None:
        self.linear = linear
        self.packed: torch.Tensor | None = None
        weight = getattr(linear, "weight", None)
        if (
            isinstance(linear, torch.nn.Linear)
            and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.shape[0] >= PACKED_MIN_VOCABULARY
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # untyped in torch
        ):
            try:
                with torch.no_grad():
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            except (AttributeError, RuntimeError):  # a torch built without these ops: the module
                self.packed = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is None or hidden.device.type != "cpu" or hidden.dtype != torch.float32:
            return torch.as_tensor(self.linear(hidden))
        bias = self.linear.bias
        packed = torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self.packed, bias, "none", [], "")
        return torch.as_tensor(packed)


class BlipDecoder:
    """Greedy and beam-search captioning for one loaded ``BlipForConditionalGeneration``."""

    def __init__(self, model: Any, *, static: bool = False, cuda_graphs: bool = False) -> None:
        text = model.config.text_config
        self.model = model
        self.bert = model.text_decoder.bert
        self.head = model.text_decoder.cls
        self.layers = list(self.bert.encoder.layer)
        self.heads = int(text.num_attention_heads)
        self.head_dim = int(text.hidden_size) // self.heads
        self.scale = math.sqrt(self.head_dim)
        self.bos_id = int(text.bos_token_id)
        self.eos_id = int(text.sep_token_id)
        self.pad_id = int(text.pad_token_id)
        self.vocab = int(text.vocab_size)
        self.early_stopping: bool | str = model.text_decoder.generation_config.early_stopping
        self.static = static or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], _GraphStep] = {}
        self._pool: dict[tuple[int, ...], _Cache] = {}
        self.vocabulary = VocabularyProjection(self.head.predictions.decoder)

    # -- the network ---------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, max_len: int, beams: int) -> _Cache:
        """Each layer's cross-attention keys/values of the image states, once per image."""
        count = int(images.shape[0])
        cross_k, cross_v = [], []
        for layer in self.layers:
            attention = layer.crossattention.self
            cross_k.append(self._split(attention.key(images)).transpose(-1, -2).contiguous())
            cross_v.append(self._split(attention.value(images)).contiguous())
        shape = (count * beams, self.heads, max_len, self.head_dim)
        like = cross_k[0]
        if self.cuda_graphs and like.is_cuda:
            return self._pooled(cross_k, cross_v, shape, beams)
        return _Cache(
            self_k=[like.new_zeros(shape) for _ in self.layers],
            self_v=[like.new_zeros(shape) for _ in self.layers],
            cross_k=cross_k,
            cross_v=cross_v,
            beams=beams,
            positions=torch.arange(max_len, device=like.device),
        )

    def _pooled(
        self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], shape: tuple[int, ...], beams: int
    ) -> _Cache:
        """The cache of this batch shape from earlier calls, with this batch's image keys/values copied
        in: a captured graph reads fixed addresses. Stale self-attention entries stay masked."""
        key = (*shape, beams)
        cache = self._pool.get(key)
        if cache is None:
            like = cross_k[0]
            cache = self._pool[key] = _Cache(
                self_k=[like.new_zeros(shape) for _ in self.layers],
                self_v=[like.new_zeros(shape) for _ in self.layers],
                cross_k=[tensor.clone() for tensor in cross_k],
                cross_v=[tensor.clone() for tensor in cross_v],
                beams=beams,
                positions=torch.arange(shape[2], device=like.device),
            )
        for pooled, fresh in zip([*cache.cross_k, *cache.cross_v], [*cross_k, *cross_v], strict=True):
            pooled.copy_(fresh)
        return cache

    def _split(self, states: torch.Tensor) -> torch.Tensor:
        """(rows, tokens, hidden) -> (rows, heads, tokens, head_dim)."""
        rows, tokens = states.shape[:2]
        return states.view(rows, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: _Cache, kv_len: int
    ) -> torch.Tensor:
        """Logits (rows, vocab) of the last of ``tokens`` (rows, T) at ``positions`` (T,).

        Writes their keys/values into the cache and attends over its first ``kv_len`` positions
        (causally masked by position). ``rows`` is images x beams, or images alone for the prompt
        (then the cache rows of every beam receive the same keys/values)."""
        hidden = self.bert.embeddings.word_embeddings(tokens)
        hidden = hidden + self.bert.embeddings.position_embeddings(positions)[None]
        hidden = self.bert.embeddings.LayerNorm(hidden)
        mask = torch.where(
            cache.positions[None, :kv_len] <= positions[:, None],
            torch.zeros((), dtype=hidden.dtype, device=hidden.device),
            torch.full((), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device),
        )
        for index, layer in enumerate(self.layers):
            attention = layer.attention.self
            context = self._self_attention(attention, hidden, positions, cache, index, kv_len, mask)
            hidden = layer.attention.output(context, hidden)
            context = self._cross_attention(layer.crossattention.self, hidden, cache, index)
            hidden = layer.crossattention.output(context, hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.vocabulary(self.head.predictions.transform(hidden[:, -1]))

    def _self_attention(
        self,
        attention: Any,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: _Cache,
        index: int,
        kv_len: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        query = self._split(attention.query(hidden))
        keys, values = cache.self_k[index], cache.self_v[index]
        new_k, new_v = self._split(attention.key(hidden)), self._split(attention.value(hidden))
        rows = int(hidden.shape[0])
        if rows != keys.shape[0]:  # the prompt, computed once per image, goes to every beam's rows
            new_k = new_k.repeat_interleave(cache.beams, dim=0)
            new_v = new_v.repeat_interleave(cache.beams, dim=0)
            query = query.repeat_interleave(cache.beams, dim=0)
        keys.index_copy_(2, positions, new_k)
        values.index_copy_(2, positions, new_v)
        scores = torch.matmul(query, keys[:, :, :kv_len].transpose(-1, -2)) / self.scale
        probs = torch.softmax(scores + mask, dim=-1)
        context = torch.matmul(probs, values[:, :, :kv_len])
        if rows != keys.shape[0]:
            context = context[:: cache.beams]
        return context.transpose(1, 2).reshape(rows, -1, self.heads * self.head_dim)

    def _cross_attention(
        self, attention: Any, hidden: torch.Tensor, cache: _Cache, index: int
    ) -> torch.Tensor:
        """All beams (and tokens) of an image attend to its keys/values in one matmul."""
        rows, tokens, width = hidden.shape
        images = int(cache.cross_k[index].shape[0])
        query = self._split(attention.query(hidden.reshape(images, -1, width)))
        scores = torch.matmul(query, cache.cross_k[index]) / self.scale
        context = torch.matmul(torch.softmax(scores, dim=-1), cache.cross_v[index])
        return context.transpose(1, 2).reshape(rows, tokens, width)

    def reorder(self, cache: _Cache, rows: torch.Tensor, filled: int) -> None:
        """Give every beam row the self-attention cache of the beam it continues (positions < filled)."""
        for tensor in (*cache.self_k, *cache.self_v):
            tensor[:, :, :filled] = tensor[rows, :, :filled]

    # -- decoding --------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, prompt_ids: list[int], **options: Any) -> DecodeOutput:
        """Caption a batch as ``model.generate`` would; ``prompt_ids`` starts with BOS, no SEP; the
        options are :meth:`generate_from_states`'s."""
        return self.generate_from_states(self.encode_images(pixel_values), prompt_ids, **options)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision encoder's states, its attention fused (:mod:`vision`)."""
        return encode_images(self.model.vision_model, pixel_values)

    @torch.inference_mode()
    def generate_from_states(
        self,
        image_states: torch.Tensor,
        prompt_ids: list[int],
        *,
        num_beams: int,
        max_new_tokens: int,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram_sizes: Sequence[int] = (),
    ) -> DecodeOutput:
        """``generate`` for images already through the vision encoder (its last hidden states)."""
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError("num_return_sequences must be between 1 and num_beams")
        images = int(image_states.shape[0])
        prompt = torch.tensor([self.bos_id, *prompt_ids[1:]], device=image_states.device)
        max_len = int(prompt.shape[0]) + max_new_tokens
        cache = self.encode(image_states, max_len, num_beams)
        positions = cache.positions[: prompt.shape[0]]
        kv_len = self._kv_len(len(positions), max_len)
        logits = self.forward(prompt.expand(images, -1), positions, cache, kv_len)
        bans = NgramBans.of(no_repeat_ngram_sizes, images, image_states.device)
        if num_beams == 1:
            return self._greedy(cache, logits, prompt, max_new_tokens, bans)
        search = _BeamSearch(self, cache, prompt, images, num_beams, max_new_tokens, length_penalty)
        return search.run(logits, num_return_sequences, bans)

    def _kv_len(self, filled: int, max_len: int) -> int:
        return max_len if self.static else filled

    def step(self, tokens: torch.Tensor, position: int, cache: _Cache) -> torch.Tensor:
        """Logits for one new token per row at ``position`` (a CUDA graph replay where enabled)."""
        max_len = int(cache.positions.shape[0])
        if self.cuda_graphs and tokens.is_cuda:
            key = (int(tokens.shape[0]), max_len, id(cache))
            graph = self._graphs.get(key)
            if graph is None:  # the first step of this batch shape runs during the capture
                self._graphs[key] = _GraphStep(self, cache, tokens, position)
                return self._graphs[key].first
            return graph.replay(tokens, position)
        positions = cache.positions[position : position + 1]
        return self.forward(tokens[:, None], positions, cache, self._kv_len(position + 1, max_len))

    def _greedy(
        self, cache: _Cache, logits: torch.Tensor, prompt: torch.Tensor, max_new: int, bans: NgramBans
    ) -> DecodeOutput:
        """transformers' greedy search: argmax per row, pad once a row has ended, stop when all have."""
        rows = int(logits.shape[0])
        prompt_len = int(prompt.shape[0])
        tokens = torch.full((rows, max_new), self.pad_id, dtype=torch.long, device=logits.device)
        log_probs = torch.zeros((rows, max_new), dtype=torch.float32, device=logits.device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=logits.device)
        for step in range(max_new):
            scores = logits.float()
            if bans.active:  # the step's own logits: banned in place
                sequences = torch.cat((prompt.expand(rows, -1), tokens[:, :step]), dim=1)
                bans.apply(sequences, scores)
            chosen = scores.argmax(dim=-1)
            token_lp = functional.log_softmax(scores, dim=-1).gather(1, chosen[:, None])[:, 0]
            chosen = torch.where(unfinished, chosen, self.pad_id)
            tokens[:, step] = chosen
            log_probs[:, step] = torch.where(unfinished, token_lp, 0.0)
            unfinished &= chosen != self.eos_id
            if step + 1 == max_new or not bool(unfinished.any()):
                break
            logits = self.step(chosen, prompt_len + step, cache)
        return DecodeOutput(tokens, log_probs)


class _BeamSearch:
    """The state of one batched beam search: (images, beams, ...) tensors, as in transformers."""

    def __init__(
        self,
        decoder: BlipDecoder,
        cache: _Cache,
        prompt: torch.Tensor,
        images: int,
        beams: int,
        max_new: int,
        length_penalty: float,
    ) -> None:
        device = prompt.device
        self.decoder, self.cache = decoder, cache
        self.images, self.beams, self.max_new = images, beams, max_new
        self.prompt_len = int(prompt.shape[0])
        self.max_len = self.prompt_len + max_new
        self.length_penalty = length_penalty
        shape = (images, beams, self.max_len)
        self.sequences = torch.full(shape, decoder.pad_id, dtype=torch.long, device=device)
        self.sequences[:, :, : self.prompt_len] = prompt
        self.token_lp = torch.zeros((images, beams, max_new), dtype=torch.float32, device=device)
        # Only the first beam is live at the start: the others hold the same prompt.
        self.scores = torch.zeros((images, beams), dtype=torch.float32, device=device)
        self.scores[:, 1:] = NEG
        self.done_sequences = self.sequences.clone()
        self.done_token_lp = self.token_lp.clone()
        self.done_scores = torch.full((images, beams), NEG, dtype=torch.float32, device=device)
        self.done = torch.zeros((images, beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((images, 1), dtype=torch.bool, device=device)
        self.top_mask = torch.arange(2 * beams, device=device) < beams
        self.offsets = torch.arange(images, device=device)[:, None] * beams

    def run(self, logits: torch.Tensor, returned: int, bans: NgramBans) -> DecodeOutput:
        for step in range(self.max_new):
            cur_len = self.prompt_len + step
            # (images, 1, vocab) for the prompt's logits (once per image), else (images, beams, vocab)
            log_probs = functional.log_softmax(logits.float(), dim=-1)
            live = int(log_probs.shape[0]) // self.images
            renorm = self._ban(bans, log_probs, cur_len, live)
            rows, last = self._advance(log_probs.view(self.images, live, -1), renorm, cur_len)
            if not self._continues(cur_len + 1, last):
                break
            self.decoder.reorder(self.cache, rows, cur_len)
            tokens = self.sequences[:, :, cur_len].reshape(-1)
            logits = self.decoder.step(tokens, cur_len, self.cache)
        sequences = self.done_sequences[:, :returned, self.prompt_len :]
        token_lp = self.done_token_lp[:, :returned]
        return DecodeOutput(sequences.reshape(-1, self.max_new), token_lp.reshape(-1, self.max_new))

    def _ban(self, bans: NgramBans, log_probs: torch.Tensor, cur_len: int, live: int) -> torch.Tensor | None:
        """Bans applied in place to ``log_probs`` (rows, vocab); then, per row, the log of the mass left
        (0 where nothing was banned), or None when no row was hit: transformers records the banned
        scores renormalised (``compute_transition_scores``), i.e. minus this."""
        if not bans.active:
            return None
        flat = self.sequences[:, :live, :cur_len].reshape(-1, cur_len)  # the prompt: beam 0 alone
        hit = bans.apply(flat, log_probs)
        if hit is None:
            return None
        renorm = torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
        renorm[hit] = torch.logsumexp(log_probs[hit], dim=-1)
        return renorm

    def _advance(
        self, log_probs: torch.Tensor, renorm: torch.Tensor | None, cur_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: top 2 x beams candidates, new running beams, new finished hypotheses.

        ``log_probs`` (images, live, vocab), ``live`` 1 for the prompt (the other beams' scores are
        ``NEG``: no candidate of theirs can make the top ``2 x beams``, as in transformers). The top
        candidates over ``live x vocab`` are found in two stages, each row's best ``2 x beams`` tokens,
        then the best of those with the beams' scores added: the same set as one ``topk`` over the
        sums, without adding the scores to the whole vocabulary. Returns the flat row each new
        running beam continues, and whether all candidates ended."""
        images, live, _ = log_probs.shape
        beams, step = self.beams, cur_len - self.prompt_len
        row_lp, row_token = torch.topk(log_probs, k=2 * beams, dim=-1, sorted=False)
        accumulated = (row_lp + self.scores[:, :live, None]).reshape(images, -1)
        top_lp, top_index = torch.topk(accumulated, k=2 * beams)
        parent = top_index // (2 * beams)
        token = row_token.reshape(images, -1).gather(1, top_index)
        top_sequences = _gather(self.sequences, parent)
        top_sequences[:, :, cur_len] = token
        top_token_lp = _gather(self.token_lp, parent)
        recorded = row_lp.reshape(images, -1).gather(1, top_index)
        if renorm is not None:
            recorded = recorded - renorm.view(images, live).gather(1, parent)
        top_token_lp[:, :, step] = recorded
        hits = token == self.decoder.eos_id
        if cur_len + 1 >= self.max_len:  # transformers' MaxLengthCriteria: every candidate ends here
            hits = torch.ones_like(hits)

        running_lp = top_lp + hits.to(torch.float32) * NEG
        keep = torch.topk(running_lp, k=beams)[1]
        self.sequences = _gather(top_sequences, keep)
        self.scores = _gather(running_lp, keep)
        self.token_lp = _gather(top_token_lp, keep)
        rows = _gather(parent + self.offsets, keep).reshape(-1)

        self._finish(top_sequences, top_token_lp, top_lp, hits, cur_len)
        return rows, hits.all()

    def _finish(
        self,
        top_sequences: torch.Tensor,
        top_token_lp: torch.Tensor,
        top_lp: torch.Tensor,
        hits: torch.Tensor,
        cur_len: int,
    ) -> None:
        """transformers' ``_update_finished_beams``: the best ``beams`` finished hypotheses so far."""
        just_finished = hits & self.top_mask[None, :]
        scored = top_lp / ((cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = torch.all(self.done, dim=-1, keepdim=True) & (self.decoder.early_stopping is True)
        scored += full.to(torch.float32) * NEG
        scored += (~self.improvable).to(torch.float32) * NEG
        scored += (~just_finished) * NEG
        merged_scores = torch.cat((self.done_scores, scored), dim=1)
        best = torch.topk(merged_scores, k=self.beams)[1]
        self.done_sequences = _gather(torch.cat((self.done_sequences, top_sequences), dim=1), best)
        self.done_token_lp = _gather(torch.cat((self.done_token_lp, top_token_lp), dim=1), best)
        self.done_scores = _gather(merged_scores, best)
        self.done = _gather(torch.cat((self.done, just_finished), dim=1), best)

    def _continues(self, cur_len: int, all_ended: torch.Tensor) -> bool:
        """transformers' early-stop heuristic and stopping rule, evaluated with one host sync."""
        if self.decoder.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_len - self.prompt_len
        else:
            best_length = cur_len - self.prompt_len
        best_running = self.scores[:, :1] / (best_length**self.length_penalty)
        worst_done = torch.where(self.done, torch.min(self.done_scores, dim=1, keepdim=True)[0], NEG)
        self.improvable = self.improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        open_beams = ~(torch.all(self.done) & (self.decoder.early_stopping is True))
        return bool(torch.any(self.improvable) & open_beams & ~all_ended)


@dataclass
class NgramBans:
    """Per image, the n-gram size that may not repeat (0: none), as transformers'
    ``NoRepeatNGramLogitsProcessor`` computes it, for a batch that may mix sizes."""

    sizes: torch.Tensor
    distinct: tuple[int, ...]

    @classmethod
    def of(cls, per_image: Sequence[int], images: int, device: torch.device) -> NgramBans:
        sizes = list(per_image) or [0] * images
        if len(sizes) != images or any(size < 0 for size in sizes):
            raise ValueError(f"no_repeat_ngram_sizes needs {images} sizes >= 0, got {sizes}")
        per_image_sizes = torch.tensor(sizes, dtype=torch.long, device=device)
        return cls(per_image_sizes, tuple(sorted({size for size in sizes if size > 0})))

    @property
    def active(self) -> bool:
        return bool(self.distinct)

    def apply(self, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        """Set ``scores`` (rows, vocab) to -inf, in place, at each token that would repeat an n-gram of
        its row of ``sequences`` (rows image-major, the same number per image); return the rows hit,
        or None when there are none. Sparse: a step rarely bans anything, and then few tokens."""
        pairs = self._banned(sequences, int(scores.shape[-1]))
        if pairs is None:
            return None
        rows, tokens = pairs
        scores.index_put_((rows, tokens), torch.tensor(-float("inf"), dtype=scores.dtype))
        return torch.as_tensor(torch.unique(rows))

    def _banned(self, sequences: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (row, token) pairs to ban (one host sync per n-gram size in the batch)."""
        cur_len = int(sequences.shape[1])
        row_sizes = self.sizes.repeat_interleave(int(sequences.shape[0]) // int(self.sizes.shape[0]))
        rows, tokens = [], []
        for size in self.distinct:
            if cur_len < size:
                continue
            prefix = sequences[:, cur_len + 1 - size :]
            windows = sequences.unfold(dimension=1, size=size, step=1)
            matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
            matches &= (row_sizes == size)[:, None] & (windows[..., -1] < vocab)
            row, window = matches.nonzero(as_tuple=True)
            rows.append(row)
            tokens.append(windows[row, window, -1])
        if not rows or sum(int(row.shape[0]) for row in rows) == 0:
            return None
        return torch.cat(rows), torch.cat(tokens)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[i, index[i, j], ...]`` (transformers' ``_gather_beams``)."""
    while index.ndim < tensor.ndim:
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class _GraphStep:
    """One decoder step captured in a CUDA graph for a fixed batch, replayed with new tokens and position.

    Static mode makes the step shape-stable: the attention spans the whole cache under a mask built
    from the position tensor, so replaying the graph is the same computation at every step."""

    def __init__(self, decoder: BlipDecoder, cache: _Cache, tokens: torch.Tensor, position: int) -> None:
        self.tokens = tokens.clone()
        self.position = torch.full((1,), position, dtype=torch.long, device=tokens.device)
        max_len = int(cache.positions.shape[0])

        def run() -> torch.Tensor:
            return decoder.forward(self.tokens[:, None], self.position, cache, max_len)

        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch.cuda.Stream is untyped
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            self.first = run()  # the real step: it writes this position's keys/values
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the warm-up's results stand
            self.output = run()

    def replay(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.position.fill_(position)
        self.graph.replay()
        return self.output.clone()
