"""Generate the install surface's derived files: ``python -m captionfleet.docgen`` (``make docs``).

Each file is written from the one place its facts live, and ``--check`` (a test does the same in
memory) fails when a committed copy is stale:

- ``docs/configuration.md``: the CaptionModel fields (from the generated CRD schema, i.e. the pydantic
  models), the options of ``captionfleet operator``, ``serve`` and ``router`` (their settings
  dataclasses) and the Helm chart's values (``values.yaml``, described by ``values.schema.json``).
- ``charts/captionfleet/templates/_rbac-rules.tpl``: the RBAC rules of ``operator/permissions.py``.
- ``charts/captionfleet/crds/``: the CRDs, byte-identical to ``crds/`` (both come from
  ``captionfleet.operator.crd``).

Imports neither torch nor transformers: settings modules are cheap to import by the CLI's rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from captionfleet.settings import env_name, option_name

REPO = Path(__file__).resolve().parents[1]
CHART = Path("charts/captionfleet")
CONFIGURATION_MD = Path("docs/configuration.md")
RBAC_RULES_TPL = CHART / "templates/_rbac-rules.tpl"
CHART_CRDS = CHART / "crds"

# (command, "module:Class") of every settings dataclass documented, in this order.
SETTINGS: tuple[tuple[str, str], ...] = (
    ("operator", "captionfleet.operator.settings:OperatorSettings"),
    ("serve", "captionfleet.settings.serve:ServeSettings"),
    ("router", "captionfleet.settings.router:RouterSettings"),
    ("train", "captionfleet.runtime.training.settings:TrainSettings"),
    ("eval", "captionfleet.runtime.training.settings:EvalSettings"),
    ("bench", "captionfleet.bench.settings:BenchSettings"),
    ("caption", "captionfleet.client.settings:CaptionSettings"),
)

# Named templates of _rbac-rules.tpl -> the rule tuples of operator/permissions.py they hold.
RBAC_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("captionfleet.rules.operatorCluster", "OPERATOR_CLUSTER_RULES"),
    ("captionfleet.rules.operatorNamespaced", "OPERATOR_NAMESPACED_RULES"),
)


# --- Markdown helpers ---------------------------------------------------------------------------


def _cell(text: object) -> str:
    """Text fit for one table cell: no newlines, no bare pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: object) -> str:
    if value is None or value == "":
        return '`""`' if value == "" else ""
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return f"`{text}`"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


# --- CaptionModel ---------------------------------------------------------------------------------


def _schema_type(node: Mapping[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string") or "anyOf" in node:
        return "int or string"
    kind = str(node.get("type", "any"))
    if kind == "array":
        return f"list of {_schema_type(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_schema_type(node['additionalProperties'])}"
    return kind


def _schema_constraints(node: Mapping[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        parts.append(f"{low}–{high}")
    elif low is not None:
        parts.append(f"≥ {low}")
    elif high is not None:
        parts.append(f"≤ {high}")
    if "exclusiveMinimum" in node:
        parts.append(f"> {node['exclusiveMinimum']}")
    if "minItems" in node or "maxItems" in node:
        parts.append(f"{node.get('minItems', 0)}–{node.get('maxItems', '∞')} items")
    if "maxLength" in node:
        parts.append(f"at most {node['maxLength']} characters")
    return "; ".join(parts)


def _walk_schema(node: Mapping[str, Any], path: str, required: bool) -> Iterator[list[str]]:
    """One row per field: path, type, default, constraints, description."""
    default = node.get("default")
    shown_default = "" if default in ({}, None) else _code(default)
    if required:
        shown_default = "required"
    yield [
        f"`{path}`",
        _schema_type(node),
        shown_default,
        _schema_constraints(node),
        str(node.get("description", "")),
    ]
    inner = node.get("items", {}) if node.get("type") == "array" else node
    prefix = f"{path}[]" if node.get("type") == "array" else path
    needed = set(inner.get("required", ()))
    for name, sub in inner.get("properties", {}).items():
        yield from _walk_schema(sub, f"{prefix}.{name}", name in needed)


def captionmodel_section() -> list[str]:
    from captionfleet.operator import crd

    manifest = crd.captionmodel_crd()
    version = manifest["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]["properties"]
    lines = [
        "## CaptionModel",
        "",
        f"`apiVersion: {manifest['spec']['group']}/{version['name']}`, `kind: "
        f"{manifest['spec']['names']['kind']}` (short name "
        f"`{manifest['spec']['names']['shortNames'][0]}`). The API server checks every constraint below "
        "(the CRD is generated from the same pydantic models); the operator reports what a schema "
        "cannot say (weights summing to 100, unique names) as the `Invalid` phase with a condition.",
        "",
        "### spec",
        "",
    ]
    header = ["Field", "Type", "Default", "Constraints", "Description"]
    lines += _table(header, list(_walk_schema(root["spec"], "spec", False))[1:])
    lines += ["", "### status (written by the operator)", ""]
    lines += _table(header, list(_walk_schema(root["status"], "status", False))[1:])
    return lines


# --- Settings dataclasses ---------------------------------------------------------------------------


def _settings_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is tuple or origin is list:
        return "comma-separated list"
    if origin is not None:  # X | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _settings_type(args[0]) + " (optional)"
    return getattr(annotation, "__name__", str(annotation))


def _load(spec: str) -> type[Any]:
    module_name, _, name = spec.partition(":")
    cls: type[Any] = getattr(importlib.import_module(module_name), name)
    return cls


def settings_section(command: str, cls: type[Any]) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        default: Any = field.default
        if default is dataclasses.MISSING and callable(field.default_factory):
            default = field.default_factory()
        if isinstance(default, (tuple, list)):
            default = ",".join(default)
        help_text = field.metadata.get("help", "")
        if "choices" in field.metadata:
            help_text += " One of: " + ", ".join(f"`{c}`" for c in field.metadata["choices"]) + "."
        rows.append(
            [
                f"`{option_name(field.name)}`",
                f"`{env_name(field.name)}`",
                _settings_type(hints[field.name]),
                _code(default),
                help_text,
            ]
        )
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"## `captionfleet {command}`", ""]
    if doc and not doc[0].startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
        lines += [doc[0], ""]
    lines += _table(["Option", "Environment", "Type", "Default", "Description"], rows)
    return lines


# --- Helm values ------------------------------------------------------------------------------------


def _walk_values(values: Mapping[str, Any], schema: Mapping[str, Any], path: str) -> Iterator[list[str]]:
    for key, value in values.items():
        sub = schema.get("properties", {}).get(key, {})
        here = f"{path}.{key}" if path else key
        nested = sub.get("type") == "object" and "properties" in sub and isinstance(value, dict)
        if nested and value:
            yield from _walk_values(value, sub, here)
            continue
        kind = sub.get("type", "any")
        if "enum" in sub:
            kind += " (" + ", ".join(f"`{v}`" for v in sub["enum"]) + ")"
        yield [f"`{here}`", kind, _code(value) or '`""`', str(sub.get("description", ""))]


def chart_values_section(root: Path) -> list[str]:
    values = yaml.safe_load((root / CHART / "values.yaml").read_text())
    schema = json.loads((root / CHART / "values.schema.json").read_text())
    chart = yaml.safe_load((root / CHART / "Chart.yaml").read_text())
    lines = [
        "## Helm chart values",
        "",
        f"Chart `{chart['name']}` {chart['version']} (`{CHART}`). Helm checks values against "
        "`values.schema.json` on install and upgrade: unknown keys and out-of-range values are errors.",
        "",
    ]
    lines += _table(["Key", "Type", "Default", "Description"], list(_walk_values(values, schema, "")))
    return lines


# --- The generated files ----------------------------------------------------------------------------


def configuration_markdown(root: Path = REPO) -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `make docs` (python -m captionfleet.docgen) from the pydantic spec models, "
        "the settings dataclasses and the chart's values; do not edit by hand. -->",
        "",
        "Every place captionfleet is configured: the `CaptionModel` resource, the options of the "
        "`captionfleet` commands (each also read from its `CAPTIONFLEET_<OPTION>` environment "
        "variable; the chart sets the operator's that way) and the Helm chart's values.",
        "",
    ]
    lines += [*captionmodel_section(), ""]
    for command, spec in SETTINGS:
        lines += [*settings_section(command, _load(spec)), ""]
    lines += chart_values_section(root)
    return "\n".join(lines) + "\n"


# A rule that one watching mode needs only (PolicyRule.mode) is rendered in that mode only: the
# chart's values decide the mode (operator.watchNamespaces empty: the whole cluster).
RBAC_MODE_CONDITIONS = {
    "clusterwide": "{{- if not .Values.operator.watchNamespaces }}",
    "namespaced": "{{- if .Values.operator.watchNamespaces }}",
}

# kopf's peering objects are read and written only with peering on (the chart's
# operator.peering.enabled; off, the operator runs --standalone).
PEERING_RESOURCES = frozenset({"kopfpeerings", "clusterkopfpeerings"})


def _rbac_conditions(rule: Any) -> list[str]:
    """The chart's `if`s around one rule: its watching mode, and peering for the peering objects."""
    conditions = [] if rule.mode == "always" else [RBAC_MODE_CONDITIONS[rule.mode]]
    if PEERING_RESOURCES & set(rule.resources):
        conditions.append("{{- if .Values.operator.peering.enabled }}")
    return conditions


def rbac_rules_template() -> str:
    from captionfleet.operator import permissions

    out = [
        "{{/*",
        "Generated by `make docs` (python -m captionfleet.docgen) from operator/permissions.py: do not edit.",
        "The rules of the operator's ClusterRoles and Roles (see rbac.yaml); each comment says why.",
        "*/}}",
    ]
    for template, attribute in RBAC_TEMPLATES:
        out.append(f'{{{{- define "{template}" -}}}}')
        for rule in getattr(permissions, attribute):
            manifest = rule.as_manifest()
            conditions = _rbac_conditions(rule)
            out += conditions
            out.append(f"# {rule.why}")
            out.append(f"- apiGroups: {json.dumps(manifest['apiGroups'])}")
            out.append(f"  resources: {json.dumps(manifest['resources'])}")
            out.append(f"  verbs: {json.dumps(manifest['verbs'])}")
            out += ["{{- end }}"] * len(conditions)
        out.append("{{- end }}")
    return "\n".join(out) + "\n"


# The chart's values that are pod-spec objects Kubernetes defines, validated by Kubernetes' own schema
# (of the oldest version the chart supports) embedded in values.schema.json: value -> definition.
CHART_SCHEMA = CHART / "values.schema.json"
UPSTREAM_SCHEMA_VERSION = "1.29"
UPSTREAM_VALUES = {"affinity": "io.k8s.api.core.v1.Affinity"}
_UPSTREAM_REF = re.compile(r'"\$ref": "[^"#]*#/\$defs/(?P<name>[^"]+)"')


def _upstream_definitions(names: Iterable[str]) -> dict[str, Any]:
    """The named Kubernetes definitions and all they refer to, refs rewritten to #/definitions/."""
    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    strict = folder / f"v{UPSTREAM_SCHEMA_VERSION}.0-local-strict"
    every = json.loads((strict / "_definitions.json").read_text())["$defs"]
    wanted, found = list(names), {}
    while wanted:
        name = wanted.pop()
        if name in found:
            continue
        text = json.dumps(every[name])
        wanted += sorted({m["name"] for m in _UPSTREAM_REF.finditer(text)})
        text = _UPSTREAM_REF.sub(lambda m: f'"$ref": "#/definitions/{m["name"]}"', text)
        found[name] = json.loads(text)
    return dict(sorted(found.items()))


def chart_values_schema(root: Path = REPO) -> str:
    """values.schema.json with Kubernetes' own definitions for UPSTREAM_VALUES (the rest is hand-written)."""
    schema = json.loads((root / CHART_SCHEMA).read_text())
    ours = {k: v for k, v in schema.get("definitions", {}).items() if not k.startswith("io.k8s.")}
    schema["definitions"] = {**ours, **_upstream_definitions(UPSTREAM_VALUES.values())}
    for value, definition in UPSTREAM_VALUES.items():
        node = schema["properties"][value]
        node.pop("properties", None)
        node.pop("additionalProperties", None)
        node["allOf"] = [{"$ref": f"#/definitions/{definition}"}]
    return json.dumps(schema, indent=2) + "\n"


def generated_files(root: Path = REPO) -> dict[Path, str]:
    """Path (relative to the repository) -> the content it must have."""
    from captionfleet.operator import crd

    files = {
        CONFIGURATION_MD: configuration_markdown(root),
        RBAC_RULES_TPL: rbac_rules_template(),
        CHART_SCHEMA: chart_values_schema(root),
    }
    for name, content in crd.render().items():
        files[CHART_CRDS / name] = content
    return files


def stale_files(root: Path = REPO) -> list[Path]:
    """The generated files whose committed content differs (or that are missing)."""
    stale = []
    for path, content in generated_files(root).items():
        target = root / path
        if not target.exists() or target.read_text() != content:
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this checkout)")
    parser.add_argument("--check", action="store_true", help="fail if a file is stale; write nothing")
    args = parser.parse_args(argv)
    stale = stale_files(args.root)
    if args.check:
        if stale:
            print("stale: " + ", ".join(map(str, stale)) + "; run `make docs`", file=sys.stderr)
            return 1
        return 0
    files = generated_files(args.root)
    for path in stale:
        target = args.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(files[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
