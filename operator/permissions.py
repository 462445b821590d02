"""The Kubernetes API permissions of the operator and of the router, as data.

The Helm chart renders its RBAC from these lists, and a test checks that the chart grants exactly
these and nothing more. The operator also builds the router's Role from ``ROUTER_RULES`` (one per
CaptionModel, in its namespace), so the two can never disagree. Kubernetes refuses to let anyone
grant permissions they do not hold themselves (RBAC escalation prevention): that is why the
operator's namespaced rules include everything in ``ROUTER_RULES``.

Three groups for the operator:

- ``OPERATOR_CLUSTER_RULES`` are always cluster-wide (a ClusterRole): kopf observes CRDs (always)
  and namespaces (when watching chosen ones) at run time, and cluster-wide peering uses
  ``clusterkopfpeerings``.
- ``OPERATOR_NAMESPACED_RULES`` apply where CaptionModels are watched: a ClusterRole when the
  operator watches all namespaces, else a Role in each watched namespace.
- ``ROUTER_RULES`` are the router's: read-only on CaptionModels and on the endpoints of the versions.

Some rules matter in one watching mode only (``PolicyRule.mode``); ``for_mode`` picks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["always", "clusterwide", "namespaced"]

READ = ("get", "list", "watch")
# Children are found by label (list), written by server-side apply (patch, and create when the object
# is new) and removed when they leave the spec (delete). Before a child is first applied, the object of
# that name is read (get) to see who owns it: one the CaptionModel does not control is left alone.
# Never update: every write is a patch.
MANAGE = ("get", "list", "create", "patch", "delete")


@dataclass(frozen=True)
class PolicyRule:
    """One RBAC rule, plus why it is needed (shown as a comment in the chart)."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    # Needed always, or only when the operator watches the whole cluster (no --namespaces), or only
    # when it watches chosen namespaces.
    mode: Mode = "always"

    def as_manifest(self) -> dict[str, Any]:
        """The rule as it appears in a Role or ClusterRole."""
        return {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }


OPERATOR_CLUSTER_RULES: tuple[PolicyRule, ...] = (
    PolicyRule(
        ("apiextensions.k8s.io",),
        ("customresourcedefinitions",),
        ("list", "watch"),
        "kopf: notices CRDs being added or removed at run time",
    ),
    PolicyRule(
        ("",),
        ("namespaces",),
        ("list", "watch"),
        "kopf: notices the watched namespaces appear and disappear",
        "namespaced",
    ),
    PolicyRule(
        ("kopf.dev",),
        ("clusterkopfpeerings",),
        ("get", "list", "watch", "patch"),
        "kopf: peering (leader election) when watching the whole cluster",
        "clusterwide",
    ),
)

OPERATOR_NAMESPACED_RULES: tuple[PolicyRule, ...] = (
    PolicyRule(
        ("captionfleet.io",),
        ("captionmodels",),
        ("get", "list", "watch", "patch"),
        "the CaptionModels themselves; patch only for kopf's finalizer and progress annotations and "
        "to remove a handled captionfleet.io/rollout-action annotation",
    ),
    PolicyRule(
        ("captionfleet.io",),
        ("captionmodels/status",),
        ("patch",),
        "phase, conditions, versions[] and endpoint live in the status subresource",
    ),
    PolicyRule(
        ("apps",),
        ("deployments",),
        (*MANAGE, "watch"),
        "a Deployment per version and one for the router; watched for readyReplicas",
    ),
    PolicyRule(("",), ("services",), MANAGE, "a Service per version and the router's public Service"),
    PolicyRule(
        ("autoscaling",),
        ("horizontalpodautoscalers",),
        MANAGE,
        "autoscaling.provider: hpa (the default), one HPA per version",
    ),
    PolicyRule(
        ("keda.sh",),
        ("scaledobjects", "triggerauthentications"),
        MANAGE,
        "autoscaling.provider: keda, one ScaledObject per version (and with jobs.redisPasswordSecret a "
        "TriggerAuthentication naming that Secret key)",
    ),
    PolicyRule(("",), ("serviceaccounts",), MANAGE, "the router's ServiceAccount"),
    PolicyRule(
        ("rbac.authorization.k8s.io",),
        ("roles", "rolebindings"),
        MANAGE,
        "the router's Role (ROUTER_RULES) and its RoleBinding",
    ),
    PolicyRule(
        ("",),
        ("events",),
        ("create", "list"),
        "Events on every decision (kopf posts core v1 events); the kubelet's FailedMount Events of "
        "the fleet's pods are read (a missing Secret volume is reported only there)",
    ),
    PolicyRule(
        ("",),
        ("pods",),
        ("list", "watch"),
        "the fleet's pods, for why a version does not start (a missing Secret, an image pull, "
        "unschedulable); Secrets themselves are never read",
    ),
    PolicyRule(
        ("",),
        ("configmaps",),
        ("get",),
        "rollout.qualityGate with dataset configMap:NAME: the evaluation images and captions are read",
    ),
    PolicyRule(
        ("kopf.dev",),
        ("kopfpeerings",),
        ("get", "list", "watch", "patch"),
        "kopf: peering (leader election) when watching chosen namespaces",
        "namespaced",
    ),
    # Held only so that the operator may grant them to the router (see the module's docstring).
    PolicyRule(("",), ("endpoints",), READ, "granted on to the router"),
    PolicyRule(
        ("discovery.k8s.io",),
        ("endpointslices",),
        READ,
        "the router pods whose stats the rollout analysis reads; also granted on to the router",
    ),
)

ROUTER_RULES: tuple[PolicyRule, ...] = (
    PolicyRule(
        ("captionfleet.io",),
        ("captionmodels",),
        READ,
        "the versions and their effective weights (status.versions[].weight)",
    ),
    PolicyRule(("",), ("endpoints",), READ, "the ready pods of each version's Service"),
    PolicyRule(
        ("discovery.k8s.io",),
        ("endpointslices",),
        READ,
        "the ready pods of each version's Service (the newer API)",
    ),
)


def as_manifests(rules: tuple[PolicyRule, ...]) -> list[dict[str, Any]]:
    """The ``rules:`` list of a Role or ClusterRole."""
    return [rule.as_manifest() for rule in rules]


def for_mode(rules: tuple[PolicyRule, ...], *, clusterwide: bool) -> tuple[PolicyRule, ...]:
    """The rules an operator needs when it watches the whole cluster, or chosen namespaces."""
    wanted = "clusterwide" if clusterwide else "namespaced"
    return tuple(rule for rule in rules if rule.mode in ("always", wanted))
