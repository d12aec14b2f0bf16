"""The report's dataset: what build.py assembles and every renderer reads, and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "qatoolbox-report/1"


@dataclass
class FigureResult:
    key: str
    title: str
    unit: str
    better: str
    query: str
    value: float | None = None
    previous: float | None = None
    error: str = ""

    @property
    def change(self) -> float | None:
        if self.value is None or self.previous is None:
            return None
        return self.value - self.previous

    @property
    def change_ratio(self) -> float | None:
        if self.value is None or not self.previous:
            return None
        return (self.value - self.previous) / abs(self.previous)


@dataclass
class ColumnInfo:
    key: str
    title: str
    unit: str
    better: str
    query: str


@dataclass
class Row:
    labels: dict[str, str]
    values: dict[str, float | None]
    previous: dict[str, float | None] = field(default_factory=dict)


@dataclass
class TableResult:
    key: str
    title: str
    by: list[str]
    columns: list[ColumnInfo]
    rows: list[Row] = field(default_factory=list)
    note: str = ""
    shown: int | None = None  # rows the HTML shows (--top); None: all


@dataclass
class SeriesResult:
    name: str
    labels: dict[str, str]
    points: list[tuple[float, float]]
    previous: bool = False  # the period before, shifted onto this one


@dataclass
class ChartResult:
    key: str
    title: str
    unit: str
    thresholds: list[dict[str, Any]]
    step: int
    queries: list[str]
    series: list[SeriesResult] = field(default_factory=list)
    ymax: float | None = None
    kind: str = "line"  # line or bar
    image: str = ""  # file name under charts/ once rendered


@dataclass
class Problem:
    """Something the report could not show as it should: a failed query, a missing series."""

    section: str
    what: str
    detail: str
    query: str = ""


@dataclass
class SectionResult:
    key: str
    title: str
    status: str  # ok, partial, no_data or failed
    note: str = ""
    intro: str = ""
    figures: list[FigureResult] = field(default_factory=list)
    tables: list[TableResult] = field(default_factory=list)
    charts: list[ChartResult] = field(default_factory=list)


@dataclass
class Gap:
    instance: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Report:
    title: str
    prometheus: str
    selector: str
    timezone: str
    start: float
    end: float
    previous_start: float | None
    previous_end: float | None
    step: int
    generated_at: float
    sections: list[SectionResult] = field(default_factory=list)
    coverage: dict[str, float | None] = field(default_factory=dict)  # instance -> share
    coverage_query: str = ""
    gaps: list[Gap] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    build_seconds: float = 0.0

    @property
    def window(self) -> int:
        return int(self.end - self.start)

    @property
    def failed_queries(self) -> int:
        return sum(1 for p in self.problems if p.what == "query failed")

    @property
    def partial(self) -> bool:
        return bool(self.problems or self.gaps)

    def section(self, key: str) -> SectionResult:
        return next(s for s in self.sections if s.key == key)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null (the report marks them as no value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(report: Report, iso: Any) -> str:
    """The whole dataset; iso(ts) formats a timestamp for people (the numbers stay Unix)."""
    sections = []
    for section in report.sections:
        doc = asdict(section)
        for figure, raw in zip(section.figures, doc["figures"], strict=True):
            raw["change"] = figure.change
            raw["change_ratio"] = figure.change_ratio
        for chart in doc["charts"]:
            for series in chart["series"]:
                series["points"] = [[t, v] for t, v in series["points"]]
        sections.append(doc)
    doc = {
        "schema": SCHEMA,
        "title": report.title,
        "generated_at": iso(report.generated_at),
        "prometheus": report.prometheus,
        "selector": report.selector,
        "timezone": report.timezone,
        "period": {"start": report.start, "end": report.end, "seconds": report.window,
                   "start_text": iso(report.start), "end_text": iso(report.end)},
        "previous_period": None if report.previous_start is None else {
            "start": report.previous_start, "end": report.previous_end,
            "start_text": iso(report.previous_start), "end_text": iso(report.previous_end)},
        "chart_step_seconds": report.step,
        "partial": report.partial,
        "problems": [asdict(p) for p in report.problems],
        "coverage": {"query": report.coverage_query, "instances": report.coverage,
                     "gaps": [{"instance": g.instance, "start": g.start, "end": g.end,
                               "seconds": g.seconds, "start_text": iso(g.start),
                               "end_text": iso(g.end)} for g in report.gaps]},
        "sections": sections,
        "build_seconds": round(report.build_seconds, 3),
    }
    return json.dumps(_clean(doc), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
