"""Semantic validation: what the CRD's schema cannot express.

The schema (from spec.py) already bounds every number and enumerates every choice; the checks here
relate fields to each other, to the object's name, or to how the operator is installed. Each problem
is one sentence naming the field, so that the Invalid condition tells the user what to change.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import ValidationError

from captionfleet.operator.affinity import affinity_problems
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.cascade import cascade_problems
from captionfleet.operator.secrecy import SECRET_QUERY_NAMES
from captionfleet.operator.spec import (
    DNS_LABEL_PATTERN,
    CaptionModelSpec,
    parse_model_source,
    parse_spec,
    seconds,
)

MAX_NAME = 63  # Services and labels: a DNS-1035 label


def _loc(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as a path; a map key that is not printable text (a nodeSelector's may be
    any text) in brackets, escaped, so that the message stays one readable line."""
    path = "spec"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":  # pydantic's mark: the key itself is refused, not its value
            path += " (the key)"
        else:
            path += f".{part}" if part.isprintable() else f"[{part!a}]"
    return path


def schema_problems(error: ValidationError) -> list[str]:
    """pydantic's errors as ``spec.versions[1].weight: <message>`` lines."""
    return [f"{_loc(e['loc'])}: {e['msg']}" for e in error.errors()]


def _names(name: str, spec: CaptionModelSpec) -> list[str]:
    problems = []
    if not re.fullmatch(DNS_LABEL_PATTERN, name):
        problems.append(
            f"metadata.name {name!r} must start with a letter and hold only lowercase letters, digits and "
            "'-': the router's Service is named after it"
        )
    longest = max([f"{name}-router"] + [f"{name}-{v.name}" for v in spec.versions], key=len)
    if len(longest) > MAX_NAME:
        problems.append(
            f"child name {longest!r} is longer than {MAX_NAME} characters: shorten metadata.name "
            "or the version names"
        )
    return problems


def _versions(spec: CaptionModelSpec) -> list[str]:
    problems = []
    counts = Counter(v.name for v in spec.versions)
    duplicates = sorted(name for name, n in counts.items() if n > 1)
    if duplicates:
        problems.append(f"spec.versions: names must be unique, {', '.join(duplicates)} repeated")
    if "router" in counts:
        problems.append("spec.versions: 'router' is reserved for the router's own objects")
    total = sum(v.weight for v in spec.versions)
    if total != 100:
        split = ", ".join(f"{v.name}={v.weight}" for v in spec.versions)
        problems.append(f"spec.versions: weights must sum to 100, they sum to {total} ({split})")
    canaries = [v.name for v in spec.versions if v.canary]
    if len(canaries) > 1:
        problems.append(
            f"spec.versions: at most one version may be in rollout (canary: true) at a time, "
            f"got {', '.join(canaries)}"
        )
    if not any(not v.canary and v.weight > 0 for v in spec.versions):
        problems.append("spec.versions: a version that is not a canary must receive traffic (weight > 0)")
    for i, v in enumerate(spec.versions):
        where = f"spec.versions[{i}] ({v.name})"
        try:
            parse_model_source(v.model)
        except ValueError as e:
            problems.append(f"{where}.model: {e}")
        if v.min_replicas is not None and v.max_replicas is not None and v.min_replicas > v.max_replicas:
            problems.append(f"{where}: minReplicas {v.min_replicas} is above maxReplicas {v.max_replicas}")
        if v.precision == "fp16" and spec.resources.gpu == 0:
            problems.append(f"{where}.precision: fp16 needs a GPU; set resources.gpu or use fp32/bf16")
        if v.precision == "int8" and spec.resources.gpu > 0:
            problems.append(
                f"{where}.precision: int8 (dynamic quantisation) runs on CPUs only; "
                "use bf16 or fp16 with resources.gpu, or set resources.gpu to 0"
            )
    return problems


def _autoscaling(spec: CaptionModelSpec, config: ClusterConfig) -> list[str]:
    problems = []
    a = spec.autoscaling
    if a.min_replicas > a.max_replicas:
        problems.append(
            f"spec.autoscaling: minReplicas {a.min_replicas} is above maxReplicas {a.max_replicas}"
        )
    if a.provider == "keda" and not config.settings.prometheus_url:
        problems.append(
            "spec.autoscaling.provider: keda needs a Prometheus to query; this operator runs without "
            "--prometheus-url (CAPTIONFLEET_PROMETHEUS_URL)"
        )
    analysis = spec.rollout.analysis
    if analysis.max_weight < analysis.step_weight:
        problems.append(
            f"spec.rollout.analysis: maxWeight {analysis.max_weight} is below "
            f"stepWeight {analysis.step_weight}"
        )
    if seconds(analysis.window) < seconds(analysis.interval):
        problems.append(
            f"spec.rollout.analysis: window {analysis.window} is shorter than interval {analysis.interval}"
        )
    return problems


def _cache(spec: CaptionModelSpec) -> list[str]:
    """Exactly one source of the Redis URL, and no credentials in plain text (never echoed)."""
    cache = spec.cache
    if cache is None:
        return []
    if (cache.redis_url is None) == (cache.redis_url_secret is None):
        return ["spec.cache: give exactly one of redisUrl and redisUrlSecret"]
    if cache.redis_url is not None and _has_credentials(cache.redis_url):
        return [
            "spec.cache.redisUrl: holds credentials, which would be stored in plain text in the "
            "Deployments; put the whole URL in a Secret and name it in spec.cache.redisUrlSecret "
            "({name, key}) instead"
        ]
    return []


def _jobs(spec: CaptionModelSpec) -> list[str]:
    """KEDA needs the queue's address (it reads no URL); the address's port must be one."""
    jobs = spec.jobs
    if jobs is None:
        return []
    if jobs.redis_address is None:
        if spec.autoscaling.provider == "keda":
            return [
                "spec.jobs.redisAddress: autoscaling.provider keda watches the job backlog through KEDA's "
                "redis-streams trigger, which needs the Redis as host:port (it reads no URL)"
            ]
        return []
    port = int(jobs.redis_address.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        return [f"spec.jobs.redisAddress: port {port} is not in 1..65535"]
    return []


def _has_credentials(url: str) -> bool:
    """User-info, or a query parameter that is a credential (redis clients take ``?password=``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "@" in url
    query = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    return bool(parts.username or parts.password) or "@" in parts.netloc or bool(query & SECRET_QUERY_NAMES)


def _moderation(spec: CaptionModelSpec) -> list[str]:
    """No credentials in plain text, and no address the runtimes would refuse (they would not start)."""
    moderation = spec.moderation
    if moderation is None:
        return []
    if _has_credentials(moderation.url):
        return [
            "spec.moderation.url: holds credentials, which would be stored in plain text in the Deployments"
        ]
    try:
        host = (urlsplit(moderation.url).hostname or "").rstrip(".").lower()
    except ValueError as exc:  # an unclosed "[" (IPv6 literal) and the like: no runtime could use it
        return [f"spec.moderation.url: is not a URL ({exc})"]
    if not moderation.allow_private_addresses and _private_host(host):
        return [
            f"spec.moderation.url: {host!r} is a private, loopback or cluster-internal address, which the "
            "runtimes refuse unless spec.moderation.allowPrivateAddresses is true"
        ]
    return []


def _private_host(host: str) -> bool:
    """An IP literal that is not public, localhost, or a cluster Service's name (a ClusterIP is private).
    Other names are checked by the runtimes on the address they resolve to."""
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        pass
    internal = (".localhost", ".svc", ".cluster.local")
    return host.endswith(internal) or "." not in host  # a bare name: a Service of the namespace


def problems(name: str, spec: CaptionModelSpec, config: ClusterConfig) -> list[str]:
    """Everything wrong with a schema-valid spec; empty when it can be reconciled."""
    found = _names(name, spec) + _versions(spec) + _autoscaling(spec, config) + _cache(spec)
    found += _jobs(spec) + _moderation(spec) + cascade_problems(spec)
    return found + affinity_problems(spec.affinity)


def check(
    name: str, raw_spec: Mapping[str, Any] | None, config: ClusterConfig
) -> tuple[CaptionModelSpec | None, list[str]]:
    """(the parsed spec, no problems) or (None or the spec, the problems)."""
    try:
        spec = parse_spec(raw_spec)
    except ValidationError as e:
        return None, schema_problems(e)
    return spec, problems(name, spec, config)
