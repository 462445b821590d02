"""Shadow traffic: copies of live requests sent to a canary in the background, compared answer by answer.

While a canary is in its shadow phase (``rollout.analysis.mirror``) the operator gives it weight 0 and
``mirror: <percent>`` in ``status.versions[]``; the routing table carries it (``Version.mirror``).
For that share of the interactive ``POST /v1/caption`` requests that another version answered 200,
the router sends the same body to the canary *after* the client's answer is built:

- the client's answer never waits for the copy and is never changed by it (the copy is a task of its
  own; nothing of it reaches the client);
- copies in flight are bounded per router (``shadow_max_in_flight``); one more is dropped and counted
  (``dropped``), so a canary that hangs costs at most that many tasks and bodies, each for at most
  ``shadow_timeout_ms``;
- copies carry ``X-Priority: bulk``: the canary's runtime never counts them as interactive queue
  depth (its autoscaler's signal), and the router counts them here only, never in the canary's live
  figures (requests, errors, latency) nor in ``bulk``;
- the primary's caption is parsed from the body the router relays, only when a copy is made and only
  up to ``shadow_max_answer_bytes``.

For each copy the router records the canary's error (the live figures' kinds), its latency (sent to
answered; it includes the runtime's bulk wait, at most ``max_queue_delay_ms`` while nothing else runs)
and its **agreement** with the primary: exact match after normalisation (case, punctuation and spaces
do not count) and a token-overlap score (F1 of the two captions' word multisets, 1.0 for equal ones).
An answer other than 200 that is no error (a 4xx) is a disagreement (exact no, overlap 0).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
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

SHADOW_PATH = "/v1/caption"
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
    """What the router reads from a 200 caption answer."""

    text: str
    confidence: float | None


def parse_caption(body: bytes, limit: int) -> Caption | None:
    """The caption and confidence of a runtime's 200 JSON answer; None when it is larger than ``limit``
    bytes or not a caption answer (it is relayed unchanged whatever this says)."""
    if len(body) > limit:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("caption"), str):
        return None
    confidence = parsed.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1:
        return Caption(parsed["caption"], None)
    return Caption(parsed["caption"], float(confidence))


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

    def offer(self, version: str, primary: str, headers: CIMultiDict[str], send: Send) -> bool:
        """Start one copy to ``version`` in the background, compared with the ``primary`` caption; False
        (and counted as dropped) when ``max_in_flight`` copies are out already. Never raises, never
        waits."""
        if len(self._tasks) >= self.max_in_flight:
            self.on_dropped(version)
            return False
        copied = CIMultiDict(headers)
        copied[PRIORITY_HEADER] = "bulk"
        task = asyncio.get_running_loop().create_task(self._copy(version, primary, copied, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _copy(self, version: str, primary: str, headers: CIMultiDict[str], send: Send) -> None:
        started = time.monotonic()
        try:
            status, body = await send(headers)
        except (EdgeError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.on_outcome(CopyOutcome(version, _ms_since(started), error=_error_kind(exc)))
            return
        latency_ms = _ms_since(started)
        if status >= 500:
            self.on_outcome(CopyOutcome(version, latency_ms, error="status_5xx"))
            return
        answer = parse_caption(body, self.answer_limit) if status == 200 else None
        if answer is None:  # a 4xx, or an answer that is no caption: a disagreement
            self.on_outcome(CopyOutcome(version, latency_ms))
            return
        exact, overlap = agreement(primary, answer.text)
        self.on_outcome(CopyOutcome(version, latency_ms, exact=exact, overlap=overlap))

    async def close(self) -> None:
        """Cancel the copies still out (shutdown: their results are of no use any more)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


def _error_kind(exc: BaseException) -> str:
    """A failed copy's kind, as the live figures count it; every endpoint ejected (a 503 the router
    answers itself) is the canary's fault here: no runtime of it could be reached."""
    if isinstance(exc, EdgeError):
        return error_kind(exc) or "connect_failures"
    log.warning("shadow copy failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    return "bad_responses"
