"""The kopf handlers: thin module-level functions, each calling a plain function and posting its Events.

``build_registry`` registers exactly these on a fresh registry, so the operator (and each test) runs
them with its own settings, never whatever is in kopf's global default registry. Every handler gets
the operator's typed context (``context.OperatorContext``) as kopf's ``memo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiohttp
import kopf

from captionfleet import names
from captionfleet.names import MANAGED_BY_LABEL, MANAGER, MODEL_LABEL
from captionfleet.operator import analysis, cascade_check, demand, figures, kube, metrics, reconcile
from captionfleet.operator.context import Clients, OperatorContext
from captionfleet.operator.events import REPAIRS, Event
from captionfleet.operator.secrecy import redacted
from captionfleet.operator.settings import OperatorSettings

FINALIZER = f"{names.GROUP}/cleanup"
RETRY_DELAY = 30.0
TIMER_EXIT_POLL_S = 1.0
CAPTION_MODELS = (names.GROUP, names.VERSION, names.PLURAL)
log = logging.getLogger(__name__)


def connection_info(credentials: kube.Credentials) -> kopf.ConnectionInfo:
    """kopf logs in with the same credentials as the operator's own calls."""
    return kopf.ConnectionInfo(**dataclasses.asdict(credentials))


class RedactedDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled-configuration, with the user-info of URLs blanked: the stored essence and
    the one compared with it are built alike, so a change is still a change, but no password is kept."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        return cast(kopf.BodyEssence, redacted(dict(essence)))


def _post(body: Mapping[str, Any], events: list[Event]) -> None:
    for event in events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, dict(body))),
            type=event.type,
            reason=str(event.reason),
            message=event.message,
        )


async def configure(settings: kopf.OperatorSettings, memo: OperatorContext, **_: Any) -> None:
    """Startup: kopf's storage, and the clients every handler shares."""
    # Progress and the last handled spec live in annotations: the status is all ours.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = RedactedDiffBase(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = MANAGER
    # A deletion waits for the pod-check timer to finish a tick: look again every second, not minute.
    settings.background.cancellation_polling = TIMER_EXIT_POLL_S
    settings.posting.level = logging.INFO
    options = memo.settings
    api = kube.Kube(kube.load_configuration(options.kubeconfig, options.context))
    operator_metrics = metrics.OperatorMetrics()
    http = aiohttp.ClientSession()
    routers = figures.RouterStats(http, api.router_endpoints)
    source: figures.Source = routers
    if options.analysis_prometheus_url:
        source = figures.Prometheus(http, options.analysis_prometheus_url)
    memo.clients = Clients(api, http, source, operator_metrics, routers)
    if options.metrics:
        memo.clients.metrics_server = await metrics.serve(operator_metrics, options.metrics)


def login(memo: OperatorContext, **_: Any) -> kopf.ConnectionInfo:
    configuration = kube.load_configuration(memo.settings.kubeconfig, memo.settings.context)
    return connection_info(kube.credentials(configuration))


async def close(memo: OperatorContext, **_: Any) -> None:
    clients = memo.clients
    if clients is None:
        return
    clients.kube.close()
    await clients.http.close()
    if clients.metrics_server is not None:
        await clients.metrics_server.cleanup()


async def _reconcile(body: Mapping[str, Any], memo: OperatorContext, *, resync: bool = False) -> None:
    uid = body["metadata"]["uid"]
    async with memo.lock(uid):
        outcome = await reconcile.reconcile(memo.require().kube, body, memo.config)
    memo.wakeup(uid).set()  # the analysis daemon looks at the new spec now, not an interval later
    memo.demand_wakeup(uid).set()
    # A periodic resync reports only what it had to repair, not that all is still well.
    _post(body, [e for e in outcome.events if not resync or e.reason in REPAIRS])
    if outcome.retry:
        raise kopf.TemporaryError(outcome.retry, delay=RETRY_DELAY)


async def reconcile_fleet(body: kopf.Body, memo: OperatorContext, **_: Any) -> None:
    await _reconcile(body, memo)


async def rollout_action(body: kopf.Body, memo: OperatorContext, **_: Any) -> None:
    """The rollout-action annotation was set. kopf's diff of the spec does not see it (it ignores every
    annotation under the prefix of its own, captionfleet.io/), so no update handler runs: act now."""
    await _reconcile(body, memo)


async def resync(namespace: str | None, name: str, memo: OperatorContext, **_: Any) -> None:
    assert namespace is not None  # CaptionModels are namespaced
    fresh = await memo.require().kube.get(kube.CAPTION_MODEL, namespace, name)  # not the timer's old view
    if fresh is not None and not fresh["metadata"].get("deletionTimestamp"):
        await _reconcile(fresh, memo, resync=True)


async def _sleep(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float) -> None:
    """Until ``seconds`` pass, the daemon is stopped, or a reconciliation wakes it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await _either(stopped, wakeup)
    wakeup.clear()


async def _either(stopped: kopf.DaemonStopped, wakeup: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(stopped.wait()), asyncio.ensure_future(wakeup.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class _Step(Protocol):
    interval_s: float
    events: list[Event]
    model: dict[str, Any] | None


def analyse_rollout(memo: OperatorContext, namespace: str, name: str) -> Awaitable[_Step]:
    """One check of the canary every rollout.analysis.interval while one is in rollout; idle otherwise."""
    return analysis.check_once(memo.tools(), namespace, name)


def watch_demand(memo: OperatorContext, namespace: str, name: str) -> Awaitable[_Step]:
    """Scale to zero and back: one demand poll of the routers per interval (fast while a version is cold)."""
    return demand.poll_once(memo.polling(), namespace, name)


def watch_cascade(memo: OperatorContext, namespace: str, name: str) -> Awaitable[_Step]:
    """The cascade's threshold and figures in status.cascade, every rollout.analysis.interval."""
    clients = memo.require()
    return cascade_check.refresh(clients.kube, clients.http, memo.config, namespace, name)


@dataclass(frozen=True)
class Periodic:
    """A daemon per CaptionModel that runs ``step`` (its kopf id is the step's name) every interval the
    step asks for, under the CaptionModel's lock."""

    step: Callable[[OperatorContext, str, str], Awaitable[_Step]]  # (memo, namespace, name)
    what: str  # named in the log when a step fails
    retry_s: float  # the pause after a failed step
    wakeup: Callable[[OperatorContext, str], asyncio.Event] | None = None
    """The event (of the CaptionModel's uid) a reconciliation sets to cut the pause short; None: none."""


DAEMONS = (
    Periodic(analyse_rollout, "rollout check", analysis.IDLE_INTERVAL_S, OperatorContext.wakeup),
    Periodic(watch_demand, "demand poll", demand.NOTHING_TO_WATCH_S, OperatorContext.demand_wakeup),
    Periodic(watch_cascade, "cascade", cascade_check.IDLE_S),
)


async def run_periodic(
    daemon: Periodic,
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    uid: str,
    memo: OperatorContext,
    **_: Any,
) -> None:
    """A daemon's loop: one step under the CaptionModel's lock, its Events posted, a pause of the
    interval it asks for (an API error is logged and the step tried again after ``retry_s``)."""
    assert namespace is not None  # CaptionModels are namespaced
    what = f"{daemon.what} of {namespace}/{name}"
    while not stopped:
        interval = daemon.retry_s
        try:
            async with memo.lock(uid):
                outcome = await daemon.step(memo, namespace, name)
            interval = outcome.interval_s
            if outcome.model is not None:
                _post(outcome.model, outcome.events)
        except kube.KubeError as e:  # the API refused or was away: try again next interval
            log.warning("%s failed: %s", what, e)
        if daemon.wakeup is None:
            await stopped.wait(interval)
        else:
            await _sleep(stopped, daemon.wakeup(memo, uid), interval)


async def delete_fleet(body: kopf.Body, memo: OperatorContext, **_: Any) -> None:
    uid = body["metadata"]["uid"]
    async with memo.lock(uid):
        events = await reconcile.clean_up(memo.require().kube, body)
    memo.forget(uid)
    _post(body, events)


async def _refresh(namespace: str, name: str, memo: OperatorContext) -> None:
    outcome = await reconcile.refresh_status(memo.require().kube, namespace, name, memo.config)
    if outcome.model is not None:
        _post(outcome.model, outcome.events)


async def child_changed(
    namespace: str | None, labels: Mapping[str, str], memo: OperatorContext, **_: Any
) -> None:
    """A Deployment or a pod of a fleet changed: its status may say something new."""
    assert namespace is not None  # Deployments and pods are namespaced
    await _refresh(namespace, labels[MODEL_LABEL], memo)


async def check_pods(namespace: str | None, name: str, memo: OperatorContext, **_: Any) -> None:
    """A fleet that is not Ready: read its pods again (a FailedMount Event changes no pod)."""
    assert namespace is not None  # CaptionModels are namespaced
    await _refresh(namespace, name, memo)


def not_ready(status: Mapping[str, Any], **_: Any) -> bool:
    return status.get("phase") not in ("Ready", "Invalid", None)


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """A registry of the handlers above; ``settings`` decide the optional resync timer."""
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(close)
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(*CAPTION_MODELS, registry=registry)(reconcile_fleet)
    if settings.resync_seconds > 0:
        every = settings.resync_seconds
        kopf.timer(*CAPTION_MODELS, interval=every, initial_delay=every, registry=registry)(resync)
    action: Mapping[str, Any] = {names.ROLLOUT_ACTION_ANNOTATION: kopf.PRESENT}
    kopf.on.event(*CAPTION_MODELS, annotations=action, registry=registry)(rollout_action)
    for daemon in DAEMONS:
        run = functools.partial(run_periodic, daemon)
        handler_id = daemon.step.__name__
        kopf.daemon(*CAPTION_MODELS, id=handler_id, cancellation_timeout=10.0, registry=registry)(run)
    kopf.on.delete(*CAPTION_MODELS, registry=registry)(delete_fleet)
    ours: Mapping[str, Any] = {MANAGED_BY_LABEL: MANAGER, MODEL_LABEL: kopf.PRESENT}
    kopf.on.event("apps", "v1", "deployments", labels=ours, registry=registry)(child_changed)
    kopf.on.event("", "v1", "pods", labels=ours, registry=registry)(child_changed)
    if settings.pod_check_seconds > 0:
        every = settings.pod_check_seconds
        kopf.timer(*CAPTION_MODELS, interval=every, when=not_ready, registry=registry)(check_pods)
    return registry
