"""The emulated Kubernetes API server for the operator tests (the ``api`` fixture).

``ApiServer`` is kmock's KubernetesEmulator plus what the real API server does and the operator relies
on. kmock stores objects as given; the real server also fills in ``uid``, ``resourceVersion``,
``generation`` and ``creationTimestamp``, names objects from ``generateName``, honours a
``resourceVersion`` precondition, filters lists by ``labelSelector``, lets the status subresource
change only the status, implements server-side apply (create-or-update; the fields of other field
managers, such as labels a user added or replicas an autoscaler set, stay, and only those the applier
set before and no longer sets are removed), and writes nothing (same ``resourceVersion``, no watch
event) for an update that changes nothing. The subclass adds exactly these, so the product code runs
unchanged.
It also refuses (422 Invalid) what a real API server refuses: built-in kinds are checked against the
upstream OpenAPI schemas (kubernetes-validate) plus the API server's own rules for pod specs
(tolerations, label keys, quantities, image names, Secret keys, affinity), integers out of int32 range, a
changed Deployment selector (immutable), and CaptionModels against the CRD's schema (whose unknown
fields are pruned, or refused under ``fieldValidation=Strict``). Lists filter by ``fieldSelector``
too, on the fields the real server allows per kind (else 400). Pods are
served (the kubelet and the scheduler are the tests' ``Cluster``); there are no Secrets at all. These
rules are written here, independently of the operator's, so the tests see what a cluster would do.
Garbage collection by owner references is not emulated: tests check the references instead.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
import kubernetes_validate
import pytest
import yaml
from kmock._internal import k8s, rendering

from captionfleet.operator.crd import captionmodel_crd

NAMESPACE = "ml"  # where the tests put their CaptionModels; it has a KopfPeering

APPLY = "application/apply-patch+yaml"
# Metadata the server owns: an apply never removes it.
SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "finalizers",
)

RESOURCES: dict[str, dict[str, Any]] = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
    },
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": ["status"]},
    "kopf.dev/v1/clusterkopfpeerings": {"kind": "ClusterKopfPeering", "namespaced": False},
    "kopf.dev/v1/kopfpeerings": {"kind": "KopfPeering", "namespaced": True},
    "captionfleet.io/v1alpha1/captionmodels": {
        "kind": "CaptionModel",
        "namespaced": True,
        "singular": "captionmodel",
        "shortnames": ["capm"],
        "subresources": ["status"],
    },
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True, "subresources": ["status", "scale"]},
    "v1/services": {"kind": "Service", "namespaced": True, "subresources": ["status"]},
    "autoscaling/v2/horizontalpodautoscalers": {
        "kind": "HorizontalPodAutoscaler",
        "namespaced": True,
        "subresources": ["status"],
    },
    "discovery.k8s.io/v1/endpointslices": {"kind": "EndpointSlice", "namespaced": True},
    "v1/serviceaccounts": {"kind": "ServiceAccount", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},  # made by the tests; the kubelet mounts them
    "rbac.authorization.k8s.io/v1/roles": {"kind": "Role", "namespaced": True},
    "rbac.authorization.k8s.io/v1/rolebindings": {"kind": "RoleBinding", "namespaced": True},
}
KEDA = {
    "keda.sh/v1alpha1/scaledobjects": {
        "kind": "ScaledObject",
        "namespaced": True,
        "subresources": ["status"],
    },
    "keda.sh/v1alpha1/triggerauthentications": {
        "kind": "TriggerAuthentication",
        "namespaced": True,
        "subresources": ["status"],
    },
}
# The parts of KEDA's CRD schemas (keda.sh_scaledobjects, keda.sh_triggerauthentications) that our
# manifests use: the server refuses what they refuse, e.g. a trigger's metadata value that is no string.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                               "name": {"type": "string"}},
            },
            **{key: _INT32 for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval",
                                       "cooldownPeriod", "idleReplicaCount")},
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["metadata", "type"],
                    "properties": {
                        "type": {"type": "string", "minLength": 1},
                        "name": {"type": "string"},
                        "metricType": {"type": "string"},
                        "metadata": _STRINGS,
                        "useCachedMetrics": {"type": "boolean"},
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "properties": {
            "secretTargetRef": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["key", "name", "parameter"],
                    "properties": {key: {"type": "string"} for key in ("key", "name", "parameter")},
                },
            },
        },
    },
}  # fmt: skip
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]


K8S_VERSION = "1.33"
VALIDATED = {
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Pod",
}
# The fields a list may select on (fieldSelector), per kind, as the API server's field label
# conversion functions allow; any other is refused with 400.
SELECTABLE_FIELDS = {
    "Event": {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "Pod": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
}
# The API server's rules (k8s.io/apimachinery validation), as it applies them to a pod template.
_QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^([+-]?)([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")


def _label_key_problems(key: str, where: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    if not _QUALIFIED_NAME.match(key) or len(name) > 63 or len(prefix) > 253:
        return [
            f"{where}: Invalid value: {key!r}: name part must consist of alphanumeric characters, "
            "'-', '_' or '.'"
        ]
    return []


def _toleration_problems(toleration: Mapping[str, Any], where: str) -> list[str]:
    key, operator = toleration.get("key") or "", toleration.get("operator") or "Equal"
    problems = _label_key_problems(key, f"{where}.key") if key else []
    if not key and operator != "Exists":
        problems.append(
            f"{where}.operator: Invalid value: {operator!r}: operator must be Exists when `key` is empty"
        )
    if operator == "Exists" and toleration.get("value"):
        problems.append(f"{where}.operator: Invalid value: value must be empty when `operator` is 'Exists'")
    if toleration.get("tolerationSeconds") is not None and toleration.get("effect") != "NoExecute":
        problems.append(
            f"{where}.effect: Invalid value: effect must be 'NoExecute' when `tolerationSeconds` is set"
        )
    return problems


def _container_problems(container: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    image = str(container.get("image") or "")
    if not image or image != image.strip():
        problems.append(
            f"{where}.image: Invalid value: {image!r}: must not have leading or trailing whitespace"
        )
    for part in ("requests", "limits"):
        for resource, value in ((container.get("resources") or {}).get(part) or {}).items():
            match = _QUANTITY.match(str(value))
            if match is None:
                problems.append(
                    f"{where}.resources.{part}[{resource}]: Invalid value: {value!r}: quantities must match"
                )
            elif match.group(1) == "-":
                problems.append(
                    f"{where}.resources.{part}[{resource}]: Invalid value: must be greater than or equal to 0"
                )
    return problems


_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _secret_key_problems(key: str, where: str) -> list[str]:
    """IsConfigMapKey: a Secret's key, also a file name when mounted."""
    if len(key) > 253 or not _SECRET_KEY.match(key):
        return [
            f"{where}: Invalid value: {key!r}: a valid config key must consist of alphanumeric characters"
        ]
    if key in (".", "..") or key.startswith(".."):
        return [f"{where}: Invalid value: {key!r}: must not be '.' or '..' or start with '..'"]
    return []


def _secret_use_problems(pod: Mapping[str, Any], where: str) -> list[str]:
    """The keys of Secret volumes' items and env secretKeyRefs; items' paths relative, without '..'."""
    problems = []
    for i, volume in enumerate(pod.get("volumes") or []):
        for j, item in enumerate((volume.get("secret") or {}).get("items") or []):
            at = f"{where}.volumes[{i}].secret.items[{j}]"
            problems += _secret_key_problems(str(item.get("key") or ""), f"{at}.key")
            path = str(item.get("path") or "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                problems.append(f"{at}.path: Invalid value: {path!r}: must be a relative path without '..'")
    for kind in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(kind) or []):
            for j, env in enumerate(container.get("env") or []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref is not None:
                    at = f"{where}.{kind}[{i}].env[{j}].valueFrom.secretKeyRef.key"
                    problems += _secret_key_problems(str(ref.get("key") or ""), at)
    return problems


# The API's integers are int32 except these int64 fields (of the kinds the operator writes).
INT64_FIELDS = {
    "tolerationSeconds",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "runAsUser",
    "runAsGroup",
    "fsGroup",
    "expirationSeconds",
    "observedGeneration",
    "generation",
}


def int32_problems(value: Any, where: str = "") -> list[str]:
    """Integers out of int32 range where the API declares int32: the server cannot decode them."""
    if isinstance(value, Mapping):
        return [
            problem
            for key, item in value.items()
            if key not in INT64_FIELDS
            for problem in int32_problems(item, f"{where}.{key}" if where else str(key))
        ]
    if isinstance(value, list):
        return [problem for i, item in enumerate(value) for problem in int32_problems(item, f"{where}[{i}]")]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**31) <= value < 2**31:
        return [f"{where}: Invalid value: {value}: cannot be decoded into an int32"]
    return []


def _requirement_problems(req: Mapping[str, Any], where: str, operators: str) -> list[str]:
    """A node selector or label selector requirement, as ValidateNodeSelectorRequirement and
    ValidateLabelSelectorRequirement check it."""
    problems = _label_key_problems(str(req.get("key") or ""), f"{where}.key")
    operator, values = req.get("operator"), req.get("values") or []
    if operator not in operators.split():
        return [*problems, f"{where}.operator: Unsupported value: {operator!r}"]
    if operator in ("In", "NotIn") and not values:
        problems.append(
            f"{where}.values: Required value: must be specified when `operator` is 'In' or 'NotIn'"
        )
    if operator in ("Exists", "DoesNotExist") and values:
        problems.append(
            f"{where}.values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
        )
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"[-+]?\d+", str(values[0]))):
        problems.append(f"{where}.values: Required value: must be specified single integer value")
    return problems


NODE_OPERATORS = "In NotIn Exists DoesNotExist Gt Lt"
LABEL_OPERATORS = "In NotIn Exists DoesNotExist"


def _node_term_problems(term: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for i, req in enumerate(term.get("matchExpressions") or []):
        problems += _requirement_problems(req, f"{where}.matchExpressions[{i}]", NODE_OPERATORS)
    for i, req in enumerate(term.get("matchFields") or []):
        at = f"{where}.matchFields[{i}]"
        if req.get("key") != "metadata.name" or req.get("operator") not in ("In", "NotIn"):
            problems.append(f"{at}: Invalid value: only metadata.name with In or NotIn is supported")
        if len(req.get("values") or []) != 1:
            problems.append(
                f"{at}.values: Required value: must be only one value when `operator` is 'In' or 'NotIn'"
            )
    return problems


def _pod_term_problems(term: Mapping[str, Any], where: str) -> list[str]:
    key = str(term.get("topologyKey") or "")
    problems = (
        _label_key_problems(key, f"{where}.topologyKey") if key else [f"{where}.topologyKey: Required value"]
    )
    for field in ("labelSelector", "namespaceSelector"):
        selector = term.get(field) or {}
        for label, value in (selector.get("matchLabels") or {}).items():
            problems += _label_key_problems(str(label), f"{where}.{field}.matchLabels")
            if not _LABEL_VALUE.match(str(value)):
                problems.append(f"{where}.{field}.matchLabels: Invalid value: {value!r}")
        for i, req in enumerate(selector.get("matchExpressions") or []):
            problems += _requirement_problems(req, f"{where}.{field}.matchExpressions[{i}]", LABEL_OPERATORS)
    for namespace in term.get("namespaces") or []:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", str(namespace)):
            problems.append(f"{where}.namespaces: Invalid value: {namespace!r}")
    return problems


def _weighted(
    terms: list[Mapping[str, Any]], where: str, inner: str, check: Callable[..., list[str]]
) -> list[str]:
    problems = []
    for i, term in enumerate(terms):
        if not 1 <= int(term.get("weight") or 0) <= 100:
            problems.append(f"{where}[{i}].weight: Invalid value: must be in the range 1-100")
        problems += check(term.get(inner) or {}, f"{where}[{i}].{inner}")
    return problems


def _affinity_problems(affinity: Mapping[str, Any], where: str) -> list[str]:
    """ValidateAffinity: what the Affinity's schema leaves to the server's code."""
    node = affinity.get("nodeAffinity") or {}
    problems = []
    if (required := node.get("requiredDuringSchedulingIgnoredDuringExecution")) is not None:
        at = f"{where}.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
        terms = required.get("nodeSelectorTerms") or []
        problems += [] if terms else [f"{at}: Required value: must have at least one node selector term"]
        for i, term in enumerate(terms):
            problems += _node_term_problems(term, f"{at}[{i}]")
    preferred = node.get("preferredDuringSchedulingIgnoredDuringExecution") or []
    problems += _weighted(preferred, f"{where}.nodeAffinity.preferred", "preference", _node_term_problems)
    for kind in ("podAffinity", "podAntiAffinity"):
        pods = affinity.get(kind) or {}
        for i, term in enumerate(pods.get("requiredDuringSchedulingIgnoredDuringExecution") or []):
            problems += _pod_term_problems(term, f"{where}.{kind}.required[{i}]")
        preferred = pods.get("preferredDuringSchedulingIgnoredDuringExecution") or []
        problems += _weighted(preferred, f"{where}.{kind}.preferred", "podAffinityTerm", _pod_term_problems)
    return problems


def _hpa_problems(spec: Mapping[str, Any]) -> list[str]:
    """ValidateHorizontalPodAutoscalerSpec's bounds (without the HPAScaleToZero feature gate)."""
    low, high = spec.get("minReplicas", 1), spec.get("maxReplicas", 0)
    if low < 1:
        return [f"spec.minReplicas: Invalid value: {low}: must be greater than or equal to 1"]
    if high < low:
        return [f"spec.maxReplicas: Invalid value: {high}: must be greater than or equal to `minReplicas`"]
    return []


def pod_template_problems(obj: Mapping[str, Any]) -> list[str]:
    template = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return pod_spec_problems(template, "spec.template.spec")


def pod_spec_problems(pod: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for i, toleration in enumerate(pod.get("tolerations") or []):
        problems += _toleration_problems(toleration, f"{where}.tolerations[{i}]")
    for key in pod.get("nodeSelector") or {}:
        problems += _label_key_problems(key, f"{where}.nodeSelector")
    for kind in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(kind) or []):
            problems += _container_problems(container, f"{where}.{kind}[{i}]")
    return (
        problems
        + _secret_use_problems(pod, where)
        + _affinity_problems(pod.get("affinity") or {}, f"{where}.affinity")
    )


def schema_problems(obj: Mapping[str, Any]) -> list[str]:
    """What the API server's schema validation says of a built-in object or a CaptionModel."""
    if obj.get("kind") == "CaptionModel":
        schema = captionmodel_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        errors = jsonschema.Draft7Validator(schema).iter_errors(dict(obj))
        return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]
    if obj.get("kind") in KEDA_SCHEMAS:
        errors = jsonschema.Draft7Validator(KEDA_SCHEMAS[str(obj["kind"])]).iter_errors(obj.get("spec"))
        return [f"spec.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]
    if obj.get("kind") not in VALIDATED:
        return []
    try:
        kubernetes_validate.validate(dict(obj), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        caught = e.caught
        return [f"{'.'.join(str(p) for p in caught.absolute_path)}: {caught.message}"]
    if out_of_range := int32_problems({k: v for k, v in obj.items() if k != "metadata"}):
        return out_of_range
    if obj.get("kind") == "Pod":
        return pod_spec_problems(obj.get("spec") or {}, "spec")
    if obj.get("kind") == "HorizontalPodAutoscaler":
        return _hpa_problems(obj.get("spec") or {})
    return pod_template_problems(obj) if obj.get("kind") == "Deployment" else []


def pruned(value: Any, schema: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """(what a real API server stores of a custom resource's ``value``, the unknown fields it dropped):
    fields the structural schema does not declare are pruned, except under
    ``x-kubernetes-preserve-unknown-fields``; an object schema without properties keeps all."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value, []
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        kept = [pruned(item, schema["items"]) for item in value]
        return [item for item, _ in kept], [f"[{i}]{p}" for i, (_, u) in enumerate(kept) for p in u]
    properties, extra = schema.get("properties"), schema.get("additionalProperties")
    if not isinstance(value, Mapping) or (properties is None and not isinstance(extra, Mapping)):
        return value, []
    result, unknown = {}, []
    for key, item in value.items():
        declared = (properties or {}).get(key, extra if isinstance(extra, Mapping) else None)
        if declared is None:
            unknown.append(f".{key}")
            continue
        result[key], inner = pruned(item, declared)
        unknown += [f".{key}{path}" for path in inner]
    return result, unknown


def _merged(old: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch applied (RFC 7386)."""
    result = dict(old)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(old.get(key), Mapping):
            result[key] = _merged(old[key], value)
        else:
            result[key] = value
    return result


def _matches(labels: Mapping[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def _field_terms(kind: str, selector: str) -> list[tuple[str, str, bool]]:
    """(field, value, equal) of each term; 400 for a field the kind cannot be selected by."""
    terms = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        equal = "!=" not in term
        field, _, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if field not in SELECTABLE_FIELDS.get(kind, {"metadata.name", "metadata.namespace"}):
            raise k8s.KubernetesError(400, "BadRequest", f'field label not supported: "{field}"')
        terms.append((field, value, equal))
    return terms


def _replacement(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new`` (``None`` removes a key)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(old.get(key), Mapping):
            patch[key] = _replacement(old[key], value)
        else:
            patch[key] = value
    return patch


def _applied_merge(
    live: Mapping[str, Any], applied: Mapping[str, Any], before: Mapping[str, Any]
) -> dict[str, Any]:
    """Server-side apply for one field manager: the fields it applies are set, the ones it applied
    ``before`` and no longer does are removed, every other manager's fields stay. Lists are taken
    whole (a real server merges keyed lists, e.g. containers by name, item by item)."""
    result = {key: value for key, value in live.items() if key in applied or key not in before}
    for key, value in applied.items():
        earlier = before.get(key)
        if isinstance(value, Mapping) and isinstance(live.get(key), Mapping):
            result[key] = _applied_merge(live[key], value, earlier if isinstance(earlier, Mapping) else {})
        else:
            result[key] = copy.deepcopy(value)
    return result


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    _versions: Any = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _log: list[rendering.Request] = attrs.field(factory=list, init=False)
    # (resource, namespace, name, field manager) -> (the object's uid, what that manager last applied)
    _applied: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = {**info, "verbs": VERBS}

    def install_keda(self) -> None:
        for key, info in KEDA.items():
            self.resources[key] = {**info, "verbs": VERBS}

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 cannot parse the path of the namespace list (kopf lists and watches it when it
        # serves chosen namespaces): serve it here.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        namespace = kmock.resource("v1/namespaces")
        items = [
            obj.raw for (res, _, _), obj in self._objects.items() if res == namespace and not obj.deleted
        ]
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response(
                {"kind": "NamespaceList", "metadata": {"resourceVersion": "1"}, "items": items}
            )
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        await asyncio.Event().wait()  # no namespace ever changes; ends when the server stops
        return response

    def _next_version(self) -> str:
        return str(next(self._versions))

    def _stored(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None

    def _server_fields(self, data: dict[str, Any], namespace: str | None) -> None:
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_version()
        meta["generation"] = 1
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def _apply_as_create(self, request: rendering.Request, data: dict[str, Any]) -> None:
        self._server_fields(data, request.namespace)
        async with self._lock:
            self._objects[request.resource, request.namespace, request.name] = copy.deepcopy(data)
            await self._buses[request.resource].put({"type": "ADDED", "object": copy.deepcopy(data)})

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock finds the current request among all earlier ones for every reaction it considers,
        # which makes each request slower than the one before: keep the earlier ones in a log.
        self._log.extend(self._requests[:-1])
        del self._requests[:-1]
        resource = request.resource
        if resource is not None and resource.plural is not None and resource not in self.resources:
            raise k8s.KubernetesResourceNotFoundError()  # e.g. KEDA's kinds when it is not installed
        data = request.data if isinstance(request.data, dict) else None
        if resource is not None and resource.plural == "captionmodels" and data is not None:
            self._prune(request, data)
        if request.resource is not None and data is not None and request.subresource is None:
            self._validate(request, data)
        if request.resource is not None and data is not None:
            if request.action == kmock.action.CREATE:
                self._server_fields(data, request.namespace)
            elif request.action == kmock.action.UPDATE:
                old = self._stored(request)
                content_type = request.headers.get("Content-Type", "")
                if content_type.startswith(APPLY) and old is None:
                    await self._apply_as_create(request, data)
                    old = self._stored(request)
                apply = content_type.startswith(APPLY)
                if old is not None and not self._update_fields(request, data, old, apply=apply):
                    # A real server writes nothing for an update that changes nothing: the
                    # resourceVersion stays and no watch event is sent.
                    return aiohttp.web.json_response(old)
        try:
            return await super()._handle(request)
        except (
            jsonpatch.JsonPatchTestFailed,
            jsonpatch.JsonPatchConflict,
            jsonpatch.JsonPointerException,
        ) as e:
            # A JSON patch that does not apply (a failed "test" of the resourceVersion, as kopf sends
            # with its finalizers) is 422 on a real server, which kopf takes as "try again next
            # cycle"; not the 500 kmock would answer, which kopf retries for a minute.
            raise k8s.KubernetesError(422, "Invalid", f"the patch does not apply: {e}") from e

    def _prune(self, request: rendering.Request, data: dict[str, Any]) -> None:
        """A CaptionModel's unknown fields: refused with ``fieldValidation=Strict`` (kubectl's default),
        else dropped, as a real server does with a CRD's structural schema."""
        schema = captionmodel_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        kept, unknown = pruned(data, schema)
        if unknown and request.params.get("fieldValidation") == "Strict":
            fields = ", ".join(f"unknown field {path.lstrip('.')!r}" for path in unknown)
            raise k8s.KubernetesError(422, "Invalid", f"strict decoding error: {fields}")
        data.clear()
        data.update(kept)

    def _validate(self, request: rendering.Request, data: dict[str, Any]) -> None:
        """Refuse, as a real API server does, an object that its schema or rules refuse (422)."""
        if request.action == kmock.action.CREATE or request.headers.get("Content-Type", "").startswith(APPLY):
            candidate = data
        elif request.action == kmock.action.UPDATE and (old := self._stored(request)) is not None:
            candidate = _merged(old, data)
        else:
            return
        problems = schema_problems(candidate)
        stored = self._stored(request) if request.action == kmock.action.UPDATE else None
        if stored is not None and stored.get("kind") == "Deployment":
            selector = (candidate.get("spec") or {}).get("selector")
            if selector is not None and selector != stored["spec"].get("selector"):
                problems.append("spec.selector: Invalid value: field is immutable")
        if problems:
            kind, name = candidate.get("kind"), (candidate.get("metadata") or {}).get("name")
            raise k8s.KubernetesError(422, "Invalid", f"{kind} {name!r} is invalid: {'; '.join(problems)}")

    def _update_fields(
        self, request: rendering.Request, data: dict[str, Any], old: dict[str, Any], *, apply: bool
    ) -> bool:
        """Turn ``data`` into the merge patch the server stores; False when it changes nothing."""
        meta = data.get("metadata") or {}
        wanted = meta.get("resourceVersion")
        if wanted and wanted != old["metadata"].get("resourceVersion"):
            raise k8s.KubernetesError(409, "Conflict", "the object has been modified; please apply again")
        if request.subresource == "status":  # the status subresource changes the status only
            patch = {"status": copy.deepcopy(data.get("status"))}
        elif apply:
            patch = _replacement(old, self._applied_object(request, data, old))
        else:
            patch = copy.deepcopy(data)
        body_changed = request.subresource is None and any(
            key not in ("metadata", "status") and patch[key] != old.get(key) for key in patch
        )
        patch.setdefault("metadata", {})
        if patch["metadata"] is None:
            patch["metadata"] = {}
        patch["metadata"].pop("resourceVersion", None)
        if _merged(old, patch) == old:
            return False
        patch["metadata"]["resourceVersion"] = self._next_version()
        if body_changed:
            patch["metadata"]["generation"] = int(old["metadata"].get("generation") or 0) + 1
        data.clear()
        data.update(patch)
        return True

    def _applied_object(
        self, request: rendering.Request, data: Mapping[str, Any], old: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``old`` after server-side apply of ``data`` by the request's field manager (force: its
        fields win); status and the server's metadata stay as they are."""
        key = (request.resource, request.namespace, request.name, request.params.get("fieldManager") or "")
        uid = str(old["metadata"].get("uid"))
        earlier_uid, earlier = self._applied.get(key, (uid, {}))
        applied = {k: v for k, v in data.items() if k != "status"}
        applied["metadata"] = {
            k: v for k, v in (data.get("metadata") or {}).items() if k not in SERVER_METADATA
        }
        new = _applied_merge(old, applied, earlier if earlier_uid == uid else {})
        new["metadata"].update({k: v for k, v in old["metadata"].items() if k in SERVER_METADATA})
        self._applied[key] = (uid, copy.deepcopy(applied))
        return new

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        info = self.resources.get(request.resource)
        kind = (info.kind if info is not None else None) or ""
        terms = _field_terms(kind, request.params.get("fieldSelector") or "")
        result: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [
                item
                for item in result["items"]
                if _matches(item.get("metadata", {}).get("labels") or {}, selector)
            ]
        result["items"] = [
            item
            for item in result["items"]
            if all((_field_value(item, field) == value) == equal for field, value, equal in terms)
        ]
        return result  # type: ignore[no-any-return]

    def seen(self) -> list[rendering.Request]:
        """Every request received so far, in order."""
        return self._log + list(self._requests)

    def live(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object, or None when it does not exist (or was deleted)."""
        key = (kmock.resource(resource), namespace, name)
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None

    def names(self, resource: str, namespace: str | None = None) -> set[str]:
        """Names of the live objects of a resource."""
        wanted = kmock.resource(resource)
        return {
            name
            for (res, ns, name), obj in self._objects.items()
            if res == wanted and (namespace is None or ns == namespace) and not obj.deleted
        }


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        crd = captionmodel_crd()
        server.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = (
            crd
        )
        for name in ("default", NAMESPACE):
            server.objects["v1/namespaces", None, name] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name},
            }
        server.objects["kopf.dev/v1/clusterkopfpeerings", None, "captionfleet"] = {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "captionfleet"},
        }
        server.objects["kopf.dev/v1/kopfpeerings", NAMESPACE, "captionfleet"] = {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "captionfleet", "namespace": NAMESPACE},
        }
        yield server


def write_kubeconfig(
    path: Path, server: str, token: str = "test-token", contexts: Mapping[str, str | None] | None = None
) -> Path:
    """A kubeconfig for ``server`` with one user of ``token`` and ``contexts`` (name -> namespace, None:
    the default one; the first is current, ``emulator`` when none are given)."""
    chosen = contexts or {"emulator": None}
    listed = []
    for name, namespace in chosen.items():
        context = {"cluster": "emulator", "user": "tester"} | ({"namespace": namespace} if namespace else {})
        listed.append({"name": name, "context": context})
    config = {"apiVersion": "v1", "kind": "Config", "contexts": listed, "current-context": next(iter(chosen))}
    config |= {"clusters": [{"name": "emulator", "cluster": {"server": server}}]}
    config |= {"users": [{"name": "tester", "user": {"token": token}}]}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(name="write_kubeconfig")
def write_kubeconfig_fixture() -> Callable[..., Path]:
    """:func:`write_kubeconfig` for the tests below this folder (a conftest is not imported by name)."""
    return write_kubeconfig


def canary_model(
    name: str, stable: str, canary: str, analysis: Mapping[str, Any], **spec: Any
) -> dict[str, Any]:
    """A CaptionModel of two versions: v1 (model ``stable``, 90 %) and the canary v2 (model ``canary``,
    10 %), rolled out by ``analysis``; ``spec``: more fields of the spec."""
    versions = [
        {"name": "v1", "model": stable, "weight": 90},
        {"name": "v2", "model": canary, "weight": 10, "canary": True},
    ]
    rollout = {"analysis": dict(analysis)}
    body = {"versions": versions, **spec, "rollout": rollout}
    return {
        "apiVersion": "captionfleet.io/v1alpha1",
        "kind": "CaptionModel",
        "metadata": {"name": name},
        "spec": body,
    }


BUNDLED_IN_IMAGE = "file:///opt/captionfleet/models/scenes-blip-tiny"
"""The bundled model where the runtime image holds it (the e2e kubelet maps the folder)."""
QUICK_CHECKS = {"interval": "500ms", "window": "10s", "minRequests": 10, "stepWeight": 25, "maxWeight": 75}
"""Short rollout checks, so that a rollout ends within an e2e test."""


def one_pod_canary(
    name: str, canary: str, analysis: Mapping[str, Any], *, stable: str = BUNDLED_IN_IMAGE, **spec: Any
) -> dict[str, Any]:
    """:func:`canary_model` with one pod per version and one router pod (no autoscaler), as the
    e2e tests run fleets on two CPUs; ``analysis`` over :data:`QUICK_CHECKS`."""
    one_pod = {"autoscaling": {"provider": "none", "minReplicas": 1, "maxReplicas": 1}}
    one_pod |= {"router": {"replicas": 1}}
    return canary_model(name, stable, canary, QUICK_CHECKS | dict(analysis), **(one_pod | spec))


@pytest.fixture(name="canary_model")
def canary_model_fixture() -> Callable[..., dict[str, Any]]:
    """:func:`canary_model` for the tests below this folder."""
    return canary_model


async def caption_peer(
    caption: Callable[[aiohttp.web.Request], Any],
) -> aiohttp.web.AppRunner:
    """A runtime-shaped HTTP peer on a free loopback port: ``caption`` answers ``POST /v1/caption``
    (the quality gate's tests; call ``cleanup()`` on the runner when done)."""
    app = aiohttp.web.Application()
    app.router.add_post("/v1/caption", caption)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner
