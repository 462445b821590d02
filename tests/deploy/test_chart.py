"""The Helm chart, rendered by real Helm: lint, every object valid, the operator pod hardened."""

from __future__ import annotations

import argparse
import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from captionfleet import cli
from captionfleet.operator.settings import OperatorSettings
from captionfleet.settings import from_args

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "captionfleet"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS_FOR_CRD = ("1.29", kubernetes_validate.utils.latest_version())

Render = Callable[[dict[str, Any] | None], Any]


def _values(name: str, everything_on: dict[str, Any]) -> dict[str, Any]:
    return {
        "defaults": {},
        "everything-on": everything_on,
        "cluster-wide-with-monitoring": {
            "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
            "dashboard": {"enabled": True},
        },
        "existing-service-account-standalone": {
            "serviceAccount": {"create": False, "name": "platform-operator"},
            "operator": {"peering": {"enabled": False}},
            "fullnameOverride": "captions",
        },
        "no-rbac-alerts-off": {
            "rbac": {"create": False},
            "metrics": {
                "prometheusRule": {
                    "enabled": True,
                    "alerts": {"p99Latency": {"enabled": False}, "rollback": {"enabled": False}},
                }
            },
        },
    }[name]


VALUE_SETS = [
    "defaults",
    "everything-on",
    "cluster-wide-with-monitoring",
    "existing-service-account-standalone",
    "no-rbac-alerts-off",
]


@pytest.mark.parametrize("value_set", ["defaults", "everything-on"])
def test_helm_lint_is_clean_in_strict_mode(value_set: str, everything_on: dict[str, Any]) -> None:
    report = helm.lint(CHART, _values(value_set, everything_on), strict=True, namespace="captionfleet-system")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_rendered_object_is_valid(
    value_set: str,
    everything_on: dict[str, Any],
    render: Render,
    validate_object: Callable[[dict[str, Any]], None],
) -> None:
    rendered = render(_values(value_set, everything_on))
    assert rendered.objects
    seen = set()
    for obj in rendered.objects:
        validate_object(obj)
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"rendered twice: {key}"
        seen.add(key)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "cf"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_validation_catches_a_wrong_field(render: Render, validate_object: Callable[..., None]) -> None:
    # The validator itself must be able to fail: a misspelt field in a real rendered object.
    deployment = render(None).one("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(broken)


def test_optional_parts_are_off_by_default(render: Render) -> None:
    kinds = {o["kind"] for o in render(None).objects}
    assert kinds == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "ClusterKopfPeering",
        "Secret",  # the operator's master key (operatorKey): on by default
    }


def test_everything_on_renders_every_part(render: Render, everything_on: dict[str, Any]) -> None:
    rendered = render(everything_on)
    kinds = {o["kind"] for o in rendered.objects}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "Role", "RoleBinding", "KopfPeering"} <= kinds
    assert "ClusterKopfPeering" not in kinds
    assert {p["metadata"]["namespace"] for p in rendered.of_kind("KopfPeering")} == {"ml", "ml-staging"}
    assert rendered.one("ConfigMap", "-dashboard")["metadata"]["namespace"] == "monitoring"


def _operator_container(rendered: Any) -> dict[str, Any]:
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def test_operator_pod_is_hardened(render: Render) -> None:
    deployment = render(None).one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _operator_container(render(None))
    assert deployment["spec"]["replicas"] == 1
    # Two operators must never reconcile the same objects: no rolling overlap.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    # With a read-only root filesystem, /tmp must be a volume.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == "cf-captionfleet"


def _settings_from_env(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """The OperatorSettings the container's command line and CAPTIONFLEET_* variables produce."""
    for name in [n for n in os.environ if n.startswith("CAPTIONFLEET_")]:
        monkeypatch.delenv(name)
    for var in container["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    argv = container["args"]
    parser = cli.build_parser(only=argv[0])
    args: argparse.Namespace = parser.parse_args(argv)
    return from_args(OperatorSettings, args)


def test_the_operator_command_and_variables_are_real_options(
    render: Render, everything_on: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = _operator_container(render(None))
    assert container["args"] == ["operator"]
    option_vars = {f"CAPTIONFLEET_{name.upper()}" for name in OperatorSettings.__dataclass_fields__}
    unknown = {v["name"] for v in container["env"]} - option_vars
    assert not unknown, f"variables no operator option reads: {unknown}"

    settings = _settings_from_env(container, monkeypatch)
    assert settings.namespaces == ()
    assert settings.default_runtime_image == "ghcr.io/captionfleet/runtime:0.1.0"
    assert settings.standalone is False
    assert settings.peering == "captionfleet"

    container = _operator_container(render(everything_on))
    names = [v["name"] for v in container["env"]]
    assert len(names) == len(set(names)), "extraEnv must replace the chart's variable, not repeat it"
    settings = _settings_from_env(container, monkeypatch)
    assert settings.namespaces == ("ml", "ml-staging")
    assert settings.default_runtime_image == "registry.example/captionfleet/runtime:0.1.0-cpu"
    assert settings.prometheus_url == "http://prometheus-operated.monitoring.svc:9090"
    assert settings.verbose is True
    assert settings.resync_seconds == 60.0  # extraEnv comes last and wins


def test_probes_hit_the_liveness_endpoint_the_operator_serves(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = _operator_container(render({"operator": {"healthPort": 9443}}))
    settings = _settings_from_env(container, monkeypatch)
    assert settings.liveness == "http://0.0.0.0:9443/healthz"
    port = next(p for p in container["ports"] if p["name"] == "health")
    assert port["containerPort"] == 9443
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}


def test_standalone_mode_has_no_peering_object(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render({"operator": {"peering": {"enabled": False}}})
    assert not rendered.of_kind("ClusterKopfPeering") and not rendered.of_kind("KopfPeering")
    assert _settings_from_env(_operator_container(rendered), monkeypatch).standalone is True


def test_the_peering_object_is_the_one_the_operator_uses(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render({"operator": {"peering": {"name": "fleet-a"}}})
    settings = _settings_from_env(_operator_container(rendered), monkeypatch)
    assert rendered.one("ClusterKopfPeering")["metadata"]["name"] == settings.peering == "fleet-a"


def test_chart_crds_are_byte_identical_to_the_generated_ones(chart: helm.Chart) -> None:
    top = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    ours = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert top, "crds/ is empty: run `make crds`"
    assert ours == top, "charts/captionfleet/crds/ differs from crds/: run `make docs`"
    # And Helm really installs them (before the templates, which create a KopfPeering).
    assert {c["filename"] for c in chart.crds} == {f"captionfleet/crds/{name}" for name in top}


def test_the_captionmodel_crd_is_the_contract(chart_crds: dict[tuple[str, str], Any]) -> None:
    assert ("captionfleet.io/v1alpha1", "CaptionModel") in chart_crds
    crd = yaml.safe_load((CHART / "crds" / "captionmodels.captionfleet.io.yaml").read_text())
    names = crd["spec"]["names"]
    assert (names["plural"], names["singular"], names["shortNames"]) == (
        "captionmodels",
        "captionmodel",
        ["capm"],
    )
    assert crd["spec"]["scope"] == "Namespaced"
    for version in KUBE_VERSIONS_FOR_CRD:
        kubernetes_validate.validate(crd, version, strict=True)


def test_notes_tell_how_to_get_from_install_to_a_caption(render: Render) -> None:
    notes = render(None).notes
    assert "kubectl get capm" in notes
    assert "kubectl apply" in notes
    assert "/v1/caption" in notes and "curl" in notes
    assert "kubectl -n captionfleet-system rollout status deployment/cf-captionfleet" in notes


def test_versions_agree_across_package_chart_and_images(render: Render) -> None:
    from captionfleet import version as captionfleet
    from captionfleet.operator.settings import DEFAULT_RUNTIME_IMAGE

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == captionfleet.__version__
    container = _operator_container(render(None))
    assert container["image"].endswith(f":{captionfleet.__version__}")
    env = {v["name"]: v["value"] for v in container["env"]}
    # Installing the chart without values runs the same runtime image the operator defaults to.
    assert env["CAPTIONFLEET_DEFAULT_RUNTIME_IMAGE"] == DEFAULT_RUNTIME_IMAGE


def _operator_key_file(rendered: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any] | None]:
    """The operator's key file setting, and the Secret volume that puts a file there (None: none)."""
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    container = _operator_container(rendered)
    path = _settings_from_env(container, monkeypatch).operator_key_file
    for mount in container["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        if "secret" in volume and path.startswith(mount["mountPath"] + "/"):
            [item] = volume["secret"]["items"]
            assert mount["readOnly"] is True and path == f"{mount['mountPath']}/{item['path']}"
            return path, volume["secret"]
    return path, None


def test_the_operator_gets_a_random_master_key_mounted_from_a_secret_of_its_own(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(None)
    path, volume = _operator_key_file(rendered, monkeypatch)
    assert path and volume is not None
    secret = rendered.one("Secret", "-operator-key")
    assert volume["secretName"] == secret["metadata"]["name"] == "cf-captionfleet-operator-key"
    key = base64.b64decode(secret["data"][volume["items"][0]["key"]]).decode()
    assert len(key) == 64 and key.isalnum()


def test_an_existing_operator_key_secret_or_none(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render({"operatorKey": {"enabled": True, "existingSecret": "platform-operator-key"}})
    _, volume = _operator_key_file(rendered, monkeypatch)
    assert volume is not None and volume["secretName"] == "platform-operator-key"
    assert not rendered.of_kind("Secret")
    rendered = render({"operatorKey": {"enabled": False, "existingSecret": ""}})
    assert _operator_key_file(rendered, monkeypatch) == ("", None) and not rendered.of_kind("Secret")
