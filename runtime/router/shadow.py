"""Shadow traffic: copies of live requests sent to a canary in the background, compared answer by answer.

While a canary is in its shadow phase (``rollout.analysis.mirror``) the operator gives it weight 0 and
``mirror: <percent>`` in ``status.versions[]``; the routing table carries it (``Version.mirror``).
For that share of the interactive caption requests that another version answered 200 (``answers.py``
decides, for a plain request and for each hop of a cascade), the router sends the same request to the
canary *after* the client's answer is built. Every kind is copied as it came: ``POST /v1/caption``
with a raw, multipart or JSON body (an image by URL too: the canary fetches it again) and
``POST /v1/caption/batch`` in either form; bulk requests and jobs never.

- the client's answer never waits for the copy and is never changed by it (the copy is a task of its
  own; nothing of it reaches the client);
- copies in flight are bounded per router (``shadow_max_in_flight``); one more is dropped and counted
  (``dropped``), so a canary that hangs costs at most that many tasks and bodies, each for at most
  ``shadow_timeout_ms``;
- copies carry ``X-Priority: bulk``: the canary's runtime never counts them as interactive queue
  depth (its autoscaler's signal), and the router counts them here only, never in the canary's live
  figures (requests, errors, latency) nor in ``bulk``;
- answers are parsed only up to ``shadow_max_answer_bytes`` (the primary's and the copy's).

The figures count **images**: a single request is one, a batch of N images N, each compared with the
primary's caption of the same image (an image the primary has no caption of is not compared, nor
counted). For each the router records the canary's error (the live figures' kinds: the whole copy
failed, or a 5xx for that image), the copy's latency (sent to answered; it includes the runtime's bulk
wait, at most ``max_queue_delay_ms`` while nothing else runs) and its **agreement** with the primary:
exact match after normalisation (case, punctuation and spaces do not count) and a token-overlap score
(F1 of the two captions' word multisets, 1.0 for equal ones). An answer other than 200 that is no
error (a 4xx, for the whole copy or the image) is a disagreement (exact no, overlap 0). A dropped copy
counts in ``dropped`` once per image it would have compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict

from captionfleet.figures import ShadowCounts
from captionfleet.names import PRIORITY_HEADER
from captionfleet.runtime.router.errors import error_kind
from captionfleet.runtime.router.histogram import bucket_index, empty_counts, latency_json
from captionfleet.runtime.web.errors import EdgeError

log = logging.getLogger(__name__)

SHADOW_REQUEST_ID_SUFFIX = ".shadow"
_WORD = re.compile(r"[^\W_]+")


def words(caption: str) -> list[str]:
    """A caption's words after normalisation: lower case, punctuation and spacing dropped."""
    return _WORD.findall(caption.lower())


def token_overlap(primary: str, copy: str) -> float:
    """F1 of the two captions' word multisets: 1.0 for the same words, 0.0 for none shared."""
    a, b = Counter(words(primary)), Counter(words(copy))
    if not a and not b:
        return 1.0
    common = sum((a & b).values())
    return 2.0 * common / (sum(a.values()) + sum(b.values()))


def agreement(primary: str, copy: str) -> tuple[bool, float]:
    """(exact match after normalisation, token overlap)."""
    return words(primary) == words(copy), token_overlap(primary, copy)


@dataclass(frozen=True)
class Caption:
    """What the router reads from a 200 caption answer (or one image of a batch answer)."""

    text: str
    confidence: float | None


@dataclass(frozen=True)
class Failed:
    """One image of a batch answer with an error instead of a caption (``status``: its HTTP status)."""

    status: int


def parse_caption(body: bytes, limit: int) -> Caption | None:
    """The caption and confidence of a runtime's 200 JSON answer to ``POST /v1/caption``; None when it
    is larger than ``limit`` bytes or not a caption answer (it is relayed unchanged whatever this says)."""
    parsed = _json_within(body, limit)
    return None if parsed is None else _caption_of(parsed)


def parse_captions(body: bytes, limit: int) -> list[Caption | Failed] | None:
    """Each image's result of a runtime's 200 JSON answer: ``[caption]`` for ``POST /v1/caption``, one
    entry per image, in order, for ``/v1/caption/batch`` (``{"results": [...]}``); None when it is
    larger than ``limit`` bytes or no caption answer."""
    parsed = _json_within(body, limit)
    if parsed is None:
        return None
    results = parsed.get("results")
    if isinstance(results, list):
        return [_result_of(result) for result in results]
    caption = _caption_of(parsed)
    return None if caption is None else [caption]


def _json_within(body: bytes, limit: int) -> dict[str, Any] | None:
    if len(body) > limit:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _caption_of(parsed: Mapping[str, Any]) -> Caption | None:
    if not isinstance(parsed.get("caption"), str):
        return None
    confidence = parsed.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1:
        return Caption(parsed["caption"], None)
    return Caption(parsed["caption"], float(confidence))


def _result_of(result: Any) -> Caption | Failed:
    """One entry of a batch's ``results``: a caption, or the image's error (status 0: none given)."""
    caption = _caption_of(result) if isinstance(result, Mapping) else None
    if caption is not None:
        return caption
    status = result.get("status") if isinstance(result, Mapping) else None
    return Failed(status if isinstance(status, int) and not isinstance(status, bool) else 0)


@dataclass(slots=True)
class ShadowFigures(ShadowCounts):
    """Copies sent to one version over some span of time, with their latency."""

    latency_sum_ms: float = 0.0
    latency_counts: list[int] = field(default_factory=empty_counts)

    def record(self, outcome: CopyOutcome) -> None:
        self.copies += 1
        self.latency_sum_ms += outcome.latency_ms
        self.latency_counts[bucket_index(outcome.latency_ms)] += 1
        if outcome.error is not None:
            self.errors += 1
            return
        self.compared += 1
        self.exact += int(outcome.exact)
        self.overlap_sum += outcome.overlap

    def add(self, other: ShadowFigures) -> None:
        self.add_counts(other)
        self.latency_sum_ms += other.latency_sum_ms
        self.latency_counts = [a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)]

    def as_json(self) -> dict[str, Any]:
        return self.counts_json() | {"latency_ms": latency_json(self.latency_sum_ms, self.latency_counts)}


@dataclass(frozen=True)
class CopyOutcome:
    """One copy's result: ``error`` one of the live figures' kinds, else the comparison."""

    version: str
    latency_ms: float
    error: str | None = None
    exact: bool = False
    overlap: float = 0.0


Send = Callable[[CIMultiDict[str]], Awaitable[tuple[int, bytes]]]
"""Sends the copy with these headers; the canary's (status, body), or an EdgeError of the router."""


class Shadower:
    """The bounded background copier of one router: ``offer`` a copy, ``close`` at shutdown."""

    def __init__(
        self,
        max_in_flight: int,
        on_outcome: Callable[[CopyOutcome], None],
        on_dropped: Callable[[str], None],
        answer_limit: int = 64 * 1024,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.on_outcome = on_outcome
        self.on_dropped = on_dropped
        self.answer_limit = answer_limit
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def offer(
        self, version: str, primaries: Sequence[str | None], headers: CIMultiDict[str], send: Send
    ) -> bool:
        """Start one copy to ``version`` in the background, compared image by image with the
        primary's captions (``primaries``, in the request's order; None: an image the primary has no
        caption of, not compared); False (each compared image counted as dropped) when
        ``max_in_flight`` copies are out already. Never raises, never waits."""
        if len(self._tasks) >= self.max_in_flight:
            for _ in _compared(primaries):
                self.on_dropped(version)
            return False
        copied = CIMultiDict(headers)
        copied[PRIORITY_HEADER] = "bulk"
        task = asyncio.get_running_loop().create_task(self._copy(version, primaries, copied, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _copy(
        self, version: str, primaries: Sequence[str | None], headers: CIMultiDict[str], send: Send
    ) -> None:
        started = time.monotonic()
        try:
            status, body = await send(headers)
        except (EdgeError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            failed = CopyOutcome(version, _ms_since(started), error=_error_kind(exc))
            for _ in _compared(primaries):
                self.on_outcome(failed)
            return
        latency_ms = _ms_since(started)
        answers = parse_captions(body, self.answer_limit) if status == 200 else None
        for index, primary in _compared(primaries):
            answer = answers[index] if answers is not None and index < len(answers) else None
            self.on_outcome(_outcome(version, latency_ms, primary, status, answer))

    async def close(self) -> None:
        """Cancel the copies still out (shutdown: their results are of no use any more)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _compared(primaries: Sequence[str | None]) -> list[tuple[int, str]]:
    return [(index, primary) for index, primary in enumerate(primaries) if primary is not None]


def _outcome(
    version: str, latency_ms: float, primary: str, status: int, answer: Caption | Failed | None
) -> CopyOutcome:
    """One image of a copy: an error (a 5xx, for the whole answer or the image), a disagreement (a
    4xx, or no caption of the image) or the comparison of the two captions."""
    if status >= 500 or (isinstance(answer, Failed) and answer.status >= 500):
        return CopyOutcome(version, latency_ms, error="status_5xx")
    if not isinstance(answer, Caption):
        return CopyOutcome(version, latency_ms)
    exact, overlap = agreement(primary, answer.text)
    return CopyOutcome(version, latency_ms, exact=exact, overlap=overlap)


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


def _error_kind(exc: BaseException) -> str:
    """A failed copy's kind, as the live figures count it; every endpoint ejected (a 503 the router
    answers itself) is the canary's fault here: no runtime of it could be reached."""
    if isinstance(exc, EdgeError):
        return error_kind(exc) or "connect_failures"
    log.warning("shadow copy failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    return "bad_responses"
