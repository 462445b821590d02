"""The chart's alert rules, checked by Prometheus' own promtool.

The PrometheusRule is rendered by real Helm, its groups written as a rules file, and promtool checks
it (``promtool check rules``: PromQL, durations, templates) and runs the unit tests of
``alert_rules_test.yaml`` against it (``promtool test rules``): for every alert, input series that
fire it and series that must not. promtool comes from Debian's prometheus package (``make promtool``,
which ``make test`` runs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

UNIT_TESTS = Path(__file__).with_name("alert_rules_test.yaml")
Render = Callable[[dict[str, Any] | None], Any]


def _rule_values(alerts: dict[str, Any] | None = None, namespaces: list[str] | None = None) -> dict[str, Any]:
    return {
        "metrics": {"prometheusRule": {"enabled": True, "alerts": alerts or {}}},
        "operator": {"watchNamespaces": namespaces or []},
    }


def _groups(
    render: Render, alerts: dict[str, Any] | None = None, namespaces: list[str] | None = None
) -> list[dict[str, Any]]:
    return list(render(_rule_values(alerts, namespaces)).one("PrometheusRule")["spec"]["groups"])


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    if executable is None:
        raise AssertionError("promtool is missing: `make promtool` installs Debian's prometheus package")
    return subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _unit_test(groups: list[dict[str, Any]], workdir: Path) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` of the unit tests against these groups. The annotations are left out:
    promtool compares them whole, and their templates are what ``check rules`` checks."""
    bare = [
        {**group, "rules": [{k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]]}
        for group in groups
    ]
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": bare}, sort_keys=False))
    shutil.copy(UNIT_TESTS, workdir / UNIT_TESTS.name)
    return promtool("test", "rules", UNIT_TESTS.name, cwd=workdir)


def test_every_rule_passes_promtool_check(render: Render, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _groups(render)}, sort_keys=False))
    result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(group["rules"]) for group in _groups(render))
    assert f"SUCCESS: {rules} rules found" in result.stdout


def test_promtool_check_can_fail(tmp_path: Path) -> None:
    broken = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])", "for": "1m"}]}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(broken))
    assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode != 0


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say(render: Render, tmp_path: Path) -> None:
    result = _unit_test(_groups(render), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_unit_tests_that_fire_it_and_that_must_not(render: Render) -> None:
    """For each alert of the chart, a check where it fires, and series beside the firing ones that
    must not fire (promtool fails when an alert fires that exp_alerts does not list)."""
    alerts = {rule["alert"] for group in _groups(render) for rule in group["rules"] if "alert" in rule}
    firing: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        versions = {re.search(r'version="([^"]+)"', s["series"]).group(1) for s in case["input_series"]}  # type: ignore[union-attr]
        for check in case["alert_rule_test"]:
            expected = {alert["exp_labels"]["version"] for alert in check["exp_alerts"]}
            if expected:
                assert versions - expected, f"{check['alertname']}: no series that must not fire"
                firing.add(check["alertname"])
    assert firing == alerts


def test_the_unit_tests_follow_the_thresholds(render: Render, tmp_path: Path) -> None:
    """Rendered with other thresholds, the same series give other answers: the tests can fail."""
    for alerts, alert in (
        ({"errorRate": {"threshold": 0.2}}, "CaptionFleetHighErrorRate"),
        ({"featureDrift": {"threshold": 0.6}}, "CaptionFeatureDrift"),
        ({"confidenceDrop": {"dropShare": 0.5}}, "CaptionConfidenceDrop"),
        ({"confidenceDrop": {"minCaptions": 5000}}, "CaptionConfidenceDrop"),
    ):
        workdir = tmp_path / f"{alert}-{len(list(tmp_path.iterdir()))}"
        workdir.mkdir()
        result = _unit_test(_groups(render, alerts), workdir)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and f"alertname: {alert}" in output, (alerts, output)


def test_a_release_confined_to_namespaces_alerts_only_on_theirs(render: Render, tmp_path: Path) -> None:
    """Two releases, each watching its own namespaces, must not both alert on (or record) one fleet:
    the unit tests' series are in namespace ml, so the rules of a release watching ml give the same
    answers, and those of a release watching other namespaces stay quiet."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    result = _unit_test(_groups(render, namespaces=["ml-staging", "ml"]), ours)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _unit_test(_groups(render, namespaces=["team-b", "mlx"]), theirs)
    output = result.stdout + result.stderr
    for alert in ("CaptionFleetHighLatency", "CaptionFleetRolledBack", "CaptionConfidenceDrop"):
        assert result.returncode != 0 and f"alertname: {alert}" in output, output
