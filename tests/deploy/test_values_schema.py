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
