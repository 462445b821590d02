"""The end-to-end harness: a kubelet for the emulated cluster, a fault-injecting proxy, client traffic.

``Kubelet`` plays the kubelet, the Deployment controller and the EndpointSlice controller at once: it
polls the Deployments stored in the emulator and, for each with replicas > 0, runs the container's
command (``captionfleet serve`` or ``captionfleet router``) as a real process on a free loopback port,
with the container's environment (the few things only a cluster provides are translated: the
listening address, the image's model folder, the service account as a kubeconfig, Secret volumes as
files in the pod's folder). A process that
answers ``/readyz`` is published as an EndpointSlice of every Service selecting its pod, and the
Deployment's status counts it ready. Scaled down or deleted: unpublished first, then stopped.

``FaultProxy`` stands in front of one version's runtime and answers HTTP 500 to a fraction of the
caption requests (fault injection lives here, never in the product). ``Traffic`` sends captions
through the router for many user ids, each user's requests one after the other, and keeps every answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
# What the runtime image holds at /opt/captionfleet/models (Dockerfile.runtime): the bundled models.
IMAGE_PATHS = {"/opt/captionfleet/models": str(REPO / "runtime" / "models")}
DEPLOYMENTS = "apps/v1/deployments"
SECRETS = "v1/secrets"
SERVICES = "v1/services"
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
POLL_S = 0.05
READY_DEADLINE_S = 120.0


class FleetFailure(Exception):
    """A process of the fleet (a pod or the operator) died or never became ready."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(check: Callable[[], Any], within: float, what: str, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns a truthy value (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError as exc:
            last = exc
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within:.0f} s waiting for {what}: {last or ''}")


# --- the fault-injecting proxy -------------------------------------------------------------------


class FaultProxy:
    """A reverse proxy to one runtime that fails ``failure_rate`` of the caption requests with HTTP 500.

    The failures are spread evenly (an accumulator, not chance): at 0.5 every other request fails.
    ``arrivals`` and ``injected`` hold the monotonic times of the caption requests it received/failed.
    """

    HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})

    def __init__(self, upstream: str, failure_rate: float) -> None:
        self.upstream = upstream
        self.failure_rate = failure_rate
        self.arrivals: list[float] = []
        self.injected: list[float] = []
        self.priorities: list[str] = []  # the X-Priority header of each caption request ("" if none)
        self.url = ""
        self._debt = 0.0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST" and request.path.startswith("/v1/caption"):
            self.arrivals.append(time.monotonic())
            self.priorities.append(request.headers.get("X-Priority", ""))
            self._debt += self.failure_rate
            if self._debt >= 1.0:
                self._debt -= 1.0
                self.injected.append(time.monotonic())
                request_id = request.headers.get("X-Request-Id", "")
                error = {"code": "injected_fault", "message": "the e2e fault proxy failed this request"}
                return web.json_response(
                    {"error": error, "request_id": request_id},
                    status=500,
                    headers={"X-Request-Id": request_id},
                )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            payload = await upstream.read()
            answer = {k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP_HEADERS}
            return web.Response(status=upstream.status, body=payload, headers=answer)


# --- the kubelet ---------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    deployment: str
    template_hash: str
    labels: dict[str, str]
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    proxy: FaultProxy | None = None
    ready: bool = False
    published: set[str] = field(default_factory=set)  # EndpointSlice names
    created: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port_retries: int = 0
    log_from: int = 0  # where this start's output begins in the log (after a restart)

    @property
    def address_port(self) -> int:
        """The port published for this pod: the proxy's when a fault proxy stands in front."""
        if self.proxy is not None:
            return int(self.proxy.url.rsplit(":", 1)[1])
        return self.port

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _template_hash(deployment: Mapping[str, Any]) -> str:
    template = deployment["spec"]["template"]
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _container_env(container: Mapping[str, Any], namespace: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[item["name"]] = namespace
        else:
            raise AssertionError(f"the e2e kubelet cannot provide {item}")
    return env


def _map_path(path: str, mounts: Mapping[str, str] | None = None) -> str:
    for inside, outside in {**IMAGE_PATHS, **(mounts or {})}.items():
        if path == inside or path.startswith(inside + "/"):
            return outside + path[len(inside) :]
    return path


@dataclass(eq=False)
class Kubelet:
    """Runs the emulated cluster's Deployments as local processes and publishes them (module doc)."""

    api: Any
    kubeconfig: Path
    namespace: str
    workdir: Path
    faults: dict[str, float] = field(default_factory=dict)  # Deployment name -> its proxies' failure rate
    pods: dict[str, list[Pod]] = field(default_factory=dict, init=False)
    proxies: list[FaultProxy] = field(default_factory=list, init=False)  # every proxy started, in order
    failures: list[str] = field(default_factory=list, init=False)
    started: dict[str, int] = field(default_factory=dict, init=False)  # Deployment -> pods ever started
    # Deployment name -> seconds a new pod stays Pending before its process starts (a slow node:
    # a GPU node being added, a large image pulled); changed by a test while the kubelet runs.
    start_delays: dict[str, float] = field(default_factory=dict, init=False)
    _reported: dict[str, tuple[Any, ...]] = field(default_factory=dict, init=False)
    _counter: int = field(default=0, init=False)
    _http: aiohttp.ClientSession | None = field(default=None, init=False)

    # lifecycle
    async def run(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        while True:
            await self.sync()
            await asyncio.sleep(POLL_S)  # the kubelet's poll period

    async def shutdown(self) -> None:
        """Stop every process and proxy (teardown; also after a failure)."""
        for pods in self.pods.values():
            for pod in pods:
                if pod.task is not None:
                    pod.task.cancel()
        # The test is over: no drain (the router would wait out its drain delay on SIGTERM).
        await asyncio.gather(
            *(
                asyncio.to_thread(_stop_process, pod.process, signal.SIGKILL)
                for pods in self.pods.values()
                for pod in pods
            )
        )
        for proxy in self.proxies:
            await proxy.stop()
        if self._http is not None:
            await self._http.close()

    def check(self) -> None:
        """Raise when a pod failed to start or died (not an AssertionError: polling must stop at once)."""
        if self.failures:
            raise FleetFailure("\n\n".join(self.failures))

    # one pass
    async def sync(self) -> None:
        deployments = {
            name: obj
            for name in self.api.names(DEPLOYMENTS, self.namespace)
            if (obj := self.api.live(DEPLOYMENTS, self.namespace, name)) is not None
        }
        for name in set(self.pods) | set(deployments):
            await self._sync_deployment(name, deployments.get(name))

    async def _sync_deployment(self, name: str, deployment: Mapping[str, Any] | None) -> None:
        pods = self.pods.setdefault(name, [])
        for pod in list(pods):
            if pod.process.poll() is not None and pod.ready:
                self.failures.append(
                    f"pod {pod.name} exited with {pod.process.returncode}:\n{pod.log_tail()}"
                )
                await self._stop(pod)
        if deployment is None:
            for pod in list(pods):
                await self._stop(pod)
            self.pods.pop(name, None)
            return
        wanted = deployment["spec"].get("replicas", 1)
        current_hash = _template_hash(deployment)
        current = [p for p in pods if p.template_hash == current_hash]
        old = [p for p in pods if p.template_hash != current_hash]
        for _ in range(wanted - len(current)):
            pods.append(await self._start(name, deployment, current_hash))
        for pod in sorted(current, key=lambda p: p.ready)[: max(0, len(current) - wanted)]:
            await self._stop(pod)
        ready_current = [p for p in pods if p.template_hash == current_hash and p.ready]
        if len(ready_current) >= wanted:  # a rolling update: old pods go once the new ones serve
            for pod in old:
                await self._stop(pod)
        for pod in self.pods.get(name, []):
            if pod.ready:
                await self._publish(pod)
        await self._report(name, deployment, current_hash)

    # pods
    async def _start(self, deployment_name: str, deployment: Mapping[str, Any], template_hash: str) -> Pod:
        template = deployment["spec"]["template"]
        container = template["spec"]["containers"][0]
        command = [*container.get("command", []), *container.get("args", [])]
        assert command[:1] == ["captionfleet"], f"the e2e kubelet runs captionfleet only, not {command}"
        self._counter += 1
        pod_name = f"{deployment_name}-{template_hash[:5]}-{self._counter}"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
        home = self.workdir / pod_name
        home.mkdir(parents=True, exist_ok=True)
        mounts = self._secret_volumes(template["spec"], container, home)
        env.update({k: _map_path(v, mounts) for k, v in _container_env(container, self.namespace).items()})
        env.update(
            CAPTIONFLEET_HOST="127.0.0.1",
            CAPTIONFLEET_PORT=str(port),
            HOME=str(home),
            HF_HOME=str(home / "hf"),
        )
        if command[1] == "serve":
            env["CAPTIONFLEET_MODEL"] = _map_path(env.get("CAPTIONFLEET_MODEL", ""))
            env["CAPTIONFLEET_TORCH_THREADS"] = "1"  # two CPUs for the whole fleet
            env["CAPTIONFLEET_PREPROCESS_WORKERS"] = "1"
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        elif command[1] == "router":
            env["CAPTIONFLEET_KUBECONFIG"] = str(self.kubeconfig)  # its service account, here
        log_path = self.workdir / f"{pod_name}.log"
        argv = [sys.executable, "-m", "captionfleet", *command[1:]]
        process = await asyncio.to_thread(_spawn, argv, env, log_path)
        labels = dict(template.get("metadata", {}).get("labels") or {})
        pod = Pod(pod_name, deployment_name, template_hash, labels, process, port, log_path)
        pod.argv, pod.env = argv, env
        self.started[deployment_name] = self.started.get(deployment_name, 0) + 1
        pod.task = asyncio.create_task(self._become_ready(pod))
        return pod

    def _secret_volumes(
        self, pod_spec: Mapping[str, Any], container: Mapping[str, Any], home: Path
    ) -> dict[str, str]:
        """Write the container's Secret volumes into the pod's folder, as the kubelet mounts them
        (the listed items, else every key): mount path -> that folder."""
        sources = {v["name"]: v["secret"] for v in pod_spec.get("volumes") or [] if "secret" in v}
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            source = sources.get(mount["name"])
            if source is None:
                continue
            secret = self.api.live(SECRETS, self.namespace, source["secretName"])
            assert secret is not None, f"the e2e kubelet cannot mount the missing {source['secretName']}"
            data = secret.get("data") or {}
            folder = home / "volumes" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for item in source.get("items") or [{"key": key, "path": key} for key in data]:
                (folder / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
            mounts[mount["mountPath"]] = str(folder)
        return mounts

    async def _become_ready(self, pod: Pod) -> None:
        assert self._http is not None
        pending_until = pod.created + self.start_delays.get(pod.deployment, 0.0)
        while time.monotonic() < pending_until:  # Pending: the "node" has not started it yet
            await asyncio.sleep(min(POLL_S, pending_until - time.monotonic()))
            pending_until = pod.created + self.start_delays.get(pod.deployment, 0.0)
        deadline = time.monotonic() + READY_DEADLINE_S
        url = f"http://127.0.0.1:{pod.port}/readyz"
        while time.monotonic() < deadline:
            if pod.process.poll() is not None:
                if await self._lost_its_port(pod):
                    continue
                self.failures.append(
                    f"pod {pod.name} exited with {pod.process.returncode}:\n{pod.log_tail()}"
                )
                return
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._http.get(url) as response:
                    if response.status == 200:
                        rate = self.faults.get(pod.deployment)
                        if rate is not None:
                            pod.proxy = FaultProxy(f"http://127.0.0.1:{pod.port}", rate)
                            self.proxies.append(pod.proxy)
                            await pod.proxy.start()
                        pod.ready = True
                        return
            await asyncio.sleep(POLL_S)  # a readiness probe's period
        self.failures.append(f"pod {pod.name} not ready after {READY_DEADLINE_S:.0f} s:\n{pod.log_tail()}")

    async def _lost_its_port(self, pod: Pod) -> bool:
        """Start the pod again on another port when another process took the one ``free_port`` chose
        before the pod bound it (a real pod has an address of its own, so this is the harness's race,
        not the product's failure); at most three times."""
        this_start = pod.log_path.read_bytes()[pod.log_from :].decode(errors="replace")
        if pod.port_retries >= 3 or "address already in use" not in this_start:
            return False
        pod.port_retries += 1
        pod.log_from = pod.log_path.stat().st_size
        pod.port = free_port()
        pod.env["CAPTIONFLEET_PORT"] = str(pod.port)
        pod.process = await asyncio.to_thread(_spawn, pod.argv, pod.env, pod.log_path)
        return True

    async def _stop(self, pod: Pod) -> None:
        await self._unpublish(pod)
        if pod.task is not None:
            pod.task.cancel()
        pods = self.pods.get(pod.deployment, [])
        if pod in pods:
            pods.remove(pod)
        await asyncio.to_thread(_stop_process, pod.process)

    # EndpointSlices and Deployment status
    def _services_of(self, pod: Pod) -> list[str]:
        names = []
        for name in sorted(self.api.names(SERVICES, self.namespace)):
            service = self.api.live(SERVICES, self.namespace, name) or {}
            selector = service.get("spec", {}).get("selector") or {}
            if selector and all(pod.labels.get(k) == v for k, v in selector.items()):
                names.append(name)
        return names

    async def _publish(self, pod: Pod) -> None:
        for service in self._services_of(pod):
            slice_name = f"{service}-{pod.name}"
            if slice_name in pod.published:
                continue
            body = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name,
                    "namespace": self.namespace,
                    "labels": {"kubernetes.io/service-name": service},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": pod.address_port, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": ["127.0.0.1"],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": pod.name, "namespace": self.namespace},
                    }
                ],
            }
            await self._send("POST", SLICES_PATH.format(namespace=self.namespace), body)
            pod.published.add(slice_name)

    async def _unpublish(self, pod: Pod) -> None:
        for slice_name in sorted(pod.published):
            path = SLICES_PATH.format(namespace=self.namespace) + f"/{slice_name}"
            await self._send("DELETE", path, {})
        pod.published.clear()

    async def _report(self, name: str, deployment: Mapping[str, Any], template_hash: str) -> None:
        pods = self.pods.get(name, [])
        updated = [p for p in pods if p.template_hash == template_hash]
        ready = sum(1 for p in pods if p.ready)
        status = {
            "observedGeneration": deployment["metadata"].get("generation"),
            "replicas": len(pods),
            "updatedReplicas": len(updated),
            "readyReplicas": ready,
            "availableReplicas": ready,
        }
        key = tuple(status.values())
        if self._reported.get(name) == key:
            return
        path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/status"
        await self._send("PATCH", path, {"status": status}, "application/merge-patch+json")
        self._reported[name] = key

    async def _send(self, method: str, path: str, body: Any, content_type: str = "application/json") -> None:
        headers = {"Content-Type": content_type}
        async with self.api.request(method, path, json=body, headers=headers) as response:
            if response.status >= 300 and not (method == "DELETE" and response.status == 404):
                raise AssertionError(f"{method} {path}: {response.status} {await response.text()}")

    # reading
    def warnings(self, deployment: str, most: int = 20) -> list[str]:
        """The last warning and error lines its pods logged, access log aside: for a failing test."""
        lines = [
            line
            for pod in self.pods.get(deployment, [])
            for line in pod.log_path.read_text(errors="replace").splitlines()
            if '"level": "warning"' in line or '"level": "error"' in line
        ]
        return [line for line in lines if ".access" not in line][-most:]

    def ready_pods(self, deployment: str) -> list[Pod]:
        return [p for p in self.pods.get(deployment, []) if p.ready and p.published]


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A process in its own session (stopped with everything it starts), output appended to a file."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop_process(process: subprocess.Popen[bytes], first: signal.Signals = signal.SIGTERM) -> None:
    """``first`` to the process's group, SIGKILL after 10 s; waits for the end."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


# --- the operator as a process -------------------------------------------------------------------


class OperatorProcess:
    """``captionfleet operator`` against the emulator, as its own process (so it can be killed -9)."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.killed = False

    def start(self, **options: str) -> None:
        """Start the operator; ``options``: more of its settings, as CAPTIONFLEET_<NAME> variables."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.killed = False
        self.metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
        env.update(
            CAPTIONFLEET_KUBECONFIG=str(self.kubeconfig),
            CAPTIONFLEET_NAMESPACES=self.namespace,
            CAPTIONFLEET_STANDALONE="true",
            CAPTIONFLEET_LIVENESS="",
            CAPTIONFLEET_METRICS=f"http://127.0.0.1:{self.metrics_port}/metrics",
            CAPTIONFLEET_RESYNC_SECONDS="0",
        )
        env.update({f"CAPTIONFLEET_{name.upper()}": value for name, value in options.items()})
        self.process = _spawn([sys.executable, "-m", "captionfleet", "operator"], env, self.log_path)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies or the OOM killer strikes."""
        self.killed = True
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)

    def check(self) -> None:
        """Raise when the operator, started and not killed on purpose, has exited."""
        if self.process is not None and not self.killed and self.process.poll() is not None:
            raise FleetFailure(f"the operator exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")


# --- client traffic ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    user: str
    sent: float  # monotonic
    done: float
    status: int  # 0: no HTTP answer (connection failure, timeout)
    version: str | None  # X-Routed-Version (also on error answers), else the body's model_version
    error: str | None = None  # an error answer's code and message, for a failing test to say why


def _error_of(body: object) -> str | None:
    """``code: message`` of a contract error body, else None."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    return f"{error.get('code')}: {error.get('message')}"


class Traffic:
    """Caption requests through ``url`` from ``users``; each user's requests one after the other.

    ``workers`` loops run side by side, worker i owning users i, i+workers, ...; each sends about
    ``rate_per_s / workers`` requests per second (paced, so a slow fleet is not flooded).
    """

    def __init__(
        self,
        url: str,
        users: list[str],
        images: list[bytes],
        rate_per_s: float,
        workers: int = 8,
        headers: Mapping[str, str] | None = None,  # on every request (e.g. X-API-Key)
    ):
        self.url = url
        self.headers = dict(headers or {})
        self.users = users
        self.images = images
        self.rate_per_s = rate_per_s
        self.workers = workers
        self.answers: list[Answer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Traffic:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _worker(self, index: int) -> None:
        mine = self.users[index :: self.workers]
        pause = self.workers / self.rate_per_s
        while True:
            for user in mine:
                started = time.monotonic()
                self.answers.append(await self._one(user))
                await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))  # pacing

    async def _one(self, user: str) -> Answer:
        assert self._session is not None
        image = self.images[int(hashlib.sha256(user.encode()).hexdigest(), 16) % len(self.images)]
        sent = time.monotonic()
        try:
            async with self._session.post(
                self.url + "/v1/caption",
                data=image,
                headers={**self.headers, "Content-Type": "image/png", "X-User-Id": user},
            ) as response:
                version = response.headers.get("X-Routed-Version")
                body = await response.json(content_type=None)
                if version is None and isinstance(body, dict):
                    version = body.get("model_version")
                return Answer(user, sent, time.monotonic(), response.status, version, _error_of(body))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Answer(user, sent, time.monotonic(), 0, None, repr(exc))

    def since(self, moment: float) -> list[Answer]:
        return [a for a in self.answers if a.sent >= moment]


class StatusLog:
    """Every distinct ``status`` of one CaptionModel, with the monotonic time it was first seen.

    Event-driven: it watches the CaptionModels (as kopf and the routers do) and records each change as
    it arrives, so a busy machine delays the records but never skips one.
    """

    def __init__(self, api: Any, namespace: str, name: str) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._watching = asyncio.Event()

    async def __aenter__(self) -> StatusLog:
        self._task = asyncio.create_task(self._run())
        await self._watching.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _record(self, obj: Mapping[str, Any] | None) -> None:
        status = json.loads(json.dumps((obj or {}).get("status") or {}))
        if not self.seen or self.seen[-1][1] != status:
            self.seen.append((time.monotonic(), status))

    async def _run(self) -> None:
        path = f"/apis/captionfleet.io/v1alpha1/namespaces/{self.namespace}/captionmodels?watch=true"
        async with self.api.request("GET", path) as response:
            self._record(self.api.live("captionfleet.io/v1alpha1/captionmodels", self.namespace, self.name))
            self._watching.set()
            async for line in response.content:
                if not line.strip():
                    continue
                obj = json.loads(line).get("object") or {}
                if (obj.get("metadata") or {}).get("name") == self.name:
                    self._record(obj)

    def rollouts(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, dict(s.get("rollout") or {})) for t, s in self.seen]

    def first(self, predicate: Callable[[dict[str, Any]], bool]) -> float | None:
        return next((t for t, s in self.seen if predicate(s)), None)
