"""Assemble the report's dataset from Prometheus: check there is data, plan and run each
section's queries (tables.py, chartdata.py), the alerts (alerts.py) and the data's own
coverage."""

from __future__ import annotations

import time

from exporter.report import queries as q
from exporter.report.alerts import alerts_section
from exporter.report.chartdata import DAY, plan_chart, plan_daily
from exporter.report.dataset import Gap, Problem, Report, SectionResult
from exporter.report.jobs import FATAL, Progress, Runner
from exporter.report.plan import Options, Plan
from exporter.report.promapi import Client, PromError, Series
from exporter.report.tables import fill_rows, plan_figures, plan_tables
from exporter.report.times import human


class NoDataError(Exception):
    """Nothing to report on: the selector matches no samples in the period."""


class Builder:
    """Runs the queries (a few at a time) and fills a Report."""

    def __init__(self, client: Client, options: Options, progress: Progress | None = None
                 ) -> None:
        self.client = client
        self.o = options
        self.window = options.end - options.start
        self.ctx = q.Context(options.selector, self.window, options.step, options.peak)
        self.runner = Runner(options.parallel, progress)
        self.problems: list[Problem] = []

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
        report.sections.append(alerts_section(self.client, self.ctx, o, self._problem))
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

        plan = Plan(self.client, self.o, fill, known)
        plan_figures(plan, spec, section)
        tables = plan_tables(plan, spec)
        for chart in spec.charts:
            section.charts.append(plan_chart(plan, chart))
        if spec.daily is not None and self.window >= DAY:
            daily_table, daily_charts = plan_daily(plan, spec.daily)
            tables.append(daily_table)
            section.charts.extend(daily_charts)

        self.runner.run(plan.jobs)
        failures, jobs, missing_all = plan.failures, plan.jobs, plan.missing
        if failures:
            first_what, first_error, first_query = failures[0]
            self._problem(spec.key, "query failed",
                          f"{len(failures)} of {len(jobs)} queries failed; the first: "
                          f"{first_what}: {first_error}", first_query)
        for table in tables:
            section.tables.append(fill_rows(table, self.o))
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

        self.runner.run([("coverage", lambda: self.client.range(steps_query, self.o.start,
                                                                self.o.end, peak),
                          gaps, failed)])
