"""A small, read-only Kubernetes API client: credentials, and a list-then-watch loop per collection.

aiohttp talks to the API server directly (the router is async and needs two watches, nothing more).
Credentials come from the pod's service account (its token file is re-read on every connection, since
kubelet rotates it) or from a kubeconfig, loaded by the ``kubernetes`` package so that every kind of
kubeconfig user (token, client certificate, exec plugin) works.

:class:`Reflector` keeps one collection in memory the way client-go's reflector does: list, then watch
from the list's ``resourceVersion``; a watch that ends is resumed from the last version seen; a 410
Gone (too old) means a fresh list; any other failure is logged and retried after a backoff (1 s
doubling to 30 s), keeping the last known objects meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_S = 290  # the API server ends the watch after this; we resume from the last version
MAX_EVENT_BYTES = 16 * 1024 * 1024


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeConfigError(ValueError):
    """No usable credentials: neither in a pod nor a readable kubeconfig."""


@dataclass
class KubeAccess:
    """Where the API server is and how to authenticate to it."""

    server: str  # https://10.96.0.1:443
    namespace: str | None = None  # the pod's or the kubeconfig context's namespace
    ssl_context: ssl.SSLContext | None = None
    token: Callable[[], str | None] = field(default=lambda: None)

    def headers(self) -> dict[str, str]:
        token = self.token()
        return (
            {"Authorization": token if token.startswith(("Bearer ", "Basic ")) else f"Bearer {token}"}
            if token
            else {}
        )


def in_cluster_access(
    directory: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] = os.environ
) -> KubeAccess:
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (directory / "token").exists():
        raise KubeConfigError("not in a pod: KUBERNETES_SERVICE_HOST or the service account token is missing")
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    namespace_file = directory / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
    address = f"[{host}]" if ":" in host else host

    def token() -> str | None:
        return (directory / "token").read_text().strip() or None

    return KubeAccess(f"https://{address}:{port}", namespace, context, token)


def kubeconfig_access(path: str | None) -> KubeAccess:
    """From a kubeconfig file (None: $KUBECONFIG or ~/.kube/config), with its current context."""
    # Imported here: heavy, and only a kubeconfig needs it.
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.config.config_exception import ConfigException

    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration, persist_config=False
        )
        _, current = k8s_config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, TypeError) as exc:
        raise KubeConfigError(f"cannot load the kubeconfig {path or '(default)'}: {exc}") from exc
    namespace = (current or {}).get("context", {}).get("namespace")
    context = None
    if str(configuration.host).startswith("https:"):
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
        if not configuration.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE

    def token() -> str | None:
        hook = getattr(configuration, "refresh_api_key_hook", None)
        if hook is not None:
            hook(configuration)  # exec plugins and expiring tokens refresh here
        bearer = configuration.auth_settings().get("BearerToken")  # the kubeconfig's token, exec's too
        return str(bearer["value"]) if bearer and bearer.get("value") else None

    return KubeAccess(str(configuration.host).rstrip("/"), namespace, context, token)


def load_access(kubeconfig: str = "") -> KubeAccess:
    """The kubeconfig if given, else the pod's service account, else the default kubeconfig."""
    if kubeconfig:
        return kubeconfig_access(kubeconfig)
    try:
        return in_cluster_access()
    except KubeConfigError:
        return kubeconfig_access(None)


class KubeApi:
    def __init__(self, access: KubeAccess, session: aiohttp.ClientSession) -> None:
        self.access = access
        self.session = session

    async def list(self, path: str, params: Mapping[str, str]) -> tuple[list[dict[str, Any]], str]:
        """The items of a collection and its resourceVersion."""
        async with self.session.get(
            self.access.server + path,
            params=dict(params),
            headers=self.access.headers(),
            ssl=self.access.ssl_context or True,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            if response.status != 200:
                raise KubeError(response.status, (await response.text())[:500])
            body = await response.json(content_type=None)
        items = body.get("items") or []
        return list(items), str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(
        self, path: str, params: Mapping[str, str], version: str
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events ({type, object}) from ``version`` on, until the server ends the stream."""
        query = {
            **params,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        if version:
            query["resourceVersion"] = version
        async with self.session.get(
            self.access.server + path,
            params=query,
            headers=self.access.headers(),
            ssl=self.access.ssl_context or True,
            # A silent, half-dead connection must not hang the watch forever.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_TIMEOUT_S + 30),
        ) as response:
            if response.status != 200:
                raise KubeError(response.status, (await response.text())[:500])
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_EVENT_BYTES:
                    raise KubeError(500, f"a watch event is larger than {MAX_EVENT_BYTES} bytes")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class Reflector:
    """One collection mirrored in memory; ``on_change(objects by name)`` after the list and every event."""

    def __init__(
        self,
        api: KubeApi,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        on_change: Callable[[dict[str, dict[str, Any]]], None],
        on_error: Callable[[str], None] = lambda message: None,
        backoff_s: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        self.api = api
        self.path = path
        self.params = dict(params or {})
        self.on_change = on_change
        self.on_error = on_error
        self.backoff_s = backoff_s
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = False  # a list has succeeded at least once

    async def run(self) -> None:
        """Mirror the collection until cancelled."""
        delay = self.backoff_s[0]
        while True:
            try:
                items, version = await self.api.list(self.path, self.params)
                self.objects = {_name(item): item for item in items}
                self.synced = True
                self.on_change(dict(self.objects))
                delay = self.backoff_s[0]
                while True:  # resume each ended watch from the last version seen
                    version = await self._watch(version)
            except Gone:
                log.info("watch expired; listing again", extra={"path": self.path})
                continue
            except (aiohttp.ClientError, KubeError, TimeoutError, ValueError, OSError) as exc:
                message = f"{self.path}: {type(exc).__name__}: {exc}"
                log.warning(
                    "kubernetes API call failed; retrying", extra={"error": message, "retry_in_s": delay}
                )
                self.on_error(message)
            await asyncio.sleep(delay)  # a backoff, not a synchronisation
            delay = min(delay * 2, self.backoff_s[1])

    async def _watch(self, version: str) -> str:
        async for event in self.api.watch(self.path, self.params, version):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise KubeError(int(obj.get("code") or 500), str(obj.get("message") or obj))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            name = _name(obj)
            if kind == "DELETED":
                self.objects.pop(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self.objects[name] = obj
            else:
                continue
            self.on_change(dict(self.objects))
        return version


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")
