"""What every builder shares: the fleet context, child names, labels and the owner reference.

Builders are pure: a :class:`FleetContext` in, whole manifests (plain dicts) out. Nothing here talks
to the API or mutates its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from captionfleet.operator import spec as s
from captionfleet.operator.rollout import CanaryState
from captionfleet.operator.settings import OperatorSettings
from captionfleet.operator.traffic import Share, shares

RUNTIME_PORT = 8080
PROMETHEUS_PATH = "/metrics"
MANAGER = "captionfleet-operator"

# Labels on every child. MODEL_LABEL finds a CaptionModel's children; it and VERSION_LABEL and
# COMPONENT_LABEL make up the (immutable) Deployment selectors.
MODEL_LABEL = "captionfleet.io/model"
VERSION_LABEL = "captionfleet.io/version"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


@dataclass(frozen=True)
class ClusterConfig:
    """What this operator installation decides for every fleet (from OperatorSettings)."""

    default_image: str
    pull_policy: str
    queue_depth_metric: str
    prometheus_url: str

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> ClusterConfig:
        return cls(
            default_image=settings.default_runtime_image,
            pull_policy=settings.image_pull_policy,
            queue_depth_metric=settings.queue_depth_metric,
            prometheus_url=settings.prometheus_url,
        )


@dataclass(frozen=True)
class FleetContext:
    """One CaptionModel as the builders see it."""

    name: str
    namespace: str
    uid: str
    spec: s.CaptionModelSpec
    shares: tuple[Share, ...]
    config: ClusterConfig
    rollout: CanaryState | None = None

    @classmethod
    def create(
        cls,
        *,
        name: str,
        namespace: str,
        uid: str,
        spec: s.CaptionModelSpec,
        config: ClusterConfig,
        rollout: CanaryState | None = None,
    ) -> FleetContext:
        return cls(name, namespace, uid, spec, tuple(shares(spec, rollout)), config, rollout)

    def share(self, version: str) -> Share:
        return next(share for share in self.shares if share.name == version)

    def image(self, version: s.ModelVersion | None = None) -> str:
        if version is not None and version.image:
            return version.image
        return self.spec.image or self.config.default_image


# Child names; validation.py checks they fit in 63 characters.
def version_name(ctx: FleetContext, version: str) -> str:
    """Deployment, Service and autoscaler of one version."""
    return f"{ctx.name}-{version}"


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
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(ctx: FleetContext, name: str, component: str, version: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": labels(ctx, component, version),
        "ownerReferences": [owner_reference(ctx)],
    }


def http_probe(path: str, *, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
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


def image_pull_secrets(ctx: FleetContext) -> list[dict[str, str]]:
    return [{"name": name} for name in ctx.spec.image_pull_secrets]


def without_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}
