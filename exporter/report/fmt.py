"""Numbers for people: units as the dashboards show them, and period-over-period changes."""

from __future__ import annotations

from datetime import tzinfo

from exporter.report import queries as q
from exporter.report.dataset import FigureResult
from exporter.report.times import format_span, human

NO_VALUE = "-"


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def value(number: float | None, unit: str, tz: tzinfo | None = None) -> str:
    """One figure in its unit: 99.66%, 240 ms, 20 GiB, 1,431,918, 2.37/s, a date."""
    if number is None:
        return NO_VALUE
    if unit == q.RATIO:
        percent = number * 100
        digits = 2 if abs(percent) < 100 else 1
        return f"{_trim(f'{percent:.{digits}f}')}%"
    if unit == q.SECONDS:
        if number == 0:
            return "0 s"
        if abs(number) < 0.9995:
            return f"{number * 1000:.0f} ms"
        if abs(number) < 120:
            return f"{_trim(f'{number:.2f}')} s"
        return format_span(number)
    if unit == q.BYTES:
        size = float(number)
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if abs(size) < 1024 or suffix == "PiB":
                return f"{size:.0f} {suffix}" if suffix == "B" else f"{size:.1f} {suffix}"
            size /= 1024
    if unit == q.RATE:
        return f"{_trim(f'{number:.2f}')}/s"
    if unit == q.TIMESTAMP and tz is not None:
        return human(number, tz)
    if float(number).is_integer() and abs(number) < 1e15:
        return f"{int(number):,}"
    return f"{number:,.2f}"


def change(current: float | None, previous: float | None, unit: str) -> str:
    """+20.0%, -0.30 pp (ratios change in percentage points), new, ±0, or empty."""
    if current is None or previous is None:
        return ""
    if unit == q.RATIO:
        points = (current - previous) * 100
        return "±0 pp" if abs(points) < 0.005 else f"{points:+.2f} pp"
    if current == previous:
        return "±0"
    if previous == 0:
        return "new" if current > 0 else f"{value(current - previous, unit)}"
    relative = (current - previous) / abs(previous) * 100
    return "±0%" if abs(relative) < 0.05 else f"{relative:+.1f}%"


def verdict(current: float | None, previous: float | None, better: str, unit: str) -> str:
    """good, bad or neutral: whether the change is in the direction the figure wants."""
    if current is None or previous is None or not better or current == previous:
        return "neutral"
    if change(current, previous, unit).startswith("±"):
        return "neutral"  # shown as no change: no colour either
    up = current > previous
    return "good" if up == (better == "higher") else "bad"


def figure_line(fig: FigureResult, tz: tzinfo | None = None) -> str:
    text = f"{fig.title}: {value(fig.value, fig.unit, tz)}"
    delta = change(fig.value, fig.previous, fig.unit)
    return f"{text} ({delta})" if delta else text
