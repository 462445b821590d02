"""Per model version: an HPA (autoscaling/v2) or a KEDA ScaledObject, within the version's bounds."""

from __future__ import annotations

from typing import Any

from captionfleet.operator.builders import common
from captionfleet.operator.builders.replicas import replica_bounds
from captionfleet.operator.builders.runtime import COMPONENT
from captionfleet.operator.spec import ModelVersion


def _target(ctx: common.FleetContext, version: ModelVersion) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": common.version_name(ctx, version.name)}


def hpa(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any]:
    """Scale on the per-pod queue depth; CPU is the fallback.

    The HPA takes the largest proposal over its metrics and still acts on the CPU one when the
    queue-depth metric cannot be read (e.g. the metrics adapter is down), so the version never stays
    stuck at its floor under load.
    """
    autoscaling = ctx.spec.autoscaling
    low, high = replica_bounds(ctx.spec, ctx.share(version.name))
    return {
        **common.head(
            ctx,
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            common.version_name(ctx, version.name),
            COMPONENT,
            version.name,
        ),
        "spec": {
            "scaleTargetRef": _target(ctx, version),
            "minReplicas": max(low, 1),  # the HPA cannot scale to zero; validation refuses 0 with it
            "maxReplicas": high,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": ctx.config.queue_depth_metric},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(autoscaling.target_queue_depth),
                        },
                    },
                },
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": autoscaling.target_cpu_utilization,
                        },
                    },
                },
            ],
            "behavior": {
                # Loading a model takes a while: scale up promptly, scale down only after 5 quiet minutes.
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": 300},
            },
        },
    }


def scaled_object(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any]:
    """KEDA reads the queue depth straight from Prometheus (the operator's --prometheus-url)."""
    autoscaling = ctx.spec.autoscaling
    low, high = replica_bounds(ctx.spec, ctx.share(version.name))
    name = common.version_name(ctx, version.name)
    # Pods of a Deployment are named <deployment>-<replicaset hash>-<pod hash>.
    query = (
        f'sum(avg_over_time({ctx.config.queue_depth_metric}{{namespace="{ctx.namespace}",'
        f'pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}}[1m]))'
    )
    return {
        **common.head(ctx, "keda.sh/v1alpha1", "ScaledObject", name, COMPONENT, version.name),
        "spec": {
            "scaleTargetRef": _target(ctx, version),
            "minReplicaCount": low,
            "maxReplicaCount": high,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": ctx.config.prometheus_url,
                        "query": query,
                        "threshold": str(autoscaling.target_queue_depth),
                    },
                },
                {
                    "type": "cpu",
                    "metricType": "Utilization",
                    "metadata": {"value": str(autoscaling.target_cpu_utilization)},
                },
            ],
        },
    }


def autoscaler(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any] | None:
    """The version's autoscaler; none for a retired version (scaled to zero by its Deployment)."""
    provider = ctx.autoscaler()
    if ctx.share(version.name).retired:
        return None
    if provider == "hpa":
        return hpa(ctx, version)
    if provider == "keda":
        return scaled_object(ctx, version)
    return None
