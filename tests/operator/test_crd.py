"""The generated CRD: up to date, valid, and accepting/rejecting CRs as the API server would."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from captionfleet.operator import crd

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = "1.33"


def _schema() -> dict[str, Any]:
    return dict(crd.captionmodel_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as kubectl's server-side field validation (Strict) does.

    A structural schema may not say ``additionalProperties: false`` itself; the API server prunes or
    (with kubectl's default strict validation) refuses unknown fields, except under
    ``x-kubernetes-preserve-unknown-fields``.
    """
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


VALIDATOR = jsonschema.Draft7Validator(_strict(_schema()))


def _errors(cr: dict[str, Any]) -> list[str]:
    return sorted(
        "/".join(str(p) for p in e.absolute_path) + ": " + e.message for e in VALIDATOR.iter_errors(cr)
    )


def test_the_committed_crds_are_what_the_spec_generates() -> None:
    for name, content in crd.render().items():
        path = REPO / "crds" / name
        assert path.exists() and path.read_text() == content, f"{path} is stale: run `make crds`"


def test_the_check_command_fails_on_a_stale_file(tmp_path: Path) -> None:
    assert crd.main([str(tmp_path)]) == 0  # writes
    assert crd.main(["--check", str(tmp_path)]) == 0
    stale = tmp_path / crd.CRD_FILE
    stale.write_text(stale.read_text().replace("maxBatchSize", "maxBatch"))
    assert crd.main(["--check", str(tmp_path)]) == 1


def test_the_crds_are_valid_kubernetes_objects() -> None:
    for document in [crd.captionmodel_crd(), *crd.peering_crds()]:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_names_subresources_and_printer_columns_follow_the_contract() -> None:
    spec = crd.captionmodel_crd()["spec"]
    assert spec["group"] == "captionfleet.io" and spec["scope"] == "Namespaced"
    assert spec["names"] | {"categories": None} == {
        "kind": "CaptionModel",
        "listKind": "CaptionModelList",
        "plural": "captionmodels",
        "singular": "captionmodel",
        "shortNames": ["capm"],
        "categories": None,
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Stable": ".status.stableVersion",
        "Canary": ".status.canaryVersion",
        "Canary-Weight": ".status.canaryWeight",
        "Ready": ".status.readyReplicas",
        "Age": ".metadata.creationTimestamp",
        "Endpoint": ".status.endpoint",
    }
    status = _schema()["properties"]["status"]["properties"]
    for path in columns.values():
        if path.startswith(".status."):
            assert path.removeprefix(".status.") in status


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in (schema.get("properties") or {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += _walk(schema["additionalProperties"], f"{path}{{}}")
    return found


def test_the_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        assert "$ref" not in node and "allOf" not in node and "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type"
            assert "anyOf" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_defaults_enums_and_bounds_reach_the_schema() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    batching = spec["batching"]
    assert batching["default"] == {}
    assert batching["properties"]["maxBatchSize"] | {"description": None} == {
        "type": "integer",
        "minimum": 1,
        "maximum": 256,
        "default": 8,
        "description": None,
    }
    version = spec["versions"]["items"]["properties"]
    assert version["precision"]["enum"] == ["fp32", "fp16", "bf16", "int8"]
    assert version["decoder"]["enum"] == ["native", "transformers"]
    assert version["weight"]["minimum"] == 0 and version["weight"]["maximum"] == 100
    assert spec["autoscaling"]["properties"]["provider"]["enum"] == ["hpa", "keda", "none"]
    assert spec["resources"]["properties"]["memory"]["x-kubernetes-int-or-string"] is True
    # The upstream core/v1 Affinity, so the API server checks it as it would in a pod.
    node_affinity = spec["affinity"]["properties"]["nodeAffinity"]
    assert (
        node_affinity["type"] == "object"
        and "preferredDuringSchedulingIgnoredDuringExecution" in (node_affinity["properties"])
    )
    interval = spec["rollout"]["properties"]["analysis"]["properties"]["interval"]
    assert interval["x-kubernetes-validations"] == [
        {
            "rule": "duration(self) >= duration('500ms') && duration(self) <= duration('1h')",
            "message": "must be 500ms to 1h",
        }
    ]
    assert "default" not in spec["cache"]  # no cache unless asked for


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_are_accepted(example: Path) -> None:
    assert _errors(yaml.safe_load(example.read_text())) == []


def _minimal() -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())


def _with(change: dict[str, Any]) -> dict[str, Any]:
    cr = _minimal()
    cr["spec"] = copy.deepcopy(cr["spec"]) | change
    return cr


def _bad(path: str, value: Any, complaint: str) -> tuple[dict[str, Any], str]:
    """The minimal CaptionModel with ``spec/<path>`` set to ``value`` (lists and objects made on the
    way), and the start of the schema's message about it: the path, the value, the complaint."""
    cr = copy.deepcopy(_minimal())
    keys = [int(key) if key.isdigit() else key for key in path.split("/")]
    node: Any = cr["spec"]
    for key, inner in itertools.pairwise(keys):
        if isinstance(key, int):
            node.extend({} for _ in range(key + 1 - len(node)))
        else:
            node.setdefault(key, [] if isinstance(inner, int) else {})
        node = node[key]
    node[keys[-1]] = value
    return cr, f"spec/{path}: {value!r} {complaint}"


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "no versions": _bad("versions", [], "should be non-empty"),
    "weight above 100": _bad("versions/0/weight", 120, "is greater than the maximum of 100"),
    "unknown precision": _bad(
        "versions/0/precision", "int4", "is not one of ['fp32', 'fp16', 'bf16', 'int8']"
    ),
    "bad model source": _bad("versions/0/model", "s3://bucket/model", "does not match"),
    "upper-case version name": _bad("versions/0/name", "V1", "does not match"),
    "typo in a field": (
        _with({"batching": {"maxBatchsize": 4}}),
        "spec/batching: Additional properties are not allowed ('maxBatchsize' was unexpected)",
    ),
    "batch too large": _bad("batching/maxBatchSize", 1000, "is greater than the maximum of 256"),
    "bad memory quantity": _bad("resources/memory", "16 gigs", "does not match"),
    "unknown autoscaler": _bad("autoscaling/provider", "vpa", "is not one of ['hpa', 'keda', 'none']"),
    "bad duration": _bad("rollout/analysis/interval", "a minute", "does not match"),
    "cache without URL": (_with({"cache": {}}), "spec/cache: {} "),
    "cache with a URL and a Secret": (
        _with({"cache": {"redisUrl": "redis://r", "redisUrlSecret": {"name": "s", "key": "url"}}}),
        "spec/cache: {",
    ),
    "negative memory": _bad("resources/memory", "-1Gi", "does not match"),
    "image with spaces": _bad("image", "my image:1", "does not match"),
    "affinity that is not one": _bad("affinity/nodeAffinity", "please", "is not of type 'object'"),
    "toleration key that is no label key": _bad("tolerations/0/key", "bad key!", "does not match"),
    "cache that is not Redis": _bad("cache/redisUrl", "memcached://x", "does not match"),
    "toleration with a bad effect": _bad("tolerations/0/effect", "Sometimes", "is not one of"),
    # Found by test_admitted.py: the CRD let these through to the operator.
    "GPU resource that is no resource name": _bad(
        "resources/gpuResource", "nvidia.com/a gpu", "does not match"
    ),
    "node selector value that is no string": _bad("nodeSelector/disktype", 5, "is not of type 'string'"),
    "node selector value that is no label value": _bad("nodeSelector/disktype", "ssd!", "does not match"),
    "model path with a NUL": _bad("versions/0/model", "file:///opt/m\x00", "does not match"),
    "cache URL with a control character": _bad("cache/redisUrl", "redis://r\x1b:6379", "does not match"),
    "pull secret longer than a name": (
        _with({"imagePullSecrets": ["s" * 254]}),
        f"spec/imagePullSecrets/0: {'s' * 254!r} is too long",
    ),
    "no spec": (
        {"apiVersion": "captionfleet.io/v1alpha1", "kind": "CaptionModel"},
        ": 'spec' is a required property",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_models_are_refused_with_the_field_named(name: str) -> None:
    cr, expected = BAD[name]
    errors = _errors(cr)
    assert any(error.startswith(expected) for error in errors), errors
