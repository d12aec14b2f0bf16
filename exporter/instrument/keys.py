"""What a key of the metrics files says: its parts, whether its names can be served, and how
the values of a gauge's series from several files add up (shared by both mergers).

A key is the JSON prometheus_client writes: [family, sample name, labels, help text].
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]
ParsedKey = tuple[str, str, Labels, str, float | None]

# Parsed or judged keys a merger keeps before it starts over (a folder of ever-new keys cannot
# grow its memory without bound).
KEY_CACHE_LIMIT = 200_000
# Keys that carry bookkeeping rather than metrics (the compaction's record of folded files).
MARKER_PREFIX = "__"
SUM_MODES = frozenset(("", "sum", "livesum", "all", "liveall", "mostrecent", "livemostrecent"))
# Gauge modes with one series per process (a pid label added).
PID_MODES = frozenset(("all", "liveall", "mostrecent", "livemostrecent"))
MAX_MODES = frozenset(("max", "livemax"))
# Names the text format accepts without quoting (what Prometheus before 3.0 and promtool
# parse); a file declaring any other name is not served, so it cannot break the exposition.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The sample names a family of each type may have besides its own name.
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": (),
             "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created")}


def names_servable(typ: str, mode: str, parsed: ParsedKey) -> bool:
    """Whether an entry's names can be served as they are: not if a name is not valid in the
    text format, the sample name is not its family's, a label is one the merge adds itself, or
    an le bound is outside a histogram's buckets."""
    metric, sample, labels, _, le = parsed
    if not _METRIC_NAME.fullmatch(metric) or not (
            sample == metric or sample in [metric + s for s in _SUFFIXES.get(typ, ())]):
        return False
    if (le is not None) != (typ == "histogram" and sample == f"{metric}_bucket"):
        return False
    for name, _ in labels:
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__") or (
                name == "pid" and typ == "gauge" and mode in PID_MODES):
            return False
    return True


def format_le(bound: float) -> str:
    """A bucket bound as the le label writes it ("0.5", "+Inf")."""
    return "+Inf" if bound == math.inf else repr(float(bound))


@dataclass(frozen=True, slots=True)
class Series:
    """One served series (mode: a gauge's, else "")."""

    family: str
    typ: str
    mode: str
    help: str
    sample: str
    labels: Labels
    le: float | None


def combine(mode: str, values: Iterable[float]) -> float:
    """Values of one gauge series from several places, as its mode adds them up."""
    if mode in MAX_MODES:
        return max(values)
    if mode in ("min", "livemin"):
        return min(values)
    return sum(values)


def parse_key(key: bytes) -> ParsedKey | None:
    """parse_key_text() of a key's bytes; raises ValueError when they are not UTF-8."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("a key is not UTF-8") from None
    return parse_key_text(text)


def parse_key_text(key: str) -> ParsedKey | None:
    """(metric, sample, sorted labels without le, help, le) of a key, None when it is not a
    metric's (not JSON of that shape, or a marker)."""
    try:
        metric, sample, labels, help_text = json.loads(key)
        le = labels.pop("le", None) if isinstance(labels, dict) else None
        if (isinstance(metric, str) and isinstance(sample, str) and isinstance(labels, dict)
                and not metric.startswith(MARKER_PREFIX)):
            return (metric, sample, tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                    str(help_text), None if le is None else float(le))
    except (ValueError, TypeError, RecursionError):
        # RecursionError: a key of thousands of nested brackets.
        pass
    return None
