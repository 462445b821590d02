"""The generated configuration reference is current, and the install guide's commands really work.

docs/install.md and the chart's NOTES.txt are followed as a reader would: their `--set` values go
through the chart's schema, their release names through Helm, and their CaptionModel through the
CRD schema, the operator's validation and builders, and the runtime's own option parser.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from captionfleet import cli, docgen
from captionfleet.operator import builders, validation
from captionfleet.operator.builders import common
from captionfleet.operator.settings import OperatorSettings
from captionfleet.settings import from_args
from captionfleet.settings.router import RouterSettings
from captionfleet.settings.serve import ServeSettings

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "docs" / "install.md"
Render = Callable[[dict[str, Any] | None], Any]


def test_the_configuration_reference_is_current() -> None:
    committed = (REPO / docgen.CONFIGURATION_MD).read_text()
    assert committed == docgen.configuration_markdown(), "docs/configuration.md is stale: run `make docs`"


def test_the_reference_lists_every_option_and_value() -> None:
    text = docgen.configuration_markdown()
    for cls in (OperatorSettings, ServeSettings, RouterSettings):
        for name in cls.__dataclass_fields__:
            assert f"`CAPTIONFLEET_{name.upper()}`" in text
    for key in (
        "operator.watchNamespaces",
        "metrics.prometheusRule.alerts.errorRate.threshold",
        "dashboard.enabled",
    ):
        assert f"`{key}`" in text
    for field in ("spec.versions[].model", "spec.batching.maxBatchSize", "spec.rollout.analysis.threshold"):
        assert f"`{field}`" in text


def _generated_tree(tmp_path: Path) -> Path:
    for path in docgen.generated_files():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, target)
    for name in ("values.yaml", "values.schema.json", "Chart.yaml"):
        shutil.copy2(REPO / docgen.CHART / name, tmp_path / docgen.CHART / name)
    return tmp_path


def _docgen(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "captionfleet.docgen", *argv], capture_output=True, text=True, timeout=120
    )


def test_docgen_check_fails_on_a_stale_file_and_the_command_fixes_it(tmp_path: Path) -> None:
    root = _generated_tree(tmp_path)
    assert _docgen("--root", str(root), "--check").returncode == 0
    values = root / docgen.CHART / "values.yaml"
    values.write_text(values.read_text().replace("interval: 30s", "interval: 45s"))
    (root / docgen.RBAC_RULES_TPL).write_text("edited by hand\n")
    stale = _docgen("--root", str(root), "--check")
    assert stale.returncode == 1
    assert str(docgen.CONFIGURATION_MD) in stale.stderr and str(docgen.RBAC_RULES_TPL) in stale.stderr
    assert _docgen("--root", str(root)).returncode == 0
    assert "`45s`" in (root / docgen.CONFIGURATION_MD).read_text()
    assert _docgen("--root", str(root), "--check").returncode == 0


def test_docgen_imports_no_torch() -> None:
    code = (
        "import sys, captionfleet.docgen as d; d.configuration_markdown(); "
        "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_every_set_in_the_guide_is_a_valid_value(chart: helm.Chart) -> None:
    sets = [
        m.strip("'\"")
        for block in _shell_blocks(INSTALL.read_text())
        for m in re.findall(r"--set (\S+)", block)
    ]
    assert len(sets) >= 5
    merged: dict[str, Any] = {}
    for assignment in sets:
        merged = _merge(merged, helm.parse_set_string(assignment))
    chart.validate_schema(merged)
    assert merged["operator"]["watchNamespaces"] == ["ml", "ml-staging"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def test_the_guide_names_the_objects_helm_creates(chart: helm.Chart) -> None:
    text = INSTALL.read_text()
    install = re.search(r"helm install (\S+) (\S+) \\\n\s+--namespace (\S+)", text)
    assert install, "no helm install command"
    release, path, namespace = install.groups()
    assert (REPO / path / "Chart.yaml").exists()
    rendered = chart.render({}, name=release, namespace=namespace)
    deployment = yaml.safe_load(rendered["captionfleet/templates/deployment.yaml"])
    assert f"kubectl -n {namespace} rollout status deployment/{deployment['metadata']['name']}" in text
    for example in re.findall(r"`([\w-]+\.yaml)`", text):
        assert (REPO / "examples" / example).exists(), f"examples/{example} does not exist"


def _heredoc_models(text: str) -> list[dict[str, Any]]:
    bodies = re.findall(r"<<'YAML'\n(.*?)\n\s*YAML\n", text, flags=re.S)
    assert bodies, "no CaptionModel in the text"
    return [yaml.safe_load(textwrap.dedent(body)) for body in bodies]


SETTINGS_OF = {"serve": ServeSettings, "router": RouterSettings}


def _settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings `captionfleet <command>` builds from the container's command line and environment."""
    for name in [n for n in os.environ if n.startswith("CAPTIONFLEET_")]:
        monkeypatch.delenv(name)
    for var in container.get("env", []):
        if "value" in var:  # valueFrom (the downward API) is filled in by the kubelet
            monkeypatch.setenv(var["name"], var["value"])
    argv = container["command"][1:] + container.get("args", [])
    assert container["command"][0] == "captionfleet" and argv[0] in SETTINGS_OF, container["command"]
    settings = from_args(SETTINGS_OF[argv[0]], cli.build_parser(only=argv[0]).parse_args(argv))
    # argparse checks `choices` on the command line only, not on values from the environment.
    for field in dataclasses.fields(settings):
        choices = field.metadata.get("choices")
        value = getattr(settings, field.name)
        assert choices is None or value in choices, (
            f"{argv[0]}: {field.name}={value!r} is not one of {choices}"
        )
    return settings


def _check_model_runs(model: dict[str, Any], text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    crd = yaml.safe_load((REPO / "crds" / "captionmodels.captionfleet.io.yaml").read_text())
    jsonschema.validate(model, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    config = common.ClusterConfig.from_settings(OperatorSettings())
    spec, problems = validation.check(model["metadata"]["name"], model["spec"], config)
    assert spec is not None and problems == [], problems
    ctx = common.FleetContext.create(
        name=model["metadata"]["name"], namespace="ml", uid="0", spec=spec, config=config
    )
    manifests = builders.fleet(ctx)
    # The model path must be the bundled model as the runtime image lays it out.
    bundled = {p.parent.name for p in (REPO / "runtime" / "models").glob("*/config.json")}
    images = {f"file:///opt/captionfleet/models/{n}" for n in bundled}
    assert {v["model"] for v in model["spec"]["versions"]} <= images
    (first, *_) = (v["model"].removeprefix("file://") for v in model["spec"]["versions"])
    # Each container, as the operator runs it, is accepted by the command it runs.
    commands = {}
    for deployment in (m for m in manifests if m["kind"] == "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            commands[container["command"][1]] = _settings_of(container, monkeypatch)
    assert set(commands) == {"serve", "router"}
    assert commands["serve"].model == first
    assert commands["router"].caption_model == model["metadata"]["name"]
    # The port-forward in the text reaches the router's Service on its port.
    service = next(
        m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == model["metadata"]["name"]
    )
    forward = re.search(r"port-forward service/(\S+) \d+:(\d+)", text)
    assert forward and forward.group(1) == service["metadata"]["name"]
    assert int(forward.group(2)) == service["spec"]["ports"][0]["port"]


def test_the_guides_captionmodel_runs_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    text = INSTALL.read_text()
    (model,) = _heredoc_models(text)
    _check_model_runs(model, text, monkeypatch)


def test_the_readmes_captionmodel_runs_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (REPO / "README.md").read_text()
    (model,) = _heredoc_models(text)
    _check_model_runs(model, text, monkeypatch)


def test_the_notes_captionmodel_runs_the_bundled_model(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    notes = render(None).notes
    (model,) = _heredoc_models(notes)
    _check_model_runs(model, notes, monkeypatch)
    assert model == _heredoc_models(INSTALL.read_text())[0], (
        "NOTES.txt and docs/install.md show different models"
    )
