"""The router: the fleet's public endpoint, its Deployment and Service, and its read-only RBAC."""

from __future__ import annotations

from typing import Any

from captionfleet.operator.builders import common as c
from captionfleet.operator.builders.env import AUTH_MOUNT, TMP_MOUNT, router_env
from captionfleet.operator.permissions import ROUTER_RULES, as_manifests

COMPONENT = "router"


def service_account(ctx: c.FleetContext) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": c.metadata(ctx, c.router_name(ctx), COMPONENT),
    }


def role(ctx: c.FleetContext) -> dict[str, Any]:
    """Read-only: the CaptionModels (weights in status) and the versions' endpoints."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": c.metadata(ctx, c.router_name(ctx), COMPONENT),
        "rules": as_manifests(ROUTER_RULES),
    }


def role_binding(ctx: c.FleetContext) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": c.metadata(ctx, c.router_name(ctx), COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": c.router_name(ctx)},
        "subjects": [{"kind": "ServiceAccount", "name": c.router_name(ctx), "namespace": ctx.namespace}],
    }


def deployment(ctx: c.FleetContext) -> dict[str, Any]:
    spec = ctx.spec
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_MOUNT}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if spec.auth is not None:
        volumes.append({"name": "auth", "secret": {"secretName": spec.auth.secret_name}})
        mounts.append({"name": "auth", "mountPath": AUTH_MOUNT, "readOnly": True})
    container = {
        "name": "router",
        "image": ctx.image(),
        "imagePullPolicy": ctx.config.pull_policy,
        "command": ["captionfleet", "router"],
        "ports": [{"name": "http", "containerPort": c.RUNTIME_PORT, "protocol": "TCP"}],
        "env": router_env(ctx),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "livenessProbe": c.http_probe("/healthz", period=10, failures=3),
        "readinessProbe": c.http_probe("/readyz", period=5, failures=2),
        "securityContext": c.restricted_container_security(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": c.router_name(ctx),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": c.pod_security(),
        "containers": [container],
        "volumes": volumes,
        # Spread the replicas over nodes so that one node going away keeps the endpoint up.
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": c.selector_labels(ctx, COMPONENT)},
                        },
                    }
                ]
            }
        },
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = c.image_pull_secrets(ctx)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.metadata(ctx, c.router_name(ctx), COMPONENT),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": c.selector_labels(ctx, COMPONENT)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": c.labels(ctx, COMPONENT),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(c.RUNTIME_PORT),
                        "prometheus.io/path": c.PROMETHEUS_PATH,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service(ctx: c.FleetContext) -> dict[str, Any]:
    """The public endpoint; named after the CaptionModel itself."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(ctx, c.public_service_name(ctx), COMPONENT),
        "spec": {
            "type": ctx.spec.router.service_type,
            "selector": c.selector_labels(ctx, COMPONENT),
            "ports": [
                {"name": "http", "port": ctx.spec.router.port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
