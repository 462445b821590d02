"""Semantic validation: each rule the schema cannot express, with the message the user will read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from captionfleet.operator import spec, validation
from captionfleet.operator.builders.common import ClusterConfig
from captionfleet.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
CONFIG = ClusterConfig(
    OperatorSettings(default_runtime_image="registry.test/runtime:1", prometheus_url="http://prom:9090")
)


def v(name: str, weight: int = 100, **more: Any) -> dict[str, Any]:
    return {"name": name, "model": f"hf://org/{name}", "weight": weight, **more}


def moderated(url: str) -> dict[str, Any]:
    """A spec of one version, its images checked by the moderation service at ``url``."""
    return {"versions": [v("a")], "moderation": {"url": url}}


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_have_no_problems(path: Path) -> None:
    cr = yaml.safe_load(path.read_text())
    parsed, problems = validation.check(cr["metadata"]["name"], cr["spec"], CONFIG)
    assert problems == [] and parsed is not None


REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
ODD_TERM = {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"a\x10": "x!"}}}

CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "weights",
        {"versions": [v("a", 60), v("b", 30)]},
        "spec.versions: weights must sum to 100, they sum to 90 (a=60, b=30)",
    ),
    (
        "unique names",
        {"versions": [v("a", 50), v("a", 50)]},
        "spec.versions: names must be unique, a repeated",
    ),
    (
        "one rollout at a time",
        {"versions": [v("a", 80), v("b", 10, canary=True), v("c", 10, canary=True)]},
        "spec.versions: at most one version may be in rollout (canary: true) at a time, got b, c",
    ),
    (
        "a stable version serves",
        {"versions": [v("a", 0), v("b", 100, canary=True)]},
        "spec.versions: a version that is not a canary must receive traffic (weight > 0)",
    ),
    ("reserved name", {"versions": [v("router")]}, "spec.versions: 'router' is reserved"),
    (
        "per-version bounds",
        {"versions": [v("a", minReplicas=5, maxReplicas=2)]},
        "spec.versions[0] (a): minReplicas 5 is above maxReplicas 2",
    ),
    (
        "fleet bounds",
        {"versions": [v("a")], "autoscaling": {"minReplicas": 9, "maxReplicas": 3}},
        "spec.autoscaling: minReplicas 9 is above maxReplicas 3",
    ),
    (
        "fp16 on CPU",
        {"versions": [v("a", precision="fp16")]},
        "spec.versions[0] (a).precision: fp16 needs a GPU; set resources.gpu or use fp32/bf16",
    ),
    (
        "int8 on a GPU",
        {"versions": [v("a", precision="int8")], "resources": {"gpu": 1}},
        "spec.versions[0] (a).precision: int8 (dynamic quantisation) runs on CPUs only; "
        "use bf16 or fp16 with resources.gpu, or set resources.gpu to 0",
    ),
    (
        "analysis steps",
        {"versions": [v("a")], "rollout": {"analysis": {"stepWeight": 30, "maxWeight": 20}}},
        "spec.rollout.analysis: maxWeight 20 is below stepWeight 30",
    ),
    (
        "analysis window",
        {"versions": [v("a")], "rollout": {"analysis": {"interval": "5m", "window": "1m"}}},
        "spec.rollout.analysis: window 1m is shorter than interval 5m",
    ),
    (
        "pvc path escape",
        {"versions": [{"name": "a", "model": "pvc://models/../etc"}]},
        "spec.versions[0] (a).model: model 'pvc://models/../etc': the path inside the claim may not "
        "contain '..'",
    ),
    (
        "moderation credentials",
        moderated("https://user:pw@mod.example.com/check"),
        "spec.moderation.url: holds credentials",
    ),
    (
        "moderation in the cluster",
        moderated("http://moderation.ml.svc:8080/check"),
        "spec.moderation.url: 'moderation.ml.svc' is a private, loopback or cluster-internal address",
    ),
    (
        "moderation on a private address",
        moderated("http://10.1.2.3/check"),
        "spec.moderation.url: '10.1.2.3' is a private",
    ),
    (  # found by test_admitted.py: urlsplit raised in check (no status, a crash loop)
        "moderation URL with a stray bracket",
        moderated("http://mod]eration.example.com/check"),
        "spec.moderation.url: is not a URL (Invalid IPv6 URL)",
    ),
    (
        "moderation by a bare Service name",
        moderated("http://moderation:8080/check"),
        "spec.moderation.url: 'moderation' is a private",
    ),
    # Found by test_admitted.py: a map key is any text, and was written into the message as it came.
    (
        "node selector key with a control character",
        {"versions": [v("a")], "nodeSelector": {"a\x19": "x"}},
        "spec.nodeSelector['a\\x19'] (the key): String should match pattern",
    ),
    (
        "affinity label key with a control character",
        {"versions": [v("a")], "affinity": {"podAffinity": {REQUIRED: [ODD_TERM]}}},
        "spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector"
        ".matchLabels['a\\x10']: 'x!' is not a label value",
    ),
    (
        "long child names",
        {"versions": [v("a-long-version-name-indeed")]},
        "child name 'a-fleet-name-that-is-quite-long-already-a-long-version-name-indeed' is longer",
    ),
]


@pytest.mark.parametrize(("case", "raw", "message"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_names_the_field_and_the_fix(case: str, raw: dict[str, Any], message: str) -> None:
    name = "a-fleet-name-that-is-quite-long-already" if case == "long child names" else "fleet"
    _, problems = validation.check(name, raw, CONFIG)
    assert any(p.startswith(message) for p in problems), problems


@pytest.mark.parametrize(
    "moderation",
    [
        {"url": "https://moderation.example.com/check", "failurePolicy": "Ignore", "timeoutMs": 500},
        {"url": "http://moderation.ml.svc:8080/check", "allowPrivateAddresses": True},
        {"url": "http://8.8.8.8/check"},
    ],
)
def test_usable_moderation_urls(moderation: dict[str, Any]) -> None:
    spec, problems = validation.check("fleet", {"versions": [v("a")], "moderation": moderation}, CONFIG)
    assert problems == [] and spec is not None and spec.moderation is not None


@pytest.mark.parametrize(
    "moderation",
    [{"url": "ftp://mod.example.com/"}, {"url": "https://x.example.com", "failurePolicy": "fail"},
     {"url": "https://x.example.com", "timeoutMs": 0}, {"timeoutMs": 100}],
)  # fmt: skip
def test_the_schema_refuses_unusable_moderation(moderation: dict[str, Any]) -> None:
    spec, problems = validation.check("fleet", {"versions": [v("a")], "moderation": moderation}, CONFIG)
    assert spec is None and any(p.startswith("spec.moderation") for p in problems), problems


def test_keda_needs_the_operator_to_know_a_prometheus() -> None:
    raw = {"versions": [v("a")], "autoscaling": {"provider": "keda"}}
    assert validation.check("fleet", raw, CONFIG)[1] == []
    without = ClusterConfig(replace(CONFIG.settings, prometheus_url=""))
    (problem,) = validation.check("fleet", raw, without)[1]
    assert "keda needs a Prometheus to query" in problem and "CAPTIONFLEET_PROMETHEUS_URL" in problem


def test_a_name_that_cannot_name_a_service() -> None:
    (problem,) = validation.check("2fast", {"versions": [v("a")]}, CONFIG)[1]
    assert problem.startswith("metadata.name '2fast' must start with a letter")


def test_schema_errors_from_an_older_crd_still_get_field_paths() -> None:
    parsed, problems = validation.check(
        "fleet", {"versions": [{"name": "a", "model": "hf://x/y", "weight": 101}]}, CONFIG
    )
    assert parsed is None
    assert problems == ["spec.versions[0].weight: Input should be less than or equal to 100"]


def test_all_problems_are_reported_at_once() -> None:
    raw = {"versions": [v("a", 10), v("a", 10, canary=True), v("b", 10, canary=True, precision="fp16")]}
    _, problems = validation.check("fleet", raw, CONFIG)
    assert len(problems) == 4, problems


def test_model_sources() -> None:
    assert spec.parse_model_source("hf://Salesforce/blip@main") == spec.ModelSource(
        "hf", "Salesforce/blip", revision="main"
    )
    assert spec.parse_model_source("Salesforce/blip") == spec.ModelSource("hf", "Salesforce/blip")
    assert spec.parse_model_source("gpt2") == spec.ModelSource("hf", "gpt2")
    assert spec.parse_model_source("pvc://models/blip/large/") == spec.ModelSource(
        "pvc", "models", "blip/large"
    )
    assert spec.parse_model_source("file:///opt/models/blip") == spec.ModelSource("file", "/opt/models/blip")
    with pytest.raises(ValueError, match="is not hf://org/name"):
        spec.parse_model_source("s3://bucket/key")


QUEUE = {"redisUrlSecret": {"name": "queue", "key": "url"}}


def test_jobs_with_keda_need_the_queue_address_keda_can_read() -> None:
    keda = {"versions": [v("a")], "autoscaling": {"provider": "keda"}}
    (problem,) = validation.check("fleet", keda | {"jobs": QUEUE}, CONFIG)[1]
    assert problem.startswith("spec.jobs.redisAddress: autoscaling.provider keda") and "host:port" in problem
    assert validation.check("fleet", {"versions": [v("a")], "jobs": QUEUE}, CONFIG)[1] == []  # hpa: no need
    addressed = keda | {"jobs": QUEUE | {"redisAddress": "redis.data:6379"}}
    assert validation.check("fleet", addressed, CONFIG)[1] == []
    (port,) = validation.check("fleet", keda | {"jobs": QUEUE | {"redisAddress": "redis:70000"}}, CONFIG)[1]
    assert port == "spec.jobs.redisAddress: port 70000 is not in 1..65535"


@pytest.mark.parametrize(
    "jobs",
    [
        {},  # the runtimes' URL is required
        QUEUE | {"redisAddress": "redis://redis:6379"},  # a URL, not host:port
        QUEUE | {"redisAddress": "redis"},  # no port
        QUEUE | {"targetPendingItems": 0},
    ],
)
def test_the_schema_refuses_jobs_it_cannot_use(jobs: dict[str, Any]) -> None:
    parsed, problems = validation.check("fleet", {"versions": [v("a")], "jobs": jobs}, CONFIG)
    assert parsed is None and problems and all(p.startswith("spec.jobs") for p in problems), problems
