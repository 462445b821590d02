"""The environment the operator gives the runtime and router containers: the one place it is written.

``captionfleet serve`` and ``captionfleet router`` read each setting from ``CAPTIONFLEET_<FIELD>``;
the names here are derived from the fields of their settings classes (``ServeSettings``,
``RouterSettings``, through ``captionfleet.settings.env_entries``), so a renamed setting is an error
here, not a variable the command silently ignores. ``RUNTIME_ENV`` and ``ROUTER_ENV`` document every
setting the builders may set (by field name) with where its value comes from, and ``FOREIGN_ENV`` the
few variables of other programs; a test checks that the builders set nothing else.

Every plain value is escaped for Kubernetes' ``$(VAR)`` expansion (``$`` becomes ``$$``), so a value
from the spec reaches the process exactly as written. Secrets are never values: they are
``secretKeyRef``\\s the kubelet resolves.
"""

from __future__ import annotations

import math
from typing import Any

from captionfleet import names
from captionfleet.operator.builders.common import FleetContext
from captionfleet.operator.spec import (
    CaptionModelSpec,
    ModelSource,
    ModelVersion,
    SecretKeyRef,
    parse_model_source,
    seconds,
)
from captionfleet.settings import env_entries, env_name
from captionfleet.settings.router import RouterSettings
from captionfleet.settings.serve import ServeSettings

MODEL_MOUNT = "/models"  # hf:// downloads and pvc:// claims are mounted here
DOWNLOADED_MODEL = f"{MODEL_MOUNT}/weights"  # where the init container puts an hf:// snapshot
AUTH_MOUNT = "/etc/captionfleet/auth"  # the API-key Secret (read-only)
TMP_MOUNT = "/tmp"  # the only writable path besides the model volume (read-only root filesystem)

RUNTIME_ENV: dict[str, str] = {
    "model": "local path of the model: /models/weights (hf://), /models/<path> (pvc://), <path> (file://)",
    "model_version": "versions[].name; reported as model_version in every answer",
    "precision": "versions[].precision: fp32, fp16, bf16 or int8",
    "decoder": "versions[].decoder: native or transformers",
    "device": "cuda when resources.gpu > 0, else cpu",
    "host": "0.0.0.0",
    "port": f"{names.HTTP_PORT} (the container port named {names.HTTP_PORT_NAME})",
    "max_batch_size": "batching.maxBatchSize",
    "max_queue_delay_ms": "batching.maxQueueDelayMs",
    "max_queue_size": "batching.maxQueueSize",
    "num_beams": "generation.numBeams",
    "max_new_tokens": "generation.maxNewTokens",
    "style": "generation.style (only when set)",
    "redis_url": "cache.redisUrl, or the Secret key cache.redisUrlSecret (secretKeyRef; only with a cache)",
    "api_keys_file": "/etc/captionfleet/auth/<auth.key> (only with auth)",
    "api_keys": "sha256:<digest of the operator's key for this CaptionModel> (only with auth and an "
    "operator key): the quality gate's requests; merged with the keys file",
    "jobs_redis_url": "the Secret key jobs.redisUrlSecret (secretKeyRef; only with jobs)",
    "jobs_stream": "captionfleet:jobs:<namespace>:<CaptionModel>:<version> (only with jobs): each version "
    "its own stream, watched by KEDA's redis-streams trigger too",
    "moderation_url": "moderation.url (only with moderation)",
    "moderation_timeout_ms": "moderation.timeoutMs (only with moderation)",
    "moderation_failure_policy": "moderation.failurePolicy: Fail or Ignore (only with moderation)",
    "moderation_allow_private": "moderation.allowPrivateAddresses (only with moderation)",
}

ROUTER_ENV: dict[str, str] = {
    "host": "0.0.0.0",
    "port": f"{names.HTTP_PORT} (the container port named {names.HTTP_PORT_NAME})",
    "caption_model": "metadata.name of the CaptionModel; the router reads its status.versions[] "
    "(name, weight, service) and the EndpointSlices of those Services",
    "namespace": "the pod's namespace (downward API)",
    "stats_window_s": "the longer of 900 s and rollout.analysis.window, so every check's window "
    "is covered by the router's figures",
    "api_keys_file": "/etc/captionfleet/auth/<auth.key> (only with auth)",
    "request_timeout_ms": "router.requestTimeout, in milliseconds",
    "cold_start_max_held": "router.coldStart.maxHeld",
    "cold_start_timeout_ms": "router.coldStart.timeout, in milliseconds",
    "redis_url": "cache.redisUrl, or the Secret key cache.redisUrlSecret (secretKeyRef; only with a cache): "
    "exact repeats are answered from it while a version is at zero",
}

# Not ours, but needed: the weights are local (never downloaded by the server) and the root filesystem
# is read-only, so caches go to /tmp.
FOREIGN_ENV: dict[str, str] = {"HF_HUB_OFFLINE": "1", "HF_HOME": "/tmp/hf", "HOME": "/tmp"}

ROUTER_STATS_WINDOW_S = 900
"""The router's own default history of per-second figures (``--stats-window-s``)."""


def escaped(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain values with ``$`` doubled: Kubernetes expands ``$(VAR)`` in env values, ``$$`` is a ``$``."""
    return [{**e, "value": str(e["value"]).replace("$", "$$")} if "value" in e else e for e in entries]


def model_path(source: ModelSource) -> str:
    if source.scheme == "hf":
        return DOWNLOADED_MODEL
    if source.scheme == "pvc":
        return f"{MODEL_MOUNT}/{source.path}".rstrip("/")
    return source.location


def _foreign(*keys: str) -> list[dict[str, Any]]:
    return [{"name": key, "value": FOREIGN_ENV[key]} for key in keys]


def secret_entry(cls: type[Any], field: str, ref: SecretKeyRef) -> dict[str, Any]:
    """The variable of ``cls``'s setting ``field`` from a Secret key (the kubelet resolves it)."""
    env_entries(cls, **{field: ""})  # a misspelt or renamed field is an error here too
    return {"name": env_name(field), "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _optional_serve_settings(ctx: FleetContext, version: ModelVersion) -> list[dict[str, Any]]:
    """Style, cache, jobs, moderation and API keys: set only when the spec asks for them."""
    spec = ctx.spec
    env: list[dict[str, Any]] = []
    if spec.generation.style:
        env += env_entries(ServeSettings, style=spec.generation.style)
    env += cache_entries(ServeSettings, spec)
    if spec.jobs is not None:
        env.append(secret_entry(ServeSettings, "jobs_redis_url", spec.jobs.redis_url_secret))
        env += env_entries(ServeSettings, jobs_stream=jobs_stream(ctx, version))
    if spec.moderation is not None:
        env += env_entries(
            ServeSettings,
            moderation_url=spec.moderation.url,
            moderation_timeout_ms=spec.moderation.timeout_ms,
            moderation_failure_policy=spec.moderation.failure_policy,
            moderation_allow_private=spec.moderation.allow_private_addresses,
        )
    if spec.auth is not None:
        env += env_entries(ServeSettings, api_keys_file=f"{AUTH_MOUNT}/{spec.auth.key}")
        env += operator_key_entries(ctx)
    return env


def operator_key_entries(ctx: FleetContext) -> list[dict[str, Any]]:
    """The digest of the operator's key for this CaptionModel as one more runtime key (the runtime
    merges ``api_keys`` with the keys file); nothing without an operator key. Never the key itself."""
    key = ctx.config.operator_key
    if key is None:
        return []
    return env_entries(ServeSettings, api_keys=(key.digest_for(ctx.namespace, ctx.name),))


def cache_entries(cls: type[Any], spec: CaptionModelSpec) -> list[dict[str, Any]]:
    """``redis_url`` of the shared cache for ``cls``'s process: the runtimes keep results there, the
    routers answer exact repeats from it while a version is at zero; none without ``cache``."""
    cache = spec.cache
    if cache is not None and cache.redis_url_secret is not None:
        return [secret_entry(cls, "redis_url", cache.redis_url_secret)]
    if cache is not None and cache.redis_url:
        return env_entries(cls, redis_url=cache.redis_url)
    return []


def jobs_stream(ctx: FleetContext, version: ModelVersion) -> str:
    """The version's stream of job items (its runtimes consume it, KEDA watches it)."""
    return names.jobs_stream(ctx.namespace, ctx.name, version.name)


def runtime_env(ctx: FleetContext, version: ModelVersion) -> list[dict[str, Any]]:
    spec = ctx.spec
    env = env_entries(
        ServeSettings,
        model=model_path(parse_model_source(version.model)),
        model_version=version.name,
        precision=version.precision,
        decoder=version.decoder,
        device="cuda" if spec.resources.gpu > 0 else "cpu",
        host="0.0.0.0",
        port=names.HTTP_PORT,
        max_batch_size=spec.batching.max_batch_size,
        max_queue_delay_ms=spec.batching.max_queue_delay_ms,
        max_queue_size=spec.batching.max_queue_size,
        num_beams=spec.generation.num_beams,
        max_new_tokens=spec.generation.max_new_tokens,
    )
    env += _optional_serve_settings(ctx, version)
    return escaped(env + _foreign("HF_HUB_OFFLINE", "HF_HOME", "HOME"))


def stats_window_s(spec: CaptionModelSpec) -> int:
    """Seconds of figures the router must keep: the analysis window, at least the router's default."""
    return max(ROUTER_STATS_WINDOW_S, math.ceil(seconds(spec.rollout.analysis.window)))


def router_env(ctx: FleetContext) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = env_entries(
        RouterSettings, host="0.0.0.0", port=names.HTTP_PORT, caption_model=ctx.name
    )
    env.append(
        {"name": env_name("namespace"), "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    )
    env += env_entries(RouterSettings, stats_window_s=stats_window_s(ctx.spec))
    cold_start = ctx.spec.router.cold_start
    env += env_entries(
        RouterSettings,
        request_timeout_ms=round(seconds(ctx.spec.router.request_timeout) * 1000),
        cold_start_max_held=cold_start.max_held,
        cold_start_timeout_ms=round(seconds(cold_start.timeout) * 1000),
    )
    env += cache_entries(RouterSettings, ctx.spec)
    if ctx.spec.auth is not None:
        env += env_entries(RouterSettings, api_keys_file=f"{AUTH_MOUNT}/{ctx.spec.auth.key}")
    return escaped(env + _foreign("HOME"))
