"""Shared fixtures of the install-surface tests: the chart rendered by real Helm, and its objects.

Helm v4 runs in-process through helm-python-sdk (no helm binary, no cluster): ``render`` is what
``helm template`` prints, and every rendered object is validated against the Kubernetes OpenAPI
schemas (kubernetes-validate), the prometheus-operator models, or the chart's own CRDs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "captionfleet"
RELEASE = "cf"
NAMESPACE = "captionfleet-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

# Non-default values that switch every optional part on and every mode over.
EVERYTHING_ON: dict[str, Any] = {
    "operator": {
        "watchNamespaces": ["ml", "ml-staging"],
        "prometheusUrl": "http://prometheus-operated.monitoring.svc:9090",
        "verbose": True,
        "extraEnv": [{"name": "CAPTIONFLEET_RESYNC_SECONDS", "value": "60"}],
        "runtimeImage": {"repository": "registry.example/captionfleet/runtime", "tag": "0.1.0-cpu"},
    },
    "image": {"tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/cf"}},
    "podAnnotations": {"example.com/team": "ml-platform"},
    "podLabels": {"team": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                        ]
                    }
                ]
            }
        }
    },
    "priorityClassName": "system-cluster-critical",
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "ML"}},
}


@dataclass(frozen=True)
class Rendered:
    """One `helm template`: the objects by kind, the NOTES, and the CRDs Helm would install first."""

    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {len(found)}"
        return found[0]


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


RenderAs = Callable[..., Rendered]


@pytest.fixture(scope="session")
def render_as(chart: helm.Chart) -> RenderAs:
    """Render with the given values (over the defaults), as `helm template NAME -n NAMESPACE`."""
    cache: dict[str, Rendered] = {}

    def _render(
        values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE
    ) -> Rendered:
        key = repr((values, name, namespace))
        if key not in cache:
            manifests = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
            objects: list[dict[str, Any]] = []
            notes = ""
            for path, text in sorted(manifests.items()):
                if path.endswith("NOTES.txt"):
                    notes = text
                    continue
                objects += [doc for doc in yaml.safe_load_all(text) if doc]
            cache[key] = Rendered(objects, notes)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def render(render_as: RenderAs) -> Callable[[dict[str, Any] | None], Rendered]:
    """Render with the given values (over the defaults), as `helm template cf -n captionfleet-system`."""
    return lambda values=None: render_as(values)


@pytest.fixture(scope="session")
def chart_crds(chart: helm.Chart) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> openAPIV3Schema of the served version, for every CRD in the chart's crds/."""
    schemas = {}
    for entry in chart.crds:
        for crd in yaml.safe_load_all(entry["data"]):
            if not crd:
                continue
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _prometheus_operator_model(kind: str) -> Any:
    from cloudcoil.models.prometheus_operator import v1

    return getattr(v1, kind)


def validate_prometheus_operator(obj: dict[str, Any]) -> None:
    """ServiceMonitor and PrometheusRule against models generated from prometheus-operator's CRDs.

    The models ignore unknown fields, so the object must also survive a round trip unchanged: a
    misspelt or misplaced field is dropped by the model and shows up as a difference.
    """
    model = _prometheus_operator_model(obj["kind"]).model_validate(obj)
    again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert again == obj, f"{obj['kind']} has fields its CRD does not know"


@pytest.fixture(scope="session")
def validate_object(
    chart_crds: dict[tuple[str, str], dict[str, Any]],
) -> Callable[[dict[str, Any]], None]:
    """Validate one rendered object against the schema its apiVersion/kind has (or fail)."""

    def _validate(obj: dict[str, Any]) -> None:
        key = (obj["apiVersion"], obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_prometheus_operator(obj)
        elif key in chart_crds:
            jsonschema.validate(obj, chart_crds[key])
        else:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)

    return _validate


@pytest.fixture(scope="session")
def everything_on() -> dict[str, Any]:
    return copy.deepcopy(EVERYTHING_ON)
