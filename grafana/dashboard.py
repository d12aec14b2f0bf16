"""The dashboard model: rows and panels laid out on Grafana's grid, the header every
dashboard shares, its variables and the links between dashboards."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from panels import DATASOURCE, Json, Panel
from promql import SELECTED_CLUSTERS, selector

# The classic dashboard model's last schema version (Grafana 12.2 and later write 42).
SCHEMA_VERSION = 42
# Every dashboard carries it; the dashboards' link menu lists the dashboards that have it.
TAG = "qatoolbox"


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

    def to_json(self) -> Json:
        """The dashboard JSON, panels laid out left to right in rows of 24 columns."""
        panels: list[Json] = []
        x = y = row_height = 0
        panel_id = 1
        for item in self.items:
            if isinstance(item, Row):
                y += row_height
                x = row_height = 0
                panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                               "id": panel_id, "panels": [], "title": item.title,
                               "type": "row"})
                y += 1
            else:
                if x + item.w > 24:
                    y += row_height
                    x = row_height = 0
                panels.append(item.to_json(panel_id, x, y))
                x += item.w
                row_height = max(row_height, item.h)
            panel_id += 1
        return {
            "annotations": {"list": [
                {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                 "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                 "name": "Annotations & Alerts", "type": "dashboard"},
                {"datasource": DATASOURCE, "enable": True, "hide": False, "iconColor": "red",
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
        "datasource": DATASOURCE,
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
        exporters = selector("qatoolbox_exporter_build_info", scope=SELECTED_CLUSTERS)
        variables.append(query_variable("instance", "Instance",
                                        f"label_values({exporters}, instance)"))
    else:
        servers = selector(service_family, scope=SELECTED_CLUSTERS)
        readers = selector(service_family, 'server=~"$server"', scope=SELECTED_CLUSTERS)
        variables += [
            query_variable("server", "Server", f"label_values({servers}, server)",
                           multi=False),
            query_variable("instance", "Exporter", f"label_values({readers}, instance)",
                           multi=False),
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
