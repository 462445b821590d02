"""Where the rollout analysis gets a version's figures over its window: the routers, or Prometheus.

``RouterStats`` asks every ready router pod of the fleet (the endpoints of the router's Service) for
``GET /v1/router/stats?window=<s>`` and adds their figures up; latency histograms add up too (the
routers share fixed buckets), and p99 is estimated from the sum as Prometheus does. A pod that does not
answer is left out and named in ``Reading.problems``; with no answer at all there are no figures.
``Prometheus`` asks a Prometheus server for the same counts from the routers' scraped metrics.

Both also give the mean confidence of the answers relayed (``captionfleet_router_answer_confidence``)
and, when ``Wanted`` asks, another version's figures (the stable's, for ``maxConfidenceDrop``) and the
version's shadow figures (its copies: errors, dropped, agreement, token overlap, p99).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from captionfleet.figures import ShadowCounts, quantile

TIMEOUT_S = 5.0
Endpoints = Callable[[str, str], Awaitable[list[str]]]  # (namespace, service) -> base URLs


@dataclass(slots=True)
class ShadowFigures(ShadowCounts):
    """The copies a version got in its shadow phase over the window, summed over every router."""

    p99_ms: float | None = None

    def as_live(self) -> Figures:
        """The copies as request figures (the error rate and p99 checks read these)."""
        return Figures(requests=self.copies, errors=self.errors, p99_ms=self.p99_ms)


@dataclass(frozen=True)
class Figures:
    """One version's figures over the analysis window, summed over every router."""

    requests: int
    errors: int
    p99_ms: float | None = None
    confidence: float | None = None  # mean of the 200 answers' confidence; None: none seen
    shadow: ShadowFigures | None = None

    @property
    def error_rate(self) -> float | None:
        """Percent of the requests that failed; None without requests."""
        return 100.0 * self.errors / self.requests if self.requests else None

    def describe(self) -> str:
        rate = self.error_rate
        text = f"{self.errors}/{self.requests} requests failed"
        text += f" ({rate:.2f} %)" if rate is not None else ""
        return text + (f", p99 {self.p99_ms:.0f} ms" if self.p99_ms is not None else "")


@dataclass(frozen=True)
class Reading:
    figures: Figures | None  # None: nobody answered
    problems: list[str] = field(default_factory=list)
    baseline: Figures | None = None  # the version asked for as ``baseline`` (the stable's confidence)


@dataclass(frozen=True)
class Wanted:
    """What a check needs besides the version's live figures."""

    baseline: str | None = None  # another version's figures too (maxConfidenceDrop: the stable)
    shadow: bool = False  # the version's shadow figures (its shadow phase)


class Source(Protocol):
    async def read(
        self, namespace: str, model: str, version: str, window_s: int, wanted: Wanted = Wanted()
    ) -> Reading: ...


class _Histogram:
    """Latency counts added up over routers; percentiles only when every router used the same bounds."""

    def __init__(self) -> None:
        self.bounds: list[float] | None = None
        self.counts: list[int] | None = None

    def add(self, bounds: list[float], counts: list[int]) -> None:
        if not counts:
            return
        if self.counts is None:
            self.bounds, self.counts = bounds, counts
        elif bounds == self.bounds and len(counts) == len(self.counts):
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        else:  # routers of different releases: counts still add up, percentiles do not
            self.bounds = []

    def p99(self) -> float | None:
        return quantile(self.bounds, self.counts, 0.99) if self.bounds and self.counts else None


def _counts(figures: Mapping[str, Any]) -> list[int]:
    return [int(n) for n in (figures.get("latency_ms") or {}).get("counts") or []]


def _sum_shadow(windows: Sequence[tuple[list[float], Mapping[str, Any]]]) -> ShadowFigures | None:
    """The shadow figures of one version over its routers' windows; None when no router has any."""
    summed, latency, seen = ShadowFigures(), _Histogram(), False
    for bounds, window in windows:
        shadow = window.get("shadow")
        if not isinstance(shadow, Mapping):
            continue
        seen = True
        summed.add_json(shadow)
        latency.add(bounds, _counts(shadow))
    if not seen:
        return None
    summed.p99_ms = latency.p99()
    return summed


def sum_router_stats(bodies: Sequence[Mapping[str, Any]], version: str) -> Figures:
    """The figures of ``version`` over the window, summed over the routers' stats bodies."""
    windows = [
        (
            [float(b) for b in body.get("latency_buckets_ms") or []],
            ((body.get("versions") or {}).get(version) or {}).get("window") or {},
        )
        for body in bodies
    ]
    requests = errors = confidences = 0
    confidence_sum, latency = 0.0, _Histogram()
    for bounds, window in windows:
        requests += int(window.get("requests") or 0)
        errors += int(window.get("errors") or 0)
        latency.add(bounds, _counts(window))
        confidence = window.get("confidence") or {}
        confidences += int(confidence.get("count") or 0)
        confidence_sum += float(confidence.get("sum") or 0.0)
    return Figures(
        requests=requests,
        errors=errors,
        p99_ms=latency.p99(),
        confidence=confidence_sum / confidences if confidences else None,
        shadow=_sum_shadow(windows),
    )


class RouterStats:
    """Figures from every router pod of the fleet (the router's Service is named after the model)."""

    def __init__(self, session: aiohttp.ClientSession, endpoints: Endpoints, port_name: str = "http") -> None:
        self.session = session
        self.endpoints = endpoints
        self.port_name = port_name

    async def _one(self, url: str, window_s: int, timeout_s: float = TIMEOUT_S) -> Mapping[str, Any]:
        async with self.session.get(
            f"{url}/v1/router/stats",
            params={"window": str(window_s)},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            body = await response.json(content_type=None)
        if not isinstance(body, dict) or not isinstance(body.get("versions"), dict):
            raise ValueError("not a router stats body")
        try:  # a body whose figures do not add up is left out like a router that did not answer
            for version in body["versions"]:
                sum_router_stats([body], version)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"router stats not understood: {e}") from e
        return body

    async def bodies(
        self, namespace: str, model: str, window_s: int, timeout_s: float = TIMEOUT_S
    ) -> tuple[list[Mapping[str, Any]], list[str]]:
        """The stats bodies of every router pod that answered, and a line per one that did not."""
        urls = await self.endpoints(namespace, model)
        if not urls:
            return [], [f"Service {namespace}/{model} has no ready router endpoints"]
        answers = await asyncio.gather(
            *(self._one(url, window_s, timeout_s) for url in urls), return_exceptions=True
        )
        bodies, problems = [], []
        for url, answer in zip(urls, answers, strict=True):
            if isinstance(answer, aiohttp.ClientError | TimeoutError | ValueError):
                problems.append(f"router {url}: {type(answer).__name__}: {answer}")
            elif isinstance(answer, BaseException):
                raise answer
            else:
                bodies.append(answer)
        return bodies, problems

    async def read(
        self, namespace: str, model: str, version: str, window_s: int, wanted: Wanted = Wanted()
    ) -> Reading:
        bodies, problems = await self.bodies(namespace, model, window_s)
        if not bodies:
            return Reading(None, problems)
        baseline = sum_router_stats(bodies, wanted.baseline) if wanted.baseline else None
        return Reading(sum_router_stats(bodies, version), problems, baseline)


def _sample(data: Any) -> float | None:
    """The value of a query answer's first sample; None without one (or NaN: no data in the window).
    What no counter or latency can be (not a number, infinite, negative) is an answer not understood:
    a ValueError, so the check has no figures rather than wrong ones."""
    result = data.get("result") if isinstance(data, dict) else None
    if result == []:
        return None
    if not result:
        raise ValueError(f"not a Prometheus query result: {str(data)[:200]}")
    sample = result[0].get("value") if isinstance(result, list) and isinstance(result[0], dict) else None
    if not isinstance(sample, list) or len(sample) != 2 or not isinstance(sample[1], str):
        raise ValueError(f"not a Prometheus vector sample: {str(result)[:200]}")
    value = float(sample[1])
    if math.isnan(value):
        return None
    if math.isinf(value) or value < 0:
        raise ValueError(f"sample {sample[1]!r} is no count or latency")
    return value


class Prometheus:
    """Figures from the routers' metrics as scraped by Prometheus (the chart's ServiceMonitor)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url.rstrip("/")

    async def _scalar(self, query: str) -> float | None:
        async with self.session.get(
            f"{self.url}/api/v1/query",
            params={"query": query},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        ) as response:
            body = await response.json(content_type=None)
        if not isinstance(body, dict):
            raise ValueError(f"HTTP {response.status}: not a Prometheus query answer: {str(body)[:200]}")
        if response.status != 200 or body.get("status") != "success":
            raise ValueError(f"HTTP {response.status}: {body.get('error') or body}"[:300])
        return _sample(body.get("data"))

    async def _increase(self, metric: str, labels: str, window_s: int) -> float:
        return await self._scalar(f"sum(increase({metric}{{{labels}}}[{window_s}s]))") or 0.0

    async def _p99_ms(self, histogram: str, labels: str, window_s: int) -> float | None:
        p99_s = await self._scalar(
            f"histogram_quantile(0.99, sum by (le) (rate({histogram}_bucket{{{labels}}}[{window_s}s])))"
        )
        return None if p99_s is None else p99_s * 1000

    async def _figures(self, labels: str, window_s: int, shadow: bool) -> Figures:
        confidences = await self._increase("captionfleet_router_answer_confidence_count", labels, window_s)
        confidence_sum = await self._increase("captionfleet_router_answer_confidence_sum", labels, window_s)
        return Figures(
            requests=round(await self._increase("captionfleet_router_requests_total", labels, window_s)),
            errors=round(await self._increase("captionfleet_router_upstream_errors_total", labels, window_s)),
            p99_ms=await self._p99_ms("captionfleet_router_request_duration_seconds", labels, window_s),
            confidence=confidence_sum / confidences if confidences else None,
            shadow=await self._shadow(labels, window_s) if shadow else None,
        )

    async def _shadow(self, labels: str, window_s: int) -> ShadowFigures:
        copies = "captionfleet_router_shadow_copies_total"
        counts = {
            outcome: round(await self._increase(copies, f'{labels},outcome="{outcome}"', window_s))
            for outcome in ("agree", "differ", "error")
        }
        return ShadowFigures(
            copies=sum(counts.values()),
            errors=counts["error"],
            dropped=round(await self._increase("captionfleet_router_shadow_dropped_total", labels, window_s)),
            compared=counts["agree"] + counts["differ"],
            exact=counts["agree"],
            overlap_sum=await self._increase(
                "captionfleet_router_shadow_token_overlap_sum", labels, window_s
            ),
            p99_ms=await self._p99_ms("captionfleet_router_shadow_duration_seconds", labels, window_s),
        )

    async def read(
        self, namespace: str, model: str, version: str, window_s: int, wanted: Wanted = Wanted()
    ) -> Reading:
        def labels(of: str) -> str:
            return f'namespace="{namespace}",captionmodel="{model}",version="{of}"'

        try:
            figures = await self._figures(labels(version), window_s, wanted.shadow)
            baseline = (
                await self._figures(labels(wanted.baseline), window_s, False) if wanted.baseline else None
            )
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as e:
            return Reading(None, [f"Prometheus {self.url}: {type(e).__name__}: {e}"])
        return Reading(figures, baseline=baseline)
