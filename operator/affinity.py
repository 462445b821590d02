"""What the API server checks of a pod's Affinity beyond its OpenAPI schema (ValidateAffinity).

The CRD holds the upstream schema of ``spec.affinity``, which types every field but lets through
requirements a real API server refuses in the runtime Deployments: ``In`` without values, ``Exists``
with values, ``Gt`` with a value that is no integer, a key or topologyKey that is no qualified name,
a weight outside 1..100, no node selector term. Such a CaptionModel is Invalid here, naming the field,
before anything is applied. One sentence per problem, the path from ``spec.affinity``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from captionfleet.operator.spec import LABEL_VALUE_PATTERN, is_qualified_name

NAMESPACE_PATTERN = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"  # a DNS-1123 label

WITH_VALUES = ("In", "NotIn")
WITHOUT_VALUES = ("Exists", "DoesNotExist")
ONE_INTEGER = ("Gt", "Lt")


def _key(key: Any, where: str) -> list[str]:
    text = str(key or "")
    if not is_qualified_name(text):
        return [f"{where}: {text!r} is not a qualified name (an optional DNS prefix and '/', then a name)"]
    return []


def _values(operator: str, values: list[Any], where: str, allowed: tuple[str, ...]) -> list[str]:
    if operator not in allowed:
        return [f"{where}.operator: {operator!r} is not one of {', '.join(allowed)}"]
    if operator in WITH_VALUES and not values:
        return [f"{where}.values: operator {operator} needs at least one value"]
    if operator in WITHOUT_VALUES and values:
        return [f"{where}.values: operator {operator} takes no values"]
    if operator in ONE_INTEGER and (len(values) != 1 or not re.fullmatch(r"[-+]?[0-9]+", str(values[0]))):
        return [f"{where}.values: operator {operator} takes exactly one integer value"]
    return []


def _node_term(term: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for i, req in enumerate(term.get("matchExpressions") or []):
        at = f"{where}.matchExpressions[{i}]"
        operator, values = str(req.get("operator")), list(req.get("values") or [])
        problems += _key(req.get("key"), f"{at}.key")
        problems += _values(operator, values, at, WITH_VALUES + WITHOUT_VALUES + ONE_INTEGER)
    for i, req in enumerate(term.get("matchFields") or []):
        at = f"{where}.matchFields[{i}]"
        if req.get("key") != "metadata.name":
            problems.append(f"{at}.key: only metadata.name can be matched, not {req.get('key')!r}")
        if len(req.get("values") or []) != 1:
            problems.append(f"{at}.values: a field is matched against exactly one value")
        problems += _values(str(req.get("operator")), ["x"], at, WITH_VALUES)
    return problems


def _weight(term: Mapping[str, Any], where: str) -> list[str]:
    weight = term.get("weight")
    if not isinstance(weight, int) or not 1 <= weight <= 100:
        return [f"{where}.weight: {weight!r} is not in 1..100"]
    return []


def _node_affinity(node: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is not None:
        terms = required.get("nodeSelectorTerms") or []
        at = f"{where}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
        if not terms:
            problems.append(f"{at}: needs at least one node selector term")
        for i, term in enumerate(terms):
            problems += _node_term(term, f"{at}[{i}]")
    for i, term in enumerate(node.get("preferredDuringSchedulingIgnoredDuringExecution") or []):
        at = f"{where}.preferredDuringSchedulingIgnoredDuringExecution[{i}]"
        problems += _weight(term, at) + _node_term(term.get("preference") or {}, f"{at}.preference")
    return problems


def _label_selector(selector: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for key, value in (selector.get("matchLabels") or {}).items():
        problems += _key(key, f"{where}.matchLabels")
        if len(str(value)) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, str(value)):
            shown = key if isinstance(key, str) and key.isprintable() else ascii(key)  # one readable line
            problems.append(f"{where}.matchLabels[{shown}]: {value!r} is not a label value")
    for i, req in enumerate(selector.get("matchExpressions") or []):
        at = f"{where}.matchExpressions[{i}]"
        problems += _key(req.get("key"), f"{at}.key")
        problems += _values(
            str(req.get("operator")), list(req.get("values") or []), at, WITH_VALUES + WITHOUT_VALUES
        )
    return problems


def _pod_term(term: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    if not term.get("topologyKey"):
        problems.append(f"{where}.topologyKey: required (e.g. kubernetes.io/hostname)")
    else:
        problems += _key(term["topologyKey"], f"{where}.topologyKey")
    for selector in ("labelSelector", "namespaceSelector"):
        if term.get(selector) is not None:
            problems += _label_selector(term[selector], f"{where}.{selector}")
    for i, namespace in enumerate(term.get("namespaces") or []):
        if not re.fullmatch(NAMESPACE_PATTERN, str(namespace)):
            problems.append(f"{where}.namespaces[{i}]: {namespace!r} is not a namespace name")
    return problems


def _pod_affinity(pod: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for i, term in enumerate(pod.get("requiredDuringSchedulingIgnoredDuringExecution") or []):
        problems += _pod_term(term, f"{where}.requiredDuringSchedulingIgnoredDuringExecution[{i}]")
    for i, term in enumerate(pod.get("preferredDuringSchedulingIgnoredDuringExecution") or []):
        at = f"{where}.preferredDuringSchedulingIgnoredDuringExecution[{i}]"
        problems += _weight(term, at) + _pod_term(term.get("podAffinityTerm") or {}, f"{at}.podAffinityTerm")
    return problems


def affinity_problems(affinity: Mapping[str, Any] | None) -> list[str]:
    """What a real API server would refuse in ``spec.affinity`` (already schema-valid)."""
    if not affinity:
        return []
    problems = _node_affinity(affinity.get("nodeAffinity") or {}, "spec.affinity.nodeAffinity")
    for kind in ("podAffinity", "podAntiAffinity"):
        problems += _pod_affinity(affinity.get(kind) or {}, f"spec.affinity.{kind}")
    return problems
