"""The router: the fleet's public endpoint, its Deployment and Service, and its read-only RBAC."""

from __future__ import annotations

import math
from typing import Any

from captionfleet.operator.builders import common
from captionfleet.operator.builders.env import AUTH_MOUNT, TMP_MOUNT, router_env, stats_window_s
from captionfleet.operator.permissions import ROUTER_RULES, as_manifests

COMPONENT = "router"
# The router's memory: a base for the process, plus its per-version statistics over the window it is
# asked to keep (about 16 bytes per second of window and version), so a long analysis window gets the
# memory it needs instead of an OOM kill. The limit leaves room for request bodies in flight.
ROUTER_BASE_MEMORY_MI = 128
STATS_BYTES_PER_SECOND = 16
ROUTER_MEMORY_HEADROOM_MI = 384
MI = 1024 * 1024


def service_account(ctx: common.FleetContext) -> dict[str, Any]:
    return common.head(ctx, "v1", "ServiceAccount", common.router_name(ctx), COMPONENT)


def role(ctx: common.FleetContext) -> dict[str, Any]:
    """Read-only: the CaptionModels (weights in status) and the versions' endpoints."""
    return {
        **common.head(ctx, "rbac.authorization.k8s.io/v1", "Role", common.router_name(ctx), COMPONENT),
        "rules": as_manifests(ROUTER_RULES),
    }


def role_binding(ctx: common.FleetContext) -> dict[str, Any]:
    name = common.router_name(ctx)
    return {
        **common.head(ctx, "rbac.authorization.k8s.io/v1", "RoleBinding", name, COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ctx.namespace}],
    }


def memory_request_mi(ctx: common.FleetContext) -> int:
    """Mi of memory the router asks for, from the statistics window it keeps for every version."""
    stats = len(ctx.spec.versions) * stats_window_s(ctx.spec) * STATS_BYTES_PER_SECOND
    return ROUTER_BASE_MEMORY_MI + math.ceil(stats / MI)


def _resources(ctx: common.FleetContext) -> dict[str, Any]:
    request = memory_request_mi(ctx)
    return {
        "requests": {"cpu": "100m", "memory": f"{request}Mi"},
        "limits": {"memory": f"{request + ROUTER_MEMORY_HEADROOM_MI}Mi"},
    }


def _spread(ctx: common.FleetContext) -> dict[str, Any]:
    """Spread the replicas over nodes so that one node going away keeps the endpoint up."""
    term = {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": common.selector_labels(ctx, COMPONENT)},
    }
    preferred = [{"weight": 100, "podAffinityTerm": term}]
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}}


def pod_spec(ctx: common.FleetContext) -> dict[str, Any]:
    spec = ctx.spec
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_MOUNT}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if (auth := common.auth_volume(ctx)) is not None:
        volumes.append(auth)
        mounts.append({"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True})
    container = {
        "name": "router",
        "image": ctx.image(),
        "imagePullPolicy": ctx.config.settings.image_pull_policy,
        "command": ["captionfleet", "router"],
        "ports": [common.container_port()],
        "env": router_env(ctx),
        "resources": _resources(ctx),
        "livenessProbe": common.http_probe("/healthz", period=10, failures=3),
        "readinessProbe": common.http_probe("/readyz", period=5, failures=2),
        "securityContext": common.restricted_container_security(),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "serviceAccountName": common.router_name(ctx),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": common.pod_security(),
        "containers": [container],
        "volumes": volumes,
        "affinity": _spread(ctx),
    }
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = common.image_pull_secrets(ctx)
    return pod


def deployment(ctx: common.FleetContext) -> dict[str, Any]:
    return {
        **common.head(ctx, "apps/v1", "Deployment", common.router_name(ctx), COMPONENT),
        "spec": {
            "replicas": ctx.spec.router.replicas,
            "selector": {"matchLabels": common.selector_labels(ctx, COMPONENT)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": common.pod_template(ctx, COMPONENT, None, pod_spec(ctx)),
        },
    }


def service(ctx: common.FleetContext) -> dict[str, Any]:
    """The public endpoint; named after the CaptionModel itself."""
    return {
        **common.head(ctx, "v1", "Service", common.public_service_name(ctx), COMPONENT),
        "spec": {
            "type": ctx.spec.router.service_type,
            "selector": common.selector_labels(ctx, COMPONENT),
            "ports": [common.service_port(ctx.spec.router.port)],
        },
    }
