"""What every builder shares: the fleet context, child names, labels and the owner reference.

Builders are pure: a :class:`FleetContext` in, whole manifests (plain dicts) out. Nothing here talks
to the API or mutates its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from captionfleet import names
from captionfleet.names import COMPONENT_LABEL, MANAGED_BY_LABEL, MANAGER, MODEL_LABEL, VERSION_LABEL
from captionfleet.operator.operator_key import OperatorKey
from captionfleet.operator.rollout import CanaryState
from captionfleet.operator.settings import OperatorSettings
from captionfleet.operator.spec import CaptionModelSpec, ModelVersion
from captionfleet.operator.traffic import Share, shares

PROMETHEUS_PATH = "/metrics"
# Where a version that may scale to zero stands (operator/coldstart.py): Ready (its autoscaler's
# range), Idle (0 pods, no HPA), Waking (requests are held: the operator sets its first replica).
ColdPhase = Literal["Ready", "Idle", "Waking"]


@dataclass(frozen=True)
class ClusterConfig:
    """What this operator installation decides for every fleet: its settings (the default image, the
    pull policy, the metrics sources), and the operator key the settings name, loaded once."""

    settings: OperatorSettings = field(default_factory=OperatorSettings)
    operator_key: OperatorKey | None = None  # the quality gate's way past spec.auth (operator_key.py)

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> ClusterConfig:
        """Raises OperatorKeyError when the operator key file cannot be used."""
        return cls(settings, OperatorKey.load(settings.operator_key_file))


@dataclass(frozen=True)
class FleetContext:
    """One CaptionModel as the builders see it."""

    name: str
    namespace: str
    uid: str
    spec: CaptionModelSpec
    shares: tuple[Share, ...]
    config: ClusterConfig
    rollout: CanaryState | None = None
    keda_installed: bool = True  # without KEDA's CRD a keda fleet gets fixed replicas, no autoscaler
    cold: Mapping[str, ColdPhase] = field(default_factory=dict)  # versions that may scale to zero

    @classmethod
    def create(
        cls,
        *,
        name: str,
        namespace: str,
        uid: str,
        spec: CaptionModelSpec,
        config: ClusterConfig,
        rollout: CanaryState | None = None,
        canary_ready: bool = False,
        keda_installed: bool = True,
    ) -> FleetContext:
        fleet_shares = tuple(shares(spec, rollout, canary_ready=canary_ready))
        return cls(name, namespace, uid, spec, fleet_shares, config, rollout, keda_installed)

    def with_cold(self, cold: Mapping[str, ColdPhase]) -> FleetContext:
        return replace(self, cold=dict(cold))

    def share(self, version: str) -> Share:
        return next(share for share in self.shares if share.name == version)

    def autoscaler(self) -> str:
        """The autoscaler the versions get: hpa, keda or none (also when KEDA is not installed)."""
        provider = self.spec.autoscaling.provider
        return "none" if provider == "keda" and not self.keda_installed else provider

    def image(self, version: ModelVersion | None = None) -> str:
        if version is not None and version.image:
            return version.image
        return self.spec.image or self.config.settings.default_runtime_image


# Child names; validation.py checks they fit in 63 characters.
def version_name(ctx: FleetContext, version: str) -> str:
    """Deployment, Service and autoscaler of one version."""
    return version_service(ctx.name, version)


def version_service(model: str, version: str) -> str:
    """The name of version ``version`` of CaptionModel ``model``'s children (its Service among them)."""
    return f"{model}-{version}"


def router_name(ctx: FleetContext) -> str:
    """The router's Deployment, ServiceAccount, Role and RoleBinding."""
    return f"{ctx.name}-router"


def public_service_name(ctx: FleetContext) -> str:
    """The router's Service carries the CaptionModel's own name: it is the fleet's endpoint."""
    return ctx.name


def endpoint(ctx: FleetContext) -> str:
    port = ctx.spec.router.port
    suffix = "" if port == 80 else f":{port}"
    return f"http://{public_service_name(ctx)}.{ctx.namespace}.svc{suffix}"


def selector_labels(ctx: FleetContext, component: str, version: str | None = None) -> dict[str, str]:
    labels = {MODEL_LABEL: ctx.name, COMPONENT_LABEL: component}
    if version is not None:
        labels[VERSION_LABEL] = version
    return labels


def labels(ctx: FleetContext, component: str, version: str | None = None) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"captionfleet-{component}",
        "app.kubernetes.io/instance": ctx.name,
        "app.kubernetes.io/part-of": "captionfleet",
        MANAGED_BY_LABEL: MANAGER,
        **selector_labels(ctx, component, version),
    }


def owner_reference(ctx: FleetContext) -> dict[str, Any]:
    """Deleting the CaptionModel garbage-collects every child."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def head(
    ctx: FleetContext, api_version: str, kind: str, name: str, component: str, version: str | None = None
) -> dict[str, Any]:
    """``apiVersion``, ``kind`` and ``metadata`` of a child object: the start of every manifest built."""
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata(ctx, name, component, version)}


def metadata(ctx: FleetContext, name: str, component: str, version: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": labels(ctx, component, version),
        "ownerReferences": [owner_reference(ctx)],
    }


def container_port() -> dict[str, Any]:
    """The one port of every runtime and router container."""
    return {"name": names.HTTP_PORT_NAME, "containerPort": names.HTTP_PORT, "protocol": "TCP"}


def service_port(port: int) -> dict[str, Any]:
    return {"name": names.HTTP_PORT_NAME, "port": port, "targetPort": names.HTTP_PORT_NAME, "protocol": "TCP"}


def pod_template(
    ctx: FleetContext, component: str, version: str | None, pod_spec: dict[str, Any]
) -> dict[str, Any]:
    """A pod template with the fleet's labels and Prometheus' scrape annotations."""
    return {
        "metadata": {
            "labels": labels(ctx, component, version),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(names.HTTP_PORT),
                "prometheus.io/path": PROMETHEUS_PATH,
            },
        },
        "spec": pod_spec,
    }


def http_probe(path: str, *, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": names.HTTP_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def restricted_container_security() -> dict[str, Any]:
    """The 'restricted' Pod Security Standard, per container."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security() -> dict[str, Any]:
    # fsGroup makes the emptyDir volumes (downloaded models, /tmp) writable for the runtime user.
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def auth_volume(ctx: FleetContext) -> dict[str, Any] | None:
    """The API-key Secret as a volume of its one key: a missing key then stops the mount, and the
    kubelet's FailedMount Event names it (pods.py), instead of a runtime that finds no keys file."""
    if ctx.spec.auth is None:
        return None
    key = ctx.spec.auth.key
    secret = {"secretName": ctx.spec.auth.secret_name, "items": [{"key": key, "path": key}]}
    return {"name": "auth", "secret": secret}


def image_pull_secrets(ctx: FleetContext) -> list[dict[str, str]]:
    return [{"name": name} for name in ctx.spec.image_pull_secrets]


def without_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}
