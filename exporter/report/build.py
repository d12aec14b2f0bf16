"""Assemble the report's dataset from Prometheus: every section's queries for this period and
the one before, the charts, the alerts that fired, and the data's own coverage."""

from __future__ import annotations

import math
import queue
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from exporter.report import queries as q
from exporter.report.dataset import (
    ChartResult,
    ColumnInfo,
    FigureResult,
    Gap,
    Problem,
    Report,
    Row,
    SectionResult,
    SeriesResult,
    TableResult,
)
from exporter.report.promapi import Client, PromError, Series
from exporter.report.times import human, local

FATAL = ("unreachable", "auth")
DAY = 86400

Progress = Callable[[int, int, str], None]


class NoDataError(Exception):
    """Nothing to report on: the selector matches no samples in the period."""


@dataclass(frozen=True)
class Options:
    selector: str
    start: int
    end: int
    compare: bool
    step: int
    top: int
    tz: tzinfo
    timezone: str
    title: str
    parallel: int = 4
    peak: int = 60  # resolution of peaks over sums and of the coverage check


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


def _key(labels: dict[str, str], by: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(labels.get(name, "") for name in by)


def _legend(template: str, labels: dict[str, str], fallback: str) -> str:
    text = template
    for name, value in labels.items():
        text = text.replace("{" + name + "}", value)
    text = " ".join(part for part in text.split() if not (part.startswith("{")
                                                           and part.endswith("}")))
    return text.strip() or fallback


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Builder:
    """Runs the queries (a few at a time) and fills a Report."""

    def __init__(self, client: Client, options: Options, progress: Progress | None = None
                 ) -> None:
        self.client = client
        self.o = options
        self.window = options.end - options.start
        self.ctx = q.Context(options.selector, self.window, options.step, options.peak)
        self.progress = progress
        self._lock = threading.Lock()
        self._done = 0
        self._total = 0
        self.problems: list[Problem] = []

    # --- running queries -------------------------------------------------------------------

    def _run(self, jobs: list[tuple[str, Callable[[], Any], Callable[[Any], None],
                                    Callable[[PromError], None]]]) -> None:
        """Run (label, call, on_result, on_error) jobs on a few daemon threads; a fatal error
        (Prometheus gone, credentials refused) stops everything and is raised. Daemon threads
        and joins with a timeout let Ctrl-C or SIGTERM end the run at once."""
        self._total += len(jobs)
        pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for job in jobs:
            pending.put(job)
        fatal: list[PromError] = []

        def worker() -> None:
            while not fatal:
                try:
                    label, call, ok, failed = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = call()
                except PromError as exc:
                    if exc.kind in FATAL:
                        fatal.append(exc)
                        return
                    with self._lock:
                        failed(exc)
                else:
                    with self._lock:
                        ok(result)
                with self._lock:
                    self._done += 1
                    if self.progress is not None:
                        self.progress(self._done, self._total, label)

        threads = [threading.Thread(target=worker, name=f"report-query-{n}", daemon=True)
                   for n in range(min(max(1, self.o.parallel), max(1, len(jobs))))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
        if fatal:
            raise fatal[0]

    def _problem(self, section: str, what: str, detail: str, query: str = "") -> None:
        self.problems.append(Problem(section, what, detail, query))

    # --- the report ------------------------------------------------------------------------

    def build(self) -> Report:
        began = time.monotonic()
        o = self.o
        previous_end = o.start if o.compare else None
        report = Report(o.title, self.client.display, o.selector, o.timezone, o.start, o.end,
                        o.start - self.window if o.compare else None, previous_end, o.step,
                        time.time())
        self._check_data()
        first = o.start - self.window if o.compare else o.start
        known = self._known_names(first)
        for spec in q.SECTIONS:
            report.sections.append(self._section(spec, known))
        report.sections.append(self._alerts())
        self._coverage(report)
        report.problems = self.problems
        report.build_seconds = time.monotonic() - began
        return report

    def _check_data(self) -> None:
        o = self.o
        expr = self.ctx.fill(f"count(last_over_time({q.UP}[$w]))")
        try:
            found = self.client.instant(expr, o.end)
        except PromError as exc:
            if exc.kind == "bad_query":
                raise PromError("bad_query", f"--selector {o.selector!r} is not a valid "
                                f"label matcher list: {exc}") from None
            raise
        if found:
            return
        span = f"between {human(o.start, o.tz)} and {human(o.end, o.tz)}"
        try:
            jobs: list[str] | None = self.client.label_values("job", o.start, o.end)
        except PromError as exc:
            if exc.kind == "unreachable":
                raise
            jobs = None  # only a hint: the label API may be blocked
        hint = ("" if jobs is None else f"; jobs with data then: {', '.join(jobs[:10])}" if jobs
                else "; Prometheus has nothing at all then (before its retention, or in "
                     "the future?)")
        raise NoDataError(f"no data: no up{{{o.selector}}} samples {span}{hint}")

    def _known_names(self, first: int) -> set[str] | None:
        """Metric names with data from first to the end (per storage block: a superset), to
        tell a missing recording rule from an empty result; None where the label API is
        unavailable (a proxy may allow only queries): then every series is assumed present."""
        try:
            known = self.client.metric_names("{" + self.o.selector + "}", first, self.o.end)
            known |= self.client.metric_names('{__name__=~"slo:.+"}', first, self.o.end)
        except PromError as exc:
            if exc.kind == "unreachable":
                raise
            return None
        return known

    @staticmethod
    def _missing(expr: str, known: set[str] | None) -> list[str]:
        return [] if known is None else sorted(q.names(expr) - known)

    def _section(self, spec: q.Section, known: set[str] | None) -> SectionResult:
        section = SectionResult(spec.key, spec.title, "ok", intro=spec.intro)

        def fill(expr: str) -> str:
            return self.ctx.fill(expr, spec.selector)

        # The names API answers per storage block, so the probe is confirmed by a query over
        # exactly this period.
        matchers = "{$sel}" if spec.selector else ""
        probe = fill(f"count(last_over_time({spec.probe}{matchers}[$w]))")
        try:
            present = (known is None or spec.probe in known) and bool(
                self.client.instant(probe, self.o.end))
        except PromError as exc:
            if exc.kind in FATAL:
                raise
            self._problem(spec.key, "query failed", f"whether there is data: {exc}", probe)
            section.status = "failed"
            section.note = "This section could not be read."
            return section
        if not present:
            section.status = "no_data"
            section.note = spec.empty
            return section

        jobs: list[Any] = []
        failures: list[tuple[str, PromError, str]] = []
        missing_all: set[str] = set()

        def failed(what: str, query: str) -> Callable[[PromError], None]:
            def record(exc: PromError) -> None:
                failures.append((what, exc, query))
            return record

        def instants(expr: str, what: str, store: Callable[[str, list[Any]], None]) -> None:
            missing = self._missing(expr, known)
            if missing:
                missing_all.update(missing)
                return
            query = fill(expr)
            times = [("value", self.o.end)]
            if self.o.compare:
                times.append(("previous", self.o.start))
            for slot, at in times:
                jobs.append((f"{spec.title}: {what}", lambda a=at: self.client.instant(query, a),
                             lambda r, s=slot: store(s, r), failed(what, query)))

        for fig in spec.figures:
            result = FigureResult(fig.key, fig.title, fig.unit, fig.better, fill(fig.expr))
            section.figures.append(result)

            def store_figure(slot: str, samples: list[Any], res: FigureResult = result) -> None:
                if samples:
                    setattr(res, slot, _finite(samples[0].value))

            instants(fig.expr, fig.title, store_figure)

        tables: list[tuple[q.Table, TableResult, dict[str, dict[tuple[str, ...], float]],
                           dict[str, dict[tuple[str, ...], float]]]] = []
        for table in spec.tables:
            result_t = TableResult(table.key, table.title, list(table.by),
                                   [ColumnInfo(c.key, c.title, c.unit, c.better, fill(c.expr))
                                    for c in table.columns], note=table.note)
            current: dict[str, dict[tuple[str, ...], float]] = {}
            before: dict[str, dict[tuple[str, ...], float]] = {}
            tables.append((table, result_t, current, before))
            for column in table.columns:
                def store_column(slot: str, samples: list[Any], *, col: str = column.key,
                                 t: q.Table = table, cur: dict[str, Any] = current,
                                 prev: dict[str, Any] = before) -> None:
                    target = cur if slot == "value" else prev
                    target[col] = {_key(s.labels, t.by): s.value for s in samples}

                instants(column.expr, f"{table.title}: {column.title}", store_column)

        for chart in spec.charts:
            section.charts.append(self._chart(chart, fill, known, jobs=jobs, failed=failed,
                                              missing_all=missing_all))
        if spec.daily is not None and self.window >= DAY:
            daily_table, daily_chart = self._daily(spec.daily, fill, known, jobs=jobs,
                                                   failed=failed, missing_all=missing_all)
            tables.append(daily_table)
            section.charts.extend(daily_chart)

        self._run(jobs)
        if failures:
            first_what, first_error, first_query = failures[0]
            self._problem(spec.key, "query failed",
                          f"{len(failures)} of {len(jobs)} queries failed; the first: "
                          f"{first_what}: {first_error}", first_query)
        for table, result_t, current, before in tables:
            self._rows(table, result_t, current, before)
            section.tables.append(result_t)
        if missing_all:
            self._problem(spec.key, "missing series",
                          "not in Prometheus for this period: " + ", ".join(sorted(missing_all))
                          + " (recording rules not loaded, or the collector does not expose "
                            "them); the figures that need them are empty")
        if failures and len(failures) == len(jobs):
            section.status = "failed"
        elif failures or missing_all:
            section.status = "partial"
        return section

    def _rows(self, table: q.Table, result: TableResult,
              current: dict[str, dict[tuple[str, ...], float]],
              before: dict[str, dict[tuple[str, ...], float]]) -> None:
        keys: set[tuple[str, ...]] = set()
        for values in current.values():
            keys.update(values)
        rows = []
        for key in keys:
            labels = dict(zip(table.by, key, strict=True))
            row = Row(labels, {c.key: _finite(current.get(c.key, {}).get(key, math.nan))
                               for c in table.columns})
            if self.o.compare and table.compare:
                row.previous = {c.key: _finite(before.get(c.key, {}).get(key, math.nan))
                                for c in table.columns}
            rows.append(row)
        rows.sort(key=lambda r: (r.values.get(table.sort) is None,
                                 -(r.values.get(table.sort) or 0.0), tuple(r.labels.values())))
        result.rows = rows
        result.shown = self.o.top if table.limit else None

    def _chart(self, chart: q.Chart, fill: Callable[[str], str], known: set[str] | None, *,
               jobs: list[Any], failed: Callable[[str, str], Callable[[PromError], None]],
               missing_all: set[str]) -> ChartResult:
        result = ChartResult(chart.key, chart.title, chart.unit,
                             [{"value": t.value, "label": t.label, "severity": t.severity}
                              for t in chart.thresholds], self.o.step,
                             [fill(line.expr) for line in chart.lines], ymax=chart.ymax)
        for line in chart.lines:
            missing = self._missing(line.expr, known)
            if missing:
                missing_all.update(missing)
                continue
            query = fill(line.expr)
            spans = [(self.o.start, self.o.end, 0)]
            if chart.compare and self.o.compare:
                spans.append((self.o.start - self.window, self.o.start, self.window))

            def store(series: list[Series], shift: int, tmpl: str = line.legend) -> None:
                for s in series:
                    points = [(t + shift, float(v)) for t, v in s.points
                              if math.isfinite(float(v))]
                    name = "previous period" if shift else _legend(tmpl, s.labels, chart.title)
                    result.series.append(SeriesResult(name, s.labels, points, bool(shift)))
                result.series.sort(key=lambda x: (x.previous, x.name))

            for begin, stop, shift in spans:
                jobs.append((f"chart {chart.title}",
                             lambda b=begin, e=stop, qq=query: self.client.range(qq, b, e,
                                                                                 self.o.step),
                             lambda r, sh=shift, st=store: st(r, sh),
                             failed(f"chart {chart.title}", query)))
        return result

    def _daily(self, daily: q.Daily, fill: Callable[[str], str], known: set[str] | None, *,
               jobs: list[Any], failed: Callable[[str, str], Callable[[PromError], None]],
               missing_all: set[str]) -> tuple[Any, list[ChartResult]]:
        days = self.window // DAY
        first = self.o.end - (days - 1) * DAY
        spec = q.Table(daily.key, daily.title, ("day",), daily.columns, "", limit=False,
                       compare=False)
        result = TableResult(daily.key, daily.title, ["day"],
                             [ColumnInfo(c.key, c.title, c.unit, c.better, fill(c.expr))
                              for c in daily.columns],
                             note="Each day ends at the period's end time of day and is named "
                                  "by the date it starts on.")
        current: dict[str, dict[tuple[str, ...], float]] = {}
        charts = []
        for column in daily.columns:
            missing = self._missing(column.expr, known)
            if missing:
                missing_all.update(missing)
                continue
            query = fill(column.expr)
            chart = ChartResult(f"daily_{column.key}", f"{column.title.capitalize()} per day",
                                column.unit, [], DAY, [query], kind="bar")
            charts.append(chart)

            def store(series: list[Series], key: str = column.key, ch: ChartResult = chart
                      ) -> None:
                points = {t: float(v) for s in series for t, v in s.points}
                # A day is named by the date it starts on, in the report's time zone.
                current[key] = {(local(t - DAY, self.o.tz).strftime("%Y-%m-%d"),): v
                                for t, v in points.items()}
                ch.series.append(SeriesResult(ch.title, {}, sorted(
                    (t - DAY / 2, v) for t, v in points.items() if math.isfinite(v))))

            jobs.append((f"{daily.title}: {column.title}",
                         lambda qq=query: self.client.range(qq, first, self.o.end, DAY), store,
                         failed(f"{daily.title}: {column.title}", query)))
        return (spec, result, current, {}), charts

    # --- alerts ----------------------------------------------------------------------------

    def _episodes(self, end: int) -> list[Episode]:
        window = self.ctx.fill(q.ALERTS_FIRING)
        firing = self.client.raw(window, end)
        states = self.client.raw(self.ctx.fill(q.ALERTS_FOR_STATE), end)
        active: dict[tuple[tuple[str, str], ...], list[tuple[float, str]]] = {}
        for series in states:
            labels = {k: v for k, v in series.labels.items() if k != "__name__"}
            active[tuple(sorted(labels.items()))] = series.points
        spacings = [b[0] - a[0] for s in firing
                    for a, b in zip(s.points, s.points[1:], strict=False)]
        usual = statistics.median(spacings) if spacings else 60.0
        episodes = []
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
                episodes.append(Episode(labels, run[0], run[-1], since[0] if since else None,
                                        run[-1] >= end - 1.5 * usual))
        episodes.sort(key=lambda e: (e.start, e.labels.get("alertname", "")))
        return episodes

    def _alerts(self) -> SectionResult:
        section = SectionResult("alerts", "Alerts that fired", "ok",
                                intro="From Prometheus' ALERTS series: each run of firing "
                                      "evaluations is one episode, from the first to the last "
                                      "evaluation that found it firing.")
        query = self.ctx.fill(q.ALERTS_FIRING)
        periods = {"value": self.o.end}
        if self.o.compare:
            periods["previous"] = self.o.start
        found: dict[str, list[Episode]] = {}
        for slot, end in periods.items():
            try:
                found[slot] = self._episodes(end)
            except PromError as exc:
                if exc.kind in FATAL:
                    raise
                self._problem("alerts", "query failed", f"alerts: {exc}", query)
                section.status = "partial" if slot == "previous" else "failed"
        if "value" not in found:
            section.note = "The alerts could not be read."
            return section
        figures = [FigureResult("episodes", "alert episodes", q.COUNT, "lower", query),
                   FigureResult("critical", "critical episodes", q.COUNT, "lower", query),
                   FigureResult("firing_seconds", "time firing (all alerts)", q.SECONDS,
                                "lower", query)]
        for slot, episodes in found.items():
            setattr(figures[0], slot, float(len(episodes)))
            setattr(figures[1], slot, float(sum(1 for e in episodes
                                                if e.labels.get("severity") == "critical")))
            setattr(figures[2], slot, float(sum(e.seconds for e in episodes)))
        section.figures = figures
        names = TableResult("by_name", "By alert", ["alertname", "severity"], [
            ColumnInfo("episodes", "episodes", q.COUNT, "lower", query),
            ColumnInfo("firing_seconds", "time firing", q.SECONDS, "lower", query)])
        summary: dict[str, dict[tuple[str, str], list[float]]] = {}
        for slot, episodes in found.items():
            per = summary.setdefault(slot, {})
            for e in episodes:
                key = (e.labels.get("alertname", ""), e.labels.get("severity", ""))
                per.setdefault(key, [0.0, 0.0])
                per[key][0] += 1
                per[key][1] += e.seconds
        for key, (count, seconds) in sorted(summary.get("value", {}).items(),
                                            key=lambda kv: (-kv[1][1], kv[0])):
            row = Row({"alertname": key[0], "severity": key[1]},
                      {"episodes": count, "firing_seconds": seconds})
            if self.o.compare:
                count0, seconds0 = summary.get("previous", {}).get(key, [0.0, 0.0])
                row.previous = {"episodes": count0, "firing_seconds": seconds0}
            names.rows.append(row)
        episodes_table = TableResult("episodes", "Episodes", [
            "alertname", "severity", "labels", "state"], [
            ColumnInfo("start", "firing from", q.TIMESTAMP, "", query),
            ColumnInfo("end", "last firing", q.TIMESTAMP, "", query),
            ColumnInfo("seconds", "duration", q.SECONDS, "lower", query),
            ColumnInfo("active_since", "pending since", q.TIMESTAMP, "",
                       self.ctx.fill(q.ALERTS_FOR_STATE))])
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

    # --- coverage --------------------------------------------------------------------------

    def _coverage(self, report: Report) -> None:
        """The gaps in each exporter's successful scrapes (up == 1) at one-minute resolution,
        and the share of the period they leave."""
        steps_query = self.ctx.fill(q.UP_STEPS)
        report.coverage_query = steps_query
        peak = self.o.peak

        def gaps(series: list[Series]) -> None:
            grid = range(self.o.start, self.o.end + 1, peak)
            for s in series:
                instance = s.labels.get("instance", "")
                good = {round(t) for t, v in s.points if float(v) == 1}
                run_start: int | None = None
                lost = 0
                for t in grid:
                    if t not in good and run_start is None:
                        run_start = t
                    elif t in good and run_start is not None:
                        report.gaps.append(Gap(instance, run_start, t))
                        lost += t - run_start
                        run_start = None
                if run_start is not None:
                    report.gaps.append(Gap(instance, run_start, self.o.end))
                    lost += self.o.end - run_start
                report.coverage[instance] = 1 - lost / self.window
            report.gaps.sort(key=lambda g: (g.start, g.instance))

        def failed(exc: PromError) -> None:
            self._problem("coverage", "query failed", f"coverage: {exc}", steps_query)

        self._run([("coverage", lambda: self.client.range(steps_query, self.o.start,
                                                          self.o.end, peak), gaps, failed)])
