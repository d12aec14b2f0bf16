"""Read the generated Grafana dashboards and take their PromQL apart (lint and live tests)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"

RATE_FUNCTIONS = {"rate", "irate", "increase"}
# Functions whose range argument is a trend window, not a rate window.
TREND_FUNCTIONS = {"predict_linear", "deriv"}
TREND_VARIABLES = {"$trend_window"}
# Functions asking whether a series existed in the dashboard's time range ([$__range]): the
# Overview's hosts table keeps a host whose exporter is down.
RANGE_FUNCTIONS = {"present_over_time"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "topk", "bottomk", "sum", "min", "max",
            "avg", "count", "quantile", "stddev", "stdvar", "count_values", "group"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Built-in series that Prometheus makes itself, not the exporter.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"}

_TOKEN = re.compile(
    r'(?P<string>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')'
    r"|(?P<matchers>\{[^}]*\})"
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w:]))"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
    r"|(?P<var>\$[A-Za-z_][A-Za-z0-9_]*|\$\{[^}]*\})"
    r"|(?P<open>\()|(?P<close>\))"
    r"|(?P<other>[^\s])"
)


def load_generator() -> ModuleType:
    """grafana/generate.py as a module (it is a script, not part of a package)."""
    # Its modules import each other as top-level names, as when run as a script (whose
    # folder Python puts first on sys.path).
    if str(GRAFANA) not in sys.path:
        sys.path.insert(0, str(GRAFANA))
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def load_dashboards() -> dict[str, dict[str, Any]]:
    """{file name: dashboard JSON} of every committed dashboard."""
    return {path.name: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Query:
    """One PromQL query of a dashboard: where it is and what it says."""

    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def iter_queries(dashboards: dict[str, dict[str, Any]],
                 with_annotations: bool = True) -> Iterator[Query]:
    """Every panel target's expr (and, optionally, each annotation's and variable's query)."""
    for name, dash in dashboards.items():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                yield Query(name, panel.get("title", "?"), target.get("refId", "?"),
                            target.get("expr", ""))
        if with_annotations:
            for ann in dash.get("annotations", {}).get("list", []):
                if "expr" in ann:
                    yield Query(name, f"annotation {ann['name']}", "-", ann["expr"])


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of a PromQL expression; label matchers and strings stay whole."""
    return [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(expr)]


def analyse(expr: str) -> tuple[list[str], list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """(metric names, [(metric, enclosing functions)], [(range text, innermost function)])."""
    toks = tokens(expr)
    stack: list[str] = []
    names: list[str] = []
    metrics: list[tuple[str, list[str]]] = []
    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind == "ident" and nxt[0] == "open":
            if text in LABEL_LIST_KEYWORDS:
                depth = 0
                while i < len(toks):  # skip the label list: its words are not metrics
                    if toks[i][0] == "open":
                        depth += 1
                    elif toks[i][0] == "close":
                        depth -= 1
                        if depth == 0:
                            break
                    i += 1
            else:
                stack.append(text)
                i += 1  # the "(" is consumed with the function
        elif kind == "open":
            stack.append("")
        elif kind == "close":
            if stack:
                stack.pop()
        elif kind == "ident" and text not in KEYWORDS:
            names.append(text)
            metrics.append((text, [f for f in stack if f]))
        elif kind == "range":
            innermost = next((f for f in reversed(stack) if f), "")
            ranges.append((text[1:-1], innermost))
        i += 1
    return names, metrics, ranges


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads."""
    return set(analyse(expr)[0])


def is_counter_like(name: str) -> bool:
    """Counters and histogram parts: meaningful only through rate/increase."""
    return name.endswith(("_total", "_bucket", "_count", "_sum"))


def problems(expr: str) -> list[str]:
    """Convention problems of one query: ranges, counters outside rate, balance."""
    found: list[str] = []
    if expr.count("(") != expr.count(")"):
        found.append("unbalanced parentheses")
    _, metrics, ranges = analyse(expr)
    for window, func in ranges:
        if func in RANGE_FUNCTIONS:
            if window != "$__range":
                found.append(f"{func} range [{window}] must be [$__range]")
        elif func in TREND_FUNCTIONS:
            if window not in TREND_VARIABLES:
                found.append(f"{func} range [{window}] must be one of {sorted(TREND_VARIABLES)}")
        elif window != "$__rate_interval":
            found.append(f"range [{window}] in {func or 'a selector'}: use [$__rate_interval]")
    for name, funcs in metrics:
        if is_counter_like(name) and not RATE_FUNCTIONS & set(funcs):
            found.append(f"counter {name} used outside rate/irate/increase")
    return found


def expand(expr: str, window: str, trend_window: str = "5m") -> str:
    """The query as Grafana sends it with every variable set to All and a fixed rate window."""
    out = expr.replace("$__rate_interval", window)
    out = out.replace("$trend_window", trend_window)
    out = out.replace("$__interval", window).replace("$__range", trend_window)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".+", out)


def documented_metric_names() -> set[str]:
    """Metric names written in the README and docs/*.md, with "`_sibling`" shorthand expanded.

    The docs list siblings after a full name (`qatoolbox_host_load1`, `_load5`), so each
    shorthand is expanded against every prefix of the full name before it on the same line.
    """
    names: set[str] = set()
    # docs/dashboards.md is left out: the dashboards must not document their own names.
    texts = [ROOT / "README.md",
             *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "dashboards.md")]
    for path in texts:
        for line in path.read_text(encoding="utf-8").splitlines():
            full = re.findall(r"\bqatoolbox_[a-z0-9_]+", line)
            names.update(full)
            for short in re.findall(r"`(_[a-z0-9_]+)`", line):
                for stem in full:
                    parts = stem.split("_")
                    names.update("_".join(parts[:k]) + short for k in range(2, len(parts)))
    return names
