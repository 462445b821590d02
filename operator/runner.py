"""Start kopf with the operator's handlers and settings (used by the command and by the tests)."""

from __future__ import annotations

import asyncio

import kopf

from captionfleet.operator.context import OperatorContext
from captionfleet.operator.handlers import build_registry
from captionfleet.operator.secrecy import install_log_redaction
from captionfleet.operator.settings import OperatorSettings


async def run_operator(
    settings: OperatorSettings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or SIGINT/SIGTERM when run in the main thread)."""
    install_log_redaction()
    await kopf.operator(
        registry=build_registry(settings),
        memo=OperatorContext.create(settings),
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        # Peering elects one active replica; standalone skips it (a single replica, development).
        standalone=settings.standalone,
        peering_name=None if settings.standalone else settings.peering,
        liveness_endpoint=settings.liveness or None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
