"""Durations, points in time and time zones as the report and export flags write them."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from exporter.configtypes import sum_duration

_SPAN_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_SPAN_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
               "y": 365 * 86400}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_span(text: str) -> int:
    """Prometheus' duration syntax ("7d", "1d12h", "90m") in whole seconds, at least 1."""
    text = text.strip()
    try:
        total = sum_duration(text, _SPAN_PART, _SPAN_UNITS)
    except ValueError:
        if not text:
            raise ValueError(f'expected a duration of whole seconds like "7d", got "{text}"'
                             ) from None
        raise ValueError(f'expected a duration like "7d" or "1h30m", got "{text}"') from None
    if total < 1 or total != int(total):
        raise ValueError(f'expected a duration of whole seconds like "7d", got "{text}"')
    return int(total)


def format_span(seconds: float) -> str:
    """A short human form: 7d, 1d 2h, 25m, 40s."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2])


def promql_span(seconds: int) -> str:
    """A range for PromQL brackets."""
    return f"{int(seconds)}s"


def zone(name: str | None) -> tzinfo:
    """The named IANA time zone, or the machine's local zone when name is empty."""
    if not name:
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else timezone.utc
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f'unknown time zone "{name}" (use an IANA name like Asia/Shanghai)'
                         ) from None


def parse_time(text: str, tz: tzinfo, now: float | None = None) -> int:
    """A point in time as Unix seconds: "now", "midnight" (the last midnight in tz), Unix
    seconds, a date (midnight in tz) or RFC 3339 (a time without offset is in tz)."""
    text = text.strip()
    current = time.time() if now is None else now
    if text == "now":
        return int(current)
    if text == "midnight":
        local = datetime.fromtimestamp(current, tz)
        return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    if re.fullmatch(r"\d{9,11}(\.\d+)?", text):
        return int(float(text))
    try:
        if _DATE.match(text):
            parsed = datetime.strptime(text, "%Y-%m-%d")
        else:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f'expected "now", "midnight", Unix seconds, a date (2024-03-11) or '
                         f'RFC 3339 (2024-03-11T00:00:00Z), got "{text}"') from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return int(parsed.timestamp())


def local(ts: float, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(ts, tz)


def iso(ts: float, tz: tzinfo) -> str:
    """RFC 3339 with the zone's offset, to the second."""
    return local(ts, tz).isoformat(timespec="seconds")


def human(ts: float, tz: tzinfo, seconds: bool = False) -> str:
    """2024-03-06 14:10 (UTC+08:00) style, for people."""
    moment = local(ts, tz)
    text = moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return f"{text} {zone_label(tz, ts)}"


def zone_label(tz: tzinfo, ts: float) -> str:
    offset = local(ts, tz).utcoffset() or timedelta(0)
    if offset == timedelta(0):
        return "UTC"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def nice_step(span: int, points: int = 336) -> int:
    """The smallest round step that draws span in at most about points points."""
    for step in (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= points:
            return step
    return 86400 * max(1, -(-span // (86400 * points)))
