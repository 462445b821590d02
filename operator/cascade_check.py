"""The cascade's daemon (``handlers.watch_cascade``): resolve the threshold, read the figures, write them.

Every ``rollout.analysis.interval`` while a CaptionModel has a cascade (every second while its
threshold is not resolved yet; a CaptionModel without one is looked at every minute), under the same
lock as the reconciliations, so neither overwrites the other:

- with ``targetEscalationRate`` and no threshold yet (or another fast version or rate), read the fast
  version's calibration from ``GET /v1/models`` of one of its ready pods (the endpoints of its Service)
  and write the resolved threshold into ``status.cascade`` (an Event says so; a calibration that is
  missing or unusable gets a Warning Event, once per message, and the status says why);
- read the cascade's figures over ``rollout.analysis.window`` from every router pod
  (``GET /v1/router/stats``, its ``cascade`` part) and write their sum into ``status.cascade.figures``.

A merge patch of ``status.cascade`` alone: the rest of the status stays the reconciliation's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from captionfleet import names
from captionfleet.figures import quantile
from captionfleet.operator import kube, reconcile, validation
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.cascade import (
    CascadeFigures,
    CascadeStatus,
    TierFigures,
    threshold_from_calibration,
)
from captionfleet.operator.events import Event, Reason
from captionfleet.operator.spec import CaptionModelSpec, seconds

log = logging.getLogger(__name__)
TIMEOUT_S = 5.0
IDLE_S = 60.0  # how often a CaptionModel without a cascade is looked at again
PENDING_S = 1.0  # ... one whose cascade has no status or threshold yet


async def _get_json(http: aiohttp.ClientSession, url: str, params: Mapping[str, str] | None = None) -> Any:
    async with http.get(url, params=params, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as response:
        if response.status != 200:
            raise ValueError(f"{url}: HTTP {response.status}")
        return await response.json(content_type=None)


async def _endpoints(api: kube.Api, namespace: str, service: str) -> list[str]:
    """Base URLs of the ready pods behind a Service, from its EndpointSlices."""
    slices = await api.list(kube.ENDPOINT_SLICE, namespace, {names.SERVICE_NAME_LABEL: service})
    return names.ready_endpoints(slices, names.HTTP_PORT_NAME)


async def read_calibration(http: aiohttp.ClientSession, urls: Sequence[str]) -> Any:
    """The ``calibration`` a fast runtime shows in ``GET /v1/models`` (top level, or its model's)."""
    problems = []
    for url in urls:
        try:
            body = await _get_json(http, f"{url}/v1/models")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            problems.append(f"{type(e).__name__}: {e}")
            continue
        if isinstance(body, Mapping):
            models = body.get("models") or [{}]
            first = (
                models[0] if isinstance(models, list) and models and isinstance(models[0], Mapping) else {}
            )
            return body.get("calibration") or first.get("calibration")
    raise ValueError("; ".join(problems) or "the fast version has no ready pod yet")


def sum_cascade_figures(bodies: Sequence[Mapping[str, Any]], window_s: int, now: str) -> CascadeFigures:
    """The routers' ``cascade`` stats added up (latency histograms too: the routers share buckets)."""
    totals = {"requests": 0, "escalated": 0, "deadline": 0, "quality_failed": 0}
    tiers: dict[str, tuple[int, list[int]]] = {}
    bounds: list[float] = []
    for body in bodies:
        part = body.get("cascade") or {}
        totals["requests"] += int(part.get("requests") or 0)
        totals["escalated"] += int(part.get("escalated") or 0)
        for outcome in ("deadline", "quality_failed"):
            totals[outcome] += int((part.get("outcomes") or {}).get(outcome) or 0)
        bounds = [float(b) for b in body.get("latency_buckets_ms") or []]
        for key, figures in (part.get("tiers") or {}).items():
            seen, counts = tiers.get(key, (0, []))
            these = [int(n) for n in figures.get("counts") or []]
            counts = [a + b for a, b in zip(counts, these, strict=True)] if counts else these
            tiers[key] = (seen + int(figures.get("requests") or 0), counts)

    def tier(name: str) -> TierFigures:
        requests, counts = tiers.get(name, (0, []))
        if not counts or not bounds:
            return TierFigures(requests=requests)
        return TierFigures(
            requests=requests, p50_ms=quantile(bounds, counts, 0.5), p99_ms=quantile(bounds, counts, 0.99)
        )

    requests = totals["requests"]
    return CascadeFigures(
        window_s=window_s,
        requests=requests,
        escalated=totals["escalated"],
        escalation_rate=round(totals["escalated"] / requests, 6) if requests else None,
        skipped_deadline=totals["deadline"],
        skipped_quality_failed=totals["quality_failed"],
        fast=tier("fast"),
        quality=tier("quality"),
        updated=now,
    )


async def _threshold(
    api: kube.Api,
    http: aiohttp.ClientSession,
    namespace: str,
    name: str,
    spec: CaptionModelSpec,
    status: CascadeStatus,
) -> tuple[dict[str, Any], list[Event]]:
    """What to patch into status.cascade about the threshold, and the Events to post."""
    rate = spec.cascade.target_escalation_rate if spec.cascade else None
    if rate is None or status.threshold is not None:
        return {}, []
    urls = await _endpoints(api, namespace, f"{name}-{status.fast_version}")
    try:
        threshold, signal = threshold_from_calibration(await read_calibration(http, urls), rate)
    except ValueError as e:
        message = f"the threshold for targetEscalationRate {rate} is not resolved: {e}"
        if message == status.message:
            return {}, []
        return {"message": message}, [Event.warning(Reason.CASCADE_CALIBRATION, message)]
    sign = "below" if signal == "confidence" else "above"
    message = (
        f"escalated {sign} {signal} {threshold} (targetEscalationRate {rate}, the fast model's calibration)"
    )
    patch = {"threshold": threshold, "signal": signal, "message": message}
    return patch, [Event.normal(Reason.CASCADE_THRESHOLD, message)]


async def _figures(
    api: kube.Api, http: aiohttp.ClientSession, namespace: str, name: str, window_s: int, now: str
) -> CascadeFigures | None:
    bodies = []
    for url in await _endpoints(api, namespace, name):  # the router's Service has the model's name
        try:
            body = await _get_json(http, f"{url}/v1/router/stats", {"window": str(window_s)})
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("cascade figures incomplete", extra={"router": url, "problem": str(e)})
            continue
        if isinstance(body, Mapping) and isinstance(body.get("cascade"), Mapping):
            bodies.append(body)
    return sum_cascade_figures(bodies, window_s, now) if bodies else None


@dataclass
class CascadeOutcome:
    interval_s: float = IDLE_S  # when to look again
    events: list[Event] = field(default_factory=list)
    model: dict[str, Any] | None = None  # the CaptionModel the events are about


async def refresh(
    api: kube.Api, http: aiohttp.ClientSession, config: ClusterConfig, namespace: str, name: str
) -> CascadeOutcome:
    """One look at the cascade of CaptionModel ``name``: the threshold resolved, the figures written."""
    body = await api.get(kube.CAPTION_MODEL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return CascadeOutcome()
    spec, problems = validation.check(name, body.get("spec"), config)
    if problems or spec is None or spec.cascade is None:
        return CascadeOutcome()
    stored = (body.get("status") or {}).get("cascade")
    if not isinstance(stored, Mapping):
        return CascadeOutcome(PENDING_S)  # the reconciliation writes it first
    status = CascadeStatus.model_validate(stored)
    patch, events = await _threshold(api, http, namespace, name, spec, status)
    window_s = max(1, round(seconds(spec.rollout.analysis.window)))
    figures = await _figures(api, http, namespace, name, window_s, reconcile.now())
    if figures is not None:
        patch["figures"] = figures.model_dump(by_alias=True, mode="json")
    if patch:
        await api.patch_status(kube.CAPTION_MODEL, namespace, name, {"cascade": patch})
    interval = seconds(spec.rollout.analysis.interval)
    if status.threshold is None and "threshold" not in patch:
        interval = min(interval, PENDING_S)  # the fast version's pods may be ready any moment
    return CascadeOutcome(interval, events, body)
