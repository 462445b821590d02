"""The Kubernetes API, behind one small module: log in like kubectl, apply, list, delete, patch status.

Everything else in the operator deals in plain manifests (dicts). Writes are server-side apply with
one field manager, so applying the same manifests twice changes nothing, fields the operator stopped
setting are removed, and fields owned by others (the HPA's replica count) are left alone.
The ``kubernetes`` client is synchronous; its calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from captionfleet import names

FIELD_MANAGER = names.MANAGER
JsonView = Mapping[str, Any]
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)


@dataclass(frozen=True)
class Kind:
    """A resource the operator reads or writes (every one namespaced), and its REST paths."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        group_version = self.api_version
        path = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        if namespace:  # none: across namespaces
            path += f"/namespaces/{namespace}"
        path += f"/{self.plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path


CAPTION_MODEL = Kind(names.API_VERSION, names.KIND, names.PLURAL)
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
SCALED_OBJECT = Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects")
TRIGGER_AUTHENTICATION = Kind("keda.sh/v1alpha1", "TriggerAuthentication", "triggerauthentications")
SERVICE_ACCOUNT = Kind("v1", "ServiceAccount", "serviceaccounts")
ROLE = Kind("rbac.authorization.k8s.io/v1", "Role", "roles")
ROLE_BINDING = Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
ENDPOINT_SLICE = Kind("discovery.k8s.io/v1", "EndpointSlice", "endpointslices")
# Read only: why a fleet's pods do not start (pods.py); never Secrets.
POD = Kind("v1", "Pod", "pods")
EVENT = Kind("v1", "Event", "events")

# The kinds of a CaptionModel's children, in the order they are removed (traffic first).
CHILD_KINDS = (
    HPA,
    SCALED_OBJECT,
    TRIGGER_AUTHENTICATION,
    SERVICE,
    DEPLOYMENT,
    ROLE_BINDING,
    ROLE,
    SERVICE_ACCOUNT,
)
KINDS = {(k.api_version, k.kind): k for k in (CAPTION_MODEL, *CHILD_KINDS)}


def kind_of(manifest: Mapping[str, Any]) -> Kind:
    return KINDS[manifest["apiVersion"], manifest["kind"]]


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unreachable(KubeError):
    """The API server was not reached (connection refused, timeout)."""


class NotFound(KubeError):
    """404: the object, or its kind (a CRD such as KEDA's that is not installed), does not exist."""


class Conflict(KubeError):
    """409: the object changed since it was read (a resourceVersion precondition), or already exists."""


class Invalid(KubeError):
    """422: the API server refused the object (its schema or validation rules)."""


_ERRORS: dict[int, type[KubeError]] = {0: Unreachable, 404: NotFound, 409: Conflict, 422: Invalid}


def api_error(status: int, message: str) -> KubeError:
    """The one mapping from an HTTP status to a typed error."""
    return _ERRORS.get(status, KubeError)(status, message)


def load_configuration(kubeconfig: str = "", context: str = "") -> kubernetes.client.Configuration:
    """Credentials the way kubectl finds them.

    An explicit kubeconfig wins; otherwise the in-cluster service account, else ``$KUBECONFIG``
    (read now, not at import), else ``~/.kube/config``.
    """
    configuration = kubernetes.client.Configuration()
    if not kubeconfig:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        except kubernetes.config.ConfigException:
            pass
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path,  # may list several files, like kubectl's $KUBECONFIG
            context=context or None,
            client_configuration=configuration,
            persist_config=False,
        )
    except (kubernetes.config.ConfigException, OSError) as e:
        raise api_error(0, f"cannot log in: not in a cluster, and kubeconfig {path!r}: {e}") from e
    return configuration


@dataclass(frozen=True)
class Credentials:
    """What an HTTP client (kopf's) needs to talk to the API as this Configuration does."""

    server: str
    ca_path: str | None
    insecure: bool
    username: str | None
    password: str | None
    scheme: str | None
    token: str | None
    certificate_path: str | None
    private_key_path: str | None


def credentials(configuration: kubernetes.client.Configuration) -> Credentials:
    # The client keeps "Bearer <token>" (under BearerToken since kubernetes 36, else authorization).
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, token = header.split(" ", 1) if header and " " in header else (None, header or None)
    return Credentials(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def _message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return f"{e.status} {e.reason}"


Selector = Mapping[str, str]
"""A label or field selector: every key must have its value (``labelSelector=k1=v1,k2=v2``)."""


class Api(Protocol):
    """What reconcile.py and analysis.py use of the API: ``Kube`` in the operator, a fake in unit tests."""

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]: ...
    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def list(
        self, kind: Kind, namespace: str, labels: Selector, *, fields: Selector | None = None
    ) -> list[dict[str, Any]]: ...
    async def delete(self, kind: Kind, namespace: str, name: str) -> bool: ...
    async def installed(self, kind: Kind, namespace: str) -> bool: ...
    async def remove_annotation(self, kind: Kind, namespace: str, name: str, key: str) -> None: ...
    async def patch_status(
        self, kind: Kind, namespace: str, name: str, status: JsonView, *, resource_version: str | None = None
    ) -> dict[str, Any]: ...


class Kube:
    """A handful of typed calls on top of the generic ``ApiClient``."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self._client = kubernetes.client.ApiClient(configuration)

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        request = self._client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(*request, _request_timeout=TIMEOUT)
            response.read()  # type: ignore[no-untyped-call]
        except Exception as e:  # urllib3 errors: the server was not reached
            raise api_error(0, f"{method} {path}: {e}") from e
        if not 200 <= response.status <= 299:
            text = (response.data or b"").decode(errors="replace")
            error = ApiException(status=response.status, reason=response.reason, body=text)
            raise api_error(response.status, f"{method} {path}: {_message(error)}")
        return json.loads(response.data) if response.data else None

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._call, method, path, **kwargs)

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply (create or update); returns the object as stored."""
        meta = manifest["metadata"]
        path = kind_of(manifest).path(meta.get("namespace"), meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        result = await self._request(
            "PATCH", path, query=query, body=dict(manifest), content_type="application/apply-patch+yaml"
        )
        return dict(result)

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self._request("GET", kind.path(namespace, name)))
        except NotFound:
            return None

    async def list(
        self, kind: Kind, namespace: str, labels: Selector, *, fields: Selector | None = None
    ) -> list[dict[str, Any]]:
        """Objects with these labels (and field values, e.g. an Event's ``reason``); none when the kind
        itself is not installed (e.g. KEDA)."""
        query = [("labelSelector", ",".join(f"{key}={value}" for key, value in labels.items()))]
        if fields:
            query.append(("fieldSelector", ",".join(f"{key}={value}" for key, value in fields.items())))
        try:
            result = await self._request("GET", kind.path(namespace), query=query)
        except NotFound:
            return []
        return [dict(item) for item in result.get("items") or []]

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete in the background (dependents are collected later); False if already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self._request("DELETE", kind.path(namespace, name), body=body)
        except NotFound:
            return False
        return True

    async def ready_endpoints(self, namespace: str, service: str, port_name: str) -> builtins.list[str]:
        """Base URLs of the ready pods behind a Service, from its EndpointSlices."""
        slices = await self.list(ENDPOINT_SLICE, namespace, {names.SERVICE_NAME_LABEL: service})
        return names.ready_endpoints(slices, port_name)

    async def router_endpoints(self, namespace: str, model: str) -> builtins.list[str]:
        """The router pods of a CaptionModel: its public Service carries the model's name."""
        return await self.ready_endpoints(namespace, model, names.HTTP_PORT_NAME)

    async def installed(self, kind: Kind, namespace: str) -> bool:
        """Whether the API serves this kind at all (a CRD such as KEDA's ScaledObject may be missing)."""
        try:
            await self._request("GET", kind.path(namespace), query=[("limit", "1")])
        except NotFound:
            return False
        return True

    async def remove_annotation(self, kind: Kind, namespace: str, name: str, key: str) -> None:
        """Drop one annotation (a handled one-shot request); nothing if the object is gone."""
        body = {"metadata": {"annotations": {key: None}}}
        with contextlib.suppress(NotFound):
            await self._request(
                "PATCH", kind.path(namespace, name), body=body, content_type="application/merge-patch+json"
            )

    async def patch_status(
        self, kind: Kind, namespace: str, name: str, status: JsonView, *, resource_version: str | None = None
    ) -> dict[str, Any]:
        """JSON-merge-patch the status subresource (``None`` values remove fields).

        With ``resource_version`` the write raises Conflict if the object changed since it was read.
        """
        path = kind.path(namespace, name, "status")
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        result = await self._request("PATCH", path, body=body, content_type="application/merge-patch+json")
        return dict(result)
