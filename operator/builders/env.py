"""The environment the operator gives the runtime and router containers: the one place it is written.

``captionfleet serve`` and ``captionfleet router`` read each option from ``CAPTIONFLEET_<OPTION>``
(captionfleet/settings.py), so these names are the options of those commands. ``RUNTIME_ENV`` and
``ROUTER_ENV`` list every variable the builders may set, with where its value comes from; a test
checks that the builders set nothing else.
"""

from __future__ import annotations

import math
from typing import Any

from captionfleet.operator import spec as s
from captionfleet.operator.builders.common import RUNTIME_PORT, FleetContext

MODEL_MOUNT = "/models"  # hf:// downloads and pvc:// claims are mounted here
DOWNLOADED_MODEL = f"{MODEL_MOUNT}/weights"  # where the init container puts an hf:// snapshot
AUTH_MOUNT = "/etc/captionfleet/auth"  # the API-key Secret (read-only)
TMP_MOUNT = "/tmp"  # the only writable path besides the model volume (read-only root filesystem)

RUNTIME_ENV: dict[str, str] = {
    "CAPTIONFLEET_MODEL": "local path of the model: /models/weights (hf://), /models/<path> (pvc://), "
    "<path> (file://)",
    "CAPTIONFLEET_MODEL_VERSION": "versions[].name; reported as model_version in every answer",
    "CAPTIONFLEET_PRECISION": "versions[].precision: fp32, fp16, bf16 or int8",
    "CAPTIONFLEET_DECODER": "versions[].decoder: native or transformers",
    "CAPTIONFLEET_DEVICE": "cuda when resources.gpu > 0, else cpu",
    "CAPTIONFLEET_HOST": "0.0.0.0",
    "CAPTIONFLEET_PORT": "8080 (the container port named http)",
    "CAPTIONFLEET_MAX_BATCH_SIZE": "batching.maxBatchSize",
    "CAPTIONFLEET_MAX_QUEUE_DELAY_MS": "batching.maxQueueDelayMs",
    "CAPTIONFLEET_MAX_QUEUE_SIZE": "batching.maxQueueSize",
    "CAPTIONFLEET_NUM_BEAMS": "generation.numBeams",
    "CAPTIONFLEET_MAX_NEW_TOKENS": "generation.maxNewTokens",
    "CAPTIONFLEET_STYLE": "generation.style (only when set)",
    "CAPTIONFLEET_REDIS_URL": "cache.redisUrl (only with a cache)",
    "CAPTIONFLEET_API_KEYS_FILE": "/etc/captionfleet/auth/<auth.key> (only with auth)",
    # Not ours, but needed: the weights are local (never downloaded by the server) and the root
    # filesystem is read-only, so caches go to /tmp.
    "HF_HUB_OFFLINE": "1",
    "HF_HOME": "/tmp/hf",
    "HOME": "/tmp",
}

ROUTER_ENV: dict[str, str] = {
    "CAPTIONFLEET_HOST": "0.0.0.0",
    "CAPTIONFLEET_PORT": "8080 (the container port named http)",
    "CAPTIONFLEET_CAPTION_MODEL": "metadata.name of the CaptionModel; the router reads its status.versions[] "
    "(name, weight, service) and the EndpointSlices of those Services",
    "CAPTIONFLEET_NAMESPACE": "the pod's namespace (downward API)",
    "CAPTIONFLEET_STATS_WINDOW_S": "the longer of 900 s and rollout.analysis.window, so every check's window "
    "is covered by the router's figures",
    "CAPTIONFLEET_API_KEYS_FILE": "/etc/captionfleet/auth/<auth.key> (only with auth)",
    "HOME": "/tmp",
}


def _var(name: str, value: object) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def model_path(source: s.ModelSource) -> str:
    if source.scheme == "hf":
        return DOWNLOADED_MODEL
    if source.scheme == "pvc":
        return f"{MODEL_MOUNT}/{source.path}".rstrip("/")
    return source.location


def runtime_env(ctx: FleetContext, version: s.ModelVersion) -> list[dict[str, Any]]:
    spec = ctx.spec
    env = [
        _var("CAPTIONFLEET_MODEL", model_path(s.parse_model_source(version.model))),
        _var("CAPTIONFLEET_MODEL_VERSION", version.name),
        _var("CAPTIONFLEET_PRECISION", version.precision),
        _var("CAPTIONFLEET_DECODER", version.decoder),
        _var("CAPTIONFLEET_DEVICE", "cuda" if spec.resources.gpu > 0 else "cpu"),
        _var("CAPTIONFLEET_HOST", "0.0.0.0"),
        _var("CAPTIONFLEET_PORT", RUNTIME_PORT),
        _var("CAPTIONFLEET_MAX_BATCH_SIZE", spec.batching.max_batch_size),
        _var("CAPTIONFLEET_MAX_QUEUE_DELAY_MS", spec.batching.max_queue_delay_ms),
        _var("CAPTIONFLEET_MAX_QUEUE_SIZE", spec.batching.max_queue_size),
        _var("CAPTIONFLEET_NUM_BEAMS", spec.generation.num_beams),
        _var("CAPTIONFLEET_MAX_NEW_TOKENS", spec.generation.max_new_tokens),
    ]
    if spec.generation.style:
        env.append(_var("CAPTIONFLEET_STYLE", spec.generation.style))
    if spec.cache is not None:
        env.append(_var("CAPTIONFLEET_REDIS_URL", spec.cache.redis_url))
    if spec.auth is not None:
        env.append(_var("CAPTIONFLEET_API_KEYS_FILE", f"{AUTH_MOUNT}/{spec.auth.key}"))
    env += [_var("HF_HUB_OFFLINE", 1), _var("HF_HOME", "/tmp/hf"), _var("HOME", "/tmp")]
    return env


ROUTER_STATS_WINDOW_S = 900
"""The router's own default history of per-second figures (``--stats-window-s``)."""


def stats_window_s(spec: s.CaptionModelSpec) -> int:
    """Seconds of figures the router must keep: the analysis window, at least the router's default."""
    return max(ROUTER_STATS_WINDOW_S, math.ceil(s.seconds(spec.rollout.analysis.window)))


def router_env(ctx: FleetContext) -> list[dict[str, Any]]:
    env = [
        _var("CAPTIONFLEET_HOST", "0.0.0.0"),
        _var("CAPTIONFLEET_PORT", RUNTIME_PORT),
        _var("CAPTIONFLEET_CAPTION_MODEL", ctx.name),
        {"name": "CAPTIONFLEET_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        _var("CAPTIONFLEET_STATS_WINDOW_S", stats_window_s(ctx.spec)),
    ]
    if ctx.spec.auth is not None:
        env.append(_var("CAPTIONFLEET_API_KEYS_FILE", f"{AUTH_MOUNT}/{ctx.spec.auth.key}"))
    env.append(_var("HOME", "/tmp"))
    return env
