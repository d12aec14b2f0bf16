"""Charts as PNG images, drawn with matplotlib's Agg backend (no display, no pyplot state):
PNG because mail clients block inline SVG; the units and threshold lines of the dashboards."""

from __future__ import annotations

import io
import logging
from datetime import datetime, tzinfo

from exporter.report import queries as q
from exporter.report.dataset import ChartResult
from exporter.report.fmt import value

WIDTH, HEIGHT, DPI = 9.0, 2.6, 100
COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
SEVERITY = {"warning": "#e69f00", "critical": "#d62728"}


class ChartsUnavailableError(Exception):
    """matplotlib is not installed (the `report` extra)."""


def check() -> None:
    """Import matplotlib now, so a missing extra fails before any query is made."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ChartsUnavailableError("HTML reports need matplotlib for their charts: pip install "
                                "'qatoolbox-exporter[report]' (or use --format csv,json)"
                                ) from None
    # Its font cache warnings (an unwritable home in a systemd unit) are not our news.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


def _ticks(start: float, end: float, tz: tzinfo) -> tuple[list[float], list[str]]:
    """Tick positions (Unix seconds) on round local times, with their labels."""
    span = end - start
    step = next((h * 3600 for h in (1, 3, 6, 12, 24, 48, 168, 336) if span / (h * 3600) <= 9),
                28 * 86400)
    first = datetime.fromtimestamp(start, tz).replace(hour=0, minute=0, second=0, microsecond=0)
    positions, labels = [], []
    moment = first
    while moment.timestamp() <= end:
        at = moment.timestamp()
        if at >= start:
            positions.append(at)
            labels.append(moment.strftime("%a %m-%d" if step >= 86400 else
                                          ("%m-%d" if moment.hour == 0 else "%H:%M")))
        moment = datetime.fromtimestamp(at + step, tz)
        if step >= 86400:  # stay on local midnight across DST changes
            moment = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return positions, labels


def render(chart: ChartResult, tz: tzinfo, start: float, end: float) -> bytes:
    """One chart as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.set_title(chart.title, loc="left", fontsize=11)
    drawn = False
    colour = iter(COLOURS * 4)
    for series in chart.series:
        if not series.points:
            continue
        xs = [t for t, _ in series.points]
        ys = [v for _, v in series.points]
        if chart.kind == "bar":
            ax.bar(xs, ys, width=0.7 * chart.step, color=COLOURS[0], label=series.name)
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(value(y, chart.unit), (x, y), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
        elif series.previous:
            ax.plot(xs, ys, color="#999999", linestyle="--", linewidth=1, label=series.name)
        else:
            ax.plot(xs, ys, color=next(colour), linewidth=1.3, label=series.name)
        drawn = True
    for threshold in chart.thresholds:
        ax.axhline(threshold["value"], color=SEVERITY.get(threshold["severity"], "#e69f00"),
                   linestyle=":", linewidth=1.2, label=threshold["label"])
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                color="#777777")
    ax.set_xlim(start, end)
    ax.set_ylim(bottom=0)
    if chart.ymax is not None:
        top = max([chart.ymax] + [v for s in chart.series for _, v in s.points])
        ax.set_ylim(top=top * 1.02)
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: _tick(v, chart.unit)))
    if chart.kind == "bar":  # one label under each day's bar: the date it starts on
        days = [t for s in chart.series for t, _ in s.points]
        ax.set_xticks(days, [datetime.fromtimestamp(t, tz).strftime("%a %m-%d") for t in days])
    else:
        positions, labels = _ticks(start, end, tz)
        ax.set_xticks(positions, labels)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles, names = ax.get_legend_handles_labels()
    if names and not (chart.kind == "bar" and not chart.thresholds):
        ax.legend(handles, names, fontsize=7, loc="upper left", frameon=False,
                  ncol=min(len(names), 4))
    # Fixed margins rather than tight_layout(): a quarter of the drawing time, and every chart
    # of the report lines up.
    figure.subplots_adjust(left=0.085, right=0.965, top=0.88, bottom=0.12)
    out = io.BytesIO()
    # No software version or date in the file: the same data gives the same bytes.
    figure.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
    return out.getvalue()


def _tick(number: float, unit: str) -> str:
    if unit == q.RATIO:
        return f"{number * 100:.0f}%"
    return value(number, unit)
