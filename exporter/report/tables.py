"""A section's figures and tables: instant queries at the end of this period and of the one
before, and the rows the answers make."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from exporter.report import queries as q
from exporter.report.dataset import ColumnInfo, FigureResult, Row, SectionResult, TableResult
from exporter.report.plan import Options, Plan

# column key -> label values of a row -> value
Values = dict[str, dict[tuple[str, ...], float]]


@dataclass
class PendingTable:
    """A table whose queries are planned; fill_rows() fills it once they have run."""

    spec: q.Table
    result: TableResult
    current: Values
    before: Values


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _key(labels: dict[str, str], by: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(labels.get(name, "") for name in by)


def _instants(plan: Plan, spec: q.Section, expr: str, what: str,
              store: Callable[[str, list[Any]], None]) -> None:
    """expr at the period's end (slot "value") and, when comparing, at its start (slot
    "previous")."""
    if plan.lacks(expr):
        return
    query = plan.fill(expr)
    times = [("value", plan.o.end)]
    if plan.o.compare:
        times.append(("previous", plan.o.start))
    for slot, at in times:
        plan.add(f"{spec.title}: {what}", partial(plan.client.instant, query, at),
                 partial(store, slot), what, query)


def plan_figures(plan: Plan, spec: q.Section, section: SectionResult) -> None:
    for fig in spec.figures:
        result = FigureResult(fig.key, fig.title, fig.unit, fig.better, plan.fill(fig.expr))
        section.figures.append(result)

        def store_figure(slot: str, samples: list[Any], res: FigureResult = result) -> None:
            if samples:
                setattr(res, slot, _finite(samples[0].value))

        _instants(plan, spec, fig.expr, fig.title, store_figure)


def plan_tables(plan: Plan, spec: q.Section) -> list[PendingTable]:
    tables = []
    for table in spec.tables:
        result = TableResult(table.key, table.title, list(table.by),
                             [ColumnInfo(c.key, c.title, c.unit, c.better, plan.fill(c.expr))
                              for c in table.columns], note=table.note)
        pending = PendingTable(table, result, {}, {})
        tables.append(pending)
        for column in table.columns:
            def store_column(slot: str, samples: list[Any], *, col: str = column.key,
                             p: PendingTable = pending) -> None:
                target = p.current if slot == "value" else p.before
                target[col] = {_key(s.labels, p.spec.by): s.value for s in samples}

            _instants(plan, spec, column.expr, f"{table.title}: {column.title}", store_column)
    return tables


def fill_rows(pending: PendingTable, options: Options) -> TableResult:
    """The table's rows from the answers, largest of its sort column first."""
    table, result, current, before = (pending.spec, pending.result, pending.current,
                                      pending.before)
    keys: set[tuple[str, ...]] = set()
    for values in current.values():
        keys.update(values)
    found = []
    for key in keys:
        labels = dict(zip(table.by, key, strict=True))
        row = Row(labels, {c.key: _finite(current.get(c.key, {}).get(key, math.nan))
                           for c in table.columns})
        if options.compare and table.compare:
            row.previous = {c.key: _finite(before.get(c.key, {}).get(key, math.nan))
                            for c in table.columns}
        found.append(row)
    found.sort(key=lambda r: (r.values.get(table.sort) is None,
                              -(r.values.get(table.sort) or 0.0), tuple(r.labels.values())))
    result.rows = found
    result.shown = options.top if table.limit else None
    return result
