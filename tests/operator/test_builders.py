"""The pure builders: spec in, whole manifests out, valid for Kubernetes, without a cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from captionfleet.operator import builders, spec
from captionfleet.operator.builders import autoscaling, runtime
from captionfleet.operator.builders.common import ClusterConfig, FleetContext
from captionfleet.operator.builders.env import FOREIGN_ENV, ROUTER_ENV, RUNTIME_ENV
from captionfleet.operator.builders.replicas import replica_bounds
from captionfleet.operator.settings import OperatorSettings
from captionfleet.operator.traffic import Share
from captionfleet.settings import env_name
from captionfleet.settings.serve import ServeSettings

from .conftest import KEDA_SCHEMAS, schema_problems

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = "1.33"
CONFIG = ClusterConfig(
    OperatorSettings(default_runtime_image="registry.test/runtime:1", prometheus_url="http://prometheus:9090")
)

JOBS: dict[str, Any] = {
    "redisUrlSecret": {"name": "queue", "key": "url"},
    "redisAddress": "redis-master.data.svc:6379",
    "redisPasswordSecret": {"name": "queue", "key": "password"},
    "redisDatabase": 2,
    "targetPendingItems": 40,
}


def context(raw: dict[str, Any], name: str = "fleet") -> FleetContext:
    return FleetContext.create(
        name=name, namespace="ml", uid="0d5c-uid", spec=spec.parse_spec(raw), config=CONFIG
    )


def example(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "examples" / name).read_text())["spec"])


def variations() -> list[tuple[str, dict[str, Any]]]:
    cases = [(path.name, yaml.safe_load(path.read_text())["spec"]) for path in EXAMPLES]
    ab = example("ab-canary.yaml")
    keda = ab | {"autoscaling": ab["autoscaling"] | {"provider": "keda", "minReplicas": 0}}
    cases.append(("keda", keda))
    cases.append(("keda with jobs", keda | {"jobs": JOBS}))
    cases.append(("hpa with jobs", ab | {"jobs": {"redisUrlSecret": JOBS["redisUrlSecret"]}}))
    cases.append(("fixed replicas", ab | {"autoscaling": {"provider": "none", "minReplicas": 3}}))
    cases.append(("file model, NodePort router", {"versions": [{"name": "v1", "model": "file:///opt/m"}],
                  "router": {"serviceType": "NodePort", "port": 8443}}))  # fmt: skip
    moderated = {"url": "http://moderation.ml.svc:8080/v1/moderate", "allowPrivateAddresses": True}
    cases.append(("moderation", example("minimal.yaml") | {"moderation": moderated}))
    return cases


@pytest.mark.parametrize(("case", "raw"), variations(), ids=[c for c, _ in variations()])
def test_every_manifest_is_valid_for_kubernetes(case: str, raw: dict[str, Any]) -> None:
    manifests = builders.fleet(context(raw))
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in KEDA_SCHEMAS:  # CRDs that kubernetes-validate has no schema for
            assert manifest["apiVersion"] == "keda.sh/v1alpha1"
            assert schema_problems(manifest) == []
        else:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        meta = manifest["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"][0]["uid"] == "0d5c-uid"
        assert meta["labels"]["captionfleet.io/model"] == "fleet"
        assert len(meta["name"]) <= 63


def test_builders_do_not_touch_their_input() -> None:
    raw = example("ab-canary.yaml")
    kept = copy.deepcopy(raw)
    ctx = context(raw)
    first = builders.fleet(ctx)
    assert raw == kept
    assert builders.fleet(ctx) == first  # pure: the same input, the same manifests


def test_children_per_version_and_for_the_router() -> None:
    kinds = [(m["kind"], m["metadata"]["name"]) for m in builders.fleet(context(example("ab-canary.yaml")))]
    assert kinds == [
        ("ServiceAccount", "fleet-router"),
        ("Role", "fleet-router"),
        ("RoleBinding", "fleet-router"),
        ("Deployment", "fleet-base"),
        ("Service", "fleet-base"),
        ("HorizontalPodAutoscaler", "fleet-base"),
        ("Deployment", "fleet-large"),
        ("Service", "fleet-large"),
        ("HorizontalPodAutoscaler", "fleet-large"),
        ("Deployment", "fleet-base-next"),
        ("Service", "fleet-base-next"),
        ("HorizontalPodAutoscaler", "fleet-base-next"),
        ("Deployment", "fleet-router"),
        ("Service", "fleet"),
    ]


def test_the_containers_set_only_the_documented_environment() -> None:
    for _, raw in variations():
        for manifest in builders.fleet(context(raw)):
            if manifest["kind"] != "Deployment":
                continue
            for c in manifest["spec"]["template"]["spec"]["containers"]:
                fields = RUNTIME_ENV if c["name"] == "runtime" else ROUTER_ENV
                documented = {env_name(field) for field in fields} | set(FOREIGN_ENV)
                assert {e["name"] for e in c["env"]} <= documented, c["name"]


@pytest.mark.parametrize(("window", "kept"), [("5m", "900"), ("30m", "1800"), ("1h30s", "3630")])
def test_the_router_keeps_figures_for_the_whole_analysis_window(window: str, kept: str) -> None:
    raw = example("ab-canary.yaml")
    raw["rollout"] = {"analysis": {"window": window}}
    (router,) = [m for m in builders.fleet(context(raw)) if m["metadata"]["name"] == "fleet-router"
                 and m["kind"] == "Deployment"]  # fmt: skip
    env = {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CAPTIONFLEET_STATS_WINDOW_S"] == kept


def test_gpus_are_limits_only_when_asked_for() -> None:
    gpu = context(example("gpu-pvc.yaml"))
    cpu = context(example("minimal.yaml"))
    gpu_limits = runtime.deployment(gpu, gpu.spec.versions[0])["spec"]["template"]["spec"]["containers"][0]
    cpu_limits = runtime.deployment(cpu, cpu.spec.versions[0])["spec"]["template"]["spec"]["containers"][0]
    assert gpu_limits["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_limits["resources"]["limits"]
    assert gpu_limits["resources"]["requests"]["nvidia.com/gpu"] == 1  # extended: requests == limits
    assert "nvidia.com/gpu" not in cpu_limits["resources"]["requests"]


def test_the_init_container_gets_the_model_as_arguments_never_as_code() -> None:
    raw = {"versions": [{"name": "v1", "model": "hf://org/model-x@v2.0"}]}
    ctx = context(raw)
    pod = runtime.deployment(ctx, ctx.spec.versions[0])["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["command"] == ["python", "-c", runtime.DOWNLOAD_SCRIPT]
    assert fetch["args"] == ["org/model-x", "v2.0", "/models/weights"]
    assert "org/model-x" not in runtime.DOWNLOAD_SCRIPT
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["model"]["readOnly"] is True  # the server only reads what the init container wrote


@pytest.mark.parametrize(
    ("fleet", "weight", "override", "expected"),
    [
        ((2, 20), 100, {}, (2, 20)),
        ((2, 20), 60, {}, (2, 12)),
        ((2, 20), 10, {}, (1, 2)),  # a 10 % canary gets a tenth, not the stable version's count
        ((2, 20), 0, {}, (1, 1)),  # no traffic: one warm pod
        ((0, 20), 10, {}, (0, 2)),  # scale to zero stays possible (KEDA)
        ((1, 100), 7, {}, (1, 7)),  # integer arithmetic: 7 % of 100 is 7
        ((2, 20), 10, {"minReplicas": 3}, (3, 3)),
        ((2, 20), 60, {"maxReplicas": 4}, (2, 4)),
        ((2, 20), 60, {"minReplicas": 1, "maxReplicas": 30}, (1, 30)),
    ],
)
def test_replica_bounds_follow_the_traffic_share(
    fleet: tuple[int, int], weight: int, override: dict[str, int], expected: tuple[int, int]
) -> None:
    raw = {
        "versions": [{"name": "v", "model": "hf://a/b", "weight": 100, **override}],
        "autoscaling": {"minReplicas": fleet[0], "maxReplicas": fleet[1]},
    }
    parsed = spec.parse_spec(raw)
    assert replica_bounds(parsed, Share("v", "stable", weight)) == expected


def test_fixed_replicas_without_an_autoscaler() -> None:
    raw = {
        "versions": [{"name": "v1", "model": "hf://a/b"}],
        "autoscaling": {"provider": "none", "minReplicas": 3},
    }
    ctx = context(raw)
    assert autoscaling.autoscaler(ctx, ctx.spec.versions[0]) is None
    assert runtime.deployment(ctx, ctx.spec.versions[0])["spec"]["replicas"] == 3


def test_the_hpa_scales_on_queue_depth_with_a_cpu_fallback() -> None:
    ctx = context(example("ab-canary.yaml"))
    hpa = autoscaling.hpa(ctx, ctx.spec.versions[0])["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fleet-base"}
    pods, cpu = hpa["metrics"]
    assert pods["pods"] == {
        "metric": {"name": "captionfleet_queue_depth"},
        "target": {"type": "AverageValue", "averageValue": "8"},
    }
    assert cpu["resource"]["target"] == {"type": "Utilization", "averageUtilization": 80}


@pytest.mark.parametrize(("window", "request_mi", "limit_mi"), [("5m", 129, 513), ("24h", 132, 516)])
def test_the_router_asks_for_the_memory_its_statistics_window_needs(
    window: str, request_mi: int, limit_mi: int
) -> None:
    raw = example("ab-canary.yaml")  # three versions
    raw["rollout"] = {"analysis": {"window": window}}
    (router,) = [m for m in builders.fleet(context(raw)) if m["metadata"]["name"] == "fleet-router"
                 and m["kind"] == "Deployment"]  # fmt: skip
    resources = router["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"] == f"{request_mi}Mi"
    assert resources["limits"]["memory"] == f"{limit_mi}Mi"


def test_env_values_are_escaped_and_secrets_are_references() -> None:
    raw = example("minimal.yaml")
    raw["versions"][0]["model"] = "file:///opt/$(HOME)/m"
    raw["cache"] = {"redisUrlSecret": {"name": "redis", "key": "url"}}
    ctx = context(raw)
    env = runtime.deployment(ctx, ctx.spec.versions[0])["spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["CAPTIONFLEET_MODEL"]["value"] == "/opt/$$(HOME)/m"
    assert by_name["CAPTIONFLEET_REDIS_URL"] == {
        "name": "CAPTIONFLEET_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}},
    }


def _runtime_env(manifest: dict[str, Any]) -> dict[str, Any]:
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_jobs_reach_every_runtime_as_a_secret_reference_and_a_stream_per_version() -> None:
    raw = example("ab-canary.yaml") | {"jobs": JOBS}
    deployments = [m for m in builders.fleet(context(raw)) if m["kind"] == "Deployment"]
    runtimes = [m for m in deployments if m["metadata"]["labels"]["app.kubernetes.io/component"] == "runtime"]
    streams = set()
    for manifest in runtimes:
        env = _runtime_env(manifest)
        assert env["CAPTIONFLEET_JOBS_REDIS_URL"] == {"secretKeyRef": {"name": "queue", "key": "url"}}
        version = manifest["metadata"]["labels"]["captionfleet.io/version"]
        assert env["CAPTIONFLEET_JOBS_STREAM"] == f"captionfleet:jobs:ml:fleet:{version}"
        streams.add(env["CAPTIONFLEET_JOBS_STREAM"])
    assert len(streams) == len(runtimes) == 3
    router = next(m for m in deployments if m["metadata"]["name"] == "fleet-router")
    assert not any(name.startswith("CAPTIONFLEET_JOBS") for name in _runtime_env(router))
    plain = next(m for m in builders.fleet(context(example("ab-canary.yaml"))) if m["kind"] == "Deployment")
    assert not any(name.startswith("CAPTIONFLEET_JOBS") for name in _runtime_env(plain))


def test_keda_watches_the_job_backlog_after_the_interactive_queue() -> None:
    ab = example("ab-canary.yaml")
    raw = ab | {"autoscaling": {"provider": "keda"}, "jobs": JOBS}
    ctx = context(raw)
    manifests = builders.fleet(ctx)
    scaled = next(
        m for m in manifests if m["kind"] == "ScaledObject" and m["metadata"]["name"] == "fleet-base"
    )
    types = [t["type"] for t in scaled["spec"]["triggers"]]
    assert types == ["prometheus", "cpu", "redis-streams"]  # the interactive queue depth first
    backlog = scaled["spec"]["triggers"][2]
    assert backlog["metadata"] == {
        "address": "redis-master.data.svc:6379",
        "stream": "captionfleet:jobs:ml:fleet:base",  # the same stream the version's runtimes read
        "streamLength": "40",
        "databaseIndex": "2",
        "enableTLS": "false",
    }
    assert "consumerGroup" not in backlog["metadata"]  # with one, KEDA would count only delivered items
    (auth,) = [
        m for m in manifests if m["kind"] == "TriggerAuthentication" and m["metadata"]["name"] == "fleet-base"
    ]
    assert backlog["authenticationRef"] == {"name": "fleet-base"}
    assert auth["spec"] == {
        "secretTargetRef": [{"parameter": "password", "name": "queue", "key": "password"}]
    }
    kinds = [m["kind"] for m in manifests if m["metadata"]["name"] == "fleet-base"]
    assert kinds.index("TriggerAuthentication") < kinds.index("ScaledObject")


def test_no_password_no_credentials_and_no_keda_no_backlog_trigger() -> None:
    ab = example("ab-canary.yaml")
    open_queue = {k: v for k, v in JOBS.items() if k != "redisPasswordSecret"}
    manifests = builders.fleet(context(ab | {"autoscaling": {"provider": "keda"}, "jobs": open_queue}))
    assert not any(m["kind"] == "TriggerAuthentication" for m in manifests)
    backlogs = [t for m in manifests if m["kind"] == "ScaledObject" for t in m["spec"]["triggers"][2:]]
    assert len(backlogs) == 3 and not any("authenticationRef" in t for t in backlogs)
    with_hpa = builders.fleet(context(ab | {"jobs": JOBS}))
    assert not any(m["kind"] in ("TriggerAuthentication", "ScaledObject") for m in with_hpa)


def test_moderation_reaches_the_runtimes_as_their_settings() -> None:
    raw = example("minimal.yaml")
    raw["moderation"] = {"url": "https://mod.example.com/v1/check?x=$(HOME)", "timeoutMs": 750,
                         "failurePolicy": "Ignore"}  # fmt: skip
    ctx = context(raw)
    env = runtime.deployment(ctx, ctx.spec.versions[0])["spec"]["template"]["spec"]["containers"][0]["env"]
    values = {e["name"]: e["value"] for e in env if "value" in e}
    settings = ServeSettings(
        moderation_url=values["CAPTIONFLEET_MODERATION_URL"].replace("$$", "$"),
        moderation_timeout_ms=float(values["CAPTIONFLEET_MODERATION_TIMEOUT_MS"]),
        moderation_failure_policy=values["CAPTIONFLEET_MODERATION_FAILURE_POLICY"],
    )
    assert settings.moderation_url == "https://mod.example.com/v1/check?x=$(HOME)"
    assert settings.moderation_timeout_ms == 750 and settings.moderation_failure_policy == "Ignore"
    assert values["CAPTIONFLEET_MODERATION_ALLOW_PRIVATE"] == "false" and not settings.check()
    # Without moderation in the spec, the runtimes get none of its settings.
    plain = context(example("minimal.yaml"))
    pod = runtime.deployment(plain, plain.spec.versions[0])["spec"]["template"]["spec"]
    env = pod["containers"][0]["env"]
    assert not [e for e in env if "MODERATION" in e["name"]]
