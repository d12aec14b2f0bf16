"""Lint of the generated Grafana dashboards and their provisioning files."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.grafana_queries import (
    DASHBOARD_DIR,
    GRAFANA,
    PROMETHEUS_SERIES,
    ROOT,
    analyse,
    documented_metric_names,
    iter_panels,
    iter_queries,
    load_dashboards,
    load_generator,
    metric_names,
    problems,
    tokens,
)

# The classic dashboard JSON model's current schema version: Grafana 12.2 and later (13.x
# included) write 42, the last version of the v1 model; older files are migrated on load.
CURRENT_SCHEMA_VERSION = 42
# Changing a uid breaks every bookmark and link to the dashboard: these are fixed.
EXPECTED_UIDS = {
    "business.json": "qatoolbox-business",
    "host.json": "qatoolbox-host",
    "http.json": "qatoolbox-http",
    "overview.json": "qatoolbox-overview",
    "postgres.json": "qatoolbox-postgres",
    "redis.json": "qatoolbox-redis",
    "slo.json": "qatoolbox-slo",
}
# Panel types of the React era. Angular ones (graph, singlestat, table-old, the old
# piechart/worldmap plugins) no longer render in Grafana 11 and 12.
ALLOWED_PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap",
                       "text", "piechart", "state-timeline", "status-history", "barchart",
                       "histogram", "alertlist", "dashlist", "logs", "nodeGraph", "xychart"}
ANGULAR_PANEL_TYPES = {"graph", "singlestat", "table-old", "grafana-piechart-panel",
                       "grafana-worldmap-panel", "grafana-clock-panel", "natel-discrete-panel",
                       "grafana-polystat-panel", "flant-statusmap-panel", "heatmap-old"}

DASHBOARDS = load_dashboards()


def panels_of(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dash) if p.get("type") != "row"]


def test_seven_dashboards_with_fixed_uids() -> None:
    assert {name: d["uid"] for name, d in DASHBOARDS.items()} == EXPECTED_UIDS
    titles = [d["title"] for d in DASHBOARDS.values()]
    assert len(set(titles)) == len(titles)


def test_regenerating_changes_nothing() -> None:
    rendered = load_generator().render()
    assert set(rendered) == {p.name for p in DASHBOARD_DIR.glob("*.json")}
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is out of date: run python grafana/generate.py")
    # A second run renders byte for byte the same (no dict-order or id drift).
    assert load_generator().render() == rendered


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_header(name: str) -> None:
    dash = DASHBOARDS[name]
    assert dash["schemaVersion"] == CURRENT_SCHEMA_VERSION
    text = json.dumps(dash)
    assert "__inputs" not in dash and "__requires" not in dash
    assert "${DS_" not in text, "unresolved import placeholder"
    assert "id" not in dash or dash["id"] is None
    assert "qatoolbox" in dash["tags"]
    assert dash["description"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_variables(name: str) -> None:
    variables = {v["name"]: v for v in DASHBOARDS[name]["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    # A dashboard about one shared server (docs/scaling.md) selects one server and one
    # exporter reading it; the others select any hosts, all by default.
    service = name in ("postgres.json", "redis.json", "business.json")
    multi = ["cluster", "job"] + ([] if service else ["instance"])
    single = ["server", "instance"] if service else []
    for var in multi + single:
        v = variables[var]
        assert v["type"] == "query"
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert v["refresh"] == 2, "options must follow the time range"
        if var in multi:
            assert v["multi"] is True and v["includeAll"] is True
            # Targets without a cluster label (one host, no fleet) still match All.
            assert v["allValue"] == (".*" if var == "cluster" else ".+")
        else:
            assert v["multi"] is False and v["includeAll"] is False, var
    assert "$job" in variables["instance"]["definition"], "instance must follow job"
    assert "$cluster" in variables["job"]["definition"], "job must follow cluster"
    if service:
        assert "$server" in variables["instance"]["definition"], "exporters of the server"
    for v in variables.values():
        if v["type"] == "query":
            assert v["definition"] == v["query"]["query"]
            assert v["definition"].startswith("label_values(")


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_use_the_datasource_variable(name: str) -> None:
    for panel in panels_of(DASHBOARDS[name]):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_unit_description_and_targets(name: str) -> None:
    for panel in panels_of(DASHBOARDS[name]):
        title = panel["title"]
        assert panel["description"].strip(), f"{title}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"], f"{title}: no targets"
        refs = [t.get("refId") for t in panel["targets"]]
        assert all(refs) and len(set(refs)) == len(refs), f"{title}: refIds {refs}"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{title}: target without a query"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_no_angular_panels(name: str) -> None:
    for panel in iter_panels(DASHBOARDS[name]):
        assert panel["type"] not in ANGULAR_PANEL_TYPES, panel["title"]
        assert panel["type"] in ALLOWED_PANEL_TYPES, panel["title"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_grid_inside_24_columns_without_overlap(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    ids: set[int] = set()
    for panel in iter_panels(DASHBOARDS[name]):
        pos = panel["gridPos"]
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']} runs past column 24"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_range_selectors_and_counters() -> None:
    found = [f"{q.where}: {p}" for q in iter_queries(DASHBOARDS) for p in problems(q.expr)]
    assert not found, "\n".join(found)


def test_checker_catches_bad_queries() -> None:
    # The lint must be able to fail: typical community-dashboard mistakes.
    assert problems("rate(x_total[5m])")
    assert problems("sum(qatoolbox_http_requests_total)")
    assert problems("histogram_quantile(0.9, sum by (le) (x_bucket))")
    assert problems("predict_linear(x[1h], 3600)")
    assert not problems("sum by (le) (rate(x_bucket{a=~\"$b\"}[$__rate_interval]))")
    assert not problems("predict_linear(x[$trend_window], 3600)")
    assert metric_names('sum by (route, le) (rate(a_bucket{x="y"}[1m])) / b') == {"a_bucket",
                                                                                 "b"}
    assert analyse("time() - up")[0] == ["up"]
    assert ("string", '"a b"') in tokens('x{} == "a b"')


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_links_between_dashboards(name: str) -> None:
    dash = DASHBOARDS[name]
    links = [link for link in dash["links"] if link["type"] == "dashboards"]
    assert links and all("qatoolbox" in link["tags"] for link in links)
    assert all(link["keepTime"] and link["includeVars"] for link in links)
    uids = set(EXPECTED_UIDS.values())
    for panel in panels_of(dash):
        for link in panel.get("links", []):
            uid = link["url"].split("/d/")[1].split("?")[0]
            assert uid in uids, f"{panel['title']} links to unknown dashboard {uid}"
    if name == "overview.json":
        targets = {link["url"].split("/d/")[1].split("?")[0]
                   for p in panels_of(dash) for link in p.get("links", [])}
        assert len(targets) >= 3, "the overview should lead to the detailed dashboards"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_firing_alerts_are_annotations(name: str) -> None:
    annotations = DASHBOARDS[name]["annotations"]["list"]
    alerts = [a for a in annotations if "ALERTS" in a.get("expr", "")]
    assert alerts and alerts[0]["enable"] is True
    assert alerts[0]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert 'alertstate="firing"' in alerts[0]["expr"]


def test_overview_shows_alerts_by_severity() -> None:
    exprs = [t["expr"] for p in panels_of(DASHBOARDS["overview.json"]) for t in p["targets"]]
    for severity in ("critical", "warning", "info"):
        assert any("ALERTS" in e and f'severity="{severity}"' in e for e in exprs)


def recorded_names() -> set[str]:
    """Names the rules in prometheus/rules record (documented in docs/alerting.md)."""
    names: set[str] = set()
    for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml")):
        for group in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("groups", []):
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def alert_thresholds() -> dict[str, float]:
    """{alert: the number its expression compares a recording rule or metric with}."""
    found: dict[str, float] = {}
    for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml")):
        for group in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("groups", []):
            for rule in group["rules"]:
                match = re.search(r"[\w:]+(?:\{[^}]*\})?\)?\s*[<>]\s*(-?[\d.e]+)",
                                  rule.get("expr", ""))
                if "alert" in rule and match:
                    found[rule["alert"]] = float(match.group(1))
    return found


# Panels that show what an alert watches: (dashboard, panel title) -> (the recording rule or
# metric the alert reads, the alerts whose thresholds the panel must draw).
ALERTED_PANELS = {
    ("overview.json", "CPU utilisation"): (
        "instance:qatoolbox_host_cpu_utilisation:ratio",
        ("HostCpuUsageHigh", "HostCpuUsageCritical")),
    ("overview.json", "Memory utilisation"): (
        "instance:qatoolbox_host_memory_utilisation:ratio",
        ("HostMemoryUsageHigh", "HostMemoryUsageCritical")),
    ("overview.json", "Fullest file system"): (
        "instance_mountpoint:qatoolbox_host_filesystem_usage:ratio",
        ("HostDiskUsageHigh", "HostDiskUsageCritical")),
    ("host.json", "File system usage"): (
        "instance_mountpoint:qatoolbox_host_filesystem_usage:ratio",
        ("HostDiskUsageHigh", "HostDiskUsageCritical")),
    ("host.json", "Load per CPU"): ("instance:qatoolbox_host_load5_per_cpu:ratio",
                                    ("HostHighLoad",)),
    ("host.json", "Clock offset"): ("qatoolbox_host_timex_offset_seconds", ("HostClockSkew",)),
    ("overview.json", "5xx ratio"): ("instance:qatoolbox_http_requests_5xx:ratio_rate5m",
                                     ("HttpErrorRatioHigh",)),
    ("overview.json", "Latency p95 / p99"): (
        "instance:qatoolbox_http_request_duration_seconds:p95_rate5m", ("HttpLatencyP95High",)),
    ("postgres.json", "Connection slots used"): (
        "instance:qatoolbox_postgres_connections_used:ratio",
        ("PostgresTooManyConnections", "PostgresConnectionsExhausted")),
    ("postgres.json", "Transaction ID age"): ("qatoolbox_postgres_database_xid_age",
                                              ("PostgresXidWraparound",)),
    ("http.json", "Traffic z-score"): ("instance:qatoolbox_http_requests:rate5m_zscore",
                                       ("HttpTrafficAnomaly",)),
}


def test_panels_use_the_alerts_formulas_and_draw_their_thresholds() -> None:
    thresholds = alert_thresholds()
    panels = {(name, p["title"]): p for name, d in DASHBOARDS.items() for p in panels_of(d)}
    for (dash, title), (series, alerts) in ALERTED_PANELS.items():
        panel = panels[(dash, title)]
        exprs = [t["expr"] for t in panel["targets"]]
        assert any(series in metric_names(e) for e in exprs), (dash, title, exprs)
        steps = {step["value"] for step in
                 panel["fieldConfig"]["defaults"]["thresholds"]["steps"]}
        for alert in alerts:
            assert thresholds[alert] in steps, (dash, title, alert, thresholds[alert], steps)
        if panel["type"] == "timeseries":
            style = panel["fieldConfig"]["defaults"]["custom"].get("thresholdsStyle", {})
            assert style.get("mode") in {"line", "dashed", "line+area", "dashed+area"}, title


def test_one_cpu_formula() -> None:
    # The alerts count iowait as not busy; a panel computing "1 - idle" would disagree.
    for query in iter_queries(DASHBOARDS):
        assert not re.search(r'1\s*-\s*avg.*mode="idle"', query.expr), query.where


def test_slo_dashboard_reads_the_sloth_rules() -> None:
    used = {name for q in iter_queries({"slo.json": DASHBOARDS["slo.json"]})
            for name in metric_names(q.expr)}
    assert {"slo:period_error_budget_remaining:ratio", "slo:current_burn_rate:ratio",
            "slo:sli_error:ratio_rate5m", "slo:sli_error:ratio_rate1h",
            "slo:error_budget:ratio"} <= used
    http = {q.expr for q in iter_queries({"http.json": DASHBOARDS["http.json"]})}
    assert any("offset 1w" in e for e in http), "last week's traffic is drawn"
    assert any("rate5m_prediction" in e for e in http), "the anomaly baseline is drawn"


def test_every_metric_is_documented() -> None:
    documented = documented_metric_names() | recorded_names()
    used = {name for q in iter_queries(DASHBOARDS) for name in metric_names(q.expr)}
    histogram_parts = ("_bucket", "_count", "_sum")
    missing = set()
    for name in used - PROMETHEUS_SERIES:
        base = name
        for suffix in histogram_parts:
            if name.endswith(suffix) and name not in documented:
                base = name[: -len(suffix)]
        if base not in documented:
            missing.add(name)
    assert not missing, f"used by a dashboard but not documented: {sorted(missing)}"


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = config["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus"
    assert ds["isDefault"] is True and ds["editable"] is False
    # The dashboards' default data source is this uid.
    for dash in DASHBOARDS.values():
        var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
        assert var["current"]["value"] == ds["uid"]
    # $__rate_interval is at least four scrape intervals only when Grafana knows the interval.
    interval = ds["jsonData"]["timeInterval"]
    prom = ROOT / "prometheus" / "prometheus.yml"
    expected = "15s"
    if prom.exists():
        expected = yaml.safe_load(prom.read_text())["global"]["scrape_interval"]
    assert interval == expected


def test_dashboard_provider() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/provider.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    assert provider["allowUiUpdates"] is False


def test_alert_rules_link_to_existing_dashboards() -> None:
    # Alert notifications link to GRAFANA/d/<dashboard annotation>?var-instance=...
    uids = set(EXPECTED_UIDS.values())
    linked = set()
    for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml")):
        for group in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("groups", []):
            for rule in group.get("rules", []):
                uid = rule.get("annotations", {}).get("dashboard")
                if uid:
                    assert uid in uids, f"{path.name}: {rule.get('alert')} links to {uid}"
                    linked.add(uid)
    variables = {v["name"] for d in DASHBOARDS.values() for v in d["templating"]["list"]}
    assert "instance" in variables


# --- fleets (docs/scaling.md) -------------------------------------------------------------------

SERVICE_FAMILIES = ("qatoolbox_postgres_", "qatoolbox_redis_", "qatoolbox_celery_queue_",
                    "qatoolbox_celery_unacked_", "qatoolbox_users", "qatoolbox_chat_",
                    "qatoolbox_time_capsules", "qatoolbox_business_")


def test_host_dashboard_names_every_line_with_its_host() -> None:
    """With All hosts selected (the default), a line without its host is ambiguous and a sum
    over hosts mixes machines."""
    problems = []
    for panel in panels_of(DASHBOARDS["host.json"]):
        for target in panel["targets"]:
            where = f"{panel['title']} / {target['refId']}"
            if panel["type"] != "table" and "{{instance}}" not in target["legendFormat"]:
                problems.append(f"{where}: legend {target['legendFormat']!r} lacks the host")
            for by in re.findall(r"\b(?:sum|avg|count|min|max|topk)\s+by\s*\(([^)]*)\)",
                                 target["expr"]):
                if "instance" not in by:
                    problems.append(f"{where}: aggregates over hosts (by ({by}))")
    assert not problems, "\n".join(problems)


def test_overview_counts_each_shared_service_once() -> None:
    """N exporters reading one database must not show it N times nor multiply its figures."""
    problems = []
    for panel in panels_of(DASHBOARDS["overview.json"]):
        for target in panel["targets"]:
            names = [n for n in metric_names(target["expr"]) if n.startswith(SERVICE_FAMILIES)]
            if names and "max by (cluster, server" not in target["expr"]:
                problems.append(f"{panel['title']} / {target['refId']}: {names} not once per "
                                f"server")
    assert not problems, "\n".join(problems)
    titles = {p["title"] for p in panels_of(DASHBOARDS["overview.json"])}
    assert "Hosts" in titles


def test_dashboards_select_a_cluster() -> None:
    for name, dash in DASHBOARDS.items():
        names = [v["name"] for v in dash["templating"]["list"]]
        assert names[:3] == ["datasource", "cluster", "job"], (name, names)
        for panel in panels_of(dash):
            for target in panel["targets"]:
                for selector in re.findall(r"qatoolbox_[\w:]*\{([^}]*)\}", target["expr"]):
                    assert 'cluster=~"$cluster"' in selector, (name, panel["title"], selector)
