"""Generate the CaptionModel CRD from the pydantic models: ``python -m captionfleet.operator.crd crds/``.

``make crds`` runs this; a test fails when the files in ``crds/`` differ from what it would write.
The JSON schema pydantic produces is turned into a Kubernetes *structural* schema: references
inlined, ``Optional`` unwrapped, no ``title``/``additionalProperties: false``, int-or-string for
quantities, ``{}`` as the default of objects whose fields have defaults (the API server then fills
those fields in), and ``x-kubernetes-preserve-unknown-fields`` only where the spec is free-form.
The KopfPeering CRDs kopf uses for leader election are written next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from captionfleet import names
from captionfleet.operator.spec import CaptionModelSpec
from captionfleet.operator.status import CaptionModelStatus

CRD_FILE = f"{names.PLURAL}.{names.GROUP}.yaml"
# The Kubernetes release whose core/v1 Affinity schema the CRD embeds (from kubernetes-validate's copy
# of the upstream OpenAPI schemas, read only when the CRD is generated).
UPSTREAM_VERSION = "1.33.0"
PEERING_FILE = "kopfpeerings.kopf.dev.yaml"

# Keywords of the JSON schema that the CRD's openAPIV3Schema keeps as they are.
_KEPT = (
    "type",
    "description",
    "format",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "required",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
)

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stable", "type": "string", "jsonPath": ".status.stableVersion"},
    {"name": "Canary", "type": "string", "jsonPath": ".status.canaryVersion"},
    {
        "name": "Canary-Weight",
        "type": "integer",
        "jsonPath": ".status.canaryWeight",
        "description": "Share of traffic the canary version receives now, in percent.",
    },
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref`` and single-item ``allOf``; the outer keys (description, default) win."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        else:
            return node


def structural(node: dict[str, Any], defs: dict[str, Any], *, field: bool = False) -> dict[str, Any]:
    """One pydantic JSON-schema node -> a structural openAPIV3Schema node.

    ``field``: the node is a property whose absence means "all defaults" (not an Optional one).
    """
    node = _resolve(node, defs)
    if node.get("x-kubernetes-int-or-string"):
        out = {k: node[k] for k in _KEPT if k in node and k != "type"}
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "default" in node:
            out["default"] = node["default"]
        return out
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        if len(branches) != 1:
            raise ValueError(f"cannot express this union in a structural schema: {node['anyOf']}")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if outer.get("default", ...) is None:
            del outer["default"]  # Optional[...] = None: simply not set
        return structural({**_resolve(branches[0], defs), **outer}, defs)  # Optional: no {} default

    out = {k: node[k] for k in _KEPT if k in node}
    if node.get("type") == "object":
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            out["properties"] = {name: structural(sub, defs, field=True) for name, sub in properties.items()}
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        elif len(patterns := node.get("patternProperties") or {}) == 1:
            # dict[LabelKey, LabelValue]: a structural schema cannot constrain the keys (validation.py
            # does), but the server checks every value (a string, its pattern and length).
            out["additionalProperties"] = structural(next(iter(patterns.values())), defs)
        elif extra is not False:  # dict[str, Any]: free-form, like an Affinity
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") == "array":
        out["items"] = structural(node["items"], defs)
    if "default" in node and node["default"] is not None:
        default = node["default"]
        # Objects default to {}: the API server then applies the defaults of their fields.
        out["default"] = {} if isinstance(default, dict) and "properties" in out else default
    elif field and "properties" in out and not out.get("required"):
        out["default"] = {}  # a section of optional settings: present with its defaults
    return out


def _upstream_definitions() -> dict[str, Any]:
    import json

    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = folder / f"v{UPSTREAM_VERSION}-local-strict" / "_definitions.json"
    return dict(json.loads(path.read_text())["$defs"])


def upstream(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """An upstream JSON schema node (kubernetes-validate's form) as a structural CRD schema node:
    references inlined, nullable types unwrapped, the strict ``additionalProperties: false`` dropped."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    out = {k: node[k] for k in _KEPT if k in node and k != "type"}
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next(t for t in kind if t != "null")
    if kind is not None:
        out["type"] = kind
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {name: upstream(sub, defs) for name, sub in node["properties"].items()}
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = upstream(node["additionalProperties"], defs)
    if "items" in node:
        out["items"] = upstream(node["items"], defs)
    return out


def upstream_schema(definition: str) -> dict[str, Any]:
    """The structural schema of an upstream type, e.g. ``io.k8s.api.core.v1.Affinity``."""
    defs = _upstream_definitions()
    return upstream(defs[definition], defs)


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def captionmodel_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition of CaptionModel."""
    spec_schema = openapi_schema(CaptionModelSpec)
    spec_schema["description"] = "The fleet: model versions, their traffic split and how they run."
    # The API server checks an affinity as it would in a pod: the upstream schema, not free-form.
    affinity = spec_schema["properties"]["affinity"]
    spec_schema["properties"]["affinity"] = {
        **upstream_schema("io.k8s.api.core.v1.Affinity"),
        "description": affinity["description"],
    }
    status_schema = openapi_schema(CaptionModelStatus)
    status_schema["description"] = "Written by the operator only; the spec is never rewritten."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{names.PLURAL}.{names.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "captionfleet"},
        },
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": list(names.SHORT_NAMES),
                "categories": ["captionfleet"],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An image-captioning fleet: model versions behind one router.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def _peering_crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    """kopf's peering resources (leader election between operator replicas), as kopf documents them."""
    return [
        _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        _peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
    ]


HEADER = "# Generated by `make crds` (python -m captionfleet.operator.crd crds/) from operator/spec.py.\n"


def render() -> dict[str, str]:
    """File name -> content, for every file in crds/."""
    dump = {"sort_keys": False, "default_flow_style": False, "width": 110}
    return {
        CRD_FILE: HEADER + yaml.safe_dump(captionmodel_crd(), **dump),  # type: ignore[call-overload]
        PEERING_FILE: HEADER + yaml.safe_dump_all(peering_crds(), explicit_start=True, **dump),  # type: ignore[call-overload]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the CRDs generated from the spec.")
    parser.add_argument("directory", type=Path, nargs="?", default=Path("crds"))
    parser.add_argument("--check", action="store_true", help="fail if the files differ; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, content in render().items():
        path = args.directory / name
        if path.exists() and path.read_text() == content:
            continue
        stale.append(str(path))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run `make crds`", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
