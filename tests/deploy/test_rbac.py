"""The chart grants the operator exactly what operator/permissions.py lists: nothing missing, nothing more.

Grants are compared as sets of (scope, apiGroup, resource, verb), where scope is "cluster" for a
ClusterRole bound by a ClusterRoleBinding and the namespace for a Role bound by a RoleBinding, and
only roles actually bound to the operator's ServiceAccount count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from captionfleet import docgen
from captionfleet.operator import permissions as p

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "captionfleet-system"
Grant = tuple[str, str, str, str]
Render = Callable[[dict[str, Any] | None], Any]


def _grants(scope: str, rules: Iterable[dict[str, Any]]) -> set[Grant]:
    return {
        (scope, group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _expected(scope: str, rules: tuple[p.PolicyRule, ...], *, clusterwide: bool) -> set[Grant]:
    """The grants of ``rules`` that the operator needs in one watching mode (PolicyRule.mode)."""
    return _grants(scope, p.as_manifests(p.for_mode(rules, clusterwide=clusterwide)))


def granted_to(objects: list[dict[str, Any]], service_account: str) -> set[Grant]:
    """Everything the rendered RBAC lets ``service_account`` (in the release namespace) do."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    grants: set[Grant] = set()
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
        if subject not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        namespace = binding["metadata"].get("namespace")
        role_namespace = namespace if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_namespace, ref["name"]))
        assert role is not None, f"{binding['metadata']['name']} binds a role the chart does not create"
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else namespace
        grants |= _grants(scope, role["rules"])
    return grants


def test_cluster_wide_mode_grants_exactly_the_permissions_module(render: Render) -> None:
    granted = granted_to(render(None).objects, "cf-captionfleet")
    expected = _expected("cluster", p.OPERATOR_CLUSTER_RULES, clusterwide=True) | _expected(
        "cluster", p.OPERATOR_NAMESPACED_RULES, clusterwide=True
    )
    assert granted - expected == set(), "granted but not in operator/permissions.py"
    assert expected - granted == set(), "in operator/permissions.py but not granted"


def test_namespaced_mode_grants_the_fleet_rules_only_in_the_watched_namespaces(render: Render) -> None:
    rendered = render({"operator": {"watchNamespaces": ["ml", "ml-staging"]}})
    granted = granted_to(rendered.objects, "cf-captionfleet")
    expected = (
        _expected("cluster", p.OPERATOR_CLUSTER_RULES, clusterwide=False)
        | _expected("ml", p.OPERATOR_NAMESPACED_RULES, clusterwide=False)
        | _expected("ml-staging", p.OPERATOR_NAMESPACED_RULES, clusterwide=False)
    )
    assert granted - expected == set(), "granted but not in operator/permissions.py"
    assert expected - granted == set(), "in operator/permissions.py but not granted"
    assert {r["metadata"]["namespace"] for r in rendered.of_kind("Role")} == {"ml", "ml-staging"}


def test_an_existing_service_account_gets_the_grants(render: Render) -> None:
    rendered = render({"serviceAccount": {"create": False, "name": "platform-operator"}})
    assert not rendered.of_kind("ServiceAccount")
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"
    assert granted_to(rendered.objects, "platform-operator") == granted_to(
        render(None).objects, "cf-captionfleet"
    )


def test_rbac_can_be_left_to_the_platform_team(render: Render) -> None:
    kinds = {o["kind"] for o in render({"rbac": {"create": False}}).objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def test_no_wildcards_and_no_secrets(render: Render) -> None:
    for role in render(None).of_kind("ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            # The operator mounts API-key Secrets by name; it never reads them.
            assert "secrets" not in rule["resources"]


def test_the_operator_holds_everything_it_grants_the_router(render: Render) -> None:
    # RBAC escalation prevention: the API server refuses a Role with rules its creator lacks.
    for namespaces in ([], ["ml"]):
        granted = granted_to(render({"operator": {"watchNamespaces": namespaces}}).objects, "cf-captionfleet")
        scope = namespaces[0] if namespaces else "cluster"
        router = _expected(scope, p.ROUTER_RULES, clusterwide=not namespaces)
        assert router <= granted, router - granted
        # ...and it may create the router's Role and RoleBinding there.
        for resource in ("roles", "rolebindings"):
            assert (scope, "rbac.authorization.k8s.io", resource, "create") in granted


@pytest.mark.parametrize("namespaces", [[], ["ml"]], ids=["cluster-wide", "namespaced"])
def test_every_rule_says_why_in_the_rendered_role(chart: Any, namespaces: list[str]) -> None:
    values = {"operator": {"watchNamespaces": namespaces}}
    text = chart.render(values, name="cf", namespace=NAMESPACE)["captionfleet/templates/rbac.yaml"]
    for rule in p.for_mode(
        p.OPERATOR_CLUSTER_RULES + p.OPERATOR_NAMESPACED_RULES, clusterwide=not namespaces
    ):
        assert f"# {rule.why}" in text


def test_the_rules_template_is_generated_from_the_permissions_module() -> None:
    path = REPO / docgen.RBAC_RULES_TPL
    assert path.read_text() == docgen.rbac_rules_template(), f"{path} is stale: run `make docs`"


@pytest.mark.parametrize("namespaces", [[], ["ml"]], ids=["cluster-wide", "namespaced"])
def test_standalone_mode_grants_no_peering_rights(render: Render, namespaces: list[str]) -> None:
    values: dict[str, Any] = {"operator": {"watchNamespaces": namespaces}}
    with_peering = granted_to(render(values).objects, "cf-captionfleet")
    values["operator"]["peering"] = {"enabled": False}
    standalone = granted_to(render(values).objects, "cf-captionfleet")
    peering = "kopfpeerings" if namespaces else "clusterkopfpeerings"
    assert {g[2] for g in with_peering - standalone} == {peering}
    assert not {g for g in standalone if g[1] == "kopf.dev"}
