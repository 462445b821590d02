"""values.schema.json: Helm refuses bad values with a message that names the key."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "captionfleet"

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown pull policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("tag with a space", {"image": {"tag": "v1 beta"}}, "/image/tag"),
    (
        "a namespace glob: RBAC cannot grant on it",
        {"operator": {"watchNamespaces": ["ml-*"]}},
        "/operator/watchNamespaces/0",
    ),
    ("a namespace twice", {"operator": {"watchNamespaces": ["ml", "ml"]}}, "/operator/watchNamespaces"),
    (
        "namespaces as one string",
        {"operator": {"watchNamespaces": "ml,ml-staging"}},
        "/operator/watchNamespaces",
    ),
    ("a privileged port for a non-root process", {"operator": {"healthPort": 80}}, "/operator/healthPort"),
    ("a port as a string", {"operator": {"healthPort": "8081"}}, "/operator/healthPort"),
    ("negative resync", {"operator": {"resyncSeconds": -1}}, "/operator/resyncSeconds"),
    (
        "a Prometheus URL without scheme",
        {"operator": {"prometheusUrl": "prometheus:9090"}},
        "/operator/prometheusUrl",
    ),
    (
        "peering name not a DNS label",
        {"operator": {"peering": {"name": "Fleet_A"}}},
        "/operator/peering/name",
    ),
    ("misspelt option", {"operator": {"watchNamespace": ["ml"]}}, "watchNamespace"),
    ("replicas: the operator runs exactly one", {"replicas": 3}, "replicas"),
    (
        "interval in words",
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        "/metrics/serviceMonitor/interval",
    ),
    (
        "error rate as a percentage",
        {"metrics": {"prometheusRule": {"alerts": {"errorRate": {"threshold": 5}}}}},
        "/metrics/prometheusRule/alerts/errorRate/threshold",
    ),
    (
        "queue depth of zero",
        {"metrics": {"prometheusRule": {"alerts": {"queueDepth": {"threshold": 0}}}}},
        "/metrics/prometheusRule/alerts/queueDepth/threshold",
    ),
    (
        "latency threshold of zero",
        {"metrics": {"prometheusRule": {"alerts": {"p99Latency": {"thresholdSeconds": 0}}}}},
        "/metrics/prometheusRule/alerts/p99Latency/thresholdSeconds",
    ),
    (
        "unknown severity",
        {"metrics": {"prometheusRule": {"alerts": {"rollback": {"severity": "page"}}}}},
        "/metrics/prometheusRule/alerts/rollback/severity",
    ),
    (
        "label value not a string",
        {"dashboard": {"labels": {"grafana_dashboard": 1}}},
        "/dashboard/labels/grafana_dashboard",
    ),
    ("upper-case full name", {"fullnameOverride": "CaptionFleet"}, "/fullnameOverride"),
    ("pull secret without a name", {"imagePullSecrets": [{"secret": "regcred"}]}, "/imagePullSecrets/0"),
    ("env var without a name", {"operator": {"extraEnv": [{"value": "1"}]}}, "/operator/extraEnv/0"),
    (
        "env value a number",
        {"operator": {"extraEnv": [{"name": "X", "value": 5}]}},
        "/operator/extraEnv/0/value",
    ),
    (
        "env value and valueFrom",
        {"operator": {"extraEnv": [{"name": "X", "value": "1", "valueFrom": {}}]}},
        "/operator/extraEnv/0",
    ),
    ("env name with a space", {"operator": {"extraEnv": [{"name": "A B"}]}}, "/operator/extraEnv/0/name"),
    ("digest not sha256 hex", {"image": {"tag": "0.1@sha256:xyz"}}, "/image/tag"),
    ("repository with a tag in it", {"image": {"repository": "ghcr.io/op:1"}}, "/image/repository"),
    (
        "runtime repository upper-case",
        {"operator": {"runtimeImage": {"repository": "Reg/X"}}},
        "/operator/runtimeImage",
    ),
    ("full name over 63", {"fullnameOverride": "a" * 64}, "/fullnameOverride"),
    ("name over 63", {"nameOverride": "a" * 64}, "/nameOverride"),
    (
        "credentials in the Prometheus URL",
        {"operator": {"prometheusUrl": "http://u:p@prom:9090"}},
        "/operator/prometheusUrl",
    ),
    ("negative cpu request", {"resources": {"requests": {"cpu": "-500m"}}}, "/resources/requests/cpu"),
    ("memory in words", {"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ("unknown resources key", {"resources": {"request": {}}}, "/resources"),
    (
        "toleration Exists with a value",
        {"tolerations": [{"operator": "Exists", "value": "v"}]},
        "/tolerations/0/value",
    ),
    ("empty toleration", {"tolerations": [{}]}, "/tolerations/0"),
    (
        "tolerationSeconds without NoExecute",
        {"tolerations": [{"key": "a", "tolerationSeconds": 5}]},
        "/tolerations/0",
    ),
    (
        "toleration key not a qualified name",
        {"tolerations": [{"key": "bad key!", "operator": "Exists"}]},
        "/tolerations/0/key",
    ),
    (
        "unknown toleration effect",
        {"tolerations": [{"key": "a", "effect": "Sometimes"}]},
        "/tolerations/0/effect",
    ),
    ("affinity not an object", {"affinity": {"nodeAffinity": "please"}}, "/affinity/nodeAffinity"),
    ("affinity misspelt", {"affinity": {"nodeAfinity": {}}}, "/affinity"),
    (
        "affinity term not an object (Kubernetes' own schema)",
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": "x"}}},
        "/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution",
    ),
    (
        "affinity field misspelt deep inside",
        {
            "affinity": {
                "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologykey": "z"}]}
            }
        },
        "/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution/0",
    ),
    ("nodeSelector key with a space", {"nodeSelector": {"a b": "c"}}, "/nodeSelector"),
    ("nodeSelector value too long", {"nodeSelector": {"a": "x" * 64}}, "/nodeSelector/a"),
    ("priority class with a space", {"priorityClassName": "Not Valid"}, "/priorityClassName"),
    ("pod label key invalid", {"podLabels": {"bad key!": "x"}}, "/podLabels"),
    ("pod label value invalid", {"podLabels": {"team": "a b"}}, "/podLabels/team"),
    ("pod annotation not a string", {"podAnnotations": {"a": 1}}, "/podAnnotations/a"),
    (
        "monitor label key invalid",
        {"metrics": {"serviceMonitor": {"labels": {"a b": "x"}}}},
        "/metrics/serviceMonitor/labels",
    ),
    ("pull secret name invalid", {"imagePullSecrets": [{"name": "Reg Cred"}]}, "/imagePullSecrets/0/name"),
    ("a root user", {"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ("runAsNonRoot off", {"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    (
        "seccomp Unconfined",
        {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
        "/podSecurityContext/seccompProfile",
    ),
    (
        "seccomp Localhost without a profile",
        {"podSecurityContext": {"seccompProfile": {"type": "Localhost"}}},
        "/podSecurityContext/seccompProfile",
    ),
    (
        "a profile with RuntimeDefault",
        {"securityContext": {"seccompProfile": {"type": "RuntimeDefault", "localhostProfile": "x.json"}}},
        "/securityContext/seccompProfile",
    ),
    ("sysctls (restricted refuses)", {"podSecurityContext": {"sysctls": []}}, "/podSecurityContext"),
    ("privileged container", {"securityContext": {"privileged": True}}, "/securityContext/privileged"),
    (
        "privilege escalation",
        {"securityContext": {"allowPrivilegeEscalation": True}},
        "/securityContext/allowPrivilegeEscalation",
    ),
    (
        "capabilities not dropped",
        {"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
        "/securityContext/capabilities/drop",
    ),
    (
        "a capability added",
        {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
        "/securityContext/capabilities/add/0",
    ),
    ("dashboard namespace over 63", {"dashboard": {"namespace": "a" * 64}}, "/dashboard/namespace"),
]


@pytest.fixture(scope="module")
def loaded() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as chart:
        yield chart


@pytest.mark.parametrize(("case", "values", "where"), BAD_VALUES, ids=[case for case, _, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(
    loaded: helm.Chart, case: str, values: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        loaded.validate_schema(values)
    assert where in str(caught.value), caught.value


def test_install_itself_refuses_bad_values(loaded: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="/image/pullPolicy"):
        loaded.render({"image": {"pullPolicy": "Sometimes"}}, name="cf", namespace="default")


def test_good_non_default_values_pass(loaded: helm.Chart, everything_on: dict[str, Any]) -> None:
    loaded.validate_schema(everything_on)
    loaded.validate_schema({})


def test_an_existing_service_account_needs_its_name(loaded: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serviceAccount\.name is required"):
        loaded.render({"serviceAccount": {"create": False}}, name="cf", namespace="default")


def _leaves(
    values: Mapping[str, Any], schema: Mapping[str, Any], path: str = ""
) -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        sub = schema.get("properties", {}).get(key)
        here = f"{path}.{key}" if path else key
        yield here, sub
        if sub is not None and isinstance(value, dict) and "properties" in sub:
            yield from _leaves(value, sub, here)


def test_every_value_is_typed_and_described() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, sub in _leaves(values, schema):
        assert sub is not None, f"{path} is in values.yaml but not in values.schema.json"
        assert sub.get("type"), f"{path} has no type in values.schema.json"
        assert sub.get("description"), f"{path} has no description (docs/configuration.md shows it)"
        if sub["type"] == "object" and "properties" in sub:
            assert sub.get("additionalProperties") is False, f"{path}: a typo there would pass silently"
