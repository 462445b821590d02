"""Where the rollout analysis gets a version's figures over its window: the routers, or Prometheus.

``RouterStats`` asks every ready router pod of the fleet (the endpoints of the router's Service) for
``GET /v1/router/stats?window=<s>`` and adds their figures up; latency histograms add up too (the
routers share fixed buckets), and p99 is estimated from the sum as Prometheus does. A pod that does not
answer is left out and named in ``Reading.problems``; with no answer at all there are no figures.
``Prometheus`` asks a Prometheus server for the same counts from the routers' scraped metrics.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

TIMEOUT_S = 5.0
Endpoints = Callable[[str, str], Awaitable[list[str]]]  # (namespace, service) -> base URLs


@dataclass(frozen=True)
class Figures:
    """One version's figures over the analysis window, summed over every router."""

    requests: int
    errors: int
    p99_ms: float | None = None

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


class Source(Protocol):
    async def read(self, namespace: str, model: str, version: str, window_s: int) -> Reading: ...


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile from a histogram (``counts`` has one more slot than ``bounds``: above the last)."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = bounds[index - 1] if index > 0 else 0.0
            if index == len(bounds):
                return float(lower)
            return float(lower + (bounds[index] - lower) * (rank - seen) / count)
        seen += count
    return float(bounds[-1])


def sum_router_stats(bodies: Sequence[Mapping[str, Any]], version: str) -> Figures:
    """The figures of ``version`` over the window, summed over the routers' stats bodies."""
    requests = errors = 0
    bounds: list[float] | None = None
    counts: list[int] | None = None
    for body in bodies:
        window = ((body.get("versions") or {}).get(version) or {}).get("window") or {}
        requests += int(window.get("requests") or 0)
        errors += int(window.get("errors") or 0)
        these = [int(n) for n in (window.get("latency_ms") or {}).get("counts") or []]
        body_bounds = [float(b) for b in body.get("latency_buckets_ms") or []]
        if not these:
            continue
        if counts is None:
            bounds, counts = body_bounds, these
        elif body_bounds == bounds and len(these) == len(counts):
            counts = [a + b for a, b in zip(counts, these, strict=True)]
        else:  # routers of different releases: counts still add up, percentiles do not
            bounds = []
    p99 = quantile(bounds, counts, 0.99) if bounds and counts else None
    return Figures(requests=requests, errors=errors, p99_ms=p99)


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

    async def read(self, namespace: str, model: str, version: str, window_s: int) -> Reading:
        bodies, problems = await self.bodies(namespace, model, window_s)
        if not bodies:
            return Reading(None, problems)
        return Reading(sum_router_stats(bodies, version), problems)


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
        if response.status != 200 or body.get("status") != "success":
            raise ValueError(f"HTTP {response.status}: {body.get('error') or body}")
        result = (body.get("data") or {}).get("result") or []
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    async def read(self, namespace: str, model: str, version: str, window_s: int) -> Reading:
        labels = f'namespace="{namespace}",captionmodel="{model}",version="{version}"'
        try:
            requests = await self._scalar(
                f"sum(increase(captionfleet_router_requests_total{{{labels}}}[{window_s}s]))"
            )
            errors = await self._scalar(
                f"sum(increase(captionfleet_router_upstream_errors_total{{{labels}}}[{window_s}s]))"
            )
            p99_s = await self._scalar(
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(captionfleet_router_request_duration_seconds_bucket{{{labels}}}[{window_s}s])))"
            )
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as e:
            return Reading(None, [f"Prometheus {self.url}: {type(e).__name__}: {e}"])
        return Reading(
            Figures(
                requests=round(requests or 0),
                errors=round(errors or 0),
                p99_ms=None if p99_s is None else p99_s * 1000,
            )
        )
