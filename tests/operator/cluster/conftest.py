"""The real kopf operator against the emulated API server (``api``, from the parent conftest).

The operator runs in its own thread and event loop, like a separate process: kopf treats every task
of its loop as its own, and the emulator's server must not be one of them. ``Cluster`` does what a
user (kubectl) and the Deployment controller would do, and reads what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from captionfleet.operator.runner import run_operator
from captionfleet.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
NAMESPACE = "ml"
CAPM = "captionfleet.io/v1alpha1/captionmodels"
T = TypeVar("T")


async def eventually(check: Callable[[], T], within: float = 10.0, interval: float = 0.02) -> T:
    """Poll ``check`` until it returns without AssertionError (its result), or fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


def caption_model(name: str, **spec: Any) -> dict[str, Any]:
    """A CaptionModel manifest: one version unless ``versions`` is given, the rest of ``spec`` as is."""
    versions = spec.pop("versions", [{"name": "v1", "model": "file:///opt/models/v1"}])
    return {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": name},
        "spec": {"versions": versions, **spec},
    }


def pod_waiting(
    reason: str, message: str = "", container: str = "runtime", image: str = ""
) -> dict[str, Any]:
    """A scheduled pod whose container ``container`` waits with ``reason`` (the kubelet's words)."""
    waiting: dict[str, Any] = {"reason": reason, **({"message": message} if message else {})}
    status = {"name": container, "ready": False, "restartCount": 0, "state": {"waiting": waiting}}
    if image:
        status["image"] = image
    return {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
        ],
        "containerStatuses": [status],
    }


def pod_crashing(container: str, exit_code: int, message: str, *, init: bool = False) -> dict[str, Any]:
    """A container in CrashLoopBackOff after exiting with ``exit_code`` and termination ``message``."""
    terminated = {"exitCode": exit_code, "reason": "Error", "message": message}
    status = {
        "name": container,
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed"}},
        "lastState": {"terminated": terminated},
    }
    key = "initContainerStatuses" if init else "containerStatuses"
    return {
        "phase": "Pending" if init else "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
        key: [status],
    }


def pod_unschedulable(message: str) -> dict[str, Any]:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    return {"phase": "Pending", "conditions": [condition]}


def pod_running() -> dict[str, Any]:
    return {
        "phase": "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
        "containerStatuses": [
            {"name": "runtime", "ready": True, "restartCount": 0, "state": {"running": {}}},
        ],
    }


class Cluster:
    """What a user (kubectl) and the Deployment controller do, against the emulated API server."""

    eventually = staticmethod(eventually)
    # pod statuses, as the scheduler and the kubelet report them (for ``create_pods``)
    pod_waiting = staticmethod(pod_waiting)
    pod_crashing = staticmethod(pod_crashing)
    pod_unschedulable = staticmethod(pod_unschedulable)
    pod_running = staticmethod(pod_running)

    def __init__(self, api: Any, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig

    async def _send(self, method: str, path: str, body: Any, content_type: str = "application/json") -> Any:
        async with self.api.request(method, path, json=body, headers={"Content-Type": content_type}) as rsp:
            payload = await rsp.json()
            assert rsp.status < 300, payload
            return payload

    # kubectl
    async def apply_example(self, file: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return await self.create(yaml.safe_load((EXAMPLES / file).read_text()), namespace)

    async def create(self, manifest: Mapping[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
        body = copy.deepcopy(dict(manifest))
        body["metadata"]["namespace"] = namespace
        return dict(
            await self._send(
                "POST", f"/apis/captionfleet.io/v1alpha1/namespaces/{namespace}/captionmodels", body
            )
        )

    async def patch_spec(self, name: str, spec: Mapping[str, Any], namespace: str = NAMESPACE) -> None:
        path = f"/apis/captionfleet.io/v1alpha1/namespaces/{namespace}/captionmodels/{name}"
        await self._send("PATCH", path, {"spec": dict(spec)}, "application/merge-patch+json")

    async def delete(self, name: str, namespace: str = NAMESPACE) -> None:
        await self._send(
            "DELETE", f"/apis/captionfleet.io/v1alpha1/namespaces/{namespace}/captionmodels/{name}", {}
        )

    # the Deployment controller
    async def roll_out(
        self, name: str, *, replicas: int | None = None, ready: int | None = None, **extra: Any
    ) -> None:
        """Report the Deployment rolled out with ``ready`` of ``replicas`` pods ready."""
        deployment = self.get("apps/v1/deployments", name)
        replicas = deployment["spec"].get("replicas", 1) if replicas is None else replicas
        ready = replicas if ready is None else ready
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
            **extra,
        }
        namespace = deployment["metadata"]["namespace"]
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status"
        await self._send("PATCH", path, {"status": status}, "application/merge-patch+json")

    # the Deployment controller, the scheduler and the kubelet, for the pods
    async def create_pods(self, deployment: str, status: Mapping[str, Any], count: int = 1) -> list[str]:
        """Pods of ``deployment``'s template (as its ReplicaSet makes them), then ``status`` reported
        for each (as the scheduler and kubelet do: a pod is created without one); their names."""
        found = self.get("apps/v1/deployments", deployment)
        template = found["spec"]["template"]
        namespace = found["metadata"]["namespace"]
        names = []
        for _ in range(count):
            name = f"{deployment}-{uuid.uuid4().hex[:10]}"
            metadata = {"name": name, "namespace": namespace, "labels": dict(template["metadata"]["labels"])}
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
            await self._send("POST", f"/api/v1/namespaces/{namespace}/pods", body)
            await self.set_pod_status(name, status, namespace)
            names.append(name)
        return names

    async def set_pod_status(self, pod: str, status: Mapping[str, Any], namespace: str = NAMESPACE) -> None:
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/status"
        await self._send("PATCH", path, {"status": dict(status)}, "application/merge-patch+json")

    async def kubelet_event(self, pod: str, reason: str, message: str, namespace: str = NAMESPACE) -> None:
        """A Warning Event on a pod, as the kubelet posts one (e.g. FailedMount)."""
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{pod}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": namespace},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "kubelet", "host": "node-1"},
            "count": 1,
        }
        await self._send("POST", f"/api/v1/namespaces/{namespace}/events", body)

    async def create_status(self, pod_spec: Mapping[str, Any]) -> int:
        """The API server's answer (HTTP status) to a Deployment of ``pod_spec`` with one container."""
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "probe", "namespace": NAMESPACE},
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "metadata": {"labels": {"a": "b"}},
                    "spec": {"containers": [{"name": "c", "image": "i"}], **copy.deepcopy(dict(pod_spec))},
                },
            },
        }
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
        async with self.api.request("POST", path, json=deployment) as rsp:
            return int(rsp.status)

    # reading
    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        obj = self.api.live(resource, namespace, name)
        assert obj is not None, f"{resource} {namespace}/{name} does not exist"
        return obj

    def model(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return self.get(CAPM, name, namespace)

    def status(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return dict(self.model(name, namespace).get("status") or {})

    def names(self, resource: str, namespace: str = NAMESPACE) -> set[str]:
        return self.api.names(resource, namespace)

    def events(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        found = [self.api.live("v1/events", namespace, name) for name in self.names("v1/events", namespace)]
        return sorted((e for e in found if e), key=lambda e: e["metadata"]["resourceVersion"])

    def event_reasons(self, name: str, namespace: str = NAMESPACE) -> list[tuple[str, str, str]]:
        return [
            (e["type"], e["reason"], e["message"])
            for e in self.events(namespace)
            if e["involvedObject"]["name"] == name
        ]

    def condition(self, name: str, type_: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        conditions = {c["type"]: c for c in self.status(name, namespace).get("conditions", [])}
        assert type_ in conditions, conditions
        return dict(conditions[type_])

    def children(self, name: str, namespace: str = NAMESPACE) -> dict[str, set[str]]:
        """Every child kind -> names of the objects labelled for this CaptionModel."""
        result = {}
        for resource in CHILD_RESOURCES:
            names = {
                n
                for n in self.names(resource, namespace)
                if (self.api.live(resource, namespace, n) or {})
                .get("metadata", {})
                .get("labels", {})
                .get("captionfleet.io/model")
                == name
            }
            if names:
                result[resource] = names
        return result


CHILD_RESOURCES = (
    "apps/v1/deployments",
    "v1/services",
    "autoscaling/v2/horizontalpodautoscalers",
    "keda.sh/v1alpha1/scaledobjects",
    "keda.sh/v1alpha1/triggerauthentications",
    "v1/serviceaccounts",
    "rbac.authorization.k8s.io/v1/roles",
    "rbac.authorization.k8s.io/v1/rolebindings",
)


@pytest.fixture
def cluster(api: Any, tmp_path: Path, write_kubeconfig: Callable[..., Path]) -> Cluster:
    return Cluster(api, write_kubeconfig(tmp_path / "kubeconfig", str(api.url).rstrip("/")))


@pytest.fixture
def settings(cluster: Cluster) -> OperatorSettings:
    return OperatorSettings(
        kubeconfig=str(cluster.kubeconfig),
        liveness="",
        metrics="",
        resync_seconds=0,
        pod_check_seconds=0,  # test_operator_pods.py turns the timer on; the rest need no polling
        prometheus_url="http://prometheus.monitoring.svc:9090",
        default_runtime_image="registry.test/captionfleet/runtime:1.2.3",
    )


@contextlib.asynccontextmanager
async def running(settings: OperatorSettings) -> AsyncIterator[None]:
    """The real operator, in its own thread and loop, until the block ends."""
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run_operator(settings, stop_flag=stop, ready_flag=ready))
        except BaseException as e:  # reported by the test, not lost in the thread
            failures.append(e)
            ready.set()

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 20), "the operator did not start"
        assert not failures, failures
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive(), "the operator did not stop"
    assert not failures, failures


@pytest.fixture
async def operator(settings: OperatorSettings) -> AsyncIterator[None]:
    async with running(settings):
        yield


@pytest.fixture
def start_operator() -> Callable[[OperatorSettings], contextlib.AbstractAsyncContextManager[None]]:
    """``async with start_operator(settings): ...`` runs the operator for the block (restarts)."""
    return running
