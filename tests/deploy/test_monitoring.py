"""ServiceMonitor, PrometheusRule and the Grafana dashboard: they watch what really exists.

The ServiceMonitor must select the Services the operator's own builders produce; every series the
alerts and the dashboard query must be one the runtime exports (or a recording rule of the chart),
with labels it has or the scrape adds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram

from captionfleet.operator import spec as s
from captionfleet.operator.builders import common, router, runtime
from captionfleet.operator.metrics import OperatorMetrics
from captionfleet.operator.settings import OperatorSettings
from captionfleet.runtime.router.metrics import RouterMetrics
from captionfleet.runtime.server.metrics import ServerMetrics
from captionfleet.runtime.web.metrics import declared_metrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "captionfleet"
DASHBOARD = CHART / "dashboards" / "captionfleet.json"
Render = Callable[[dict[str, Any] | None], Any]

MONITORING_ON = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
# Labels every scraped series gets: Prometheus' own, the ServiceMonitor's defaults, our relabelings.
SCRAPE_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
RELABELED = {"captionmodel", "version", "component"}
ALERTS = {
    "CaptionFleetHighLatency",
    "CaptionFleetHighErrorRate",
    "CaptionFleetQueueBacklog",
    "CaptionFleetRolledBack",
    "CaptionFeatureDrift",
    "CaptionConfidenceDrop",
}


def _exported(metrics: object) -> dict[str, set[str]]:
    """Series name -> label names, for every metric of a runtime's or router's registry."""
    series: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, (Counter, Gauge, Histogram)):
            continue
        name, labels = collector._name, set(collector._labelnames)
        if isinstance(collector, Counter):
            series[f"{name}_total"] = labels
        elif isinstance(collector, Histogram):
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


RUNTIME_SERIES = _exported(ServerMetrics("v1", max_batch_size=8))
# The router's Service has no version label: its series carry their own `version`.
ROUTER_SERIES = _exported(RouterMetrics())
# Exported by the operator itself; its PodMonitor keeps the series' own labels (honorLabels).
OPERATOR_SERIES = _exported(OperatorMetrics())

_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{([^}]*)\})?")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"[^"]*"\s*,?')
_KEYWORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "rate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "le",
    "label_values",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "count",
}


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(series name, label names matched) for every series selector in a PromQL expression."""
    text = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    text = re.sub(r"\boffset\s+[0-9a-z]+", " ", text)  # offsets
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping label lists
    for match in _SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(3)
        if name in _KEYWORDS or name.startswith("$"):
            continue
        if not name.startswith("captionfleet"):
            raise AssertionError(f"unexpected identifier {name!r} in {expr!r}")
        labels = set()
        if braces:
            remainder = _MATCHER.sub("", braces)
            assert not remainder.strip(), f"cannot parse matchers {braces!r}"
            labels = {m.group(1) for m in _MATCHER.finditer(braces)}
        yield name, labels


def balanced(expr: str) -> bool:
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', "", expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def check_expr(expr: str, recorded: set[str]) -> None:
    assert balanced(expr), f"unbalanced brackets: {expr}"
    found = list(selectors(expr))
    assert found, f"no series in {expr}"
    for name, labels in found:
        if name in recorded:
            continue
        if name in OPERATOR_SERIES:
            available = OPERATOR_SERIES[name] | SCRAPE_LABELS
        elif name in ROUTER_SERIES:
            available = ROUTER_SERIES[name] | SCRAPE_LABELS | RELABELED
        else:
            assert name in RUNTIME_SERIES, f"{name} is not exported by the runtime ({sorted(RUNTIME_SERIES)})"
            available = RUNTIME_SERIES[name] | SCRAPE_LABELS | RELABELED
        assert labels <= available, f"{name} has no labels {labels - available}"


def test_selector_parsing_can_fail() -> None:
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("sum(rate(captionfleet_requests[5m]))", set())
    with pytest.raises(AssertionError, match="no labels"):
        check_expr('rate(captionfleet_queue_depth{code="500"}[5m])', set())
    with pytest.raises(AssertionError, match="unbalanced"):
        check_expr("sum(rate(captionfleet_requests_total[5m])", set())


def _prometheus_rule(render: Render, values: dict[str, Any] = MONITORING_ON) -> dict[str, Any]:
    return dict(render(values).one("PrometheusRule"))


def test_alerts_query_real_series(render: Render) -> None:
    groups = _prometheus_rule(render)["spec"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert {rule["alert"] for rule in rules if "alert" in rule} == ALERTS
    for rule in rules:
        check_expr(rule["expr"], recorded)
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_thresholds_and_switches_come_from_values(render: Render) -> None:
    values = {
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {
                "enabled": True,
                "alerts": {
                    "p99Latency": {"thresholdSeconds": 0.75, "for": "3m", "severity": "critical"},
                    "errorRate": {"threshold": 0.2},
                    "queueDepth": {"threshold": 12},
                    "rollback": {"enabled": False},
                },
            },
        }
    }
    rules = {
        rule["alert"]: rule
        for group in _prometheus_rule(render, values)["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert set(rules) == ALERTS - {"CaptionFleetRolledBack"}
    latency = rules["CaptionFleetHighLatency"]
    assert latency["expr"].endswith("> 0.75") and latency["for"] == "3m"
    assert latency["labels"]["severity"] == "critical"
    assert rules["CaptionFleetHighErrorRate"]["expr"].endswith("> 0.2")
    assert rules["CaptionFleetQueueBacklog"]["expr"].endswith("> 12")


def test_the_drift_and_confidence_alerts_take_their_thresholds_from_values(render: Render) -> None:
    alerts = {
        "featureDrift": {"threshold": 0.35, "for": "1h", "severity": "critical"},
        "confidenceDrop": {"dropShare": 0.25, "window": "30m", "minCaptions": 40, "for": "2h"},
    }
    values = {"metrics": {"prometheusRule": {"enabled": True, "alerts": alerts}}}
    rules = {
        rule["alert"]: rule
        for group in _prometheus_rule(render, values)["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    drift = rules["CaptionFeatureDrift"]
    assert drift["expr"].endswith("> 0.35") and drift["for"] == "1h"
    assert drift["labels"]["severity"] == "critical"
    drop = rules["CaptionConfidenceDrop"]
    assert "< (1 - 0.25)" in drop["expr"] and drop["expr"].endswith(">= 40") and drop["for"] == "2h"
    assert drop["expr"].count("[30m] offset 1d") == 2 and drop["expr"].count("[30m])") == 3
    assert "more than 25 % below" in drop["annotations"]["description"]
    switched_off = {"featureDrift": {"enabled": False}, "confidenceDrop": {"enabled": False}}
    off = {"metrics": {"prometheusRule": {"enabled": True, "alerts": switched_off}}}
    names = {r.get("alert") for g in _prometheus_rule(render, off)["spec"]["groups"] for r in g["rules"]}
    assert not names & {"CaptionFeatureDrift", "CaptionConfidenceDrop"}


def _fleet_services() -> list[dict[str, Any]]:
    """The Services the operator creates for a two-version CaptionModel (its real builders)."""
    spec = s.parse_spec(
        {
            "versions": [
                {"name": "v1", "model": "file:///m", "weight": 90},
                {"name": "v2", "model": "file:///m", "weight": 10},
            ]
        }
    )
    ctx = common.FleetContext.create(
        name="captions",
        namespace="ml",
        uid="0000",
        spec=spec,
        config=common.ClusterConfig.from_settings(OperatorSettings()),
    )
    return [runtime.service(ctx, v) for v in spec.versions] + [router.service(ctx)]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        if expression["operator"] == "Exists" and not present:
            return False
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_the_service_monitor_scrapes_the_services_the_operator_creates(render: Render) -> None:
    monitor = render(MONITORING_ON).one("ServiceMonitor", "-fleets")["spec"]
    assert monitor["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["endpoints"]
    for service in _fleet_services():
        labels = service["metadata"]["labels"]
        assert _selects(monitor["selector"], labels), labels
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        # Each relabeling reads a Service label the operator really sets (or the router's lacks).
        for relabel in endpoint["relabelings"]:
            (source,) = relabel["sourceLabels"]
            key = source.removeprefix("__meta_kubernetes_service_label_")
            sanitized = {re.sub(r"[^a-zA-Z0-9_]", "_", k): k for k in labels}
            assert key in sanitized or relabel["targetLabel"] == "version", (source, labels)
    assert endpoint["path"] == common.PROMETHEUS_PATH
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == RELABELED
    # ...and not the Services of other applications, nor the operator's own.
    assert not _selects(monitor["selector"], {"app.kubernetes.io/part-of": "captionfleet"})


def test_the_service_monitor_follows_the_watched_namespaces(render: Render) -> None:
    values = {**MONITORING_ON, "operator": {"watchNamespaces": ["ml", "ml-staging"]}}
    monitor = render(values).one("ServiceMonitor", "-fleets")["spec"]
    assert monitor["namespaceSelector"] == {"matchNames": ["ml", "ml-staging"]}


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_configmap_carries_the_dashboard(render: Render) -> None:
    config_map = render({"dashboard": {"enabled": True}}).one("ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["captionfleet.json"]) == _dashboard()


def test_the_dashboard_queries_real_series_through_its_variables() -> None:
    dashboard = _dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "captionmodel", "version"}
    builtins = {"__rate_interval", "__range"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_expr(target["expr"], set())
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= variables | builtins, (panel["title"], used)
    for variable in dashboard["templating"]["list"][1:]:
        query = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert query, variable
        check_expr(query.group(1), set())
        ((name, _),) = selectors(query.group(1))
        assert query.group(2) in RUNTIME_SERIES[name] | SCRAPE_LABELS | RELABELED


def test_the_dashboard_covers_what_the_alerts_watch() -> None:
    queried = {
        name for panel in _panels(_dashboard()) for t in panel["targets"] for name, _ in selectors(t["expr"])
    }
    for series in (
        "captionfleet_requests_total",
        "captionfleet_request_duration_seconds_bucket",
        "captionfleet_queue_depth",
        "captionfleet_batch_size_sum",
        "captionfleet_cache_hits_total",
        "captionfleet_rollbacks_total",
        "captionfleet_router_version_weight",
        "captionfleet_router_requests_total",
    ):
        assert series in queried


def test_the_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_the_operator_exports_the_rollback_series_and_is_scraped_with_its_labels(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = {"namespace", "captionmodel", "version"}
    assert {
        "captionfleet_rollbacks_total": fleet,
        "captionfleet_quality_gate_runs_total": fleet | {"verdict"},
        "captionfleet_quality_gate_score": fleet | {"role", "metric"},
    } == OPERATOR_SERIES
    rendered = render(MONITORING_ON | {"operator": {"metricsPort": 9100}})
    monitor = rendered.one("PodMonitor", "-operator")["spec"]
    pod = rendered.one("Deployment")["spec"]["template"]
    assert _selects(monitor["selector"], pod["metadata"]["labels"])
    (endpoint,) = monitor["podMetricsEndpoints"]
    # The series' namespace is the CaptionModel's; without honorLabels it would become exported_namespace.
    assert endpoint["honorLabels"] is True and endpoint["path"] == "/metrics"
    (container,) = pod["spec"]["containers"]
    port = next(p for p in container["ports"] if p["name"] == endpoint["port"])
    assert port["containerPort"] == 9100
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["CAPTIONFLEET_METRICS"] == "http://0.0.0.0:9100/metrics"
    assert not render(None).of_kind("PodMonitor")


def test_the_install_guide_lists_every_router_series() -> None:
    guide = (CHART.parents[1] / "docs" / "install.md").read_text()
    declared = [d.exposed_name for _, d in declared_metrics(RouterMetrics)]
    scraped = ["captionfleet_router_table_source_errors_total", "captionfleet_router_endpoints_ejected"]
    assert len(declared) >= 10
    for name in declared + scraped:
        assert f"| `{name}` |" in guide, f"{name} is not in docs/install.md"
