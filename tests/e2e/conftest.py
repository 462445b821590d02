"""Fixtures of the end-to-end tests: the emulated API server, the real operator, the kubelet harness.

The API server is the operator tests' ``ApiServer`` (kmock's emulator plus what the real server fills
in), loaded from ``tests/operator/conftest.py``. The operator runs as ``captionfleet operator`` in its
own process (standalone: one replica, so it can be killed and restarted without waiting out a peer),
the fleet's Deployments as real processes started by ``harness.Kubelet``. Everything is stopped at
teardown, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.util
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import kmock
import pytest

from captionfleet.operator.crd import captionmodel_crd

HERE = Path(__file__).resolve().parent
NAMESPACE = "ml"
CAPM = "captionfleet.io/v1alpha1/captionmodels"


def _load(name: str, path: Path) -> ModuleType:
    """A module of the test tree by its path (the tests are no package: --import-mode=importlib)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("captionfleet_e2e_harness", HERE / "harness.py")
emulator = _load("captionfleet_e2e_emulator", HERE.parent / "operator" / "conftest.py")


class Fleet:
    """The cluster as a user sees it (kubectl), plus the harness's processes behind it."""

    def __init__(self, api: Any, kubeconfig: Path, workdir: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.kubelet: Any = None
        self.operator = harness.OperatorProcess(kubeconfig, NAMESPACE, workdir / "operator.log")
        self._kubelet_task: asyncio.Task[None] | None = None

    def start_kubelet(self, faults: Mapping[str, float] | None = None) -> None:
        self.kubelet = harness.Kubelet(self.api, self.kubeconfig, NAMESPACE, self.workdir, dict(faults or {}))
        self._kubelet_task = asyncio.create_task(self.kubelet.run())

    async def close(self) -> None:
        await asyncio.to_thread(self.operator.stop)
        if self._kubelet_task is not None:
            self._kubelet_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._kubelet_task
        if self.kubelet is not None:
            await self.kubelet.shutdown()

    def check(self) -> None:
        """Fail at once when a process of the fleet died or the kubelet loop crashed."""
        if self._kubelet_task is not None and self._kubelet_task.done():
            self._kubelet_task.result()
        if self.kubelet is not None:
            self.kubelet.check()
        self.operator.check()

    async def eventually(self, check: Any, within: float, what: str) -> Any:
        """``harness.eventually``, failing at once when a process of the fleet died."""

        def guarded() -> Any:
            self.check()
            return check()

        return await harness.eventually(guarded, within, what)

    # kubectl
    async def send(self, method: str, path: str, body: Any, content_type: str = "application/json") -> Any:
        headers = {"Content-Type": content_type}
        async with self.api.request(method, path, json=body, headers=headers) as response:
            payload = await response.json()
            assert response.status < 300, payload
            return payload

    async def create(self, manifest: Mapping[str, Any]) -> None:
        body = copy.deepcopy(dict(manifest))
        body["metadata"]["namespace"] = NAMESPACE
        await self.send("POST", f"/apis/captionfleet.io/v1alpha1/namespaces/{NAMESPACE}/captionmodels", body)

    # reading
    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.api.live(resource, NAMESPACE, name)
        return found

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.get(CAPM, name) or {}).get("status") or {})

    def events(self, name: str, reason: str | None = None) -> list[tuple[str, str, str]]:
        found = [self.api.live("v1/events", NAMESPACE, n) for n in self.api.names("v1/events", NAMESPACE)]
        ordered = sorted((e for e in found if e), key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [
            (e["type"], e["reason"], e["message"])
            for e in ordered
            if e["involvedObject"]["name"] == name and reason in (None, e["reason"])
        ]

    async def router_url(self, name: str, within: float = 120.0) -> str:
        """The URL of a ready router pod of CaptionModel ``name`` whose table routes every version."""

        def ready() -> str | None:
            self.check()
            pods = self.kubelet.ready_pods(f"{name}-router")
            return f"http://127.0.0.1:{pods[0].address_port}" if pods else None

        return str(await harness.eventually(ready, within, f"a ready router of {name}"))

    async def routes(self, router: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(router + "/v1/models") as response:
            return dict(await response.json())


@pytest.fixture
async def api() -> AsyncIterator[Any]:
    async with emulator.ApiServer() as server, kmock.Server(server):
        crd = captionmodel_crd()
        server.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = (
            crd
        )
        for name in ("default", NAMESPACE):
            namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            server.objects["v1/namespaces", None, name] = namespace
        yield server


@pytest.fixture
async def fleet(api: Any, tmp_path: Path) -> AsyncIterator[Fleet]:
    kubeconfig = emulator.write_kubeconfig(
        tmp_path / "kubeconfig", str(api.url).rstrip("/"), "e2e-token", {"emulator": NAMESPACE}
    )
    fleet = Fleet(api, kubeconfig, tmp_path)
    try:
        yield fleet
    finally:
        await fleet.close()


@pytest.fixture(scope="session")
def images() -> list[bytes]:
    from captionfleet.runtime.server.testing import encode, shapes_image

    return [encode(shapes_image(index)) for index in range(4)]
