"""The report's alerts section, from Prometheus' ALERTS series: each run of firing evaluations
of one alert is an episode."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from exporter.report import queries as q
from exporter.report.dataset import ColumnInfo, FigureResult, Row, SectionResult, TableResult
from exporter.report.jobs import FATAL
from exporter.report.plan import Options
from exporter.report.promapi import Client, PromError

# (section, what, detail, query): a Problem of the report
OnProblem = Callable[[str, str, str, str], None]


@dataclass(frozen=True)
class Episode:
    """One run of firing evaluations of one alert."""

    labels: dict[str, str]
    start: float
    end: float
    active_since: float | None
    firing_at_end: bool

    @property
    def seconds(self) -> float:
        return self.end - self.start


def episodes(client: Client, ctx: q.Context, end: int) -> list[Episode]:
    """The episodes in the window ending at end, first started first."""
    window = ctx.fill(q.ALERTS_FIRING)
    firing = client.raw(window, end)
    states = client.raw(ctx.fill(q.ALERTS_FOR_STATE), end)
    active: dict[tuple[tuple[str, str], ...], list[tuple[float, str]]] = {}
    for series in states:
        labels = {k: v for k, v in series.labels.items() if k != "__name__"}
        active[tuple(sorted(labels.items()))] = series.points
    spacings = [b[0] - a[0] for s in firing
                for a, b in zip(s.points, s.points[1:], strict=False)]
    usual = statistics.median(spacings) if spacings else 60.0
    found = []
    for series in firing:
        labels = {k: v for k, v in series.labels.items()
                  if k not in ("__name__", "alertstate")}
        times = [t for t, _ in series.points]
        runs: list[list[float]] = []
        for t in times:
            if runs and t - runs[-1][-1] <= 2 * usual:
                runs[-1].append(t)
            else:
                runs.append([t])
        pending = active.get(tuple(sorted(labels.items())), [])
        for run in runs:
            since = [float(v) for t, v in pending if run[0] - usual <= t <= run[0] + usual]
            found.append(Episode(labels, run[0], run[-1], since[0] if since else None,
                                 run[-1] >= end - 1.5 * usual))
    found.sort(key=lambda e: (e.start, e.labels.get("alertname", "")))
    return found


def alerts_section(client: Client, ctx: q.Context, o: Options, problem: OnProblem
                   ) -> SectionResult:
    section = SectionResult("alerts", "Alerts that fired", "ok",
                            intro="From Prometheus' ALERTS series: each run of firing "
                                  "evaluations is one episode, from the first to the last "
                                  "evaluation that found it firing.")
    query = ctx.fill(q.ALERTS_FIRING)
    periods = {"value": o.end}
    if o.compare:
        periods["previous"] = o.start
    found: dict[str, list[Episode]] = {}
    for slot, end in periods.items():
        try:
            found[slot] = episodes(client, ctx, end)
        except PromError as exc:
            if exc.kind in FATAL:
                raise
            problem("alerts", "query failed", f"alerts: {exc}", query)
            section.status = "partial" if slot == "previous" else "failed"
    if "value" not in found:
        section.note = "The alerts could not be read."
        return section
    figures = [FigureResult("episodes", "alert episodes", q.COUNT, "lower", query),
               FigureResult("critical", "critical episodes", q.COUNT, "lower", query),
               FigureResult("firing_seconds", "time firing (all alerts)", q.SECONDS,
                            "lower", query)]
    for slot, listed in found.items():
        setattr(figures[0], slot, float(len(listed)))
        setattr(figures[1], slot, float(sum(1 for e in listed
                                            if e.labels.get("severity") == "critical")))
        setattr(figures[2], slot, float(sum(e.seconds for e in listed)))
    section.figures = figures
    names = TableResult("by_name", "By alert", ["alertname", "severity"], [
        ColumnInfo("episodes", "episodes", q.COUNT, "lower", query),
        ColumnInfo("firing_seconds", "time firing", q.SECONDS, "lower", query)])
    summary: dict[str, dict[tuple[str, str], list[float]]] = {}
    for slot, listed in found.items():
        per = summary.setdefault(slot, {})
        for e in listed:
            key = (e.labels.get("alertname", ""), e.labels.get("severity", ""))
            per.setdefault(key, [0.0, 0.0])
            per[key][0] += 1
            per[key][1] += e.seconds
    for key, (count, seconds) in sorted(summary.get("value", {}).items(),
                                        key=lambda kv: (-kv[1][1], kv[0])):
        row = Row({"alertname": key[0], "severity": key[1]},
                  {"episodes": count, "firing_seconds": seconds})
        if o.compare:
            count0, seconds0 = summary.get("previous", {}).get(key, [0.0, 0.0])
            row.previous = {"episodes": count0, "firing_seconds": seconds0}
        names.rows.append(row)
    episodes_table = TableResult("episodes", "Episodes", [
        "alertname", "severity", "labels", "state"], [
        ColumnInfo("start", "firing from", q.TIMESTAMP, "", query),
        ColumnInfo("end", "last firing", q.TIMESTAMP, "", query),
        ColumnInfo("seconds", "duration", q.SECONDS, "lower", query),
        ColumnInfo("active_since", "pending since", q.TIMESTAMP, "",
                   ctx.fill(q.ALERTS_FOR_STATE))])
    for e in found["value"]:
        labels = e.labels
        rest = " ".join(f"{k}={v}" for k, v in sorted(labels.items())
                        if k not in ("alertname", "severity"))
        episodes_table.rows.append(Row(
            {"alertname": labels.get("alertname", ""),
             "severity": labels.get("severity", ""), "labels": rest,
             "state": "firing at end" if e.firing_at_end else "resolved"},
            {"start": e.start, "end": e.end, "seconds": e.seconds,
             "active_since": e.active_since}))
    section.tables = [names, episodes_table]
    if not found["value"]:
        section.note = "No alert fired in this period."
    return section
