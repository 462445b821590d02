"""The chart as a platform team installs it: each value changed on its own, other release names and
namespaces, two releases in one cluster, upgrade and uninstall.

Every legal case renders objects that Kubernetes accepts (kubernetes-validate, ``helm lint --strict``),
with valid names and labels, the app.kubernetes.io labels, a pod that the Pod Security Standard
"restricted" admits and no secret in an env ``value``; the value itself lands where it belongs.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from captionfleet.operator.spec import IMAGE_PATTERN, LABEL_VALUE_PATTERN, QUALIFIED_NAME_PATTERN
from tests.deploy.conftest import CHART, NAMESPACE, RenderAs, Rendered

DIGEST = "sha256:" + "0123456789abcdef" * 4
LONG_63 = "a" + "b" * 61 + "c"
RELEASE_53 = "r" + "e" * 51 + "l"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
APP_LABELS = ("name", "instance", "version", "component", "part-of", "managed-by")
Validate = Callable[[dict[str, Any]], None]
VALID: set[str] = set()  # the objects validated so far, as JSON

# name -> (values, release name, namespace). One value changed in each, to another legal value.
LEGAL: dict[str, tuple[dict[str, Any], str, str]] = {
    "one watched namespace": ({"operator": {"watchNamespaces": ["ml"]}}, "cf", NAMESPACE),
    "several watched namespaces": ({"operator": {"watchNamespaces": ["a", "b", "c"]}}, "cf", NAMESPACE),
    "existing service account": (
        {"serviceAccount": {"create": False, "name": "platform-operator"}},
        "cf",
        NAMESPACE,
    ),
    "no rbac": ({"rbac": {"create": False}}, "cf", NAMESPACE),
    "fullnameOverride of 63": ({"fullnameOverride": LONG_63}, "cf", NAMESPACE),
    "nameOverride of 63": ({"nameOverride": LONG_63}, "cf", NAMESPACE),
    "release name of 53": ({}, RELEASE_53, NAMESPACE),
    "release name of 53 and nameOverride of 63": ({"nameOverride": LONG_63}, RELEASE_53, NAMESPACE),
    "namespace other than default": ({"operator": {"watchNamespaces": ["team-a"]}}, "cf", "team-a"),
    "imagePullSecrets": ({"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror.io"}]}, "cf", NAMESPACE),
    "image tag with digest": ({"image": {"tag": f"0.1.0@{DIGEST}"}}, "cf", NAMESPACE),
    "image by digest alone": ({"image": {"tag": f"@{DIGEST}"}}, "cf", NAMESPACE),
    "runtime image by digest": ({"operator": {"runtimeImage": {"tag": f"0.1.0@{DIGEST}"}}}, "cf", NAMESPACE),
    "extraEnv value and valueFrom": (
        {
            "operator": {
                "extraEnv": [
                    {"name": "CAPTIONFLEET_VERBOSE", "value": "true"},
                    {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
                ]
            }
        },
        "cf",
        NAMESPACE,
    ),
    "resources": (
        {"resources": {"requests": {"cpu": 1, "memory": "200Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}},
        "cf",
        NAMESPACE,
    ),
    "nodeSelector": ({"nodeSelector": {"kubernetes.io/os": "linux", "pool": ""}}, "cf", NAMESPACE),
    "tolerations": (
        {
            "tolerations": [
                {"operator": "Exists"},
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 30,
                },
                {"key": "dedicated", "value": "ops", "effect": "NoSchedule"},
            ]
        },
        "cf",
        NAMESPACE,
    ),
    "affinity": (
        {
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 10,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app": "x"}},
                            },
                        }
                    ]
                }
            }
        },
        "cf",
        NAMESPACE,
    ),
    "requests equal to limits in other units": (
        {
            "resources": {
                "requests": {"cpu": "0.5", "memory": "1Gi"},
                "limits": {"cpu": "500m", "memory": "1024Mi"},
            }
        },
        "cf",
        NAMESPACE,
    ),
    "scrape interval below the default timeout": (
        {"metrics": {"serviceMonitor": {"enabled": True, "interval": "5s"}}},
        "cf",
        NAMESPACE,
    ),
    "priorityClassName": ({"priorityClassName": "platform.critical"}, "cf", NAMESPACE),
    "podAnnotations and podLabels": (
        {"podAnnotations": {"example.com/team": "ml", "note": "x y"}, "podLabels": {"team": "ml"}},
        "cf",
        NAMESPACE,
    ),
    "operatorKey.existingSecret": ({"operatorKey": {"existingSecret": "platform.key"}}, "cf", NAMESPACE),
    "operatorKey off": ({"operatorKey": {"enabled": False}}, "cf", NAMESPACE),
    "peering disabled": ({"operator": {"peering": {"enabled": False}}}, "cf", NAMESPACE),
    "monitoring with labels": (
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "kps", "role": "alert-rules"}},
            }
        },
        "cf",
        NAMESPACE,
    ),
    "dashboard elsewhere": (
        {"dashboard": {"enabled": True, "namespace": "monitoring", "labels": {"grafana_dashboard": "ml"}}},
        "cf",
        NAMESPACE,
    ),
    "security contexts tightened": (
        {
            "podSecurityContext": {
                "runAsUser": 2000,
                "seccompProfile": {"type": "Localhost", "localhostProfile": "op.json"},
            },
            "securityContext": {"capabilities": {"drop": ["ALL", "NET_RAW"]}},
        },
        "cf",
        NAMESPACE,
    ),
}

MONITOR_ON = {"metrics": {"serviceMonitor": {"enabled": True}}}
RULES_ON = {"metrics": {"prometheusRule": {"enabled": True}}}
DASHBOARD_ON = {"dashboard": {"enabled": True}}


def _alert_cases() -> dict[str, tuple[Any, dict[str, Any]]]:
    other = {
        "p99Latency": {"thresholdSeconds": 0.5},
        "errorRate": {"threshold": 0.2},
        "queueDepth": {"threshold": 10},
        "featureDrift": {"threshold": 0.5},
        "confidenceDrop": {"dropShare": 0.3, "window": "30m", "minCaptions": 20},
    }
    cases: dict[str, tuple[Any, dict[str, Any]]] = {}
    for alert in ("p99Latency", "errorRate", "queueDepth", "rollback", "featureDrift", "confidenceDrop"):
        changes = {"enabled": False, "severity": "info", **other.get(alert, {})}
        if alert != "rollback":
            changes["for"] = "1h"
        for key, value in changes.items():
            cases[f"metrics.prometheusRule.alerts.{alert}.{key}"] = (value, RULES_ON)
    return cases


# Every value of values.yaml, dotted path -> (another legal value, the values it needs to matter).
ONE_VALUE: dict[str, tuple[Any, dict[str, Any]]] = {
    "image.repository": ("registry.example.com:5000/platform/captionfleet-operator", {}),
    "image.tag": (f"0.1.0@{DIGEST}", {}),
    "image.pullPolicy": ("Always", {}),
    "imagePullSecrets": ([{"name": "regcred"}], {}),
    "nameOverride": ("captions", {}),
    "fullnameOverride": ("platform-captions", {}),
    "operator.watchNamespaces": (["ml", "ml-staging"], {}),
    "operator.runtimeImage.repository": ("registry.example.com/captionfleet/runtime", {}),
    "operator.runtimeImage.tag": ("0.1.0-cpu", {}),
    "operator.runtimeImage.pullPolicy": ("Always", {}),
    "operator.prometheusUrl": ("https://prometheus.monitoring.svc:9090/prom", {}),
    "operator.peering.enabled": (False, {}),
    "operator.peering.name": ("fleet-a", {}),
    "operator.resyncSeconds": (0, {}),
    "operator.healthPort": (9443, {}),
    "operator.metricsPort": (9090, {}),
    "operator.verbose": (True, {}),
    "operator.extraEnv": ([{"name": "TZ", "value": "UTC"}], {}),
    "serviceAccount.create": (False, {"serviceAccount": {"name": "platform-operator"}}),
    "serviceAccount.name": ("platform-operator", {}),
    "serviceAccount.annotations": ({"iam.gke.io/gcp-service-account": "op@p.iam.gserviceaccount.com"}, {}),
    "rbac.create": (False, {}),
    "operatorKey.enabled": (False, {}),
    "operatorKey.existingSecret": ("platform-operator-key", {}),
    "resources.requests.cpu": ("0.25", {}),
    "resources.requests.memory": ("100M", {}),
    "resources.limits.memory": ("1Gi", {}),
    "podSecurityContext.runAsUser": (65532, {}),
    "podSecurityContext.runAsGroup": (65532, {}),
    "podSecurityContext.fsGroup": (2000, {}),
    "podSecurityContext.seccompProfile.type": (
        "Localhost",
        {"podSecurityContext": {"seccompProfile": {"localhostProfile": "profiles/operator.json"}}},
    ),
    "securityContext.readOnlyRootFilesystem": (False, {}),
    "securityContext.capabilities.drop": (["ALL", "NET_RAW"], {}),
    "podAnnotations": ({"example.com/owner": "ml-platform"}, {}),
    "podLabels": ({"team": "ml-platform"}, {}),
    "priorityClassName": ("system-cluster-critical", {}),
    "nodeSelector": ({"kubernetes.io/os": "linux"}, {}),
    "tolerations": ([{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}], {}),
    "affinity": (LEGAL["affinity"][0]["affinity"], {}),
    "metrics.serviceMonitor.enabled": (True, {}),
    "metrics.serviceMonitor.interval": ("1m", MONITOR_ON),
    "metrics.serviceMonitor.scrapeTimeout": ("20s", MONITOR_ON),
    "metrics.serviceMonitor.labels": ({"release": "kube-prometheus-stack"}, MONITOR_ON),
    "metrics.serviceMonitor.fleets": (False, MONITOR_ON),
    "metrics.prometheusRule.enabled": (True, {}),
    "metrics.prometheusRule.labels": ({"release": "kube-prometheus-stack"}, RULES_ON),
    **_alert_cases(),
    "dashboard.enabled": (True, {}),
    "dashboard.labels.grafana_dashboard": ("ml", DASHBOARD_ON),
    "dashboard.annotations": ({"grafana_folder": "ML"}, DASHBOARD_ON),
    "dashboard.namespace": ("monitoring", DASHBOARD_ON),
}

# Values the schema holds to one value (the Pod Security Standard "restricted"), with one it refuses.
HELD: dict[str, Any] = {
    "podSecurityContext.runAsNonRoot": False,
    "securityContext.allowPrivilegeEscalation": True,
    "securityContext.privileged": True,
}

# Values that must not render: the chart refuses them with a message naming what is wrong.
REFUSED_AT_RENDER: list[tuple[str, dict[str, Any], str]] = [
    ("a pod label the selector uses", {"podLabels": {"app.kubernetes.io/name": "x"}}, "podLabels"),
    (
        "a chart label on the dashboard",
        {"dashboard": {"enabled": True, "labels": {"helm.sh/chart": "x"}}},
        "dashboard.labels",
    ),
    ("health and metrics on one port", {"operator": {"metricsPort": 8081}}, "operator.metricsPort"),
    (
        "memory request above the limit",
        {"resources": {"requests": {"memory": "512Mi"}}},
        "resources.requests.memory",
    ),
    (
        "cpu request above the limit",
        {"resources": {"requests": {"cpu": 1}, "limits": {"cpu": "999m"}}},
        "resources.requests.cpu (1) is above resources.limits.cpu (999m)",
    ),
]


def _pods(rendered: Rendered) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in rendered.of_kind("Deployment")]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the Pod Security Standard "restricted" (with "baseline") refuses in a pod spec."""
    found = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    allowed_volumes = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        found += [f"volume {volume['name']}: {kind}" for kind in kinds - allowed_volumes]
    pod_context = pod.get("securityContext", {})
    if pod_context.get("sysctls"):
        found.append("sysctls")
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        found += [f"{name}: adds {c}" for c in set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}]
        found += [f"{name}: hostPort" for p in container.get("ports", []) if p.get("hostPort")]
    return found


def _check_names_and_labels(obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, meta["name"]
    labels = meta["labels"]
    for key, value in labels.items():
        assert re.match(QUALIFIED_NAME_PATTERN, key), key
        assert re.match(LABEL_VALUE_PATTERN, value) and len(value) <= 63, f"{key}: {value!r}"
    missing = [k for k in APP_LABELS if f"app.kubernetes.io/{k}" not in labels]
    assert not missing and "helm.sh/chart" in labels, f"{obj['kind']} {meta['name']} lacks {missing}"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"


def _check_operator_pod(rendered: Rendered, values: dict[str, Any]) -> None:
    (deployment,) = rendered.of_kind("Deployment")
    template = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items(), "the selector must match the pod"
    pod = template["spec"]
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    health = values.get("operator", {}).get("healthPort", 8081)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == health
    secret_values = {v for s in rendered.of_kind("Secret") for v in s.get("data", {}).values()}
    for var in container["env"]:
        if re.search(r"PASSWORD|TOKEN|SECRET|CREDENTIAL", var["name"]):
            assert "value" not in var, f"{var['name']} has a literal value"
        assert not any(s in str(var.get("value", "")) for s in secret_values), var["name"]


def _check_release(
    values: dict[str, Any], release: str, namespace: str, render_as: RenderAs, validate_object: Validate
) -> Rendered:
    """Everything any legal values must give: valid objects and names, the labels, a restricted pod,
    no secret in the env, and a clean `helm lint --strict`."""
    rendered = render_as(values, name=release, namespace=namespace)
    for obj in rendered.objects:
        key = json.dumps(obj, sort_keys=True)
        if key not in VALID:  # most cases share most objects: validate each one once
            validate_object(obj)
            VALID.add(key)
        _check_names_and_labels(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == release
    _check_operator_pod(rendered, values)
    report = helm.lint(CHART, values, strict=True, namespace=namespace)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    return rendered


@pytest.mark.parametrize("case", list(LEGAL))
def test_each_legal_case_renders_valid_objects(
    case: str, render_as: RenderAs, validate_object: Validate
) -> None:
    values, release, namespace = LEGAL[case]
    _check_release(values, release, namespace, render_as, validate_object)


def _nested(path: str, value: Any) -> dict[str, Any]:
    for key in reversed(path.split(".")):
        value = {key: value}
    return dict(value)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _leaves(values: dict[str, Any], path: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        here = f"{path}.{key}" if path else key
        found += _leaves(value, here) if isinstance(value, dict) and value else [here]
    return found


@pytest.mark.parametrize("path", list(ONE_VALUE))
def test_every_value_changed_alone_renders_valid_objects_and_shows(
    path: str, render_as: RenderAs, validate_object: Validate
) -> None:
    value, companions = ONE_VALUE[path]
    values = _merged(companions, _nested(path, value))
    rendered = _check_release(values, "cf", NAMESPACE, render_as, validate_object)
    # The value is used: the release differs from the one without it (or from the defaults, where the
    # companions are not legal alone, as a localhostProfile without type Localhost).
    try:
        without = render_as(companions)
    except helm.HelmValuesError:
        without = render_as({})
    assert rendered.objects != without.objects, f"{path}={value!r} changes nothing"


def test_every_value_of_values_yaml_has_a_case() -> None:
    leaves = set(_leaves(yaml.safe_load((CHART / "values.yaml").read_text())))
    covered = set(ONE_VALUE) | set(HELD)
    assert leaves == covered, leaves ^ covered


@pytest.mark.parametrize("path", list(HELD))
def test_values_held_to_restricted_refuse_any_other(chart: helm.Chart, path: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="/" + path.replace(".", "/")):
        chart.validate_schema(_nested(path, HELD[path]))


@pytest.mark.parametrize(
    ("case", "values", "where"), REFUSED_AT_RENDER, ids=[c for c, _, _ in REFUSED_AT_RENDER]
)
def test_conflicting_values_are_refused_naming_the_key(
    chart: helm.Chart, case: str, values: dict[str, Any], where: str
) -> None:
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as caught:
        chart.render(values, name="cf", namespace=NAMESPACE)
    assert where in str(caught.value), caught.value


def test_the_restricted_check_can_fail(render_as: RenderAs) -> None:
    (pod,) = _pods(render_as({}))
    broken = yaml.safe_load(yaml.safe_dump(pod))
    broken["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    broken["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    broken["securityContext"]["runAsUser"] = 0
    assert len(restricted_violations(broken)) == 3


def _image_and_runtime(rendered: Rendered) -> tuple[str, str]:
    (pod,) = _pods(rendered)
    (container,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    return container["image"], str(env["CAPTIONFLEET_DEFAULT_RUNTIME_IMAGE"])


def test_images_by_digest(render_as: RenderAs) -> None:
    image, _ = _image_and_runtime(render_as(LEGAL["image tag with digest"][0]))
    assert image == f"ghcr.io/captionfleet/operator:0.1.0@{DIGEST}"
    image, _ = _image_and_runtime(render_as(LEGAL["image by digest alone"][0]))
    assert image == f"ghcr.io/captionfleet/operator@{DIGEST}"
    _, runtime = _image_and_runtime(render_as(LEGAL["runtime image by digest"][0]))
    assert runtime == f"ghcr.io/captionfleet/runtime:0.1.0@{DIGEST}"
    # The operator accepts it as the default image of the pods it creates.
    assert re.match(IMAGE_PATTERN, runtime)


def test_long_names_are_truncated_to_63_characters(render_as: RenderAs) -> None:
    for case in ("fullnameOverride of 63", "nameOverride of 63", "release name of 53 and nameOverride of 63"):
        values, release, namespace = LEGAL[case]
        rendered = render_as(values, name=release, namespace=namespace)
        for obj in rendered.objects:
            if obj["kind"] in ("Deployment", "ServiceAccount", "Secret"):
                assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    deployment = render_as({"fullnameOverride": LONG_63}).one("Deployment")
    assert deployment["metadata"]["name"] == LONG_63


def _where(rendered: Rendered) -> dict[str, Any]:
    (pod,) = _pods(rendered)
    return {
        **pod,
        **pod["containers"][0],
        "podMeta": rendered.one("Deployment")["spec"]["template"]["metadata"],
    }


@pytest.mark.parametrize(
    ("case", "field", "expected"),
    [
        ("imagePullSecrets", "imagePullSecrets", [{"name": "regcred"}, {"name": "mirror.io"}]),
        ("resources", "resources", LEGAL["resources"][0]["resources"]),
        ("nodeSelector", "nodeSelector", LEGAL["nodeSelector"][0]["nodeSelector"]),
        ("tolerations", "tolerations", LEGAL["tolerations"][0]["tolerations"]),
        ("affinity", "affinity", LEGAL["affinity"][0]["affinity"]),
        ("priorityClassName", "priorityClassName", "platform.critical"),
        ("existing service account", "serviceAccountName", "platform-operator"),
    ],
)
def test_each_value_lands_in_the_pod(case: str, field: str, expected: Any, render_as: RenderAs) -> None:
    assert _where(render_as(LEGAL[case][0]))[field] == expected


def test_pod_annotations_labels_and_extra_env_land_in_the_pod(render_as: RenderAs) -> None:
    where = _where(render_as(LEGAL["podAnnotations and podLabels"][0]))
    assert where["podMeta"]["annotations"] == {"example.com/team": "ml", "note": "x y"}
    assert where["podMeta"]["labels"]["team"] == "ml"
    env = _where(render_as(LEGAL["extraEnv value and valueFrom"][0]))["env"]
    assert {"name": "CAPTIONFLEET_VERBOSE", "value": "true"} in env
    assert [v["name"] for v in env].count("CAPTIONFLEET_VERBOSE") == 1
    assert next(v for v in env if v["name"] == "HTTPS_PROXY")["valueFrom"]["secretKeyRef"]["name"] == "proxy"


def test_another_namespace_gets_everything_namespaced(render_as: RenderAs) -> None:
    rendered = render_as({"operator": {"watchNamespaces": ["team-a", "team-b"]}}, namespace="team-a")
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "ServiceAccount", "Secret"):
            assert obj["metadata"]["namespace"] == "team-a"
    for binding in rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding"):
        assert binding["subjects"][0]["namespace"] == "team-a"
    assert {r["metadata"]["namespace"] for r in rendered.of_kind("Role")} == {"team-a", "team-b"}


def _cluster_scoped(rendered: Rendered) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in rendered.objects if "namespace" not in o["metadata"]}


def _namespaced(rendered: Rendered) -> set[tuple[str, str, str]]:
    return {
        (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
        for o in rendered.objects
        if "namespace" in o["metadata"]
    }


@pytest.mark.parametrize("names", [("captionfleet", "captionfleet"), ("fleet-a", "fleet-b")])
def test_two_releases_each_watching_its_namespace_share_no_object(
    names: tuple[str, str], render_as: RenderAs
) -> None:
    monitoring = {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "dashboard": {"enabled": True, "namespace": "monitoring"},
    }
    first, second = (
        render_as({"operator": {"watchNamespaces": [ns]}, **monitoring}, name=name, namespace=ns)
        for name, ns in zip(names, ("team-a", "team-b"), strict=True)
    )
    assert _cluster_scoped(first) and not _cluster_scoped(first) & _cluster_scoped(second)
    assert not _namespaced(first) & _namespaced(second)


def test_two_cluster_wide_operators_collide_only_on_the_peering_object(render_as: RenderAs) -> None:
    # Deliberate: two operators reconciling every namespace would fight over every fleet, so Helm
    # refuses the second release (the ClusterKopfPeering belongs to the first); their RBAC never collides.
    first = render_as({}, name="captionfleet", namespace="team-a")
    second = render_as({}, name="captionfleet", namespace="team-b")
    assert _cluster_scoped(first) & _cluster_scoped(second) == {("ClusterKopfPeering", "captionfleet")}


def test_two_operators_on_one_namespace_collide_on_its_peering_object(render_as: RenderAs) -> None:
    first = render_as({"operator": {"watchNamespaces": ["ml"]}}, name="a", namespace="team-a")
    second = render_as({"operator": {"watchNamespaces": ["ml", "ml-2"]}}, name="b", namespace="team-b")
    assert _namespaced(first) & _namespaced(second) == {("KopfPeering", "ml", "captionfleet")}


def test_crds_are_installed_by_helm_and_outlive_the_release(chart: helm.Chart, render_as: RenderAs) -> None:
    # crds/ is installed before the templates and never upgraded or deleted by Helm; the templates hold
    # no CRD and no CaptionModel (which `helm uninstall` would delete) and no hook.
    kinds = {yaml.safe_load(c["data"].split("---", 2)[-1])["kind"] for c in chart.crds}
    assert kinds == {"CustomResourceDefinition"}
    rendered = render_as(LEGAL["monitoring with labels"][0])
    for obj in rendered.objects:
        assert obj["kind"] not in ("CustomResourceDefinition", "CaptionModel")
        assert not any(k.startswith("helm.sh/hook") for k in obj["metadata"].get("annotations", {}))
    key = render_as({}).one("Secret", "-operator-key")
    assert key["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


LOOKUP = '(lookup "v1" "Secret" .Release.Namespace $name)'


def test_an_upgrade_writes_back_the_stored_operator_key(tmp_path: Path) -> None:
    # Without a cluster `lookup` finds nothing; stand in the Secret an install stored, so the template's
    # own logic (reuse the stored key, not a fresh one) is what runs.
    copy = tmp_path / "captionfleet"
    shutil.copytree(CHART, copy)
    template = copy / "templates" / "operator-key.yaml"
    text = template.read_text()
    assert text.count(LOOKUP) == 1
    template.write_text(text.replace(LOOKUP, '(dict "data" (dict "operator-key" "c3RvcmVkLWtleQ=="))'))
    with helm.Chart.load(copy) as chart:
        manifests = chart.render({}, name="cf", namespace=NAMESPACE, is_upgrade=True, revision=2)
    secret = yaml.safe_load(manifests["captionfleet/templates/operator-key.yaml"])
    assert secret["data"]["operator-key"] == "c3RvcmVkLWtleQ=="


def test_the_scrape_timeout_never_exceeds_the_interval(render_as: RenderAs) -> None:
    # Prometheus refuses a timeout above the interval: `interval: 5s` alone cuts the default 10s.
    for monitor, timeout in (
        ({"interval": "5s"}, "5s"),
        ({"interval": "1m30s", "scrapeTimeout": "1m"}, "1m"),
    ):
        rendered = render_as({"metrics": {"serviceMonitor": {"enabled": True, **monitor}}})
        for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
            [endpoint] = rendered.one(kind)["spec"][endpoints]
            assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (monitor["interval"], timeout)
