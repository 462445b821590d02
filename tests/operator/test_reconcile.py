"""reconcile.py and analysis.py as plain functions, against a fake of the kube module's interface
(``kube.Api``): what each decides and which calls it makes, without a server."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from captionfleet.operator import analysis, gate_run, kube, reconcile
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.figures import Figures, Reading
from captionfleet.operator.metrics import OperatorMetrics
from captionfleet.operator.settings import OperatorSettings

CONFIG = ClusterConfig(
    OperatorSettings(default_runtime_image="registry.test/runtime:1", prometheus_url="http://prometheus:9090")
)
NS = "ml"


def field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


class FakeKube:
    """Objects in a dict, keyed by (kind, namespace, name); every call is recorded."""

    def __init__(self, *, keda: bool = True) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.keda = keda
        self._versions = itertools.count(1)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(next(self._versions))
        meta.setdefault("generation", 1)
        self.objects[obj["kind"], meta.get("namespace", NS), meta["name"]] = obj
        return copy.deepcopy(obj)

    def of(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, NS, name))

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        if manifest["kind"] == "ScaledObject" and not self.keda:
            raise kube.NotFound(404, "the server could not find the requested resource")
        obj = copy.deepcopy(dict(manifest))
        old = self.objects.get((obj["kind"], NS, obj["metadata"]["name"]))
        if old is not None:  # as server-side apply: the status and the server's metadata stay
            obj["metadata"]["uid"] = old["metadata"]["uid"]
            if "status" in old:
                obj["status"] = old["status"]
        return self.put(obj)

    async def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind.kind, name))
        found = self.objects.get((kind.kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def list(
        self,
        kind: kube.Kind,
        namespace: str,
        labels: Mapping[str, str],
        *,
        fields: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        self.calls.append(("list", kind.kind, ""))
        return [
            copy.deepcopy(obj)
            for (k, ns, _), obj in self.objects.items()
            if k == kind.kind and ns == namespace
            and all((obj["metadata"].get("labels") or {}).get(key) == v for key, v in labels.items())
            and all(field_value(obj, key) == v for key, v in (fields or {}).items())
        ]  # fmt: skip

    async def delete(self, kind: kube.Kind, namespace: str, name: str) -> bool:
        self.calls.append(("delete", kind.kind, name))
        return self.objects.pop((kind.kind, namespace, name), None) is not None

    async def installed(self, kind: kube.Kind, namespace: str) -> bool:
        return self.keda or kind.kind != "ScaledObject"

    async def remove_annotation(self, kind: kube.Kind, namespace: str, name: str, key: str) -> None:
        self.calls.append(("remove_annotation", kind.kind, name))
        self.objects[kind.kind, namespace, name]["metadata"].get("annotations", {}).pop(key, None)

    async def patch_status(
        self,
        kind: kube.Kind,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        self.calls.append(("patch_status", kind.kind, name))
        obj = self.objects[kind.kind, namespace, name]
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            raise kube.Conflict(409, "modified")
        merged = {**(obj.get("status") or {}), **status}
        obj["status"] = {key: value for key, value in merged.items() if value is not None}
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(obj)


def model(api: FakeKube, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    body = {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": "fleet", "namespace": NS, "annotations": annotations or {}},
        "spec": spec,
    }
    return api.put(body)


ONE = {"versions": [{"name": "v1", "model": "file:///m"}]}
CANARY = {
    "versions": [
        {"name": "v1", "model": "file:///m1", "weight": 90},
        {"name": "v2", "model": "file:///m2", "weight": 10, "canary": True},
    ],
    "rollout": {"analysis": {"interval": "1s", "minRequests": 10, "stepWeight": 20}},
}


async def test_a_new_fleet_gets_every_child_and_a_status() -> None:
    api = FakeKube()
    outcome = await reconcile.reconcile(api, model(api, ONE), CONFIG)
    applied = {name for call, _, name in api.calls if call == "apply"}
    assert applied == {"fleet-router", "fleet-v1", "fleet"}
    assert [e.message for e in outcome.events if e.reason == "Created"][:3] == [
        "ServiceAccount fleet-router",
        "Role fleet-router",
        "RoleBinding fleet-router",
    ]
    assert outcome.status is not None and outcome.status.phase == "Pending"


async def test_an_object_the_fleet_does_not_own_is_never_applied() -> None:
    api = FakeKube()
    api.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fleet", "namespace": NS}})
    outcome = await reconcile.reconcile(api, model(api, ONE), CONFIG)
    assert [call for call in api.calls if call[0] in ("apply", "delete")] == []
    assert outcome.status is not None and outcome.status.phase == "Degraded"
    ready = next(c for c in outcome.status.conditions if c.type == "Ready")
    assert ready.reason == "NameConflict" and "Service fleet already exists" in ready.message
    assert [e.reason for e in outcome.events] == ["NameConflict"]
    assert "ownerReferences" not in api.of("Service", "fleet")["metadata"]  # type: ignore[index]


async def test_an_unknown_rollout_action_is_named_as_unknown_and_removed() -> None:
    api = FakeKube()
    body = model(api, ONE, {"captionfleet.io/rollout-action": "restart"})
    outcome = await reconcile.reconcile(api, body, CONFIG)
    (warning,) = [e for e in outcome.events if e.reason == "RolloutAction"]
    assert warning.type == "Warning"
    assert warning.message == "unknown rollout action 'restart' ignored; use one of abort, promote"
    assert api.of("CaptionModel", "fleet")["metadata"]["annotations"] == {}  # type: ignore[index]


async def test_without_keda_the_deployments_keep_a_replica_count_and_the_fleet_says_why() -> None:
    api = FakeKube(keda=False)
    spec = ONE | {"autoscaling": {"provider": "keda"}}
    outcome = await reconcile.reconcile(api, model(api, spec), CONFIG)
    assert api.of("Deployment", "fleet-v1")["spec"]["replicas"] == 1  # type: ignore[index]
    assert not any(kind == "ScaledObject" for call, kind, _ in api.calls if call == "apply")
    assert outcome.status is not None and outcome.status.phase == "Degraded"
    degraded = next(c for c in outcome.status.conditions if c.type == "Degraded")
    assert degraded.reason == "KedaNotInstalled"
    assert outcome.retry is None  # no retry storm: it is reported, not retried every 30 s


class Figuring:
    def __init__(self, figures: Figures | None) -> None:
        self.figures = figures
        self.reads = 0

    async def read(self, namespace: str, model: str, version: str, window_s: int) -> Reading:
        self.reads += 1
        return Reading(self.figures)


async def test_the_analysis_does_nothing_without_a_canary() -> None:
    api, source = FakeKube(), Figuring(Figures(100, 0))
    body = model(api, ONE)
    await reconcile.reconcile(api, body, CONFIG)
    api.calls.clear()
    outcome = await analysis.check_once(analysis.Tools(api, CONFIG, source, OperatorMetrics()), NS, "fleet")
    assert outcome.interval_s == analysis.IDLE_INTERVAL_S
    assert api.calls == [("get", "CaptionModel", "fleet")] and source.reads == 0


async def test_a_healthy_check_steps_the_canary_once_it_is_ready() -> None:
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    await reconcile.reconcile(api, model(api, CANARY), CONFIG)
    status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
    assert {v["name"]: v["weight"] for v in status["versions"]} == {"v1": 100, "v2": 0}  # not ready yet
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]
    tools = analysis.Tools(api, CONFIG, source, OperatorMetrics())
    outcome = await analysis.check_once(tools, NS, "fleet")
    assert outcome.interval_s == 1.0 and source.reads == 1
    assert [(e.reason, e.message.split(" (")[0]) for e in outcome.events] == [
        ("CanaryStep", "canary v2: 20 % -> 40 %")
    ]
    status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
    assert {v["name"]: v["weight"] for v in status["versions"]} == {"v1": 60, "v2": 40}
    hpa = api.of("HorizontalPodAutoscaler", "fleet-v1")["spec"]  # type: ignore[index]
    assert hpa["maxReplicas"] == 3  # 60 % of 4, now that the canary passed a check


async def test_a_pod_that_cannot_start_is_warned_once_and_no_secret_is_ever_read() -> None:
    api = FakeKube()
    spec = ONE | {"cache": {"redisUrlSecret": {"name": "redis", "key": "url"}}}
    body = model(api, spec)
    first = await reconcile.reconcile(api, body, CONFIG)
    assert first.status is not None and first.status.phase == "Pending"
    labels = api.of("Deployment", "fleet-v1")["spec"]["template"]["metadata"]["labels"]  # type: ignore[index]
    waiting = {"reason": "CreateContainerConfigError", "message": "couldn't find key url in Secret ml/redis"}
    api.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "fleet-v1-x", "namespace": NS, "labels": labels},
            "status": {
                "conditions": [],
                "containerStatuses": [{"name": "runtime", "state": {"waiting": waiting}}],
            },
        }
    )
    refreshed = await reconcile.refresh_status(api, NS, "fleet", CONFIG)
    assert refreshed.status is not None and refreshed.status.phase == "Degraded"
    expected = "version v1: Secret redis has no key url (cache.redisUrlSecret); its pods cannot start"
    assert [(e.type, e.reason, e.message) for e in refreshed.events] == [
        ("Warning", "SecretMissing", expected),
        ("Warning", "Degraded", expected),
    ]
    again = await reconcile.reconcile(api, api.of("CaptionModel", "fleet"), CONFIG)  # type: ignore[arg-type]
    assert "SecretMissing" not in [e.reason for e in again.events]
    assert not any(kind == "Secret" for _, kind, _ in api.calls)


async def test_a_quality_gate_with_auth_and_no_operator_key_waits_and_says_so_once() -> None:
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    spec = copy.deepcopy(CANARY) | {"auth": {"secretName": "keys"}}
    spec["rollout"]["qualityGate"] = {"minScore": 0.5}
    await reconcile.reconcile(api, model(api, spec), CONFIG)
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]
    asked: list[str] = []

    async def pods(namespace: str, service: str) -> list[str]:
        asked.append(service)
        return ["http://127.0.0.1:9"]

    async with aiohttp.ClientSession() as http:
        tools = analysis.Tools(api, CONFIG, source, OperatorMetrics(), gate_run.GateClients(http, pods))
        first = await analysis.check_once(tools, NS, "fleet")
        second = await analysis.check_once(tools, NS, "fleet")
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "NoOperatorKey")]
    assert second.events == [] and asked == [] and source.reads == 0  # no pod asked, said once
    status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
    assert {v["name"]: v["weight"] for v in status["versions"]} == {"v1": 100, "v2": 0}
    assert (status["rollout"]["phase"], status["rollout"]["gate"]["reason"]) == (
        "Progressing",
        "NoOperatorKey",
    )
    condition = next(c for c in status["conditions"] if c["type"] == "QualityGate")
    assert (condition["status"], condition["reason"]) == ("False", "NoOperatorKey")
    assert "operator has no key" in condition["message"]


async def test_a_quality_gate_that_cannot_read_its_configmap_says_so_once_and_keeps_the_canary_out() -> None:
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    spec = copy.deepcopy(CANARY)
    spec["rollout"]["qualityGate"] = {"dataset": "configMap:evalset", "minScore": 0.5}
    await reconcile.reconcile(api, model(api, spec), CONFIG)
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]

    async def pods(namespace: str, service: str) -> list[str]:
        return ["http://127.0.0.1:9"]  # never called: the dataset is read first

    async with aiohttp.ClientSession() as http:
        gate = gate_run.GateClients(http, pods)
        tools = analysis.Tools(api, CONFIG, source, OperatorMetrics(), gate)
        first = await analysis.check_once(tools, NS, "fleet")
        second = await analysis.check_once(tools, NS, "fleet")
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "QualityGateError")]
    assert "ConfigMap evalset (dataset configMap:evalset) does not exist" in first.events[0].message
    assert second.events == [] and source.reads == 0  # said once; no figures check before the gate
    status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
    assert {v["name"]: v["weight"] for v in status["versions"]} == {"v1": 100, "v2": 0}
    assert (status["rollout"]["phase"], status["rollout"]["gate"]["phase"]) == ("Progressing", "Error")
    condition = next(c for c in status["conditions"] if c["type"] == "QualityGate")
    assert (condition["status"], condition["reason"]) == ("False", "QualityGateError")


class Unavailable:
    """A figures source that has none, and says why."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def read(self, namespace: str, model: str, version: str, window_s: int, *_: Any) -> Reading:
        return Reading(None, [self.why])


async def test_a_check_without_figures_holds_and_says_why_once() -> None:
    api = FakeKube()
    await reconcile.reconcile(api, model(api, CANARY), CONFIG)
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]
    await reconcile.reconcile(api, api.of("CaptionModel", "fleet"), CONFIG)  # type: ignore[arg-type]
    why = "Prometheus http://prom:9090: ValueError: not a Prometheus query answer: [1, 2]"
    tools = analysis.Tools(api, CONFIG, Unavailable(why), OperatorMetrics())
    first = await analysis.check_once(tools, NS, "fleet")
    second = await analysis.check_once(tools, NS, "fleet")
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "FiguresUnavailable")]
    assert why in first.events[0].message and second.events == []  # said once per cause
    rollout = api.of("CaptionModel", "fleet")["status"]["rollout"]  # type: ignore[index]
    assert (rollout["phase"], rollout["weight"], rollout["step"]) == ("Progressing", 20, 1)
    assert why in rollout["message"]


async def test_a_canary_edited_mid_rollout_restarts_it_with_a_warning() -> None:
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    await reconcile.reconcile(api, model(api, copy.deepcopy(CANARY)), CONFIG)
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]
    await analysis.check_once(analysis.Tools(api, CONFIG, source, OperatorMetrics()), NS, "fleet")
    body = api.of("CaptionModel", "fleet")
    assert body is not None and body["status"]["rollout"]["weight"] == 40
    body["spec"]["versions"][1]["model"] = "file:///m3"  # the stored object's own spec: a copy of CANARY
    outcome = await reconcile.reconcile(api, body, CONFIG)
    (restarted,) = [e for e in outcome.events if e.reason == "RolloutRestarted"]
    assert restarted.type == "Warning"
    assert restarted.message.startswith("the rollout of canary v2 (Progressing at 40 %, step 2) starts again")
    rollout = api.of("CaptionModel", "fleet")["status"]["rollout"]  # type: ignore[index]
    assert (rollout["weight"], rollout["step"], rollout["reason"]) == (20, 1, "Started")
    again = await reconcile.reconcile(api, api.of("CaptionModel", "fleet"), CONFIG)  # type: ignore[arg-type]
    assert "RolloutRestarted" not in [e.reason for e in again.events]


def _edit_model(body: dict[str, Any]) -> None:
    body["spec"]["versions"][1]["model"] = "file:///m3"
    body["metadata"]["generation"] += 1


def _edit_gate(body: dict[str, Any]) -> None:
    body["spec"]["rollout"]["qualityGate"]["minScore"] = 0.9
    body["metadata"]["generation"] += 1


def _abort(body: dict[str, Any]) -> None:
    body["metadata"]["annotations"] = {"captionfleet.io/rollout-action": "abort"}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_edit_model, ("Progressing", "QualityGatePending", "Pending")),
        (_edit_gate, ("Progressing", "QualityGatePending", "Pending")),
        (_abort, ("RolledBack", "Aborted", "Pending")),
    ],
    ids=["canary model", "qualityGate thresholds", "abort action"],
)
async def test_a_gate_verdict_on_a_spec_changed_during_the_run_is_discarded(
    edit: Callable[[dict[str, Any]], None], expected: tuple[str, str, str]
) -> None:
    """The gate's run lets the lock go; what was reconciled meanwhile stands, the stale verdict is dropped."""
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    spec = copy.deepcopy(CANARY)
    spec["rollout"]["qualityGate"] = {"minScore": 0.0}  # the run passes, if it counted
    await reconcile.reconcile(api, model(api, spec), CONFIG)
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]

    async def caption(request: web.Request) -> web.Response:
        return web.json_response({"caption": "a red circle"})

    app = web.Application()
    app.router.add_post("/v1/caption", caption)
    edited: list[str] = []

    async def pods(namespace: str, service: str) -> list[str]:
        if service == "fleet-v2" and len(edited) == 1:  # the run's own look, after the ready check
            body = api.of("CaptionModel", "fleet")
            assert body is not None
            edit(body)
            await reconcile.reconcile(api, copy.deepcopy(body), CONFIG)  # the handler's, meanwhile
        edited.append(service)
        return [str(server.make_url("")).rstrip("/")]

    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        tools = analysis.Tools(api, CONFIG, source, OperatorMetrics(), gate_run.GateClients(http, pods))
        outcome = await analysis.check_once(tools, NS, "fleet")
    assert len(edited) >= 2 and outcome.events == [] and outcome.interval_s == 0.0
    rollout = api.of("CaptionModel", "fleet")["status"]["rollout"]  # type: ignore[index]
    assert (rollout["phase"], rollout["reason"], rollout["gate"]["phase"]) == expected
    status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
    assert {v["name"]: v["weight"] for v in status["versions"]} == {"v1": 100, "v2": 0}


async def no_pods(namespace: str, service: str) -> list[str]:
    return []


async def test_a_gated_canary_that_never_gets_ready_is_rolled_back_after_the_gate_timeout() -> None:
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    spec = copy.deepcopy(CANARY)
    spec["rollout"]["qualityGate"] = {"minScore": 0.5, "timeout": "1m"}
    await reconcile.reconcile(api, model(api, spec), CONFIG)
    async with aiohttp.ClientSession() as http:
        tools = analysis.Tools(api, CONFIG, source, OperatorMetrics(), gate_run.GateClients(http, no_pods))
        first = await analysis.check_once(tools, NS, "fleet")
        status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
        gate_state = status["rollout"]["gate"]
        assert first.events == [] and gate_state["phase"] == "Pending" and gate_state["waitingSince"]
        assert "waiting for a ready pod of canary v2" in gate_state["message"]
        written = [c for c in api.calls if c[0] == "patch_status"]
        await analysis.check_once(tools, NS, "fleet")
        assert [c for c in api.calls if c[0] == "patch_status"] == written  # waiting: nothing new to write
        gate_state["waitingSince"] = "2020-01-01T00:00:00Z"  # long ago
        late = await analysis.check_once(tools, NS, "fleet")
    assert [(e.type, e.reason) for e in late.events] == [("Warning", "QualityGateFailed")]
    assert "no ready pod to score within timeout 1m" in late.events[0].message
    status = api.of("CaptionModel", "fleet")["status"]  # type: ignore[index]
    assert (status["rollout"]["phase"], status["rollout"]["reason"]) == ("RolledBack", "QualityGateFailed")
    condition = next(c for c in status["conditions"] if c["type"] == "QualityGate")
    assert (condition["status"], condition["reason"]) == ("False", "QualityGateFailed")
    assert source.reads == 0


async def test_a_quality_gate_removed_while_pending_never_crashes_a_check() -> None:
    api, source = FakeKube(), Figuring(Figures(requests=50, errors=0))
    spec = copy.deepcopy(CANARY)
    spec["rollout"]["qualityGate"] = {"minScore": 0.5}
    await reconcile.reconcile(api, model(api, spec), CONFIG)
    body = api.of("CaptionModel", "fleet")
    assert body is not None and body["status"]["rollout"]["gate"]["phase"] == "Pending"
    del body["spec"]["rollout"]["qualityGate"]
    body["metadata"]["generation"] += 1
    await reconcile.reconcile(api, copy.deepcopy(body), CONFIG)
    api.of("Deployment", "fleet-v2")["status"] = {"readyReplicas": 1}  # type: ignore[index]
    async with aiohttp.ClientSession() as http:
        tools = analysis.Tools(api, CONFIG, source, OperatorMetrics(), gate_run.GateClients(http, no_pods))
        outcome = await analysis.check_once(tools, NS, "fleet")
    assert [e.reason for e in outcome.events] == ["CanaryStep"] and source.reads == 1
    rollout = api.of("CaptionModel", "fleet")["status"]["rollout"]  # type: ignore[index]
    assert rollout.get("gate") is None and rollout["weight"] == 40
