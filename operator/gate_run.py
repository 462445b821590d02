"""One run of the quality gate: the dataset, the captions of the canary (and the stable version), the verdict.

The operator calls the versions' runtimes itself, through the ready pods of each version's Service (its
EndpointSlices, as the analysis finds the routers), with the public caption API: every image is a raw
``POST /v1/caption`` with ``X-Priority: bulk``, so the runtimes never count it as interactive traffic
(the queue depth the autoscaler sees) and no router sees it at all (the rollout's figures stay the
clients'). The captions are scored by ``captionfleet.scoring``, the code ``captionfleet eval`` scores
with. Why not a Job in the runtime image: the operator would wait on a pod start and a model load, and
parse a log; here the canary's own pods answer, so what is scored is exactly what clients would get.

With ``spec.auth`` the pods want an API key: the gate sends the operator's own key for this CaptionModel
(``operator_key.py``; the builders gave the runtimes its digest). Without an operator key the gate does
not run at all (``NoOperatorKey``): it would only collect 401s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from captionfleet import evalsets, names
from captionfleet.operator import gate, kube
from captionfleet.operator.builders.common import version_service
from captionfleet.operator.operator_key import OperatorKey
from captionfleet.operator.spec import CaptionModelSpec, QualityGate, seconds
from captionfleet.scoring import metric_value, score_captions

CONFIG_MAP = kube.Kind("v1", "ConfigMap", "configmaps")
Endpoints = Callable[[str, str], Awaitable[list[str]]]  # (namespace, service) -> base URLs of ready pods
CONCURRENCY = 4  # caption requests in flight per version: the gate must not crowd out a shared stable
BUSY_STATUSES = (429, 503)  # asked to come back: the image is sent again (within the timeout)
RETRY_DELAY_S = 0.2


# A pod with spec.auth that does not (yet) take the operator's key: e.g. one started before the
# operator had a key, still serving until its Deployment's rollout replaces it.
REFUSED_STATUSES = (401, 403)


class NotReady(Exception):
    """A version the gate needs has no ready pod (yet), or refuses the gate's requests."""


@dataclass(frozen=True)
class GateClients:
    http: aiohttp.ClientSession
    endpoints: Endpoints
    operator_key: OperatorKey | None = None  # None: the gate cannot pass spec.auth


@dataclass(frozen=True)
class Caller:
    """How the gate's requests reach one CaptionModel's pods: the HTTP session and the headers they
    all carry (the operator's key with spec.auth: never logged, never in a message)."""

    http: aiohttp.ClientSession
    headers: dict[str, str] = field(repr=False)

    @classmethod
    def of(cls, clients: GateClients, namespace: str, model: str, spec: CaptionModelSpec) -> Caller:
        headers = {names.PRIORITY_HEADER: "bulk"}
        if spec.auth is not None and clients.operator_key is not None:
            headers[names.API_KEY_HEADER] = clients.operator_key.key_for(namespace, model)
        return cls(clients.http, headers)


async def load_dataset(api: kube.Api, namespace: str, dataset: str) -> list[evalsets.EvalImage]:
    if dataset == evalsets.BUILTIN_SCENES:
        try:
            return evalsets.builtin_scenes()
        except OSError as exc:  # a broken install: said on the CaptionModel, not a crashed check
            raise evalsets.DatasetError(f"{dataset} is not installed with the operator: {exc}") from exc
    name = dataset.removeprefix(evalsets.CONFIGMAP_PREFIX)
    found = await api.get(CONFIG_MAP, namespace, name)
    if found is None:
        raise evalsets.DatasetError(f"ConfigMap {name} (dataset {dataset}) does not exist")
    return evalsets.configmap_images(found)


async def _caption(caller: Caller, url: str, image: bytes, deadline: float) -> str | None:
    """One image's caption from one pod; None when the runtime answered with an error.

    A 429 is waited out like a 503: with spec.auth, a pod whose failed-key bucket the operator's
    address emptied (while it refused the key) answers 429 until a token is back (a second or so), then
    either takes the key or answers 401 again, which ends the run (no verdict)."""
    while True:
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        headers = {
            **caller.headers,
            "Content-Type": "application/octet-stream",
            names.TIMEOUT_HEADER: str(left_ms),
        }
        async with caller.http.post(f"{url}/v1/caption", data=image, headers=headers) as response:
            if response.status in BUSY_STATUSES and time.monotonic() + RETRY_DELAY_S < deadline:
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if response.status in REFUSED_STATUSES:
                raise NotReady(
                    f"{url} refused the gate's requests (HTTP {response.status}): it does not take the "
                    "operator's key yet (a pod started before the key's digest was in its Deployment?)"
                )
            if response.status != 200:
                return None
            body: Any = await response.json()
            caption = body.get("caption") if isinstance(body, dict) else None
            return caption if isinstance(caption, str) else None


async def caption_all(
    caller: Caller, pods: Sequence[str], images: Sequence[evalsets.EvalImage], deadline: float
) -> dict[str, str | None]:
    """Every image's caption, spread over the version's pods, CONCURRENCY at once."""
    slots = asyncio.Semaphore(CONCURRENCY)
    turn = itertools.cycle(pods)
    refused: list[NotReady] = []

    async def one(item: evalsets.EvalImage) -> tuple[str, str | None]:
        async with slots:
            if refused:
                return item.key, None  # no point asking again
            try:
                return item.key, await _caption(caller, next(turn), item.image, deadline)
            except (aiohttp.ClientError, ValueError):
                return item.key, None
            except NotReady as exc:
                refused.append(exc)
                return item.key, None

    captions = dict(await asyncio.gather(*(one(item) for item in images)))
    if refused:
        raise refused[0]
    return captions


async def _score(
    clients: GateClients,
    caller: Caller,
    namespace: str,
    service: str,
    spec: QualityGate,
    images: Sequence[Any],
    deadline: float,
) -> tuple[float, int]:
    """The gate's metric for one version, and how many of its caption requests failed."""
    pods = await clients.endpoints(namespace, service)
    if not pods:
        raise NotReady(f"{service} has no ready pod")
    captions = await caption_all(caller, pods, images, deadline)
    references = {item.key: list(item.references) for item in images}
    scores = score_captions({key: text or "" for key, text in captions.items()}, references)
    return metric_value(scores, spec.metric), sum(text is None for text in captions.values())


async def measure(
    clients: GateClients, api: kube.Api, namespace: str, model: str, spec: CaptionModelSpec
) -> gate.Measured:
    """Score the canary (and with maxDrop the stable version) on the gate's dataset."""
    quality = spec.rollout.quality_gate
    canary, stable = spec.canary(), spec.stable()
    assert quality is not None and canary is not None and stable is not None
    began = time.monotonic()
    deadline = began + seconds(quality.timeout)
    images = await load_dataset(api, namespace, quality.dataset)
    caller = Caller.of(clients, namespace, model, spec)
    service = version_service(model, canary.name)
    score, failed = await _score(clients, caller, namespace, service, quality, images, deadline)
    stable_score = None
    if quality.max_drop is not None:
        service = version_service(model, stable.name)
        stable_score, _ = await _score(clients, caller, namespace, service, quality, images, deadline)
    if time.monotonic() > deadline:
        raise TimeoutError
    return gate.Measured(len(images), score, stable_score, time.monotonic() - began, failed)


async def run(
    clients: GateClients, api: kube.Api, body: dict[str, Any], spec: CaptionModelSpec, now: str
) -> gate.GateOutcome | None:
    """One run of the gate and its verdict; None while the canary has no ready pod (nothing to score)."""
    quality, canary = spec.rollout.quality_gate, spec.canary()
    assert quality is not None and canary is not None
    namespace, model = body["metadata"]["namespace"], body["metadata"]["name"]
    if spec.auth is not None and clients.operator_key is None:
        return gate.no_operator_key(quality, canary.name, now)
    if not await clients.endpoints(namespace, version_service(model, canary.name)):
        return None
    try:
        async with asyncio.timeout(seconds(quality.timeout)):
            measured = await measure(clients, api, namespace, model, spec)
    except TimeoutError:
        return gate.timed_out(quality, canary.name, now)
    except (evalsets.DatasetError, NotReady) as exc:
        return gate.unjudged(quality, canary.name, str(exc), now)
    return gate.judge(quality, canary.name, measured, now)
