"""The routing table from the cluster: the CaptionModel's status, and the endpoints of its versions.

The operator writes the effective weights into ``status.versions[]`` (``name``, ``role``, ``weight``,
``service``, ``readyReplicas``, ``coldStart``: held through a cold start, no fallback; ``mirror``: a
canary in its shadow phase; see
``captionfleet.operator.status``). The router watches that one
object and the namespace's EndpointSlices, read-only, and rebuilds its table on every change, so a
rollback the operator writes reaches every router replica as fast as the API server tells them.

Each version's endpoints are the ready addresses of its Service's EndpointSlices (label
``kubernetes.io/service-name``), port ``http`` (the parsing is ``captionfleet.names``', shared with the
operator): the router balances over the pods itself, and a retry
goes to another pod. While no EndpointSlice of a Service is known (not created yet, or the router may
not read them) the version is reached through the Service's DNS name, ``http://<service>.<ns>.svc:8080``,
if its status says it has ready replicas.

Until the CaptionModel has been read, the table is empty (``/readyz`` says 503); when the API server is
unreachable, the last table stays in use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from captionfleet.names import captionmodels_path, endpoints_by_service
from captionfleet.runtime.router.cascade import cascade_of_status, with_cascade
from captionfleet.runtime.router.kube import KubeApi, Reflector
from captionfleet.runtime.router.sources import TableHolder
from captionfleet.runtime.router.table import RoutingTable, TableError, from_mapping

log = logging.getLogger(__name__)


def endpointslices_path(namespace: str) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


def table_from_status(
    model: Mapping[str, Any] | None,
    endpoints: Mapping[str, list[str]] | None,
    *,
    namespace: str,
    service_port: int,
) -> RoutingTable:
    """The table of one CaptionModel object; ``endpoints`` by Service (None: EndpointSlices unknown)."""
    if model is None:
        return RoutingTable.empty("no CaptionModel")
    meta = model.get("metadata") or {}
    name = str(meta.get("name") or "")
    status = model.get("status") or {}
    entries = []
    for item in status.get("versions") or []:
        if not isinstance(item, Mapping):
            raise TableError("status.versions[] must hold mappings")
        version = str(item.get("name") or "")
        service = str(item.get("service") or f"{name}-{version}")
        if endpoints is not None and service in endpoints:
            urls = list(endpoints[service])
        elif item.get("readyReplicas", 1):  # unknown counts as ready: the Service decides then
            urls = [f"http://{service}.{namespace}.svc:{service_port}"]
        else:
            urls = []
        entry: dict[str, Any] = {"name": version, "weight": item.get("weight", 0), "endpoints": urls}
        if item.get("role") is not None:
            entry["role"] = item["role"]
        if item.get("mirror"):
            entry["mirror"] = item["mirror"]
        if item.get("coldStart") is not None:  # the operator's: the version may be scaled to zero
            entry["cold_start"] = item["coldStart"]
        entries.append(entry)
    canary = status.get("canaryVersion")
    table = from_mapping(entries, source=f"CaptionModel {namespace}/{name}", canary=canary or None)
    return with_cascade(table, cascade_of_status(status.get("cascade")))


class CaptionModelSource:
    """Watches one CaptionModel and the namespace's EndpointSlices and publishes their table."""

    def __init__(
        self, api: KubeApi, namespace: str, name: str, holder: TableHolder, service_port: int
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.service_port = service_port
        self.model: dict[str, Any] | None = None
        self.models = Reflector(
            api,
            captionmodels_path(namespace),
            params={"fieldSelector": f"metadata.name={name}"},
            on_change=self._models_changed,
            on_error=holder.failed,
        )
        self.slices = Reflector(
            api, endpointslices_path(namespace), on_change=self._slices_changed, on_error=holder.failed
        )

    def _models_changed(self, objects: dict[str, dict[str, Any]]) -> None:
        self.model = objects.get(self.name)  # the API server filters by name; a fake one may not
        self._publish()

    def _slices_changed(self, objects: dict[str, dict[str, Any]]) -> None:
        self._publish()

    def _publish(self) -> None:
        if not self.models.synced:
            return
        endpoints = endpoints_by_service(self.slices.objects.values()) if self.slices.synced else None
        try:
            table = table_from_status(
                self.model, endpoints, namespace=self.namespace, service_port=self.service_port
            )
        except TableError as exc:
            message = f"CaptionModel {self.namespace}/{self.name}: unusable status: {exc}"
            log.error("routing table not applied; the last one stays", extra={"error": message})
            self.holder.failed(message)
            return
        self.holder.publish(table)

    async def run(self) -> None:
        """Both watches, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.models.run())
            group.create_task(self.slices.run())
