"""Panel builders: the queries of a panel, its JSON, and one function per panel type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

UP_DOWN = [{
    "type": "value",
    "options": {
        "0": {"text": "DOWN", "color": "red", "index": 0},
        "1": {"text": "UP", "color": "green", "index": 1},
    },
}]


@dataclass
class Target:
    """One query of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False
    result_format: str = "time_series"

    def to_json(self, ref: str) -> Json:
        """The target's JSON with refId ref."""
        return {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": self.expr,
            "format": self.result_format,
            "instant": self.instant,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "refId": ref,
        }


def targets(items: Sequence[Target | tuple[str, str] | str], instant: bool = False,
            result_format: str = "time_series") -> list[Target]:
    """Targets from (expr, legend) pairs or bare expressions."""
    out = []
    for item in items:
        if isinstance(item, Target):
            out.append(item)
        elif isinstance(item, tuple):
            out.append(Target(item[0], item[1], instant, result_format))
        else:
            out.append(Target(item, "", instant, result_format))
    return out


@dataclass
class Panel:
    """A panel before placement."""

    type: str
    title: str
    description: str
    unit: str
    queries: list[Target]
    # Width and height in grid units, as Grafana's gridPos names them (a row is 24 wide).
    w: int = 8
    h: int = 8
    options: Json = field(default_factory=dict)
    defaults: Json = field(default_factory=dict)
    overrides: list[Json] = field(default_factory=list)
    transformations: list[Json] = field(default_factory=list)
    links: list[Json] = field(default_factory=list)

    def to_json(self, panel_id: int, x: int, y: int) -> Json:
        """The panel's JSON at grid position x, y with id panel_id."""
        defaults: Json = {"unit": self.unit, **self.defaults}
        if self.type == "timeseries":
            defaults.setdefault("custom", {"fillOpacity": 10, "lineWidth": 1,
                                           "showPoints": "never", "spanNulls": False})
        defaults.setdefault("color", {"mode": "palette-classic"})
        panel: Json = {
            "datasource": DATASOURCE,
            "description": self.description,
            "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
            "gridPos": {"h": self.h, "w": self.w, "x": x, "y": y},
            "id": panel_id,
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


def threshold_steps(*steps: tuple[float | None, str]) -> Json:
    """Absolute thresholds from (lower bound, colour) steps, the first bound None."""
    return {"mode": "absolute",
            "steps": [{"color": color, "value": value} for value, color in steps]}


ALL_GREEN = threshold_steps((None, "green"))


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
    defaults: Json = {"custom": custom, "thresholds": ALL_GREEN}
    if alert_lines:
        colors = ("orange", "red") if len(alert_lines) == 2 else ("red",) * len(alert_lines)
        defaults["thresholds"] = threshold_steps((None, "transparent"),
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
    defaults: Json = {"thresholds": thresholds or ALL_GREEN, "mappings": mappings or []}
    if no_value:
        defaults["noValue"] = no_value
    return Panel("stat", title, description, unit, targets(queries), w, h, options, defaults,
                 links=links or [])


def up_stat(title: str, description: str, queries: Sequence[tuple[str, str]], *,
            links: list[Json] | None = None) -> Panel:
    """A stat of a *_up family: UP in green at 1, DOWN in red at 0."""
    return stat(title, description, "none", queries, mappings=UP_DOWN, graph=False,
                thresholds=threshold_steps((None, "red"), (1, "green")), links=links)


def bargauge(title: str, description: str, unit: str,
             queries: Sequence[Target | tuple[str, str]], *, w: int = 8,
             h: int = 8, max_: float | None = None, thresholds: Json | None = None) -> Panel:
    """A horizontal bar gauge, one bar per series."""
    options = {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
               "valueMode": "color", "namePlacement": "auto", "sizing": "auto",
               "minVizHeight": 16, "minVizWidth": 8, "maxVizHeight": 300,
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    defaults: Json = {"min": 0, "thresholds": thresholds or ALL_GREEN}
    if max_ is not None:
        defaults["max"] = max_
    return Panel("bargauge", title, description, unit, targets(queries), w, h, options,
                 defaults)


def table(title: str, description: str, unit: str, queries: Sequence[tuple[str, str]],
          *, w: int = 24, h: int = 8, columns: dict[str, str] | None = None,
          units: dict[str, str] | None = None, sort_by: str = "") -> Panel:
    """A table of instant queries merged on their labels; columns renames 'Value #A'."""
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
    defaults: Json = {"thresholds": ALL_GREEN,
                      "custom": {"align": "auto", "cellOptions": {"type": "auto"}}}
    return Panel("table", title, description, unit,
                 targets(queries, instant=True, result_format="table"), w, h, options, defaults,
                 overrides, transformations)


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

