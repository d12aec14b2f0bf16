"""A section's charts and its per-day table: range queries over the period (and the one
before, shifted onto it), their answers as the series that charts.py draws."""

from __future__ import annotations

import math
from functools import partial

from exporter.report import queries as q
from exporter.report.dataset import ChartResult, ColumnInfo, SeriesResult, TableResult
from exporter.report.plan import Plan
from exporter.report.promapi import Series
from exporter.report.tables import PendingTable
from exporter.report.times import local

DAY = 86400


def _legend(template: str, labels: dict[str, str], fallback: str) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{" + name + "}", value)
    text = " ".join(part for part in text.split() if not (part.startswith("{")
                                                           and part.endswith("}")))
    return text.strip() or fallback


def plan_chart(plan: Plan, chart: q.Chart) -> ChartResult:
    o = plan.o
    result = ChartResult(chart.key, chart.title, chart.unit,
                         [{"value": t.value, "label": t.label, "severity": t.severity}
                          for t in chart.thresholds], o.step,
                         [plan.fill(line.expr) for line in chart.lines], ymax=chart.ymax)
    for line in chart.lines:
        if plan.lacks(line.expr):
            continue
        query = plan.fill(line.expr)
        spans = [(o.start, o.end, 0)]
        if chart.compare and o.compare:
            spans.append((o.start - plan.window, o.start, plan.window))

        def store(series: list[Series], shift: int, tmpl: str = line.legend) -> None:
            for s in series:
                points = [(t + shift, float(v)) for t, v in s.points
                          if math.isfinite(float(v))]
                name = "previous period" if shift else _legend(tmpl, s.labels, chart.title)
                result.series.append(SeriesResult(name, s.labels, points, bool(shift)))
            result.series.sort(key=lambda x: (x.previous, x.name))

        for begin, stop, shift in spans:
            plan.add(f"chart {chart.title}", partial(plan.client.range, query, begin, stop,
                                                     o.step),
                     partial(store, shift=shift), f"chart {chart.title}", query)
    return result


def plan_daily(plan: Plan, daily: q.Daily) -> tuple[PendingTable, list[ChartResult]]:
    """One row and one bar per day, each day ending at the period's end time of day."""
    o = plan.o
    days = plan.window // DAY
    first = o.end - (days - 1) * DAY
    spec = q.Table(daily.key, daily.title, ("day",), daily.columns, "", limit=False,
                   compare=False)
    result = TableResult(daily.key, daily.title, ["day"],
                         [ColumnInfo(c.key, c.title, c.unit, c.better, plan.fill(c.expr))
                          for c in daily.columns],
                         note="Each day ends at the period's end time of day and is named "
                              "by the date it starts on.")
    current: dict[str, dict[tuple[str, ...], float]] = {}
    charts = []
    for column in daily.columns:
        if plan.lacks(column.expr):
            continue
        query = plan.fill(column.expr)
        chart = ChartResult(f"daily_{column.key}", f"{column.title.capitalize()} per day",
                            column.unit, [], DAY, [query], kind="bar")
        charts.append(chart)

        def store(series: list[Series], key: str = column.key, ch: ChartResult = chart
                  ) -> None:
            points = {t: float(v) for s in series for t, v in s.points}
            # A day is named by the date it starts on, in the report's time zone.
            current[key] = {(local(t - DAY, o.tz).strftime("%Y-%m-%d"),): v
                            for t, v in points.items()}
            ch.series.append(SeriesResult(ch.title, {}, sorted(
                (t - DAY / 2, v) for t, v in points.items() if math.isfinite(v))))

        plan.add(f"{daily.title}: {column.title}",
                 partial(plan.client.range, query, first, o.end, DAY), store,
                 f"{daily.title}: {column.title}", query)
    return PendingTable(spec, result, current, {}), charts
