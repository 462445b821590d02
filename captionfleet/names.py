"""The names the operator and the runtime share, in one module with no dependencies.

The operator writes them (CRD, labels, ports, the router's environment) and the runtime reads them (the
router watches the CRD and the EndpointSlices the operator's Services get; both processes speak the
same headers), so each is spelt once, here. The environment variable of a setting is not here: it is
derived from the settings field (``captionfleet.settings.env_name``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The custom resource (../shared/CONTRACT.md).
GROUP = "captionfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CaptionModel"
PLURAL = "captionmodels"
SINGULAR = "captionmodel"
SHORT_NAMES = ("capm",)


def captionmodels_path(namespace: str) -> str:
    """The API path of a namespace's CaptionModels."""
    return f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}"


# Labels and annotations. MODEL_LABEL finds a CaptionModel's children; it, VERSION_LABEL and
# COMPONENT_LABEL make up the (immutable) Deployment selectors.
MODEL_LABEL = f"{GROUP}/model"
VERSION_LABEL = f"{GROUP}/version"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "captionfleet-operator"
"""The value of MANAGED_BY_LABEL and the field manager of the operator's server-side applies."""
ROLLOUT_ACTION_ANNOTATION = f"{GROUP}/rollout-action"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""Set by Kubernetes on a Service's EndpointSlices."""

# The port of every runtime and router container and Service.
HTTP_PORT = 8080
HTTP_PORT_NAME = "http"

# Headers of the public API (CONTRACT.md) and the router's own.
REQUEST_ID_HEADER = "X-Request-Id"
API_KEY_HEADER = "X-API-Key"
USER_ID_HEADER = "X-User-Id"
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
PRIORITY_HEADER = "X-Priority"
ROUTED_VERSION_HEADER = "X-Routed-Version"
WEBHOOK_SIGNATURE_HEADER = "X-Captionfleet-Signature"
"""On a job's webhook POST: ``sha256=<hex HMAC-SHA256 of the body>``."""
WEBHOOK_DELIVERY_HEADER = "X-Captionfleet-Delivery"
"""On a job's webhook POST: the same id on every attempt of one delivery, so receivers can drop repeats."""

# The job API's Redis stream (its name is the serve setting ``jobs_stream``) is read by this consumer
# group on every runtime pod; KEDA's redis-streams trigger watches the same group.
JOBS_CONSUMER_GROUP = "captionfleet"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Prometheus latency buckets (seconds) of the runtime and the router: a cache hit takes about 1 ms, a
CPU batch of a large BLIP several seconds. The same bounds on both, so their histograms add up."""


def endpoint_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def slice_endpoints(slice_: Mapping[str, Any], port_name: str = HTTP_PORT_NAME) -> list[str]:
    """Base URLs of the ready endpoints of one EndpointSlice on the named port (or its only port).

    ``ready`` unset counts as ready (as the EndpointSlice API says); terminating endpoints do not.
    Every address of one endpoint is the same pod, so the first one stands for it.
    """
    ports = [p for p in slice_.get("ports") or [] if isinstance(p, Mapping) and p.get("port")]
    port = next((p for p in ports if p.get("name") == port_name), ports[0] if len(ports) == 1 else None)
    if port is None:
        return []
    urls = []
    for endpoint in slice_.get("endpoints") or []:
        if not isinstance(endpoint, Mapping):
            continue
        conditions = endpoint.get("conditions") or {}
        addresses = endpoint.get("addresses") or []
        if conditions.get("ready") is False or conditions.get("terminating") is True or not addresses:
            continue
        urls.append(endpoint_url(str(addresses[0]), int(port["port"])))
    return urls


def ready_endpoints(slices: Iterable[Mapping[str, Any]], port_name: str = HTTP_PORT_NAME) -> list[str]:
    """Sorted, distinct base URLs of the ready endpoints in these EndpointSlices."""
    return sorted({url for slice_ in slices for url in slice_endpoints(slice_, port_name)})


def endpoints_by_service(
    slices: Iterable[Mapping[str, Any]], port_name: str = HTTP_PORT_NAME
) -> dict[str, list[str]]:
    """Service name -> sorted ready endpoint URLs; a Service with slices but none ready maps to []."""
    found: dict[str, set[str]] = {}
    for slice_ in slices:
        service = ((slice_.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            found.setdefault(str(service), set()).update(slice_endpoints(slice_, port_name))
    return {service: sorted(urls) for service, urls in found.items()}


def jobs_stream(namespace: str, model: str, version: str) -> str:
    """The Redis stream (and key prefix) of one version's jobs: the operator gives it to the version's
    runtimes (the serve setting ``jobs_stream``) and to KEDA's redis-streams trigger, so both watch
    the same stream, and fleets or versions sharing one Redis never take each other's work."""
    return f"captionfleet:jobs:{namespace}:{model}:{version}"
