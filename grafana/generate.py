"""Build the Grafana dashboards in grafana/dashboards/ (the one source of truth for them)."""

# Plain Python on purpose: the dashboards are data, a builder library would add a dependency
# whose Grafana schema lags the Grafana we pin. Run `python grafana/generate.py` after an edit
# and commit the JSON; `--check` exits 1 when the committed JSON differs from this file.

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
# The classic dashboard model's last schema version (Grafana 12.2 and later write 42).
SCHEMA_VERSION = 42
TAG = "qatoolbox"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'cluster=~"$cluster",job=~"$job",instance=~"$instance"'
# Shared services on the Overview: every exporter of the cluster, whatever host is selected.
SVC = 'cluster=~"$cluster",job=~"$job"'
# On a fleet, several exporters may read one PostgreSQL or Redis (docs/scaling.md); their
# samples differ only by instance. ONCE keeps one reading per server before any sum.
ONCE = "cluster, server"
RI = "$__rate_interval"
IDLE = 'mode="idle"'
DAY = 'window="24h"'

Json = dict[str, Any]

UP_MAPPING = [{
    "type": "value",
    "options": {
        "0": {"text": "DOWN", "color": "red", "index": 0},
        "1": {"text": "UP", "color": "green", "index": 1},
    },
}]


def rate(metric: str, labels: str = "", func: str = "rate") -> str:
    """rate(metric{SEL,labels}[$__rate_interval])."""
    inner = f"{SEL},{labels}" if labels else SEL
    return f"{func}({metric}{{{inner}}}[{RI}])"


def sel(metric: str, labels: str = "") -> str:
    """metric{SEL,labels}."""
    inner = f"{SEL},{labels}" if labels else SEL
    return f"{metric}{{{inner}}}"


def ratio(part: str, whole: str, by: str = "") -> str:
    """Share of part in whole, 0 (not empty) where part has no series but whole has."""
    grp = f" by ({by})" if by else ""
    return (f"(sum{grp} ({part}) or sum{grp} ({whole}) * 0)\n/\nsum{grp} ({whole})")


def hit_ratio(hits: str, misses: str, by: str = "instance") -> str:
    """hits / (hits + misses) from two counters."""
    return (f"sum by ({by}) ({rate(hits)})\n/\n"
            f"(sum by ({by}) ({rate(hits)}) + sum by ({by}) ({rate(misses)}))")


def quantile(q: float, histogram: str, by: str = "", labels: str = "") -> str:
    """histogram_quantile over the rate of a histogram's buckets."""
    grp = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({grp}) ({rate(histogram + '_bucket', labels)}))"


def mean(histogram: str, by: str, labels: str = "") -> str:
    """Mean observation of a histogram over the rate window."""
    return (f"sum by ({by}) ({rate(histogram + '_sum', labels)})\n/\n"
            f"sum by ({by}) ({rate(histogram + '_count', labels)})")


def once(expr: str, by: str = "") -> str:
    """One series per (cluster, server[, by]) of a service family, however many exporters
    read that server: max, since their readings agree but for scrape timing."""
    return f"max by ({ONCE}{', ' + by if by else ''}) ({expr})"


def with_query_text(counter: str) -> str:
    """Per-statement rate of counter, labelled with the statement text from statement_info."""
    return (f"sum by (instance, queryid) ({rate(counter)})\n"
            f"* on (instance, queryid) group_left (query)\n"
            f"max by (instance, queryid, query) ({sel('qatoolbox_postgres_statement_info')})")


@dataclass
class Target:
    """One query of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False
    fmt: str = "time_series"

    def to_json(self, ref: str) -> Json:
        """The target's JSON with refId ref."""
        return {
            "datasource": DS,
            "editorMode": "code",
            "expr": self.expr,
            "format": self.fmt,
            "instant": self.instant,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "refId": ref,
        }


def targets(items: Sequence[Target | tuple[str, str] | str], instant: bool = False,
            fmt: str = "time_series") -> list[Target]:
    """Targets from (expr, legend) pairs or bare expressions."""
    out = []
    for item in items:
        if isinstance(item, Target):
            out.append(item)
        elif isinstance(item, tuple):
            out.append(Target(item[0], item[1], instant, fmt))
        else:
            out.append(Target(item, "", instant, fmt))
    return out


@dataclass
class Panel:
    """A panel before placement."""

    type: str
    title: str
    description: str
    unit: str
    queries: list[Target]
    w: int = 8
    h: int = 8
    options: Json = field(default_factory=dict)
    defaults: Json = field(default_factory=dict)
    overrides: list[Json] = field(default_factory=list)
    transformations: list[Json] = field(default_factory=list)
    links: list[Json] = field(default_factory=list)

    def to_json(self, pid: int, x: int, y: int) -> Json:
        """The panel's JSON at grid position x, y with id pid."""
        defaults: Json = {"unit": self.unit, **self.defaults}
        if self.type == "timeseries":
            defaults.setdefault("custom", {"fillOpacity": 10, "lineWidth": 1,
                                           "showPoints": "never", "spanNulls": False})
        defaults.setdefault("color", {"mode": "palette-classic"})
        panel: Json = {
            "datasource": DS,
            "description": self.description,
            "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
            "gridPos": {"h": self.h, "w": self.w, "x": x, "y": y},
            "id": pid,
            "options": self.options,
            "targets": [t.to_json(chr(ord("A") + i)) for i, t in enumerate(self.queries)],
            "title": self.title,
            "type": self.type,
        }
        if self.transformations:
            panel["transformations"] = self.transformations
        if self.links:
            panel["links"] = self.links
        return panel


def _thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute",
            "steps": [{"color": color, "value": value} for value, color in steps]}


GREEN = _thresholds((None, "green"))


def timeseries(title: str, description: str, unit: str,
               queries: Sequence[Target | tuple[str, str] | str], *, w: int = 8,
               h: int = 8, stack: bool = False, min_: float | None = None,
               max_: float | None = None,
               overrides: list[Json] | None = None, legend_right: bool = False,
               alert_lines: Sequence[float] = (), no_value: str = "") -> Panel:
    """A time series panel; alert_lines are the thresholds of the alerts on what it shows
    (warning, then critical), drawn as dashed lines; no_value is shown instead of "No data"."""
    custom: Json = {"fillOpacity": 30 if stack else 10, "lineWidth": 1, "showPoints": "never",
                    "spanNulls": False,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    defaults: Json = {"custom": custom, "thresholds": GREEN}
    if alert_lines:
        colors = ("orange", "red") if len(alert_lines) == 2 else ("red",) * len(alert_lines)
        defaults["thresholds"] = _thresholds((None, "transparent"),
                                             *zip(alert_lines, colors, strict=True))
        custom["thresholdsStyle"] = {"mode": "dashed"}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if no_value:
        defaults["noValue"] = no_value
    legend: Json = {"displayMode": "list", "placement": "bottom", "showLegend": True,
                    "calcs": []}
    if legend_right:
        legend = {"displayMode": "table", "placement": "right", "showLegend": True,
                  "calcs": ["lastNotNull", "max"]}
    options = {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    return Panel("timeseries", title, description, unit, targets(queries), w, h, options,
                 defaults, overrides or [])


def stat(title: str, description: str, unit: str,
         queries: Sequence[Target | tuple[str, str] | str], *, w: int = 4,
         h: int = 4, mappings: list[Json] | None = None, thresholds: Json | None = None,
         text_mode: str = "auto", graph: bool = True, links: list[Json] | None = None,
         no_value: str = "") -> Panel:
    """A stat panel showing the last value (no_value instead of "No data")."""
    options = {
        "colorMode": "value", "graphMode": "area" if graph else "none", "justifyMode": "auto",
        "orientation": "auto", "textMode": text_mode, "wideLayout": True,
        "showPercentChange": False,
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    defaults: Json = {"thresholds": thresholds or GREEN, "mappings": mappings or []}
    if no_value:
        defaults["noValue"] = no_value
    return Panel("stat", title, description, unit, targets(queries), w, h, options, defaults,
                 links=links or [])


def gauge(title: str, description: str, unit: str, queries: Sequence[Target | tuple[str, str]],
          *, w: int = 4, h: int = 6, max_: float = 1, thresholds: Json | None = None) -> Panel:
    """A gauge panel."""
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "showThresholdLabels": False, "showThresholdMarkers": True,
               "orientation": "auto"}
    defaults: Json = {"min": 0, "max": max_,
                      "thresholds": thresholds or _thresholds((None, "green"), (0.8, "orange"),
                                                              (0.9, "red"))}
    return Panel("gauge", title, description, unit, targets(queries), w, h, options, defaults)


def bargauge(title: str, description: str, unit: str,
             queries: Sequence[Target | tuple[str, str]], *, w: int = 8,
             h: int = 8, max_: float | None = None, thresholds: Json | None = None) -> Panel:
    """A horizontal bar gauge, one bar per series."""
    options = {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
               "valueMode": "color", "namePlacement": "auto", "sizing": "auto",
               "minVizHeight": 16, "minVizWidth": 8, "maxVizHeight": 300,
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    defaults: Json = {"min": 0, "thresholds": thresholds or GREEN}
    if max_ is not None:
        defaults["max"] = max_
    return Panel("bargauge", title, description, unit, targets(queries), w, h, options,
                 defaults)


def table(title: str, description: str, unit: str, queries: Sequence[tuple[str, str]],
          *, w: int = 24, h: int = 8, columns: dict[str, str] | None = None,
          units: dict[str, str] | None = None, sort_by: str = "") -> Panel:
    """A table of instant queries merged on their labels; columns renames 'Value #A'."""
    qs = targets(queries, instant=True, fmt="table")
    rename = {f"Value #{ref}": name for ref, name in (columns or {}).items()}
    transformations: list[Json] = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True, "job": True},
                                       "renameByName": rename}},
    ]
    overrides = [{"matcher": {"id": "byName", "options": name},
                  "properties": [{"id": "unit", "value": u}]}
                 for name, u in (units or {}).items()]
    options: Json = {"showHeader": True, "cellHeight": "sm",
                     "footer": {"show": False, "reducer": ["sum"], "fields": ""}}
    if sort_by:
        options["sortBy"] = [{"displayName": sort_by, "desc": True}]
    defaults: Json = {"thresholds": GREEN, "custom": {"align": "auto", "cellOptions":
                                                      {"type": "auto"}}}
    return Panel("table", title, description, unit, qs, w, h, options, defaults, overrides,
                 transformations)


def heatmap(title: str, description: str, unit: str, expr: str, *, w: int = 12,
            h: int = 8) -> Panel:
    """A heatmap of a histogram's bucket rates (no client-side bucketing)."""
    options = {
        "calculate": False,
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5,
                  "fill": "dark-orange", "reverse": False},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
        "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
    }
    return Panel("heatmap", title, description, unit,
                 [Target(expr, "{{le}}", False, "heatmap")], w, h, options,
                 {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                             "scaleDistribution": {"type": "linear"}}})


@dataclass
class Row:
    """A (never collapsed) row header."""

    title: str


@dataclass
class Dashboard:
    """One dashboard: uid, title, extra variables and the panels in reading order."""

    uid: str
    title: str
    description: str
    items: list[Panel | Row]
    variables: list[Json] = field(default_factory=list)
    filename: str = ""

    def to_json(self) -> Json:
        """The dashboard JSON, panels laid out left to right in rows of 24 columns."""
        panels: list[Json] = []
        x = y = row_h = 0
        pid = 1
        for item in self.items:
            if isinstance(item, Row):
                y += row_h
                x = row_h = 0
                panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                               "id": pid, "panels": [], "title": item.title, "type": "row"})
                y += 1
            else:
                if x + item.w > 24:
                    y += row_h
                    x = row_h = 0
                panels.append(item.to_json(pid, x, y))
                x += item.w
                row_h = max(row_h, item.h)
            pid += 1
        return {
            "annotations": {"list": [
                {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                 "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                 "name": "Annotations & Alerts", "type": "dashboard"},
                {"datasource": DS, "enable": True, "hide": False, "iconColor": "red",
                 "name": "Firing alerts",
                 "expr": 'ALERTS{alertstate="firing",instance=~"$instance|"}',
                 "step": "30s", "titleFormat": "{{alertname}} ({{severity}})",
                 "textFormat": "{{instance}}", "tagKeys": "severity",
                 "useValueForTime": False},
            ]},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "links": [
                {"asDropdown": False, "icon": "external link", "includeVars": True,
                 "keepTime": True, "tags": [TAG], "targetBlank": False,
                 "title": "QAToolBox", "tooltip": "", "type": "dashboards", "url": ""},
            ],
            "panels": panels,
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "tags": [TAG],
            "templating": {"list": [*common_variables(SERVICE_DASHBOARDS.get(self.uid)),
                                    *self.variables]},
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


def query_variable(name: str, label: str, query: str, multi: bool = True,
                   all_value: str = ".+") -> Json:
    """A Prometheus label_values variable: multi-select with All (All matches all_value), or
    with multi False a single choice without All (Grafana selects the first value)."""
    return {
        **({"allValue": all_value} if multi else {}),
        "current": ({"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {}),
        "datasource": DS,
        "definition": query,
        "hide": 0,
        "includeAll": multi,
        "label": label,
        "multi": multi,
        "name": name,
        "options": [],
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


# Dashboards about one shared server, by uid: the family whose `server` label lists them.
SERVICE_DASHBOARDS = {
    "qatoolbox-postgres": "qatoolbox_postgres_up",
    "qatoolbox-redis": "qatoolbox_redis_up",
    "qatoolbox-business": "qatoolbox_business_up",
}


def common_variables(service_family: str | None = None) -> list[Json]:
    """datasource, cluster, job and instance on every dashboard. Host dashboards select any
    hosts (instance, All by default: every line names its host). A dashboard about a shared
    server selects one server and one exporter reading it (instance, single): N exporters
    reading one database show it once, not N times."""
    cluster_job = 'cluster=~"$cluster",job=~"$job"'
    variables = [
        {"current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
         "hide": 0, "includeAll": False, "label": "Data source", "multi": False,
         "name": "datasource", "options": [], "query": "prometheus", "refresh": 1,
         "regex": "", "skipUrlSync": False, "type": "datasource"},
        # ".*": targets without a cluster label (a single host) still match All.
        query_variable("cluster", "Cluster",
                       "label_values(qatoolbox_exporter_build_info, cluster)", all_value=".*"),
        query_variable("job", "Job",
                       'label_values(qatoolbox_exporter_build_info{cluster=~"$cluster"}, job)'),
    ]
    if service_family is None:
        variables.append(query_variable(
            "instance", "Instance",
            f"label_values(qatoolbox_exporter_build_info{{{cluster_job}}}, instance)"))
    else:
        variables += [
            query_variable("server", "Server",
                           f"label_values({service_family}{{{cluster_job}}}, server)",
                           multi=False),
            query_variable("instance", "Exporter",
                           f'label_values({service_family}{{{cluster_job},server=~"$server"}}, '
                           f'instance)', multi=False),
        ]
    return variables


def interval_variable(name: str, label: str, options: Sequence[str], default: str) -> Json:
    """A fixed choice of window lengths (used only where $__rate_interval would be too short)."""
    return {
        "auto": False, "auto_count": 30, "auto_min": "10s",
        "current": {"selected": True, "text": default, "value": default},
        "hide": 0, "label": label, "name": name,
        "options": [{"selected": o == default, "text": o, "value": o} for o in options],
        "query": ",".join(options), "refresh": 2, "skipUrlSync": False, "type": "interval",
    }


def link(uid: str, title: str) -> Json:
    """A panel link to another dashboard, keeping time range and variables."""
    return {"targetBlank": False, "title": title,
            "url": f"/d/{uid}?${{__url_time_range}}&${{datasource:queryparam}}"
                   f"&${{cluster:queryparam}}&${{job:queryparam}}"
                   + ("" if uid in SERVICE_DASHBOARDS else "&${instance:queryparam}")}


# --- the dashboards ---------------------------------------------------------------------------


def overview() -> Dashboard:
    """The design's monitoring dashboard: one screen for administrators, fleet-wide."""
    alerts = [(f'count(ALERTS{{alertstate="firing",severity="{s}"}}) or vector(0)', s)
              for s in ("critical", "warning", "info")]
    hosts = 'qatoolbox_host_boot_time_seconds'

    def per_host(expr: str) -> str:
        return f"max by (cluster, instance) ({expr})"

    def fleet(metric: str, labels: str = "", by: str = "") -> str:
        """A business figure once per database, summed per cluster."""
        inner = f"{SVC},{labels}" if labels else SVC
        return f"sum by (cluster) ({once(f'{metric}{{{inner}}}', by)})"

    def pg_blocks(kind: str) -> str:
        counter = f"rate(qatoolbox_postgres_blocks_{kind}_total{{{SVC}}}[{RI}])"
        return f"sum by ({ONCE}) ({once(counter, 'datname')})"

    pg_hits, pg_reads = pg_blocks("hit"), pg_blocks("read")
    rd_hits = once(f"rate(qatoolbox_redis_keyspace_hits_total{{{SVC}}}[{RI}])")
    rd_misses = once(f"rate(qatoolbox_redis_keyspace_misses_total{{{SVC}}}[{RI}])")
    return Dashboard("qatoolbox-overview", "QAToolBox / Overview",
                     "The fleet at a glance: alerts, every host with its state, each shared "
                     "database and cache once, requests and business figures.", [
        Row("Health and alerts"),
        stat("Exporters up", "Exporter targets Prometheus scrapes successfully, of all "
             "targets (the `up` series).", "short",
             [(f"count({sel('up')} == 1) or vector(0)", "up"),
              (f"count({sel('up')})", "targets")], graph=False,
             thresholds=_thresholds((None, "green"))),
        stat("PostgreSQL", "1 when an exporter's last query of the server succeeded; each "
             "server once, however many exporters read it.", "none",
             [(once(f"qatoolbox_postgres_up{{{SVC}}}"), "{{server}}")], mappings=UP_MAPPING,
             graph=False, thresholds=_thresholds((None, "red"), (1, "green")),
             links=[link("qatoolbox-postgres", "PostgreSQL dashboard")]),
        stat("Redis", "1 when an exporter's last command to the server succeeded; each "
             "server once.", "none",
             [(once(f"qatoolbox_redis_up{{{SVC}}}"), "{{server}}")], mappings=UP_MAPPING,
             graph=False, thresholds=_thresholds((None, "red"), (1, "green")),
             links=[link("qatoolbox-redis", "Redis dashboard")]),
        stat("Failing collectors", "Collectors whose last run failed or timed out, on every "
             "exporter.", "short",
             [(f"count({sel('qatoolbox_exporter_collector_success')} == 0) or vector(0)",
               "failing")], graph=False,
             thresholds=_thresholds((None, "green"), (1, "red"))),
        stat("Firing alerts", "Alerts firing now, by severity (from ALERTS).", "short", alerts,
             w=8, graph=False, thresholds=_thresholds((None, "green"), (1, "orange"))),
        table("Hosts", "Every host (exporter with the host collector) seen in the time range, "
              "with its state now: exporter up, CPU and memory utilisation, fullest file "
              "system, load per CPU and uptime. A host whose exporter is down stays listed "
              "with up 0.", "percentunit",
              [(per_host(f"{sel('up')} and on (job, instance) "
                         f"present_over_time({sel(hosts)}[$__range])"), ""),
               (per_host(sel("instance:qatoolbox_host_cpu_utilisation:ratio")), ""),
               (per_host(sel("instance:qatoolbox_host_memory_utilisation:ratio")), ""),
               (per_host(sel("instance_mountpoint:qatoolbox_host_filesystem_usage:ratio")), ""),
               (per_host(sel("instance:qatoolbox_host_load5_per_cpu:ratio")), ""),
               (per_host(f"time() - {sel(hosts)}"), "")],
              h=8, columns={"A": "up", "B": "CPU", "C": "memory", "D": "fullest file system",
                            "E": "load per CPU", "F": "uptime"},
              units={"up": "bool", "load per CPU": "short", "uptime": "s"}, sort_by="CPU"),
        table("Firing alerts", "Every alert firing now with its labels.", "none",
              [('ALERTS{alertstate="firing"}', "")], h=6),
        Row("Host"),
        timeseries("CPU utilisation", "Share of CPU time busy (neither idle nor iowait), "
                   "averaged over CPUs: the recording rule HostCpuUsage* alert on, with their "
                   "80% and 95% lines.", "percentunit",
                   [(sel("instance:qatoolbox_host_cpu_utilisation:ratio"), "{{instance}}")],
                   min_=0, max_=1, alert_lines=(0.80, 0.95)),
        timeseries("Memory utilisation", "Share of memory not available for new work "
                   "(HostMemoryUsage* lines at 85% and 95%).", "percentunit",
                   [(sel("instance:qatoolbox_host_memory_utilisation:ratio"), "{{instance}}")],
                   min_=0, max_=1, alert_lines=(0.85, 0.95)),
        timeseries("Fullest file system", "Used share of the fullest file system per host "
                   "(HostDiskUsage* lines at 90% and 95%).", "percentunit",
                   [(f"max by (instance) "
                     f"({sel('instance_mountpoint:qatoolbox_host_filesystem_usage:ratio')})",
                     "{{instance}}")], min_=0, max_=1, alert_lines=(0.90, 0.95)),
        Row("Database and cache"),
        timeseries("PostgreSQL connections", "Client connections against max_connections, "
                   "per server.", "short",
                   [(f"sum by ({ONCE}) "
                     f"({once(f'qatoolbox_postgres_connections{{{SVC}}}', 'datname, state')})",
                     "{{server}} connections"),
                    (once(f"qatoolbox_postgres_max_connections{{{SVC}}}"),
                     "{{server}} max_connections")], w=6),
        timeseries("Slow queries and lock waits",
                   "Active queries older than the slow threshold, and backends waiting on a "
                   "lock, per server.", "short",
                   [(f"sum by ({ONCE}) "
                     f"({once(f'qatoolbox_postgres_slow_queries{{{SVC}}}', 'datname')})",
                     "{{server}} slow queries"),
                    (f"sum by ({ONCE}) "
                     f"({once(f'qatoolbox_postgres_lock_waits{{{SVC}}}', 'datname')})",
                     "{{server}} lock waits")], w=6),
        timeseries("PostgreSQL cache hit ratio",
                   "Share of block reads served from shared buffers, per server.",
                   "percentunit", [(f"{pg_hits}\n/\n({pg_hits} + {pg_reads})", "{{server}}")],
                   w=6, max_=1),
        timeseries("Redis hit ratio", "Share of key lookups that found the key, per server.",
                   "percentunit", [(f"{rd_hits}\n/\n({rd_hits} + {rd_misses})", "{{server}}")],
                   w=6, max_=1),
        timeseries("Redis memory", "Memory Redis uses for data, and its limit when set.",
                   "bytes",
                   [(once(f"qatoolbox_redis_memory_used_bytes{{{SVC}}}"), "{{server}} used"),
                    (f"{once(f'qatoolbox_redis_memory_max_bytes{{{SVC}}}')} > 0",
                     "{{server}} maxmemory")], w=6),
        timeseries("Redis clients", "Connected and blocked clients.", "short",
                   [(once(f"qatoolbox_redis_connected_clients{{{SVC}}}"), "{{server}} connected"),
                    (once(f"qatoolbox_redis_blocked_clients{{{SVC}}}"), "{{server}} blocked")],
                   w=6),
        timeseries("Celery backlog", "Messages waiting in each Celery queue of each broker.",
                   "short",
                   [(once(f"qatoolbox_celery_queue_length{{{SVC}}}", "queue"),
                     "{{server}} {{queue}}")], w=12),
        Row("Application"),
        timeseries("Request rate", "HTTP requests per second by status class, all hosts "
                   "together.", "reqps",
                   [(f"sum by (status) ({rate('qatoolbox_http_requests_total')})",
                     "{{status}}")], w=8, stack=True),
        timeseries("5xx ratio", "Share of requests answered with a server error over 5 "
                   "minutes, per instance (HttpErrorRatioHigh at 5%).", "percentunit",
                   [(sel("instance:qatoolbox_http_requests_5xx:ratio_rate5m"), "{{instance}}")],
                   w=8, min_=0, alert_lines=(0.05,)),
        timeseries("Latency p95 / p99", "Request duration percentiles over all routes, over 5 "
                   "minutes (HttpLatencyP95High at 2 s).", "s",
                   [(sel("instance:qatoolbox_http_request_duration_seconds:p95_rate5m"),
                     "{{instance}} p95"),
                    (sel("instance:qatoolbox_http_request_duration_seconds:p99_rate5m"),
                     "{{instance}} p99")], w=8, alert_lines=(2.0,)),
        Row("Business"),
        stat("Registered users", "Accounts in auth_user (active and inactive), each database "
             "once, per cluster.", "short", [(fleet("qatoolbox_users", by="state"), "{{cluster}}")],
             links=[link("qatoolbox-business", "Business dashboard")]),
        stat("Active users (24 h)", "Users who logged in within the last 24 hours.", "short",
             [(fleet("qatoolbox_users_active", DAY, "window"), "{{cluster}}")]),
        stat("Online users", ONLINE_HELP, "short",
             [(fleet("qatoolbox_users_online"), "{{cluster}}")]),
        stat("Messages per minute", "Chat messages sent per minute.", "short",
             [(f"sum by (cluster) "
               f"({once(f'rate(qatoolbox_chat_messages_total{{{SVC}}}[{RI}])', 'message_type')})"
               f" * 60", "{{cluster}}")]),
        stat("Chat rooms past cleanup", CLEANUP_HELP, "short",
             [(fleet("qatoolbox_chat_rooms_cleanup_overdue"), "{{cluster}}")],
             thresholds=_thresholds((None, "green"), (1, "orange"))),
        stat("Overdue time capsules",
             "Capsules past their unlock time by over an hour, still locked (unlock stalled). "
             "Only where the time capsule table exists (QAToolBox before its tools migration "
             "0070).", "short", [(fleet("qatoolbox_time_capsules_overdue"), "{{cluster}}")],
             thresholds=_thresholds((None, "green"), (1, "orange")), no_value=NO_CAPSULES),
    ])


def host() -> Dashboard:
    """Machine resources and process groups."""
    fs = 'fstype!=""'
    i = "{{instance}} "  # All hosts by default: every line names its host
    return Dashboard("qatoolbox-host", "QAToolBox / Host",
                     "CPU, load, memory, file systems, disks, network and process groups.", [
        Row("CPU and load"),
        timeseries("CPU by mode", "Share of CPU time in each mode, averaged over CPUs.",
                   "percentunit",
                   [(f"avg by (instance, mode) ({rate('qatoolbox_host_cpu_seconds_total')})",
                     i + "{{mode}}")], w=12, stack=True, max_=1),
        timeseries("Load", "Load averages against the number of CPUs.", "short",
                   [(sel("qatoolbox_host_load1"), i + "load1"),
                    (sel("qatoolbox_host_load5"), i + "load5"),
                    (sel("qatoolbox_host_load15"), i + "load15"),
                    (f"count by (instance) ({rate('qatoolbox_host_cpu_seconds_total', IDLE)})",
                     i + "CPUs")], w=12),
        timeseries("Pressure", "Share of time some task waited for CPU, memory or I/O "
                   "(PSI, where the kernel has it).", "percentunit",
                   [(rate("qatoolbox_host_pressure_cpu_waiting_seconds_total"), i + "cpu"),
                    (rate("qatoolbox_host_pressure_memory_waiting_seconds_total"), i + "memory"),
                    (rate("qatoolbox_host_pressure_io_waiting_seconds_total"), i + "io")], w=12),
        timeseries("Load per CPU", "5-minute load average per CPU (HostHighLoad at 2).", "short",
                   [(sel("instance:qatoolbox_host_load5_per_cpu:ratio"), "{{instance}}")],
                   w=12, alert_lines=(2.0,)),
        timeseries("Clock offset", "Offset of the clock from its reference as the kernel "
                   "knows it (adjtimex); HostClockSkew at +-50 ms.", "s",
                   [(sel("qatoolbox_host_timex_offset_seconds"), "{{instance}}")], w=12,
                   alert_lines=(-0.05, 0.05)),
        stat("Uptime", "Time since the host booted.", "s",
             [(f"time() - {sel('qatoolbox_host_boot_time_seconds')}", "{{instance}}")],
             w=6, h=8, graph=False),
        stat("Clock synchronised", "1 while the kernel considers the clock synchronised.",
             "none", [(sel("qatoolbox_host_timex_sync_status"), "{{instance}}")], w=6, h=8,
             graph=False, thresholds=_thresholds((None, "red"), (1, "green")),
             mappings=[{"type": "value", "options": {
                 "0": {"text": "not synced", "color": "red", "index": 0},
                 "1": {"text": "synced", "color": "green", "index": 1}}}]),
        Row("Memory"),
        timeseries("Memory", "Used (total minus available), cached, buffers and free memory.",
                   "bytes",
                   [(f"{sel('qatoolbox_host_memory_total_bytes')} - "
                     f"{sel('qatoolbox_host_memory_available_bytes')}", i + "used"),
                    (sel("qatoolbox_host_memory_cached_bytes"), i + "cached"),
                    (sel("qatoolbox_host_memory_buffers_bytes"), i + "buffers"),
                    (sel("qatoolbox_host_memory_free_bytes"), i + "free"),
                    (sel("qatoolbox_host_memory_total_bytes"), i + "total")], w=12),
        timeseries("Swap", "Swap in use and swap size.", "bytes",
                   [(f"{sel('qatoolbox_host_swap_total_bytes')} - "
                     f"{sel('qatoolbox_host_swap_free_bytes')}", i + "used"),
                    (sel("qatoolbox_host_swap_total_bytes"), i + "total")], w=12),
        Row("File systems"),
        bargauge("File system usage", "Used share of each file system, coloured at the "
                 "HostDiskUsage* lines (90% warning, 95% critical).", "percentunit",
                 [(sel("instance_mountpoint:qatoolbox_host_filesystem_usage:ratio", fs),
                   i + "{{mountpoint}}")],
                 w=8, max_=1, thresholds=_thresholds((None, "green"), (0.90, "orange"),
                                                     (0.95, "red"))),
        timeseries("Free space predicted in 24 h",
                   "Linear prediction of available bytes 24 h ahead from the trend window; "
                   "below zero means the file system fills within a day.", "bytes",
                   [(f"predict_linear({sel('qatoolbox_host_filesystem_avail_bytes', fs)}"
                     f"[$trend_window], 86400)", i + "{{mountpoint}}")], w=8),
        table("File systems", "Size, free space and inodes per file system.", "bytes",
              [(sel("qatoolbox_host_filesystem_size_bytes", fs), ""),
               (sel("qatoolbox_host_filesystem_avail_bytes", fs), ""),
               (f"1 - {sel('qatoolbox_host_filesystem_files_free', fs)}\n/\n"
                f"{sel('qatoolbox_host_filesystem_files', fs)}", ""),
               (sel("qatoolbox_host_filesystem_readonly", fs), "")],
              w=8, columns={"A": "size", "B": "available", "C": "inodes used", "D": "read-only"},
              units={"inodes used": "percentunit", "read-only": "bool"}),
        Row("Disks and network"),
        timeseries("Disk throughput", "Bytes read (negative) and written per second by disk.",
                   "Bps",
                   [(f"-{rate('qatoolbox_host_disk_read_bytes_total')}", i + "{{device}} read"),
                    (rate("qatoolbox_host_disk_written_bytes_total"), i + "{{device}} written")],
                   w=8),
        timeseries("Disk utilisation", "Share of time each disk was busy with I/O.",
                   "percentunit",
                   [(rate("qatoolbox_host_disk_io_time_seconds_total"), i + "{{device}}")], w=8),
        timeseries("Disk IOPS", "Reads and writes completed per second.", "iops",
                   [(rate("qatoolbox_host_disk_reads_completed_total"), i + "{{device}} reads"),
                    (rate("qatoolbox_host_disk_writes_completed_total"), i + "{{device}} writes")],
                   w=8),
        timeseries("Network throughput",
                   "Bytes received (negative) and transmitted per second by interface.", "Bps",
                   [(f"-{rate('qatoolbox_host_network_receive_bytes_total')}",
                     i + "{{device}} in"),
                    (rate("qatoolbox_host_network_transmit_bytes_total"), i + "{{device}} out")],
                   w=12),
        timeseries("Network errors and drops", "Errors and dropped packets per second.", "pps",
                   [(f"sum by (instance, device) "
                     f"({rate('qatoolbox_host_network_receive_errors_total')}"
                     f" + {rate('qatoolbox_host_network_transmit_errors_total')})",
                     i + "{{device}} errors"),
                    (f"sum by (instance, device) "
                     f"({rate('qatoolbox_host_network_receive_drop_total')}"
                     f" + {rate('qatoolbox_host_network_transmit_drop_total')})",
                     i + "{{device}} drops")], w=12),
        Row("Process groups"),
        timeseries("Processes", "Processes per group; 0 means the group is down.", "short",
                   [(sel("qatoolbox_process_num_procs"), i + "{{group}}")], w=8),
        timeseries("Process CPU", "CPU seconds per second used by each group (1 = one core).",
                   "short",
                   [(f"sum by (instance, group) ({rate('qatoolbox_process_cpu_seconds_total')})",
                     i + "{{group}}")], w=8),
        timeseries("Process memory", "Resident memory of each group.", "bytes",
                   [(sel("qatoolbox_process_resident_memory_bytes"), i + "{{group}}")], w=8),
        timeseries("Open files", "Open file descriptors of each group.", "short",
                   [(sel("qatoolbox_process_open_fds"), i + "{{group}}")], w=8),
        timeseries("Threads", "Threads of each group.", "short",
                   [(sel("qatoolbox_process_threads"), i + "{{group}}")], w=8),
        timeseries("Oldest process age", "Time since the oldest process of each group started; "
                   "a drop means the group restarted.", "s",
                   [(f"time() - {sel('qatoolbox_process_oldest_start_time_seconds')}",
                     i + "{{group}}")], w=8),
        Row("Exporter"),
        timeseries("Collector duration", "Time each collector took in the last scrape "
                   "(each runs under the scrape.timeout budget).", "s",
                   [(sel("qatoolbox_exporter_collector_duration_seconds"), i + "{{collector}}")],
                   w=12),
        timeseries("Collector success", "1 when the collector's last run succeeded, 0 when it "
                   "failed or ran out of time.", "none",
                   [(sel("qatoolbox_exporter_collector_success"), i + "{{collector}}")], w=12,
                   min_=0, max_=1),
    ], [interval_variable("trend_window", "Trend window", ["1h", "6h", "24h"], "6h")])


def postgres() -> Dashboard:
    """The PostgreSQL server: activity, throughput, sizes, replication, statements, tables."""
    db = 'datname=~"$datname"'
    return Dashboard("qatoolbox-postgres", "QAToolBox / PostgreSQL",
                     "Connections, slow queries, locks, transactions, cache, sizes, "
                     "checkpoints, replication, statements and table health.", [
        Row("Server"),
        stat("Up", "1 when the exporter's last PostgreSQL query succeeded.", "none",
             [(sel("qatoolbox_postgres_up"), "{{server}}")], mappings=UP_MAPPING,
             graph=False, thresholds=_thresholds((None, "red"), (1, "green"))),
        stat("Version", "Server version.", "none",
             [(sel("qatoolbox_postgres_version_info"), "{{version}}")], text_mode="name",
             graph=False),
        stat("Uptime", "Time since the server started.", "s",
             [(f"time() - {sel('qatoolbox_postgres_start_time_seconds')}", "{{server}}")],
             graph=False),
        stat("In recovery", "1 on a replica (or while recovering), 0 on a primary.", "none",
             [(sel("qatoolbox_postgres_in_recovery"), "{{server}}")], graph=False,
             mappings=[{"type": "value", "options": {"0": {"text": "primary", "index": 0},
                                                     "1": {"text": "replica", "index": 1}}}]),
        stat("Tables", "User tables in the connected database.", "short",
             [(sel("qatoolbox_postgres_tables"), "{{server}}")], graph=False),
        stat("Databases size", "Sum of the selected databases' sizes.", "bytes",
             [(f"sum({sel('qatoolbox_postgres_database_size_bytes', db)})", "size")]),
        Row("Activity"),
        timeseries("Connections by state", "Client backends by state, against max_connections.",
                   "short",
                   [(f"sum by (state) ({sel('qatoolbox_postgres_connections', db)})",
                     "{{state}}"),
                    (f"max({sel('qatoolbox_postgres_max_connections')})", "max_connections")],
                   w=12, overrides=[{"matcher": {"id": "byName", "options": "max_connections"},
                                     "properties": [
                                         {"id": "custom.lineStyle",
                                          "value": {"fill": "dash", "dash": [10, 10]}},
                                         {"id": "color", "value": {"mode": "fixed",
                                                                   "fixedColor": "red"}}]}]),
        timeseries("Connection slots used", "Client connections over max_connections less "
                   "the reserved slots (PostgresTooManyConnections at 80%, "
                   "PostgresConnectionsExhausted at 95%).", "percentunit",
                   [(sel("instance:qatoolbox_postgres_connections_used:ratio"),
                     "{{server}}")], w=12, min_=0, max_=1, alert_lines=(0.80, 0.95)),
        timeseries("Slow queries and lock waits",
                   "Active queries older than the slow threshold, backends waiting on a lock.",
                   "short",
                   [(f"sum by (datname) ({sel('qatoolbox_postgres_slow_queries', db)})",
                     "{{datname}} slow"),
                    (f"sum by (datname) ({sel('qatoolbox_postgres_lock_waits', db)})",
                     "{{datname}} lock waits")], w=12),
        timeseries("Transaction ID age", "age(datfrozenxid) per database: autovacuum freezes "
                   "at 200 million; PostgresXidWraparound at 1 billion; writes stop near 2.1 "
                   "billion.", "short",
                   [(sel("qatoolbox_postgres_database_xid_age"), "{{datname}}")], w=12,
                   alert_lines=(1e9,)),
        timeseries("Longest query and transaction",
                   "Age of the longest running query, the oldest transaction and the oldest "
                   "idle-in-transaction session.", "s",
                   [(f"max by (datname) ({sel('qatoolbox_postgres_longest_query_seconds', db)})",
                     "{{datname}} query"),
                    (f"max by (datname) "
                     f"({sel('qatoolbox_postgres_oldest_transaction_seconds', db)})",
                     "{{datname}} transaction"),
                    (f"max by (datname) "
                     f"({sel('qatoolbox_postgres_oldest_idle_in_transaction_seconds', db)})",
                     "{{datname}} idle in transaction")], w=12),
        timeseries("Locks by mode", "Locks held or awaited, by mode.", "short",
                   [(f"sum by (mode) ({sel('qatoolbox_postgres_locks', db)})", "{{mode}}")],
                   w=12),
        Row("Throughput"),
        timeseries("Transactions", "Commits and rollbacks per second.", "ops",
                   [(f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_transactions_committed_total', db)})",
                     "{{datname}} commit"),
                    (f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_transactions_rolled_back_total', db)})",
                     "{{datname}} rollback")], w=8),
        timeseries("Cache hit ratio", "Share of block reads served from shared buffers.",
                   "percentunit",
                   [(f"sum by (datname) ({rate('qatoolbox_postgres_blocks_hit_total', db)})\n/\n"
                     f"(sum by (datname) ({rate('qatoolbox_postgres_blocks_hit_total', db)})"
                     f" + sum by (datname) ({rate('qatoolbox_postgres_blocks_read_total', db)}))",
                     "{{datname}}")], w=8, max_=1),
        timeseries("Rows", "Rows returned, fetched, inserted, updated and deleted per second.",
                   "ops",
                   [(f"sum({rate(f'qatoolbox_postgres_rows_{kind}_total', db)})", kind)
                    for kind in ("returned", "fetched", "inserted", "updated", "deleted")], w=8),
        timeseries("Deadlocks and conflicts", "Deadlocks and recovery conflicts per interval.",
                   "short",
                   [(f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_deadlocks_total', db, 'increase')})",
                     "{{datname}} deadlocks"),
                    (f"sum by (datname) "
                     f"({rate('qatoolbox_postgres_conflicts_total', db, 'increase')})",
                     "{{datname}} conflicts")], w=8),
        timeseries("Temporary files", "Bytes written to temporary files per second (sorts and "
                   "hashes that did not fit work_mem).", "Bps",
                   [(f"sum by (datname) ({rate('qatoolbox_postgres_temp_bytes_total', db)})",
                     "{{datname}}")], w=8),
        timeseries("Database sizes", "Size of each database.", "bytes",
                   [(sel("qatoolbox_postgres_database_size_bytes", db), "{{datname}}")], w=8),
        Row("Checkpoints and replication"),
        timeseries("Checkpoints", "Scheduled and requested checkpoints per interval.", "short",
                   [(rate("qatoolbox_postgres_checkpoints_timed_total", func="increase"),
                     "timed"),
                    (rate("qatoolbox_postgres_checkpoints_requested_total", func="increase"),
                     "requested")], w=6),
        timeseries("Buffers written", "Buffers written per second, by writer.", "ops",
                   [(f"sum by (by) ({rate('qatoolbox_postgres_buffers_written_total')})",
                     "{{by}}")], w=6),
        timeseries("Replication lag", "Replay lag on a replica (seconds), and each replica's "
                   "lag seen from the primary (bytes).", "s",
                   [(sel("qatoolbox_postgres_replication_lag_seconds"), "replica lag"),
                    (sel("qatoolbox_postgres_replica_lag_bytes"), "{{application_name}} bytes")],
                   w=6, overrides=[{"matcher": {"id": "byRegexp", "options": ".* bytes"},
                                    "properties": [{"id": "unit", "value": "bytes"}]}]),
        timeseries("Replication slots", "WAL retained by each replication slot.", "bytes",
                   [(sel("qatoolbox_postgres_replication_slot_retained_bytes"),
                     "{{slot_name}}")], w=6),
        Row("Statements and tables"),
        table("Top statements", "Statements by execution time per second, i.e. the "
              "average number of backends busy running each (1 = one backend all the time), "
              "with calls and rows per second (pg_stat_statements, the exporter's top N).",
              "short",
              [(with_query_text(f"qatoolbox_postgres_statement_{kind}_total"), "")
               for kind in ("seconds", "calls", "rows")],
              h=9, columns={"A": "busy backends", "B": "calls/s", "C": "rows/s"},
              units={"calls/s": "ops", "rows/s": "ops"}, sort_by="busy backends"),
        table("Table health", "Dead rows, size and time since the last autovacuum and "
              "autoanalyze of the largest tables.", "short",
              [(sel("qatoolbox_postgres_table_dead_rows"), ""),
               (sel("qatoolbox_postgres_table_live_rows"), ""),
               (sel("qatoolbox_postgres_table_size_bytes"), ""),
               (f"time() - {sel('qatoolbox_postgres_table_last_autovacuum_timestamp_seconds')}",
                ""),
               (f"time() - "
                f"{sel('qatoolbox_postgres_table_last_autoanalyze_timestamp_seconds')}", "")],
              h=9, columns={"A": "dead rows", "B": "live rows", "C": "size",
                            "D": "since autovacuum", "E": "since autoanalyze"},
              units={"size": "bytes", "since autovacuum": "s", "since autoanalyze": "s"},
              sort_by="dead rows"),
        timeseries("Sequential vs index scans", "Scans per second of the busiest tables.",
                   "ops",
                   [(f"topk(5, sum by (schema, table) "
                     f"({rate('qatoolbox_postgres_table_seq_scans_total')}))",
                     "{{schema}}.{{table}} seq"),
                    (f"topk(5, sum by (schema, table) "
                     f"({rate('qatoolbox_postgres_table_index_scans_total')}))",
                     "{{schema}}.{{table}} index")], w=24),
    ], [query_variable("datname", "Database",
                       'label_values(qatoolbox_postgres_database_size_bytes{job=~"$job",'
                       'instance=~"$instance"}, datname)')])


def redis() -> Dashboard:
    """Redis: cache effectiveness, memory, clients, commands, key groups and Celery queues."""
    return Dashboard("qatoolbox-redis", "QAToolBox / Redis",
                     "Hit ratio, memory, clients, commands and latency, evictions, key groups "
                     "and Celery queues.", [
        Row("Server"),
        stat("Up", "1 when the exporter's last Redis command succeeded.", "none",
             [(sel("qatoolbox_redis_up"), "{{server}}")], mappings=UP_MAPPING, graph=False,
             thresholds=_thresholds((None, "red"), (1, "green"))),
        stat("Version", "Server version, mode and role.", "none",
             [(sel("qatoolbox_redis_version_info"), "{{version}} {{mode}} {{role}}")],
             text_mode="name", graph=False),
        stat("Uptime", "Time since the server started.", "s",
             [(sel("qatoolbox_redis_uptime_seconds"), "{{server}}")], graph=False),
        stat("Hit ratio", "Share of key lookups that found the key.", "percentunit",
             [(hit_ratio("qatoolbox_redis_keyspace_hits_total",
                         "qatoolbox_redis_keyspace_misses_total", "server"), "{{server}}")]),
        stat("Memory of limit",
             "Used memory against maxmemory, or against host memory when no limit is set "
             "(so the panel never shows N/A).", "percentunit",
             [(f"{sel('qatoolbox_redis_memory_used_bytes')}\n/ on (job, instance) group_left ()\n"
               f"({sel('qatoolbox_redis_memory_max_bytes')} > 0\n or on (job, instance)\n"
               f"{sel('qatoolbox_host_memory_total_bytes')})", "{{server}}")],
             thresholds=_thresholds((None, "green"), (0.8, "orange"), (0.9, "red"))),
        stat("Slow log", "Entries in the slow log.", "short",
             [(sel("qatoolbox_redis_slowlog_length"), "{{server}}")]),
        Row("Cache"),
        timeseries("Hit ratio", "Share of key lookups that found the key.", "percentunit",
                   [(hit_ratio("qatoolbox_redis_keyspace_hits_total",
                               "qatoolbox_redis_keyspace_misses_total", "server"), "{{server}}")],
                   max_=1),
        timeseries("Evicted and expired keys", "Keys evicted for lack of memory and keys "
                   "expired, per second.", "ops",
                   [(rate("qatoolbox_redis_evicted_keys_total"), "evicted"),
                    (rate("qatoolbox_redis_expired_keys_total"), "expired")]),
        timeseries("Keys per database", "Keys in each database, and those with a TTL.",
                   "short",
                   [(sel("qatoolbox_redis_db_keys"), "{{db}}"),
                    (sel("qatoolbox_redis_db_keys_expiring"), "{{db}} expiring")]),
        bargauge("Key groups", "QAToolBox key groups counted by the exporter's bounded SCAN.",
                 "short", [(sel("qatoolbox_redis_key_group_keys"), "{{group}}")], w=12),
        stat("Key count complete", "1 when the last count covered the whole keyspace "
             "within its budget.", "none",
             [(sel("qatoolbox_redis_key_group_scan_complete"), "{{server}}")], w=6, h=8,
             graph=False, mappings=[{"type": "value", "options": {
                 "0": {"text": "partial", "color": "orange", "index": 0},
                 "1": {"text": "complete", "color": "green", "index": 1}}}]),
        stat("Key count duration", "Time the last key-group count took.", "s",
             [(sel("qatoolbox_redis_key_group_scan_duration_seconds"), "{{server}}")],
             w=6, h=8),
        Row("Memory and clients"),
        timeseries("Memory", "Used, resident and peak memory, and maxmemory when set.", "bytes",
                   [(sel("qatoolbox_redis_memory_used_bytes"), "used"),
                    (sel("qatoolbox_redis_memory_rss_bytes"), "rss"),
                    (sel("qatoolbox_redis_memory_peak_bytes"), "peak"),
                    (f"{sel('qatoolbox_redis_memory_max_bytes')} > 0", "maxmemory")]),
        timeseries("Fragmentation", "RSS divided by used memory.", "none",
                   [(sel("qatoolbox_redis_memory_fragmentation_ratio"), "{{server}}")]),
        timeseries("Clients", "Connected and blocked clients against maxclients.", "short",
                   [(sel("qatoolbox_redis_connected_clients"), "connected"),
                    (sel("qatoolbox_redis_blocked_clients"), "blocked"),
                    (sel("qatoolbox_redis_max_clients"), "maxclients")]),
        timeseries("Connections", "Connections accepted and rejected per second.", "ops",
                   [(rate("qatoolbox_redis_connections_received_total"), "received"),
                    (rate("qatoolbox_redis_rejected_connections_total"), "rejected")]),
        timeseries("Network", "Bytes received and sent per second.", "Bps",
                   [(rate("qatoolbox_redis_net_input_bytes_total"), "in"),
                    (rate("qatoolbox_redis_net_output_bytes_total"), "out")]),
        timeseries("Replication and persistence",
                   "Connected replicas, master link state, changes since the last save.",
                   "short",
                   [(sel("qatoolbox_redis_connected_replicas"), "replicas"),
                    (sel("qatoolbox_redis_master_link_up"), "master link up"),
                    (sel("qatoolbox_redis_rdb_changes_since_last_save"), "unsaved changes"),
                    (f"time() - {sel('qatoolbox_redis_rdb_last_save_timestamp_seconds')}",
                     "seconds since save")]),
        Row("Commands"),
        timeseries("Commands by type", "Calls per second of the busiest commands.", "ops",
                   [(f"topk(10, sum by (cmd) ({rate('qatoolbox_redis_commands_total')}))",
                     "{{cmd}}"),
                    (f"sum({rate('qatoolbox_redis_commands_processed_total')})", "all")], w=12),
        timeseries("Mean command time", "Mean time per call of each command (from INFO "
                   "commandstats).", "s",
                   [(f"topk(10, sum by (cmd) "
                     f"({rate('qatoolbox_redis_commands_duration_seconds_total')})\n/\n"
                     f"sum by (cmd) ({rate('qatoolbox_redis_commands_total')}))", "{{cmd}}")],
                   w=12),
        heatmap("Command latency", "Distribution of command latencies (LATENCY HISTOGRAM, "
                "Redis 7 and later).", "s",
                f"sum by (le) ({rate('qatoolbox_redis_command_duration_seconds_bucket')})"),
        timeseries("Command latency p99", "99th percentile latency per command (LATENCY "
                   "HISTOGRAM).", "s",
                   [("topk(10, "
                     + quantile(0.99, "qatoolbox_redis_command_duration_seconds", "cmd") + ")",
                     "{{cmd}}")], w=12),
        Row("Celery queues"),
        timeseries("Queue length", "Messages waiting in each Celery queue (all priorities).",
                   "short",
                   [(f"sum by (queue) ({sel('qatoolbox_celery_queue_length')})", "{{queue}}")],
                   w=12),
        timeseries("Unacknowledged messages", "Messages delivered to workers and not yet "
                   "acknowledged.", "short",
                   [(sel("qatoolbox_celery_unacked_messages"), "{{server}}")], w=12),
    ])


def http() -> Dashboard:
    """Request rate, errors and latency overall and per route; DB use; Celery tasks."""
    rt = 'route=~"$route"'
    req = "qatoolbox_http_requests_total"
    dur = "qatoolbox_http_request_duration_seconds"
    return Dashboard("qatoolbox-http", "QAToolBox / HTTP performance",
                     "Requests, errors and latency per route, DB work per request and Celery "
                     "tasks.", [
        Row("Overall"),
        timeseries("Request rate", "Requests per second by status.", "reqps",
                   [(f"sum by (status) ({rate(req, rt)})", "{{status}}")], stack=True),
        timeseries("Error ratio", "Share of requests answered 5xx and 4xx.", "percentunit",
                   [(ratio(rate(req, f'{rt},status=~"5.."'), rate(req, rt)), "5xx"),
                    (ratio(rate(req, f'{rt},status=~"4.."'), rate(req, rt)), "4xx")], min_=0),
        timeseries("Latency p50 / p95 / p99", "Request duration percentiles.", "s",
                   [(quantile(q, dur, labels=rt), f"p{round(q * 100)}")
                    for q in (0.5, 0.95, 0.99)]),
        timeseries("In flight", "Requests being served now, summed over workers.", "short",
                   [(f"sum({sel('qatoolbox_http_requests_in_flight')})", "in flight")]),
        timeseries("Exceptions", "Unhandled exceptions per second by route.", "ops",
                   [(f"sum by (route) "
                     f"({rate('qatoolbox_http_request_exceptions_total', rt)})", "{{route}}")]),
        heatmap("Latency distribution", "Request durations over time.", "s",
                f"sum by (le) ({rate(dur + '_bucket', rt)})", w=8),
        Row("Traffic against its usual level"),
        timeseries("Request rate, baseline and last week",
                   "Requests per second now, the baseline HttpTrafficAnomaly compares it with "
                   "(median of the same hour 1-3 weeks ago) and the same hour last week, which "
                   "HttpTrafficDrop compares it with (page under 20% of it).", "reqps",
                   [(sel("instance:qatoolbox_http_requests:rate5m"), "{{instance}} now"),
                    (sel("instance:qatoolbox_http_requests:rate5m_prediction"),
                     "{{instance}} baseline"),
                    (f"{sel('instance:qatoolbox_http_requests:rate5m')} offset 1w",
                     "{{instance}} last week")], w=16),
        timeseries("Traffic z-score", "Residual (rate - baseline) in spreads of last week's "
                   "residuals; HttpTrafficAnomaly beyond +-3.", "short",
                   [(sel("instance:qatoolbox_http_requests:rate5m_zscore"), "{{instance}}")],
                   alert_lines=(-3.0, 3.0)),
        Row("Per route"),
        timeseries("p95 by route", "95th percentile duration of each route.", "s",
                   [(quantile(0.95, dur, "route", rt), "{{route}}")], w=12, legend_right=True),
        timeseries("Rate by route", "Requests per second of each route.", "reqps",
                   [(f"sum by (route) ({rate(req, rt)})", "{{route}}")], w=12,
                   legend_right=True),
        table("Slowest routes", "Routes by p95 duration, with p50, p99, rate and 5xx ratio.",
              "s",
              [(quantile(0.95, dur, "route", rt), ""),
               (quantile(0.5, dur, "route", rt), ""),
               (quantile(0.99, dur, "route", rt), ""),
               (f"sum by (route) ({rate(req, rt)})", ""),
               (ratio(rate(req, f'{rt},status=~"5.."'), rate(req, rt), "route"), "")],
              columns={"A": "p95", "B": "p50", "C": "p99", "D": "req/s", "E": "5xx ratio"},
              units={"req/s": "reqps", "5xx ratio": "percentunit"}, sort_by="p95"),
        Row("Database work per request"),
        timeseries("DB queries per request p95", "95th percentile of queries per request, "
                   "by route.", "short",
                   [(quantile(0.95, "qatoolbox_http_request_db_queries", "route", rt),
                     "{{route}}")], w=12, legend_right=True),
        timeseries("DB time per request p95", "95th percentile of database time per request, "
                   "by route.", "s",
                   [(quantile(0.95, "qatoolbox_http_request_db_seconds", "route", rt),
                     "{{route}}")], w=12, legend_right=True),
        timeseries("Mean DB queries per request", "Mean queries per request, by route.",
                   "short", [(mean("qatoolbox_http_request_db_queries", "route", rt),
                              "{{route}}")], w=12, legend_right=True),
        timeseries("Mean DB time per request", "Mean database time per request, by route.",
                   "s", [(mean("qatoolbox_http_request_db_seconds", "route", rt), "{{route}}")],
                   w=12, legend_right=True),
        Row("Celery tasks"),
        timeseries("Tasks by state", "Tasks finished per second by task and state.", "ops",
                   [(f"sum by (task, state) ({rate('qatoolbox_celery_tasks_total')})",
                     "{{task}} {{state}}")]),
        timeseries("Task failure ratio", "Share of finished tasks that failed, by task.",
                   "percentunit",
                   [(ratio(rate("qatoolbox_celery_tasks_total", 'state="failed"'),
                           rate("qatoolbox_celery_tasks_total"), "task"), "{{task}}")], min_=0),
        timeseries("Task duration p95", "95th percentile run time by task.", "s",
                   [(quantile(0.95, "qatoolbox_celery_task_duration_seconds", "task"),
                     "{{task}}")]),
    ], [query_variable("route", "Route",
                       'label_values(qatoolbox_http_requests_total{job=~"$job",'
                       'instance=~"$instance"}, route)')])


ONLINE_HELP = ("Users online now: status online or the online flag set, and seen within the "
               "presence window (business.presence_window, 5 min).")
CLEANUP_HELP = ("Chat rooms with no message and no activity for longer than QAToolBox's cleanup "
                "age plus a grace (12 h + 1 h): 0 while the cleanup (every 30 min) runs.")
NO_CAPSULES = "No time capsules in this deployment"
APPLICABLE_MAPPING = [{"type": "value", "options": {
    "0": {"text": "not in this deployment", "color": "text", "index": 0},
    "1": {"text": "counted", "color": "green", "index": 1}}}]


def business() -> Dashboard:
    """QAToolBox's own figures: users, chat, time capsules, and the stalled-job indicators."""
    capsules = 'query="qatoolbox_time_capsules"'
    return Dashboard("qatoolbox-business", "QAToolBox / Business",
                     "Users, chat rooms, messages, time capsules and stalled jobs.", [
        Row("Users"),
        stat("Registered users", "Accounts in auth_user.", "short",
             [(f"sum({sel('qatoolbox_users')})", "users")]),
        stat("Online users", ONLINE_HELP, "short",
             [(f"sum({sel('qatoolbox_users_online')})", "online")]),
        bargauge("Active users by window", "Users who logged in within each window.", "short",
                 [(f"sum by (window) ({sel('qatoolbox_users_active')})", "{{window}}")], w=8,
                 h=4),
        bargauge("Users by status",
                 "Presence rows by status; online as in Online users, not seen within the "
                 "presence window as offline, statuses the clients sent beyond the known ones "
                 "as they are (at most 20, the rest as other).", "short",
                 [(f"sum by (status) ({sel('qatoolbox_users_by_status')})", "{{status}}")],
                 w=8, h=4),
        timeseries("Accounts", "Active and inactive accounts.", "short",
                   [(f"sum by (state) ({sel('qatoolbox_users')})", "{{state}}")], w=12,
                   stack=True),
        timeseries("Active users", "Users who logged in within each window.", "short",
                   [(f"sum by (window) ({sel('qatoolbox_users_active')})", "{{window}}")],
                   w=12),
        Row("Chat"),
        timeseries("Chat rooms by type", "Rooms by room type.", "short",
                   [(f"sum by (room_type) ({sel('qatoolbox_chat_rooms')})", "{{room_type}}")],
                   stack=True),
        timeseries("Chat rooms by status",
                   "Rooms by status, expired included (QAToolBox's expiry task sets it).",
                   "short",
                   [(f"sum by (status) ({sel('qatoolbox_chat_rooms')})", "{{status}}")],
                   stack=True),
        timeseries("Messages per minute",
                   "Messages sent per minute, by type (voice messages are audio), from a "
                   "counter the cleanup's deletes do not lower.", "short",
                   [(f"sum by (message_type) ({rate('qatoolbox_chat_messages_total')}) * 60",
                     "{{message_type}}")], stack=True),
        timeseries("Messages stored",
                   "Messages in the table now, by type: the cleanup deletes idle rooms' "
                   "messages, so this goes down as well as up.", "short",
                   [(f"sum by (message_type) ({sel('qatoolbox_chat_messages_stored')})",
                     "{{message_type}}")], w=12, stack=True),
        stat("Messages in the last hour", "Messages created in the last hour.", "short",
             [(f"sum({sel('qatoolbox_chat_messages_last_hour')})", "last hour")], w=12),
        Row("Time capsules"),
        stat("Time capsules here",
             "Whether this deployment has time capsules: QAToolBox's tools migration 0070 "
             "dropped them, so at HEAD the capsule queries do not apply and the panels on the "
             "right stay empty.", "short",
             [(f"max({sel('qatoolbox_business_query_applicable', capsules)})", "capsules")],
             w=6, h=8, mappings=APPLICABLE_MAPPING, graph=False, no_value="not known yet"),
        timeseries("Time capsules", "Capsules by type and state (state from is_unlocked).",
                   "short",
                   [(f"sum by (capsule_type, state) ({sel('qatoolbox_time_capsules')})",
                     "{{capsule_type}} {{state}}")], w=12, stack=True, no_value=NO_CAPSULES),
        stat("Overdue time capsules",
             "Capsules past their unlock time by over an hour, not unlocked (unlock stalled).",
             "short", [(f"sum({sel('qatoolbox_time_capsules_overdue')})", "overdue")],
             w=6, h=8, thresholds=_thresholds((None, "green"), (1, "orange")),
             no_value=NO_CAPSULES),
        Row("Stalled jobs and queries"),
        timeseries("Chat rooms past cleanup", CLEANUP_HELP, "short",
                   [(f"sum({sel('qatoolbox_chat_rooms_cleanup_overdue')})", "past cleanup")],
                   w=12, alert_lines=(1,)),
        table("Business queries that apply here",
              "1: the tables and columns a query reads exist and it runs; 0: they do not "
              "(not run, not failing).", "short",
              [(f"max by (query) ({sel('qatoolbox_business_query_applicable')})", "")],
              w=12, columns={"A": "applicable"}),
        timeseries("Business queries failing", "Business queries whose last run failed.",
                   "short",
                   [(f"count({sel('qatoolbox_business_query_success')} == 0) or vector(0)",
                     "failing")], w=8),
        timeseries("Query age", "Time since each business query last succeeded.", "s",
                   [(f"time() - {sel('qatoolbox_business_query_last_success_timestamp_seconds')}",
                     "{{query}}")], w=8),
        timeseries("Query duration", "Time each business query took on its last run.", "s",
                   [(sel("qatoolbox_business_query_duration_seconds"), "{{query}}")], w=8),
    ])


def slo() -> Dashboard:
    """The SLOs of prometheus/slos/qatoolbox.yml from the generated Sloth recording rules."""
    sl = 'sloth_service="qatoolbox"'

    def rec(name: str, extra: str = "") -> str:
        return f"{name}{{{sl}{',' + extra if extra else ''}}}"

    by_slo = "{{sloth_slo}}"
    return Dashboard("qatoolbox-slo", "QAToolBox / SLOs",
                     "Error budgets and burn rates of the availability and latency SLOs "
                     "(prometheus/slos/qatoolbox.yml), from the Sloth-named recording rules.", [
        Row("Error budget"),
        stat("Objective", "Share of good requests each SLO promises over 30 days.",
             "percentunit", [(rec("slo:objective:ratio"), by_slo)], w=6, graph=False),
        stat("Error budget remaining", "1 - the period's burn rate: what would be left at the "
             "end of the 30 days if they went on like the period so far; below 0 the SLO is "
             "missed.", "percentunit",
             [(rec("slo:period_error_budget_remaining:ratio"), by_slo)], w=6,
             thresholds=_thresholds((None, "red"), (0, "orange"), (0.25, "green"))),
        stat("Burn rate now", "Error ratio over 5 minutes divided by the budget: 1 spends it "
             "exactly in 30 days, 14.4 in 2 days.", "none",
             [(rec("slo:current_burn_rate:ratio"), by_slo)], w=6,
             thresholds=_thresholds((None, "green"), (1, "orange"), (14.4, "red"))),
        stat("Period burn rate", "Mean error ratio of the period divided by the budget.",
             "none", [(rec("slo:period_burn_rate:ratio"), by_slo)], w=6,
             thresholds=_thresholds((None, "green"), (1, "red"))),
        Row("Burn rates of the alert windows"),
        timeseries("Page windows", "Error ratio over 5 m, 30 m, 1 h and 6 h divided by the "
                   "budget. SloErrorBudgetBurnFast pages when 1 h and 5 m are over 14.4, or 6 h "
                   "and 30 m over 6.", "none",
                   [(f"{rec(f'slo:sli_error:ratio_rate{w}')}\n/ on (sloth_id) group_left\n"
                     f"{rec('slo:error_budget:ratio')}", f"{{{{sloth_slo}}}} {w}")
                    for w in ("5m", "30m", "1h", "6h")], w=12, alert_lines=(6.0, 14.4)),
        timeseries("Ticket windows", "Error ratio over 2 h, 6 h, 1 d and 3 d divided by the "
                   "budget. SloErrorBudgetBurnSlow tickets when 1 d and 2 h are over 3, or 3 d "
                   "and 6 h over 1.", "none",
                   [(f"{rec(f'slo:sli_error:ratio_rate{w}')}\n/ on (sloth_id) group_left\n"
                     f"{rec('slo:error_budget:ratio')}", f"{{{{sloth_slo}}}} {w}")
                    for w in ("2h", "6h", "1d", "3d")], w=12, alert_lines=(1.0, 3.0)),
        Row("Service level"),
        timeseries("Error ratio", "Share of bad requests over 5 minutes (5xx for availability, "
                   "over 2 s for latency) against each SLO's budget.", "percentunit",
                   [(rec("slo:sli_error:ratio_rate5m"), by_slo),
                    (rec("slo:error_budget:ratio"), "{{sloth_slo}} budget")], w=12, min_=0),
        timeseries("Error budget remaining", "The period's remaining budget over time.",
                   "percentunit",
                   [(rec("slo:period_error_budget_remaining:ratio"), by_slo)], w=12,
                   alert_lines=(0.0,)),
    ])


DASHBOARDS = {
    "overview": overview,
    "host": host,
    "postgres": postgres,
    "redis": redis,
    "http": http,
    "business": business,
    "slo": slo,
}


def render() -> dict[str, str]:
    """{file name: JSON text} for every dashboard."""
    return {f"{name}.json": json.dumps(build().to_json(), indent=2, ensure_ascii=False) + "\n"
            for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboards, or with --check report whether the committed files are current."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if grafana/dashboards/ differs from what this script writes")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            OUT_DIR.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python grafana/generate.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
