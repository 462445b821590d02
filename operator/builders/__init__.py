"""Pure builders: a FleetContext in, every child manifest of the CaptionModel out."""

from __future__ import annotations

from typing import Any

from captionfleet.operator.builders import autoscaling, router, runtime
from captionfleet.operator.builders.common import FleetContext


def fleet(ctx: FleetContext) -> list[dict[str, Any]]:
    """All children, in the order they are best applied: the router's RBAC first, then each version
    (Deployment, Service, KEDA's credentials, autoscaler), then the router that sends traffic to them."""
    manifests = [router.service_account(ctx), router.role(ctx), router.role_binding(ctx)]
    for version in ctx.spec.versions:
        manifests.append(runtime.deployment(ctx, version))
        manifests.append(runtime.service(ctx, version))
        credentials = autoscaling.trigger_authentication(ctx, version)
        if credentials is not None:
            manifests.append(credentials)  # before the ScaledObject that names it
        scaler = autoscaling.autoscaler(ctx, version)
        if scaler is not None:
            manifests.append(scaler)
    manifests += [router.deployment(ctx), router.service(ctx)]
    return manifests
