"""The RBAC data: what the operator and the router need, no more, and consistent with the builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from captionfleet.operator import builders, kube, spec
from captionfleet.operator.builders.common import ClusterConfig, FleetContext
from captionfleet.operator.permissions import (
    MANAGE,
    OPERATOR_CLUSTER_RULES,
    OPERATOR_NAMESPACED_RULES,
    READ,
    ROUTER_RULES,
    as_manifests,
    for_mode,
)
from captionfleet.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]


def granted(rules: tuple, group: str, resource: str) -> set[str]:
    return {verb for r in rules if group in r.api_groups and resource in r.resources for verb in r.verbs}


def test_the_operator_may_manage_every_kind_it_builds() -> None:
    config = ClusterConfig(
        OperatorSettings(default_runtime_image="img", queue_depth_metric="m", prometheus_url="http://p")
    )
    for path in sorted((REPO / "examples").glob("*.yaml")):
        cr = yaml.safe_load(path.read_text())
        for provider in ("hpa", "keda"):
            raw = cr["spec"] | {"autoscaling": {"provider": provider}}
            ctx = FleetContext.create(
                name="f", namespace="ns", uid="u", spec=spec.parse_spec(raw), config=config
            )
            for manifest in builders.fleet(ctx):
                kind = kube.kind_of(manifest)
                group = kind.api_version.rpartition("/")[0]
                expected = set(MANAGE) | ({"watch"} if kind.kind == "Deployment" else set())
                assert granted(OPERATOR_NAMESPACED_RULES, group, kind.plural) == expected, kind


def test_every_kind_the_operator_lists_or_deletes_is_granted() -> None:
    for kind in kube.CHILD_KINDS:
        group = kind.api_version.rpartition("/")[0]
        assert {"list", "delete", "patch"} <= granted(OPERATOR_NAMESPACED_RULES, group, kind.plural)


GET_LIST_WATCH_PATCH = {"get", "list", "watch", "patch"}
# What the operator may do with its own resource (read it, write only its status; Secrets are mounted,
# never read) and what kopf needs cluster-wide: rules, API group, resource, the verbs granted exactly.
GRANTS = {
    "captionmodels": (OPERATOR_NAMESPACED_RULES, "captionfleet.io", "captionmodels", GET_LIST_WATCH_PATCH),
    "status": (OPERATOR_NAMESPACED_RULES, "captionfleet.io", "captionmodels/status", {"patch"}),
    "no secrets": (OPERATOR_NAMESPACED_RULES, "", "secrets", set()),
    "crds": (OPERATOR_CLUSTER_RULES, "apiextensions.k8s.io", "customresourcedefinitions", {"list", "watch"}),
    "namespaces": (OPERATOR_CLUSTER_RULES, "", "namespaces", {"list", "watch"}),
    "peerings": (OPERATOR_CLUSTER_RULES, "kopf.dev", "clusterkopfpeerings", GET_LIST_WATCH_PATCH),
    "events": (OPERATOR_NAMESPACED_RULES, "", "events", {"create", "list"}),
}


@pytest.mark.parametrize(("rules", "group", "resource", "verbs"), list(GRANTS.values()), ids=list(GRANTS))
def test_captionmodels_are_read_only_their_status_written_and_kopf_gets_what_it_needs(
    rules: Any, group: str, resource: str, verbs: set[str]
) -> None:
    assert granted(rules, group, resource) == verbs


def test_pods_are_only_listed_and_watched_and_secrets_never_read() -> None:
    # Why a version does not start comes from its pods and the kubelet's Events, never a Secret.
    assert granted(OPERATOR_NAMESPACED_RULES, "", "pods") == {"list", "watch"}
    assert granted(OPERATOR_NAMESPACED_RULES, "", "secrets") == set()
    assert not any("secrets" in rule.resources for rule in OPERATOR_CLUSTER_RULES)


def test_the_router_reads_and_the_operator_can_grant_that() -> None:
    for rule in ROUTER_RULES:
        assert set(rule.verbs) == set(READ)
        for group in rule.api_groups:
            for resource in rule.resources:
                # RBAC escalation prevention: one can only grant what one holds.
                assert set(rule.verbs) <= granted(OPERATOR_NAMESPACED_RULES, group, resource), resource
    assert {(g, r) for rule in ROUTER_RULES for g in rule.api_groups for r in rule.resources} == {
        ("captionfleet.io", "captionmodels"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
    }


def test_the_router_role_is_built_from_the_same_data() -> None:
    ctx = FleetContext.create(
        name="f",
        namespace="ns",
        uid="u",
        spec=spec.parse_spec({"versions": [{"name": "v", "model": "hf://a/b"}]}),
        config=ClusterConfig(OperatorSettings(default_runtime_image="img", queue_depth_metric="m")),
    )
    role = next(m for m in builders.fleet(ctx) if m["kind"] == "Role")
    assert role["rules"] == as_manifests(ROUTER_RULES)


def test_rules_per_watching_mode() -> None:
    clusterwide = {
        r.resources for r in for_mode(OPERATOR_CLUSTER_RULES + OPERATOR_NAMESPACED_RULES, clusterwide=True)
    }
    namespaced = {
        r.resources for r in for_mode(OPERATOR_CLUSTER_RULES + OPERATOR_NAMESPACED_RULES, clusterwide=False)
    }
    assert clusterwide - namespaced == {("clusterkopfpeerings",)}
    assert namespaced - clusterwide == {("namespaces",), ("kopfpeerings",)}
