"""The kopf handlers: thin, each one calls a plain function of reconcile.py and posts its Events.

``build_registry`` returns a fresh registry, so the operator (and each test) runs exactly these
handlers with exactly its settings, never whatever is in kopf's global default registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, cast

import aiohttp
import kopf

from captionfleet.operator import analysis, figures, kube, metrics, reconcile
from captionfleet.operator import spec as s
from captionfleet.operator.builders.common import MANAGED_BY_LABEL, MANAGER, MODEL_LABEL, ClusterConfig
from captionfleet.operator.settings import OperatorSettings

FINALIZER = f"{s.GROUP}/cleanup"
RETRY_DELAY = 30.0
REPAIRS = {"Created", "Deleted", "ApplyFailed"}


def connection_info(credentials: kube.Credentials) -> kopf.ConnectionInfo:
    """kopf logs in with the same credentials as the operator's own calls."""
    return kopf.ConnectionInfo(**dataclasses.asdict(credentials))


def _post(body: Mapping[str, Any], events: list[reconcile.Event]) -> None:
    for event in events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, dict(body))),
            type=event.type,
            reason=event.reason,
            message=event.message,
        )


def build_registry(operator_settings: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    config = ClusterConfig.from_settings(operator_settings)
    locks: dict[str, asyncio.Lock] = {}  # one reconciliation at a time per CaptionModel

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Progress and the last handled spec live in annotations: the status is all ours.
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=s.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=s.GROUP, key="last-handled-configuration"
        )
        settings.posting.reporting_component = MANAGER
        settings.posting.level = logging.INFO
        configuration = kube.load_configuration(operator_settings.kubeconfig, operator_settings.context)
        memo.kube = kube.Kube(configuration)
        memo.metrics = metrics.OperatorMetrics()
        memo.metrics_server = None
        if operator_settings.metrics:
            memo.metrics_server = await metrics.serve(memo.metrics, operator_settings.metrics)
        memo.http = aiohttp.ClientSession()
        if operator_settings.analysis_prometheus_url:
            memo.figures = figures.Prometheus(memo.http, operator_settings.analysis_prometheus_url)
        else:
            memo.figures = figures.RouterStats(memo.http, memo.kube.router_endpoints)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        configuration = kube.load_configuration(operator_settings.kubeconfig, operator_settings.context)
        return connection_info(kube.credentials(configuration))

    @kopf.on.cleanup(registry=registry)
    async def close(memo: kopf.Memo, **_: Any) -> None:
        if "kube" in memo:
            memo.kube.close()
        if "http" in memo:
            await memo.http.close()
        if memo.get("metrics_server") is not None:
            await memo.metrics_server.cleanup()

    async def run(body: Mapping[str, Any], memo: kopf.Memo, *, resync: bool = False) -> None:
        async with locks.setdefault(body["metadata"]["uid"], asyncio.Lock()):
            outcome = await reconcile.reconcile(memo.kube, body, config)
        # A periodic resync reports only what it had to repair, not that all is still well.
        events = [e for e in outcome.events if not resync or e.reason in REPAIRS]
        _post(body, events)
        if outcome.retry:
            raise kopf.TemporaryError(outcome.retry, delay=RETRY_DELAY)

    @kopf.on.resume(s.GROUP, s.VERSION, s.PLURAL, registry=registry)
    @kopf.on.create(s.GROUP, s.VERSION, s.PLURAL, registry=registry)
    @kopf.on.update(s.GROUP, s.VERSION, s.PLURAL, registry=registry)
    async def reconcile_fleet(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await run(body, memo)

    if operator_settings.resync_seconds > 0:

        @kopf.timer(
            s.GROUP,
            s.VERSION,
            s.PLURAL,
            interval=operator_settings.resync_seconds,
            initial_delay=operator_settings.resync_seconds,
            registry=registry,
        )
        async def resync(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
            assert namespace is not None  # CaptionModels are namespaced
            fresh = await memo.kube.get(kube.CAPTION_MODEL, namespace, name)  # not the timer's old view
            if fresh is not None and not fresh["metadata"].get("deletionTimestamp"):
                await run(fresh, memo, resync=True)

    @kopf.daemon(s.GROUP, s.VERSION, s.PLURAL, cancellation_timeout=10.0, registry=registry)
    async def analyse_rollout(
        stopped: kopf.DaemonStopped, namespace: str | None, name: str, uid: str, memo: Any, **_: Any
    ) -> None:
        """Every rollout.analysis.interval, one check of the canary (when one is in rollout)."""
        assert namespace is not None  # CaptionModels are namespaced
        while not stopped:
            interval = analysis.IDLE_INTERVAL_S
            try:
                async with locks.setdefault(uid, asyncio.Lock()):
                    outcome = await analysis.check_once(
                        memo.kube, namespace, name, config, memo.figures, memo.metrics
                    )
                interval = outcome.interval_s
                if outcome.model is not None:
                    _post(outcome.model, outcome.events)
            except kube.KubeError as e:  # the API refused or was away: try again next interval
                logging.getLogger(__name__).warning("rollout check of %s/%s failed: %s", namespace, name, e)
            await stopped.wait(interval)

    @kopf.on.delete(s.GROUP, s.VERSION, s.PLURAL, registry=registry)
    async def delete_fleet(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        async with locks.setdefault(body["metadata"]["uid"], asyncio.Lock()):
            events = await reconcile.clean_up(memo.kube, body)
        locks.pop(body["metadata"]["uid"], None)
        _post(body, events)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        labels={MANAGED_BY_LABEL: MANAGER, MODEL_LABEL: kopf.PRESENT},
        registry=registry,
    )
    async def deployment_changed(
        namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
    ) -> None:
        assert namespace is not None  # Deployments are namespaced
        outcome = await reconcile.refresh_status(memo.kube, namespace, labels[MODEL_LABEL], config)
        if outcome.model is not None:
            _post(outcome.model, outcome.events)

    return registry
