"""Per model version: an HPA (autoscaling/v2) or a KEDA ScaledObject, within the version's bounds.

With ``jobs``, KEDA also watches the version's backlog of job items (a ``redis-streams`` trigger on its
stream). The interactive queue depth stays the first trigger and the one the fleet is sized by; KEDA
(as the HPA under it) takes the largest proposal, so a backlog adds pods, up to the same ceiling,
and never takes any away from interactive traffic. The runtimes delete an item from the stream once
its result is stored, so the stream's length (``XLEN``, ``streamLength``) is exactly the items not yet
done: queued or being captioned (the runtimes' ``captionfleet_jobs_pending_items``). The consumer
group's pending entries (``XPENDING``, ``pendingEntriesCount``) would count only items already handed
to a pod, at most what the running pods take at once: a signal that never grows with the backlog,
and is 0 with no pods at all (no scaling up from zero). KEDA reads no URL, so the trigger takes
``jobs.redisAddress``, and the password, when there is one, through a TriggerAuthentication that
names the Secret key (``jobs.redisPasswordSecret``; KEDA reads it, the operator never does).
"""

from __future__ import annotations

from typing import Any

from captionfleet.operator.builders import common
from captionfleet.operator.builders.env import jobs_stream
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
                        "metric": {"name": ctx.config.settings.queue_depth_metric},
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
        f'sum(avg_over_time({ctx.config.settings.queue_depth_metric}{{namespace="{ctx.namespace}",'
        f'pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}}[1m]))'
    )
    return {
        **common.head(ctx, "keda.sh/v1alpha1", "ScaledObject", name, COMPONENT, version.name),
        "spec": {
            "scaleTargetRef": _target(ctx, version),
            "minReplicaCount": _keda_floor(ctx, version, low),
            "maxReplicaCount": high,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": ctx.config.settings.prometheus_url,
                        "query": query,
                        "threshold": str(autoscaling.target_queue_depth),
                    },
                },
                {
                    "type": "cpu",
                    "metricType": "Utilization",
                    "metadata": {"value": str(autoscaling.target_cpu_utilization)},
                },
                *_backlog_triggers(ctx, version),
            ],
        },
    }


def _keda_floor(ctx: common.FleetContext, version: ModelVersion, low: int) -> int:
    """At zero KEDA may stay there (no pod reports a queue); awake, a version that may scale to zero
    keeps one pod, so KEDA's own cool-down never takes it to zero behind scaleToZeroAfter's back."""
    phase = ctx.cold.get(version.name)
    if phase is None:
        return low
    return 0 if phase == "Idle" else max(low, 1)


def _backlog_triggers(ctx: common.FleetContext, version: ModelVersion) -> list[dict[str, Any]]:
    """The redis-streams trigger on the version's job items, with jobs (and an address for KEDA)."""
    jobs = ctx.spec.jobs
    if jobs is None or jobs.redis_address is None:
        return []
    trigger: dict[str, Any] = {
        "type": "redis-streams",
        "name": "job-backlog",
        "metadata": {
            "address": jobs.redis_address,
            "stream": jobs_stream(ctx, version),
            "streamLength": str(jobs.target_pending_items),
            "databaseIndex": str(jobs.redis_database),
            "enableTLS": "true" if jobs.redis_tls else "false",
        },
    }
    if jobs.redis_password_secret is not None:
        trigger["authenticationRef"] = {"name": common.version_name(ctx, version.name)}
    return [trigger]


def trigger_authentication(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any] | None:
    """KEDA's credentials for the version's backlog trigger: the password's Secret key, by reference;
    none without a KEDA autoscaler, jobs or a password."""
    jobs = ctx.spec.jobs
    if ctx.autoscaler() != "keda" or ctx.share(version.name).retired or not _backlog_triggers(ctx, version):
        return None
    assert jobs is not None
    if jobs.redis_password_secret is None:
        return None
    secret = jobs.redis_password_secret
    name = common.version_name(ctx, version.name)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": common.metadata(ctx, name, COMPONENT, version.name),
        "spec": {"secretTargetRef": [{"parameter": "password", "name": secret.name, "key": secret.key}]},
    }


def autoscaler(ctx: common.FleetContext, version: ModelVersion) -> dict[str, Any] | None:
    """The version's autoscaler; none for a retired version (scaled to zero by its Deployment), nor
    an HPA for a version at zero (an HPA cannot go below one pod)."""
    provider = ctx.autoscaler()
    if ctx.share(version.name).retired:
        return None
    if provider == "hpa" and ctx.cold.get(version.name) == "Idle":
        return None
    if provider == "hpa":
        return hpa(ctx, version)
    if provider == "keda":
        return scaled_object(ctx, version)
    return None
