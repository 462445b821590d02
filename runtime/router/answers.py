"""What the router learns from the caption answers it relays: confidence figures and shadow copies.

One step, ``AnswerObserver.answered``, for every interactive 200 caption answer of a version: the one
answer of a plain request (``app.py``) and each hop of a cascade (``cascade.py``: the fast tier's
answer, and the quality tier's when escalated). Per answer:

- each image's ``confidence`` counts for the version that answered (``versions.<v>.window.confidence``
  on the stats, ``captionfleet_router_answer_confidence``), what ``maxConfidenceDrop`` reads;
- for the mirror share, the request *as sent to that version* is copied to the mirrored version of
  the table the version was picked from (the whole routing table, or the hop's tier: a canary in its
  shadow phase joins the tier of the version it replaces, so it is compared with that tier's
  captions), and the copy's captions are compared image by image with this answer's (``shadow.py``).

Bulk requests (``X-Priority: bulk``) and jobs never come here. Answers larger than
``shadow_max_answer_bytes`` are not parsed (neither counted nor copied).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable

from multidict import CIMultiDict

from captionfleet.runtime.router.metrics import RouterMetrics
from captionfleet.runtime.router.proxy import Forwarder, Outgoing
from captionfleet.runtime.router.shadow import (
    SHADOW_REQUEST_ID_SUFFIX,
    Caption,
    CopyOutcome,
    Shadower,
    parse_captions,
)
from captionfleet.runtime.router.stats import RouterStats
from captionfleet.runtime.router.table import RoutingTable, Version
from captionfleet.settings.router import RouterSettings


class AnswerObserver:
    """The confidence figures and the shadow copier of one router."""

    def __init__(
        self,
        settings: RouterSettings,
        stats: RouterStats,
        metrics: RouterMetrics,
        rng: random.Random,
        forwarder: Callable[[], Forwarder],
    ) -> None:
        self.stats = stats
        self.metrics = metrics
        self.rng = rng
        self.forwarder = forwarder
        self.answer_limit = settings.shadow_max_answer_bytes
        self.copy_timeout_s = settings.shadow_timeout_ms / 1000
        self.shadower = Shadower(
            settings.shadow_max_in_flight,
            self._copy_ended,
            self._copy_dropped,
            answer_limit=settings.shadow_max_answer_bytes,
        )

    def answered(
        self, table: RoutingTable, version: Version, outgoing: Outgoing, status: int, body: bytes
    ) -> None:
        """``version`` answered ``outgoing`` (an interactive caption request, as sent to it) with
        ``status`` and ``body``; ``table``: the table ``version`` was picked from. A 200 caption answer
        counts its confidences and may start a shadow copy; anything else is ignored."""
        if status != 200:
            return
        results = parse_captions(body, self.answer_limit)
        if results is None:
            return
        for result in results:
            if isinstance(result, Caption) and result.confidence is not None:
                self.stats.record_confidence(version.name, result.confidence)
                self.metrics.confidence.labels(version=version.name).observe(result.confidence)
        target = table.mirror_target()
        if target is None or target.name == version.name or self.rng.random() * 100 >= target.mirror:
            return
        primaries = [result.text if isinstance(result, Caption) else None for result in results]
        copy = dataclasses.replace(
            outgoing,
            request_id=outgoing.request_id + SHADOW_REQUEST_ID_SUFFIX,
            deadline=time.monotonic() + self.copy_timeout_s,
        )
        send = functools.partial(self._send_copy, target, copy)
        self.shadower.offer(target.name, primaries, copy.headers, send)

    async def close(self) -> None:
        """Cancel the copies still out (before the HTTP client they use is closed)."""
        await self.shadower.close()

    async def _send_copy(
        self, target: Version, outgoing: Outgoing, headers: CIMultiDict[str]
    ) -> tuple[int, bytes]:
        self.metrics.shadow_in_flight.inc()
        try:
            answer = await self.forwarder().forward(target, dataclasses.replace(outgoing, headers=headers))
        finally:
            self.metrics.shadow_in_flight.dec()
        return answer.status, answer.body

    def _copy_ended(self, outcome: CopyOutcome) -> None:
        self.stats.record_copy(outcome)
        self.metrics.copy_ended(outcome)

    def _copy_dropped(self, version: str) -> None:
        self.stats.record_copy_dropped(version)
        self.metrics.shadow_dropped.labels(version=version).inc()
