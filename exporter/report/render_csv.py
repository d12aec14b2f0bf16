"""CSV (RFC 4180: CRLF line ends, quotes doubled) for the report's tables and for raw exports.
Values stay in base units (ratios 0-1, seconds, bytes) so spreadsheets can compute with them."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import tzinfo

from exporter.report import queries as q
from exporter.report.dataset import Report, TableResult
from exporter.report.promapi import Series, series_name
from exporter.report.times import iso


def safe(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula: label values come from whatever
    the monitored systems named things, so a leading = + - @ (or tab, CR) gets a quote."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if cell is None else cell for cell in row])
    return out.getvalue().encode("utf-8")


def _cell(number: float | None, unit: str, tz: tzinfo) -> object:
    if number is None:
        return None
    if unit == q.TIMESTAMP:
        return iso(number, tz)
    return repr(float(number)) if not float(number).is_integer() else int(number)


def _unit(unit: str) -> str:
    return {q.RATIO: "ratio", q.SECONDS: "seconds", q.BYTES: "bytes", q.RATE: "per second",
            q.TIMESTAMP: "time"}.get(unit, "")


def table_csv(table: TableResult, tz: tzinfo) -> bytes:
    """One table: label columns, each value column, then each previous-period column."""
    compare = any(row.previous for row in table.rows)
    header = list(table.by)
    for column in table.columns:
        unit = _unit(column.unit)
        header.append(f"{column.title} ({unit})" if unit else column.title)
    if compare:
        header += [f"{h} previous" for h in header[len(table.by):]]
    rows = []
    for row in table.rows:
        line: list[object] = [safe(row.labels.get(n, "")) for n in table.by]
        line += [_cell(row.values.get(c.key), c.unit, tz) for c in table.columns]
        if compare:
            line += [_cell(row.previous.get(c.key), c.unit, tz) for c in table.columns]
        rows.append(line)
    return _csv(header, rows)


def report_files(report: Report, tz: tzinfo) -> dict[str, bytes]:
    """csv/<name>.csv for every table, the figures, and the data gaps."""
    files: dict[str, bytes] = {}
    figure_rows = []
    for section in report.sections:
        for fig in section.figures:
            figure_rows.append([section.key, fig.key, fig.title, _unit(fig.unit) or "count",
                                _cell(fig.value, fig.unit, tz), _cell(fig.previous, fig.unit, tz),
                                _cell(fig.change, fig.unit, tz), fig.change_ratio])
        for table in section.tables:
            files[f"csv/{section.key}-{table.key}.csv"] = table_csv(table, tz)
    files["csv/figures.csv"] = _csv(["section", "figure", "title", "unit", "value", "previous",
                                     "change", "relative change"], figure_rows)
    files["csv/gaps.csv"] = _csv(["instance", "start", "end", "seconds"], [
        [safe(g.instance), iso(g.start, tz), iso(g.end, tz), int(g.seconds)]
        for g in report.gaps])
    return files


def export_csv(series: list[Series], start: float, end: float, step: int, tz: tzinfo) -> bytes:
    """A range query's result: one row per step, one column per series (named as Prometheus
    prints it), values exactly as Prometheus wrote them, empty where a series has no sample."""
    ordered = sorted(series, key=lambda s: series_name(s.labels))
    columns = [{round(t * 1000): v for t, v in s.points} for s in ordered]
    rows = []
    at = start
    while at <= end:
        key = round(at * 1000)
        stamp = f"{at:.3f}".rstrip("0").rstrip(".")
        rows.append([iso(at, tz), stamp, *[c.get(key) for c in columns]])
        at += step
    return _csv(["time", "timestamp", *[safe(series_name(s.labels)) for s in ordered]], rows)
