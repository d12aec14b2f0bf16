"""The report as one self-contained HTML file: inline CSS, charts as PNG data: URIs, no script
and no external asset, so it reads the same offline, in a browser and (via deliver.py, which
moves the images into MIME parts) in a mail client."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import tzinfo
from html import escape

from exporter.report import fmt
from exporter.report import queries as q
from exporter.report.dataset import ChartResult, Report, SectionResult, TableResult
from exporter.report.times import format_span, human

CSS = """
body{margin:0;background:#f4f5f7;color:#1d1d1f;font:14px/1.45 -apple-system,"Segoe UI",
Helvetica,Arial,"PingFang SC","Microsoft YaHei",sans-serif}
.page{max-width:960px;margin:0 auto;background:#fff;padding:24px 28px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 6px;border-bottom:2px solid
#e5e7eb;padding-bottom:4px}h3{font-size:14px;margin:16px 0 4px}
.meta{color:#555;margin:0 0 12px}.note{color:#666;font-size:13px;margin:4px 0}
.banner{background:#fff4e5;border-left:4px solid #e69f00;padding:8px 12px;margin:12px 0}
.banner.bad{background:#fdecea;border-left-color:#d62728}
table.data{border-collapse:collapse;width:100%;font-size:13px;margin:4px 0 8px}
table.data th{background:#f4f5f7;font-weight:600}
table.data td,table.data th{padding:4px 8px;border-bottom:1px solid #e5e7eb;text-align:right;
vertical-align:top}
table.data .l{text-align:left}.chg{font-size:11px;color:#666;white-space:nowrap}
.good{color:#1a7f37}.bad{color:#c62828}.warn{color:#b26a00}
.glance td{padding:6px 10px;border:1px solid #e5e7eb}.glance .v{font-size:18px;font-weight:600}
img.chart{display:block;max-width:100%;height:auto;margin:6px 0}
footer{color:#777;font-size:12px;margin-top:28px;border-top:1px solid #e5e7eb;padding-top:8px}
"""


def _chg(current: float | None, previous: float | None, unit: str, better: str) -> str:
    text = fmt.change(current, previous, unit)
    if not text:
        return ""
    return f'<span class="chg {fmt.verdict(current, previous, better, unit)}">{escape(text)}</span>'


def _figures(section: SectionResult, compare: bool) -> str:
    if not section.figures:
        return ""
    head = "<th>previous</th><th>change</th>" if compare else ""
    rows = []
    for fig in section.figures:
        cells = (f'<td class="l">{escape(fig.title)}</td>'
                 f"<td>{escape(fmt.value(fig.value, fig.unit))}</td>")
        if compare:
            cells += (f"<td>{escape(fmt.value(fig.previous, fig.unit))}</td>"
                      f"<td>{_chg(fig.value, fig.previous, fig.unit, fig.better)}</td>")
        rows.append(f"<tr>{cells}</tr>")
    return (f'<table class="data"><tr><th class="l">figure</th><th>this period</th>{head}</tr>'
            + "".join(rows) + "</table>")


def _table(table: TableResult, tz: tzinfo) -> str:
    out = [f"<h3>{escape(table.title)}</h3>"]
    if not table.rows:
        out.append('<p class="note">No rows.</p>')
        return "".join(out)
    head = "".join(f'<th class="l">{escape(name)}</th>' for name in table.by)
    head += "".join(f"<th>{escape(c.title)}</th>" for c in table.columns)
    out.append(f'<table class="data"><tr>{head}</tr>')
    shown = table.rows if table.shown is None else table.rows[:table.shown]
    for row in shown:
        cells = "".join(f'<td class="l">{escape(row.labels.get(n, ""))}</td>' for n in table.by)
        for column in table.columns:
            current = row.values.get(column.key)
            text = escape(fmt.value(current, column.unit, tz))
            if row.previous:
                change = _chg(current, row.previous.get(column.key), column.unit, column.better)
                text += f"<br>{change}" if change else ""
            cells += f"<td>{text}</td>"
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    if len(shown) < len(table.rows):
        out.append(f'<p class="note">Top {len(shown)} of {len(table.rows)}; all rows are in '
                   "the CSV and JSON files.</p>")
    if table.note:
        out.append(f'<p class="note">{escape(table.note)}</p>')
    return "".join(out)


def _chart(chart: ChartResult, png: bytes | None) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode()
    return (f'<img class="chart" width="900" alt="{escape(chart.title)}" '
            f'src="data:image/png;base64,{data}">')


def _glance(report: Report) -> str:
    """The handful of figures a reader looks at first."""
    picks: list[tuple[str, float | None, float | None, str, str]] = []

    def figure(section: str, key: str, label: str) -> None:
        try:
            found = next(f for f in report.section(section).figures if f.key == key)
        except StopIteration:
            return
        if found.value is not None:
            picks.append((label, found.value, found.previous, found.unit, found.better))

    figure("http", "requests", "requests")
    figure("http", "error_ratio", "5xx ratio")
    figure("http", "p95", "p95 latency")
    figure("alerts", "episodes", "alerts fired")
    figure("business", "active_users_7d", "active users (7 d)")
    slo = next((s for s in report.sections if s.key == "slo" and s.tables), None)
    if slo is not None:
        worst = min((r for r in slo.tables[0].rows if r.values.get("budget_remaining") is not None),
                    key=lambda r: r.values["budget_remaining"] or 0.0, default=None)
        if worst is not None:
            picks.append((f"error budget left ({worst.labels.get('sloth_slo', '')})",
                          worst.values["budget_remaining"], None, q.RATIO, "higher"))
    if not picks:
        return ""
    cells = "".join(
        f'<td><div class="note">{escape(label)}</div><div class="v">'
        f"{escape(fmt.value(v, unit))}</div>{_chg(v, p, unit, better)}</td>"
        for label, v, p, unit, better in picks)
    return f'<table class="glance" style="border-collapse:collapse"><tr>{cells}</tr></table>'


def _coverage(report: Report, tz: tzinfo) -> str:
    if not report.coverage and not report.gaps:
        return ""
    parts = [f"{escape(i)}: {escape(fmt.value(share, q.RATIO))}"
             for i, share in sorted(report.coverage.items())]
    text = ("Share of the period each exporter was scraped successfully (up == 1, at 1-minute "
            "resolution): "
            + ", ".join(parts) + ".")
    if report.gaps:
        items = "".join(f"<li>{escape(g.instance)}: {escape(human(g.start, tz))} to "
                        f"{escape(human(g.end, tz))} ({escape(format_span(g.seconds))})</li>"
                        for g in report.gaps)
        text += f" Gaps, during which figures miss data:<ul>{items}</ul>"
    return f'<p class="note">{text}</p>'


def render(report: Report, images: Mapping[str, bytes], tz: tzinfo) -> str:
    """The whole report; images maps "section.chart" keys to PNG bytes."""
    compare = report.previous_start is not None
    period = f"{human(report.start, tz)} to {human(report.end, tz)}"
    meta = [f"Period: {period} ({format_span(report.window)})"]
    if compare and report.previous_end is not None and report.previous_start is not None:
        meta.append(f"compared with {human(report.previous_start, tz)} to "
                    f"{human(report.previous_end, tz)}")
    body = [f"<h1>{escape(report.title)}</h1>",
            f'<p class="meta">{escape("; ".join(meta))}.<br>Prometheus {escape(report.prometheus)}'
            f", series {escape('{' + report.selector + '}')}; generated "
            f"{escape(human(report.generated_at, tz))}.</p>"]
    if report.problems or report.gaps:
        level = "bad" if report.failed_queries else ""
        lines = ["<strong>Partial report.</strong> "]
        if report.gaps:
            lost = sum(g.seconds for g in report.gaps)
            lines.append(f"Data gaps totalling {escape(format_span(lost))} (listed under "
                         "Data coverage). ")
        if report.problems:
            items = "".join(f"<li>{escape(p.section)}: {escape(p.what)}: {escape(p.detail)}</li>"
                            for p in report.problems)
            lines.append(f"Missing or failed figures:<ul>{items}</ul>")
        body.append(f'<div class="banner {level}">{"".join(lines)}</div>')
    glance = _glance(report)
    if glance:
        body.append("<h2>At a glance</h2>" + glance)
    for section in report.sections:
        body.append(f'<h2 id="{escape(section.key)}">{escape(section.title)}</h2>')
        if section.status == "no_data":
            body.append(f'<p class="note">{escape(section.note)}</p>')
            continue
        if section.status in ("partial", "failed"):
            body.append('<p class="note warn">Some figures of this section are missing; see '
                        "the notice at the top.</p>")
        if section.note:
            body.append(f'<p class="note">{escape(section.note)}</p>')
        if section.intro:
            body.append(f'<p class="note">{escape(section.intro)}</p>')
        body.append(_figures(section, compare))
        for table in section.tables:
            body.append(_table(table, tz))
        for chart in section.charts:
            body.append(_chart(chart, images.get(f"{section.key}.{chart.key}")))
    body.append("<h2>Data coverage</h2>" + (_coverage(report, tz) or
                                            '<p class="note">Unknown.</p>'))
    body.append(f"<footer>qatoolbox-exporter report. Every figure's PromQL is in report.json; "
                f"tables are also in the CSV files. Built in {report.build_seconds:.1f} s."
                "</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(report.title)}: {escape(period)}</title>"
            f"<style>{CSS}</style></head><body><div class=\"page\">\n"
            + "\n".join(body) + "\n</div></body></html>\n")
