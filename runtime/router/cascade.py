"""The cascade: every caption request goes to the fast tier first, and only an unsure answer to the
quality tier.

A cascade (``CascadePlan``, from the CaptionModel's ``status.cascade``, a routes file's ``cascade:``
or the ``--cascade-*`` options) splits the routing table's versions into two tiers. Inside a tier the
table's own rule picks the version (sticky by user id, by the versions' effective weights), so A/B
arms and a canary keep their shares inside their tier: a canary of the quality model answers its
share of the escalations. Which version is in which tier is the operator's rule (``docs``).

One request:

1. the fast tier answers (one hop, with the proxy's retry and the request's budget);
2. its signal decides: ``confidence < threshold`` (signal ``confidence``) or ``ood_score > threshold``
   (signal ``ood``). A batch is escalated whole when any of its images is unsure;
3. unsure and enough budget left: the same request (the same body, already held, and the same
   ``X-Request-Id``) goes to the quality tier, and its answer is returned. "Enough" is the quality
   tier's recent latency (``cascade_latency_quantile`` of its last ``cascade_latency_samples``
   answers) plus ``cascade_reserve_ms``, the time kept back to return the fast answer should the
   quality hop fail or run out of time;
4. every answer carries ``"cascade": {"escalated": bool, "fast_confidence": float}``; when an
   escalation was wanted but not made, also ``"skipped"``: ``deadline`` (too little budget left),
   ``quality_failed`` (the quality tier answered an error or not in time: the fast answer stands),
   ``no_threshold`` (the operator has not resolved the threshold yet) or ``no_signal`` (the fast
   answer had no OOD score). ``model_version`` (and ``X-Routed-Version``) says who answered.

Each hop counts in its version's figures as a request of its own (the rollout analysis of a canary in
either tier sees its own requests), and each hop's 200 caption answer is observed like a plain
request's (``answers.py``): its confidence counts for the version that answered it, and a canary of
that tier in its shadow phase gets a copy of the request as sent to the tier, compared with that
tier's caption (a fast-tier canary sees every request, a quality-tier one the escalations). The
cascade's figures (escalations, per-tier hop latency) are kept apart in ``CascadeFigures``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web

from captionfleet.names import ROUTED_VERSION_HEADER
from captionfleet.runtime.router.errors import BadUpstreamResponse, error_kind
from captionfleet.runtime.router.proxy import Outgoing, UpstreamAnswer, outgoing_of
from captionfleet.runtime.router.stats import RouterStats
from captionfleet.runtime.router.table import RoutingTable, TableError, Version
from captionfleet.runtime.web.context import REQUEST_ID
from captionfleet.runtime.web.errors import EdgeError, reply_for
from captionfleet.settings.router import RouterSettings

if TYPE_CHECKING:
    from captionfleet.runtime.router.app import Router

Signal = Literal["confidence", "ood"]
SIGNALS: tuple[Signal, ...] = ("confidence", "ood")
TIERS = ("fast", "quality")
Skipped = Literal["deadline", "quality_failed", "no_threshold", "no_signal"]
OUTCOMES = ("confident", "escalated", "deadline", "quality_failed", "no_threshold", "no_signal")


@dataclass(frozen=True)
class CascadePlan:
    """Which versions form each tier, and when the fast tier's answer is not enough."""

    fast: tuple[str, ...]
    quality: tuple[str, ...]
    threshold: float | None  # None: not resolved yet, nothing is escalated
    signal: Signal = "confidence"

    def tier_of(self, version: str) -> str | None:
        if version in self.fast:
            return "fast"
        return "quality" if version in self.quality else None

    def unsure(self, answer: Mapping[str, Any]) -> bool | None:
        """Whether one caption result asks for the quality tier; None: it has no value of the signal."""
        if self.threshold is None:
            return False
        key = "confidence" if self.signal == "confidence" else "ood_score"
        value = answer.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return value < self.threshold if self.signal == "confidence" else value > self.threshold

    def describe(self) -> dict[str, Any]:
        return {
            "fast": list(self.fast),
            "quality": list(self.quality),
            "threshold": self.threshold,
            "signal": self.signal,
        }


def plan_from_mapping(entry: Mapping[str, Any], versions: Sequence[str]) -> CascadePlan:
    """``{fast: [names], quality: [names], threshold, signal}`` (a routes file's or the status's
    ``cascade``), checked against the table's version names; TableError when unusable."""

    def names(key: str) -> tuple[str, ...]:
        value = entry.get(key)
        listed = [value] if isinstance(value, str) else value
        if not isinstance(listed, list) or not listed or not all(isinstance(n, str) and n for n in listed):
            raise TableError(f"cascade.{key} must name at least one version")
        unknown = sorted(set(listed) - set(versions))
        if unknown:
            raise TableError(f"cascade.{key}: {', '.join(unknown)} not in the routing table")
        return tuple(listed)

    fast, quality = names("fast"), names("quality")
    if set(fast) & set(quality):
        raise TableError(f"cascade: {', '.join(sorted(set(fast) & set(quality)))} in both tiers")
    threshold = entry.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise TableError(f"cascade.threshold must be a number, got {threshold!r}")
    signal = entry.get("signal") or "confidence"
    if signal not in SIGNALS:
        raise TableError(f"cascade.signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    return CascadePlan(fast, quality, None if threshold is None else float(threshold), signal)


def with_cascade(table: RoutingTable, entry: Mapping[str, Any] | None) -> RoutingTable:
    """``table`` with the cascade ``entry`` describes (None: no cascade)."""
    if entry is None:
        return table
    if not isinstance(entry, Mapping):
        raise TableError("cascade must be a mapping {fast, quality, threshold, signal}")
    plan = plan_from_mapping(entry, [v.name for v in table.versions])
    return dataclasses.replace(table, cascade=plan)


def tier_table(table: RoutingTable, names: Sequence[str]) -> RoutingTable:
    """The versions of one tier as a table of their own: the table's pick rule inside the tier."""
    return RoutingTable(tuple(v for v in table.versions if v.name in names), f"{table.source} ({names})")


class CascadeFigures:
    """Per-tier hop latency and the outcome of every cascaded request, over the router's stats window
    (a ``RouterStats`` whose "versions" are ``fast``, ``quality`` and the outcomes), and the quality
    tier's recent latencies for the deadline rule."""

    def __init__(self, stats: RouterStats, samples: int) -> None:
        self.stats = stats
        self.recent_quality_ms: deque[float] = deque(maxlen=max(1, samples))

    def hop(self, tier: str, latency_ms: float, *, ok: bool) -> None:
        self.stats.record(tier, error=None if ok else "status_5xx", latency_ms=latency_ms)
        if tier == "quality" and ok:
            self.recent_quality_ms.append(latency_ms)

    def outcome(self, name: str) -> None:
        self.stats.record(name, error=None, latency_ms=0.0)

    def quality_estimate_ms(self, quantile: float) -> float:
        """What an escalation is expected to take: a high quantile of the quality tier's recent hops."""
        recent = sorted(self.recent_quality_ms)
        if not recent:
            return 0.0
        if len(recent) == 1:
            return recent[0]
        cuts = statistics.quantiles(recent, n=100, method="inclusive")
        return cuts[min(98, max(0, round(quantile * 100) - 1))]

    def snapshot(self, window_s: int) -> dict[str, Any]:
        """The ``cascade`` part of ``GET /v1/router/stats``: counts and hop latency over the window."""
        body = self.stats.snapshot(window_s, versions=(*TIERS, *OUTCOMES))
        window = {name: entry["window"] for name, entry in body["versions"].items()}
        requests = sum(window[name]["requests"] for name in OUTCOMES)
        escalated = window["escalated"]["requests"]
        return {
            "window_s": body["window_s"],
            "requests": requests,
            "escalated": escalated,
            "escalation_rate": round(escalated / requests, 6) if requests else None,
            "outcomes": {name: window[name]["requests"] for name in OUTCOMES},
            "tiers": {
                tier: {"requests": window[tier]["requests"], **window[tier]["latency_ms"]} for tier in TIERS
            },
        }


@dataclass
class _Hop:
    version: Version
    answer: UpstreamAnswer | None = None
    error: EdgeError | None = None
    parsed: Any = None
    latency_ms: float = 0.0


@dataclass
class Cascade:
    """The cascade of one router: its tier tables (rebuilt with each routing table) and its figures."""

    router: Router
    figures: CascadeFigures
    reserve_s: float
    latency_quantile: float
    plan: CascadePlan | None = None
    tiers: dict[str, RoutingTable] = field(default_factory=dict)

    @classmethod
    def of(cls, router: Router, stats: RouterStats) -> Cascade:
        settings = router.settings
        return cls(
            router,
            CascadeFigures(stats, settings.cascade_latency_samples),
            reserve_s=settings.cascade_reserve_ms / 1000,
            latency_quantile=settings.cascade_latency_quantile,
        )

    def table_changed(self, table: RoutingTable) -> None:
        self.plan = table.cascade
        if self.plan is not None:
            self.tiers = {
                "fast": tier_table(table, self.plan.fast),
                "quality": tier_table(table, self.plan.quality),
            }
            self.router.metrics.cascade_threshold.set(
                self.plan.threshold if self.plan.threshold is not None else -1
            )

    def _pick(self, tier: str, sticky: str | None) -> Version | None:
        pick = self.tiers[tier].pick(sticky, self.router.rng)
        return None if pick is None else pick.version

    async def answer(
        self, request: web.Request, body: bytes, sticky: str | None, bulk: bool
    ) -> web.StreamResponse:
        """The cascade's answer to one ``POST /v1/caption`` (or ``/batch``)."""
        plan = self.plan
        assert plan is not None
        router = self.router
        fast = self._pick("fast", sticky)
        if fast is None:  # no fast version can take traffic: the quality tier answers alone
            alone, table = self._pick("quality", sticky), self.tiers["quality"]
            if alone is None:
                alone, table = router.pick(request, sticky, bulk=bulk), router.holder.table
            return await router.relay_caption(request, alone, body, bulk, table)
        outgoing = outgoing_of(request, body)
        first = await self._hop("fast", fast, outgoing, bulk)
        if first.error is not None or first.answer is None or first.answer.status != 200:
            return self._reply(request, first, None)
        verdicts = [plan.unsure(result) for result in _results(first.parsed)]
        if plan.threshold is not None and any(verdicts):
            return await self._escalate(request, first, outgoing, sticky, bulk)
        skipped: Skipped | None = None
        if plan.threshold is None:
            skipped = "no_threshold"
        elif None in verdicts:  # the fast answer has no value of the signal
            skipped = "no_signal"
        self.figures.outcome(skipped or "confident")
        return self._reply(request, first, _marker(first.parsed, escalated=False, skipped=skipped))

    async def _escalate(
        self, request: web.Request, first: _Hop, outgoing: Outgoing, sticky: str | None, bulk: bool
    ) -> web.StreamResponse:
        remaining_s = outgoing.deadline - time.monotonic()
        needed_s = self.figures.quality_estimate_ms(self.latency_quantile) / 1000 + self.reserve_s
        quality = self._pick("quality", sticky)
        if quality is None or remaining_s < needed_s:
            skipped: Skipped = "deadline" if quality is not None else "quality_failed"
            self.figures.outcome(skipped)
            return self._reply(request, first, _marker(first.parsed, escalated=False, skipped=skipped))
        hop_deadline = outgoing.deadline - self.reserve_s  # the fast answer can still be returned after
        second = await self._hop("quality", quality, _replace_deadline(outgoing, hop_deadline), bulk)
        if second.error is not None or second.answer is None or second.answer.status != 200:
            self.figures.outcome("quality_failed")
            return self._reply(
                request, first, _marker(first.parsed, escalated=False, skipped="quality_failed")
            )
        self.figures.outcome("escalated")
        return self._reply(request, second, _marker(second.parsed, escalated=True, fast=first.parsed))

    async def _hop(self, tier: str, version: Version, outgoing: Outgoing, bulk: bool) -> _Hop:
        """One tier's answer, counted in its version's figures and the tier's; a 200 caption answer
        to an interactive request observed as any other (confidence, shadow copies of the tier's
        mirrored canary: ``answers.py``)."""
        router = self.router
        started = time.monotonic()
        retries = 0

        def on_retry(reason: str) -> None:
            nonlocal retries
            retries += 1
            router.metrics.retries.labels(version=version.name, reason=reason).inc()

        hop = _Hop(version)
        router.metrics.in_flight.inc()
        try:
            hop.answer = await router.forwarder.forward(version, outgoing, on_retry)
            status, kind = hop.answer.status, "status_5xx" if hop.answer.status >= 500 else None
            if status == 200:
                hop.parsed = _parsed(hop.answer.body)
        except EdgeError as exc:
            hop.error = exc
            status, kind = exc.status, error_kind(exc)
        finally:
            router.metrics.in_flight.dec()
        hop.latency_ms = (time.monotonic() - started) * 1000
        router.count_answer(version.name, status, kind, started, retries, bulk)
        self.figures.hop(tier, hop.latency_ms, ok=status < 500 and (status != 200 or hop.parsed is not None))
        router.metrics.cascade_hop_latency.labels(tier=tier).observe(hop.latency_ms / 1000)
        if hop.parsed is not None and hop.answer is not None and not bulk:
            router.answers.answered(self.tiers[tier], version, outgoing, status, hop.answer.body)
        if status == 200 and hop.parsed is None:
            hop.answer = None  # a 200 that is no caption JSON: treated as the tier failing
            hop.error = None
        return hop

    def _reply(self, request: web.Request, hop: _Hop, body: Any) -> web.StreamResponse:
        """The hop's answer (``body``: with the cascade's fields), or its error in the contract's body."""
        if body is not None:
            self.router.metrics.cascade_requests.labels(outcome=_outcome_of(body)).inc()
        headers = {ROUTED_VERSION_HEADER: hop.version.name}
        if hop.answer is None:
            error = hop.error or BadUpstreamResponse("the runtime's answer is not a caption's JSON")
            return reply_for(error, {}).response(request[REQUEST_ID], headers)
        answer = hop.answer
        payload = answer.body if body is None else json.dumps(body).encode()
        response = web.Response(status=answer.status, body=payload, headers=answer.headers)
        response.headers[ROUTED_VERSION_HEADER] = hop.version.name
        if body is not None:
            response.headers["Content-Type"] = "application/json; charset=utf-8"
        return response


def _replace_deadline(outgoing: Outgoing, deadline: float) -> Outgoing:
    return Outgoing(
        outgoing.method, outgoing.path_qs, outgoing.headers, outgoing.body, outgoing.request_id, deadline
    )


def _parsed(body: bytes) -> Any:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _results(parsed: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The caption results of an answer: itself, or a batch's results that are not errors."""
    listed = parsed.get("results")
    if isinstance(listed, list):
        return [r for r in listed if isinstance(r, Mapping) and "error" not in r]
    return [parsed]


def _fast_confidence(parsed: Mapping[str, Any]) -> float | None:
    values = [r.get("confidence") for r in _results(parsed)]
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return min(numbers) if numbers else None


def _marker(
    parsed: dict[str, Any],
    *,
    escalated: bool,
    skipped: Skipped | None = None,
    fast: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``parsed`` with the cascade's fields (on each result of a batch too)."""
    confidences = [r.get("confidence") for r in _results(fast if fast is not None else parsed)]

    def marker_of(confidence: Any) -> dict[str, Any]:
        return {
            "escalated": escalated,
            "fast_confidence": confidence,
            **({"skipped": skipped} if skipped else {}),
        }

    body = dict(parsed)
    body["cascade"] = marker_of(_fast_confidence(fast if fast is not None else parsed))
    listed = body.get("results")
    if isinstance(listed, list):
        items = iter(confidences)
        body["results"] = [
            {**r, "cascade": marker_of(next(items, None))} if isinstance(r, dict) and "error" not in r else r
            for r in listed
        ]
    return body


def _outcome_of(body: Mapping[str, Any]) -> str:
    marker = body.get("cascade") or {}
    if marker.get("escalated"):
        return "escalated"
    return str(marker.get("skipped") or "confident")


def static_cascade(settings: RouterSettings) -> dict[str, Any] | None:
    """The ``--cascade-*`` options as a cascade entry (static routes only); None: no cascade."""
    if not settings.cascade_fast and not settings.cascade_quality:
        return None
    threshold = settings.cascade_threshold
    return {
        "fast": list(settings.cascade_fast),
        "quality": list(settings.cascade_quality),
        "threshold": None if threshold < 0 else threshold,
        "signal": settings.cascade_signal,
    }


def cascade_of_status(status: Any) -> dict[str, Any] | None:
    """The operator's ``status.cascade`` (``fastVersions``, ``qualityVersions``, ``threshold``,
    ``signal``) as a cascade entry; None: no cascade."""
    if not isinstance(status, Mapping):
        return None
    return {
        "fast": status.get("fastVersions"),
        "quality": status.get("qualityVersions"),
        "threshold": status.get("threshold"),
        "signal": status.get("signal"),
    }
