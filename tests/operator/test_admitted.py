"""Whatever the API server admits as a CaptionModel gets a clear outcome from the operator.

Specs are generated (hypothesis-jsonschema) from the CRD's own ``openAPIV3Schema`` for ``spec``, read
as the API server reads it: unknown fields pruned (``additionalProperties: false``), integers int64 (or
int32 where the format says so), a pattern's ``$`` as RE2's end of text (never before a newline), and
each CEL rule as a format whose strategy draws what the rule admits (a rule nobody translated fails
here). Names are what ``metadata.name`` admits: DNS-1123 subdomains of up to 253 characters. Most specs
are then made to satisfy the rules that relate fields (``usable``), and some get credentials in their
URLs, so that the builders run often and the secrets check is not vacuous.

For each (name, spec): ``validation.check`` refuses it with one-line messages naming the field (and the
Invalid status it writes is one the CRD admits, without the credentials), or every builder, under every
rollout state and scale-to-zero phase the spec can be in, builds manifests the API server accepts, with
names and labels in Kubernetes' limits and no credential of the spec in plain text.

``CAPTIONFLEET_TEST_CR_EXAMPLES`` sets the number of examples (thousands, to hunt for bugs locally).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from captionfleet import names
from captionfleet.operator import builders, coldstart, rollout, spec, validation
from captionfleet.operator.affinity import affinity_problems
from captionfleet.operator.builders.common import ClusterConfig, FleetContext
from captionfleet.operator.crd import captionmodel_crd
from captionfleet.operator.secrecy import SECRET_QUERY_NAMES
from captionfleet.operator.settings import OperatorSettings
from captionfleet.operator.status import invalid_status

from .conftest import schema_problems

CONFIG = ClusterConfig(
    OperatorSettings(default_runtime_image="registry.test/runtime:1", prometheus_url="http://prom:9090")
)
EXAMPLES = int(os.environ.get("CAPTIONFLEET_TEST_CR_EXAMPLES", "40"))
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
_DURATION_RULE = re.compile(
    r"duration\(self\) >= duration\('(?P<low>\w+)'\) && duration\(self\) <= duration\('(?P<high>\w+)'\)"
)
_EXTENDED_RULE = "self.contains('/') && !self.contains('kubernetes.io/') && !self.startsWith('requests.')"
EXTENDED_RESOURCE = "extended-resource"
_LABEL_VALUE = re.compile(spec.LABEL_VALUE_PATTERN)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def re2(pattern: str) -> str:
    """A schema pattern for Python as RE2 reads it: ``$`` is the end of the text, not before a ``\\n``."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern


def _spelled(ms: int, style: int) -> str:
    """A duration of ``ms`` milliseconds as users write it: in ms, as 1h2m3s4ms, or with a unit twice."""
    if style == 0:
        return f"{ms}ms"
    if style == 1:
        hours, rest = divmod(ms, 3_600_000)
        minutes, rest = divmod(rest, 60_000)
        whole, rest = divmod(rest, 1000)
        parts = [(hours, "h"), (minutes, "m"), (whole, "s"), (rest, "ms")]
        return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"
    return f"{ms - ms // 2}ms{ms // 2}ms"


def durations(low: str, high: str) -> st.SearchStrategy[str]:
    """What ``duration(self) >= duration(low) && duration(self) <= duration(high)`` admits."""
    lo, hi = round(spec.seconds(low) * 1000), round(spec.seconds(high) * 1000)
    millis = st.one_of(st.sampled_from([lo, hi]), st.integers(lo, hi))
    return st.one_of(st.sampled_from([low, high]), st.builds(_spelled, millis, st.integers(0, 2)))


def extended_resources(pattern: str) -> st.SearchStrategy[str]:
    """What the CEL rule of ``resources.gpuResource`` admits, on top of its pattern."""
    admitted = st.from_regex(re2(pattern)).filter(
        lambda s: "/" in s and "kubernetes.io/" not in s and not s.startswith("requests.")
    )
    return st.one_of(st.sampled_from(["nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "amd.com/gpu"]), admitted)


def _rule_format(node: Mapping[str, Any], rule: str, formats: dict[str, st.SearchStrategy[str]]) -> str:
    if match := _DURATION_RULE.fullmatch(rule):
        name = f"duration:{match['low']}:{match['high']}"
        formats.setdefault(name, durations(match["low"], match["high"]))
        return name
    if rule == _EXTENDED_RULE:
        formats.setdefault(EXTENDED_RESOURCE, extended_resources(node["pattern"]))
        return EXTENDED_RESOURCE
    raise AssertionError(f"no translation of the CEL rule {rule!r}: add one to test_admitted.py")


def plain(node: Mapping[str, Any], formats: dict[str, st.SearchStrategy[str]]) -> dict[str, Any]:
    """A structural schema node as the plain JSON schema of what the API server admits (and stores)."""
    skipped = ("default", "description", "anyOf", "properties", "items", "additionalProperties")
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in skipped}
    if node.get("type") != "string":
        out.pop("format", None)
    if "pattern" in out:
        out["pattern"] = re2(out["pattern"])
    for rule in node.get("x-kubernetes-validations") or []:
        out["format"] = _rule_format(node, rule["rule"], formats)
    if node.get("type") == "integer":
        low, high = INT32 if node.get("format") == "int32" else INT64
        out["minimum"], out["maximum"] = (
            max(low, out.get("minimum", low)),
            min(high, out.get("maximum", high)),
        )
    if "anyOf" in node:  # int-or-string
        out["anyOf"] = [plain(branch, formats) for branch in node["anyOf"]]
    if "properties" in node:
        out["properties"] = {key: plain(sub, formats) for key, sub in node["properties"].items()}
        out["additionalProperties"] = False  # pruned by the server (refused with fieldValidation=Strict)
    elif isinstance(node.get("additionalProperties"), Mapping):
        out["additionalProperties"] = plain(node["additionalProperties"], formats)
    if "items" in node:
        out["items"] = plain(node["items"], formats)
    return out


def _spec_strategy() -> st.SearchStrategy[dict[str, Any]]:
    crd_spec = captionmodel_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    formats: dict[str, st.SearchStrategy[str]] = {}
    schema = plain(crd_spec, formats)
    return from_schema(schema, custom_formats=formats)  # type: ignore[return-value]


SPECS = _spec_strategy()
# metadata.name as the API server admits it; mostly short ones, which the operator can use.
NAMES = st.one_of(
    st.from_regex(r"^[a-z]([-a-z0-9]{0,18}[a-z0-9])?\Z"),
    st.from_regex(re2(spec.DNS_SUBDOMAIN_PATTERN)).filter(lambda n: len(n) <= 253),
)


@st.composite
def credentialed_url(draw: st.DrawFn, scheme: str) -> tuple[str, list[str]]:
    """A URL with credentials in it, and those credentials: texts never to be seen in plain text."""
    token = st.from_regex(r"^[A-Za-z0-9]{4,12}\Z")
    user, password, value = draw(token), draw(token), draw(token)
    host = draw(st.sampled_from(["redis.example.com", "10.0.0.7", "cache", "[::1]", "mod.example.com:8443"]))
    name = draw(st.sampled_from(sorted(SECRET_QUERY_NAMES)))
    name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    userinfo = draw(st.sampled_from(["", f"{user}:{password}", f":{password}", f"{user}"]))
    query = draw(st.sampled_from(["", f"{name}={value}"])) if userinfo else f"{name}={value}"
    url = f"{scheme}://{userinfo}{'@' if userinfo else ''}{host}/0{'?db=0&' if query else ''}{query}"
    return url, [f"{userinfo}@" for _ in [1] if userinfo] + [query for _ in [1] if query]


def _unique_versions(raw: dict[str, Any]) -> list[dict[str, Any]]:
    versions, seen = [], set()
    for i, version in enumerate(raw["versions"]):
        version = dict(version)
        if version["name"] in seen or version["name"] == "router":
            version["name"] = f"v{i}-{len(seen)}"
        seen.add(version["name"])
        lo, hi = version.get("minReplicas"), version.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            version["minReplicas"], version["maxReplicas"] = hi, lo
        versions.append(version)
    canaries = [v for v in versions if v.get("canary")]
    for extra in canaries[1:] if len(canaries) < len(versions) else canaries:
        extra["canary"] = False
    return versions


def _weights(versions: list[dict[str, Any]]) -> None:
    """Weights that sum to 100, with traffic for the first version that is not a canary."""
    total = sum(v.get("weight", 100) for v in versions)
    for version in versions:
        version["weight"] = version.get("weight", 100) * 100 // total if total else 0
    stable = next(v for v in versions if not v.get("canary"))
    stable["weight"] += 100 - sum(v["weight"] for v in versions)
    if stable["weight"] == 0:
        donor = next(v for v in versions if v["weight"] > 0)
        donor["weight"] -= 1
        stable["weight"] = 1


def _swapped(section: dict[str, Any], low: str, high: str, defaults: tuple[Any, Any], key: Any) -> None:
    lo, hi = section.get(low, defaults[0]), section.get(high, defaults[1])
    if key(lo) > key(hi):
        section[low], section[high] = hi, lo


def _toleration(toleration: Mapping[str, Any]) -> dict[str, Any]:
    fixed = dict(toleration)
    if not fixed.get("key"):
        fixed["operator"] = "Exists"
    if fixed.get("operator") == "Exists":
        fixed.pop("value", None)
    if "tolerationSeconds" in fixed:
        fixed["effect"] = "NoExecute"
    return fixed


def _rollout(raw: dict[str, Any]) -> None:
    analysis = raw.setdefault("rollout", {}).setdefault("analysis", {})
    _swapped(analysis, "stepWeight", "maxWeight", (10, 50), int)
    _swapped(analysis, "interval", "window", ("1m", "5m"), spec.seconds)
    gate = raw["rollout"].get("qualityGate")
    if gate is not None and "minScore" not in gate and "maxDrop" not in gate:
        gate["minScore"] = 0


def usable(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` changed to satisfy the rules that relate its fields (validation.py), where it can be."""
    fixed = copy.deepcopy(dict(raw))
    fixed["versions"] = _unique_versions(fixed)
    _weights(fixed["versions"])
    gpu = fixed.get("resources", {}).get("gpu", 0)
    for version in fixed["versions"]:
        if version.get("precision") == ("int8" if gpu else "fp16"):
            version["precision"] = "fp32"
    _swapped(fixed.setdefault("autoscaling", {}), "minReplicas", "maxReplicas", (1, 4), int)
    _rollout(fixed)
    fixed["tolerations"] = [_toleration(t) for t in fixed.get("tolerations", [])]
    if affinity_problems(fixed.get("affinity")):
        del fixed["affinity"]
    if "jobs" in fixed and fixed["autoscaling"].get("provider") == "keda":
        fixed["jobs"].setdefault("redisAddress", "redis.data.svc:6379")
    if "moderation" in fixed:
        fixed["moderation"]["allowPrivateAddresses"] = True
    cascade, serving = (
        fixed.get("cascade"),
        [v for v in fixed["versions"] if v["weight"] and not v.get("canary")],
    )
    if cascade is not None and len(serving) >= 2:
        cascade["fast"], cascade["quality"] = serving[0]["name"], serving[1]["name"]
        if "confidenceThreshold" in cascade:
            cascade.pop("targetEscalationRate", None)
        else:
            cascade.setdefault("targetEscalationRate", 0.2)
    elif cascade is not None:
        del fixed["cascade"]
    return fixed


@st.composite
def captionmodels(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """(metadata.name, spec, the credentials in it) of a CaptionModel the API server admits."""
    raw = draw(SPECS)
    if draw(st.integers(0, 3)):
        raw = usable(raw)
    secrets: list[str] = []
    if draw(st.booleans()):
        field, scheme = draw(
            st.sampled_from([("cache", "redis"), ("cache", "rediss"), ("moderation", "https")])
        )
        url, secrets = draw(credentialed_url(scheme))
        raw[field] = {"redisUrl": url} if field == "cache" else {**raw.get("moderation", {}), "url": url}
    return draw(NAMES), raw, secrets


def _readable(problem: str) -> bool:
    """One line that says which field: ``spec.x.y: ...``, or about metadata.name."""
    return (
        problem.isprintable()
        and len(problem) < 2000
        and problem.startswith(("spec", "metadata.name", "child"))
    )


def _states(parsed: spec.CaptionModelSpec) -> Iterator[rollout.CanaryState]:
    """Each phase a rollout of this spec can be in (none without a canary)."""
    fresh = rollout.current(parsed, None)
    if fresh is None:
        return
    total = rollout.pool(parsed)
    yield fresh
    yield fresh.model_copy(update={"gate": None, "shadow": None, "weight": total, "step": 3})
    for phase in ("Promoted", "RolledBack"):
        for drained in (False, True):
            yield fresh.model_copy(update={"phase": phase, "drained": drained, "gate": None})


def contexts(name: str, parsed: spec.CaptionModelSpec) -> Iterator[FleetContext]:
    """Every context the reconciler can build for this spec: rollout states, a canary ready or not,
    KEDA installed or not, and each scale-to-zero phase of the versions whose floor is 0."""
    variants = [(None, False, True), (None, False, False)]
    variants += [(state, ready, True) for state in _states(parsed) for ready in (False, True)]
    for state, ready, keda in variants:
        ctx = FleetContext.create(
            name=name, namespace="ml", uid="0d5c-uid", spec=parsed, config=CONFIG, rollout=state,
            canary_ready=ready, keda_installed=keda,
        )  # fmt: skip
        yield ctx
        cold = [s.name for s in ctx.shares if coldstart.scales_to_zero(parsed, s)]
        for phase in coldstart.PHASES if cold else ():
            yield ctx.with_cold(dict.fromkeys(cold, phase))


def _label_sets(value: Any, key: str = "") -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        if key in ("labels", "matchLabels") or (key == "selector" and "matchLabels" not in value):
            yield value
        for inner, item in value.items():
            yield from _label_sets(item, inner)
    elif isinstance(value, list):
        for item in value:
            yield from _label_sets(item, key)


def assert_accepted(manifest: Mapping[str, Any], secrets: list[str]) -> None:
    """What the API server would accept, within the operator's name limits, without a credential."""
    where = f"{manifest['kind']} {manifest['metadata']['name']!r}"
    assert schema_problems(manifest) == [], where
    assert _DNS_LABEL.fullmatch(manifest["metadata"]["name"]), where  # a Service's too: at most 63
    if manifest["kind"] == "ScaledObject":  # KEDA's admission webhook
        assert manifest["spec"]["minReplicaCount"] <= manifest["spec"]["maxReplicaCount"], where
    for labels in _label_sets(manifest):
        for key, value in labels.items():
            assert spec.is_qualified_name(key), f"{where}: label key {key!r}"
            assert isinstance(value, str) and _LABEL_VALUE.fullmatch(value) and len(value) <= 63, where
    text = json.dumps(manifest, ensure_ascii=False)
    assert "\\u0000" not in text, f"{where}: a NUL cannot reach a process; the container would never start"
    assert not [s for s in secrets if s in text], f"{where} holds a credential"


def assert_invalid_clearly(name: str, raw: dict[str, Any], problems: list[str], secrets: list[str]) -> None:
    assert all(_readable(p) for p in problems), problems
    message = "; ".join(problems)
    assert not [s for s in secrets if s in message], message
    status = invalid_status(message=message, generation=1, previous={}, now="2026-01-01T00:00:00Z")
    body = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name}, "spec": raw}
    assert schema_problems(body | {"status": _stored(status.manifest())}) == []


def _stored(value: Any) -> Any:
    """A merge patch as the server stores it: a null field is no field."""
    if isinstance(value, Mapping):
        return {key: _stored(item) for key, item in value.items() if item is not None}
    return [_stored(item) for item in value] if isinstance(value, list) else value


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The spec's schema is large (the upstream Affinity among it): drawing one takes a while, by design.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=captionmodels())
def test_every_admitted_captionmodel_is_reconciled_or_clearly_invalid(
    case: tuple[str, dict[str, Any], list[str]],
) -> None:
    name, raw, secrets = case
    parsed, problems = validation.check(name, raw, CONFIG)
    if problems:
        event(f"invalid: {problems[0].split(':')[0].split(' ')[0]}")
        assert_invalid_clearly(name, raw, problems, secrets)
        return
    event("reconciled")
    assert_builds(name, parsed, secrets)


def assert_builds(name: str, parsed: spec.CaptionModelSpec, secrets: list[str]) -> None:
    """Every builder in every context builds what the API server accepts (each manifest checked once:
    most are the same in many contexts)."""
    checked = set()
    for ctx in contexts(name, parsed):
        for manifest in builders.fleet(ctx):
            key = json.dumps(manifest, sort_keys=True)
            if key not in checked:
                checked.add(key)
                assert_accepted(manifest, secrets)
