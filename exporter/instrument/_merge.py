"""Merging per-process metric values (files or in-memory) into Prometheus metric families."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric

_Labels = tuple[tuple[str, str], ...]
_ParsedKey = tuple[str, str, _Labels, str, float | None]

# Keys that carry bookkeeping rather than metrics (the compaction's record of folded files).
MARKER_PREFIX = "__"
_KEY_CACHE_LIMIT = 200_000


def format_le(bound: float) -> str:
    """A bucket bound as the le label writes it ("0.5", "+Inf")."""
    return "+Inf" if bound == math.inf else repr(float(bound))


@dataclass
class _Family:
    typ: str
    help: str
    mode: str
    samples: dict[tuple[str, _Labels], float] = field(default_factory=dict)
    buckets: dict[_Labels, dict[float, float]] = field(default_factory=dict)


class Merger:
    """Adds up values from many processes the way prometheus_client's multiprocess mode does.

    Counters, histogram buckets and sums add up; gauges follow their file's mode (sum, max,
    min, or one series per process for "all"). Parsed keys are cached across merges: the keys
    are the same scrape after scrape, and parsing their JSON is most of the cost.
    """

    def __init__(self) -> None:
        self._keys: dict[str, _ParsedKey | None] = {}
        self._families: dict[str, _Family] = {}
        self.conflicts = 0

    def reset(self) -> None:
        """Forget the values (not the key cache) before the next merge."""
        self._families = {}
        self.conflicts = 0
        if len(self._keys) > _KEY_CACHE_LIMIT:
            self._keys = {}

    def _parse(self, key: str) -> _ParsedKey | None:
        try:
            return self._keys[key]
        except KeyError:
            pass
        parsed: _ParsedKey | None = None
        try:
            metric, sample, labels, help_text = json.loads(key)
            le = labels.pop("le", None) if isinstance(labels, dict) else None
            if (isinstance(metric, str) and isinstance(sample, str) and isinstance(labels, dict)
                    and not metric.startswith(MARKER_PREFIX)):
                parsed = (metric, sample, tuple(sorted((str(k), str(v))
                                                       for k, v in labels.items())),
                          str(help_text), None if le is None else float(le))
        except (ValueError, TypeError):
            parsed = None
        self._keys[key] = parsed
        return parsed

    def add(self, prefix: str, entries: Iterable[tuple[str, float]], ident: str = "") -> None:
        """Add one process's entries; prefix is the file's type ("counter", "gauge_livesum")."""
        typ, _, mode = prefix.partition("_")
        for key, value in entries:
            parsed = self._parse(key)
            if parsed is None:
                continue
            metric, sample, labels, help_text, le = parsed
            family = self._families.get(metric)
            if family is None:
                family = self._families[metric] = _Family(typ, help_text, mode)
            elif family.typ != typ:
                self.conflicts += 1
                continue
            if typ == "histogram" and le is not None:
                per_le = family.buckets.setdefault(labels, {})
                per_le[le] = per_le.get(le, 0.0) + value
                continue
            if typ == "gauge":
                if mode in ("all", "liveall", "mostrecent", "livemostrecent"):
                    labels = (*labels, ("pid", ident))
                slot = (sample, labels)
                old = family.samples.get(slot)
                if old is None:
                    family.samples[slot] = value
                elif mode in ("max", "livemax"):
                    family.samples[slot] = max(old, value)
                elif mode in ("min", "livemin"):
                    family.samples[slot] = min(old, value)
                else:
                    family.samples[slot] = old + value
                continue
            slot = (sample, labels)
            family.samples[slot] = family.samples.get(slot, 0.0) + value

    def families(self) -> list[Metric]:
        """The merged families, histogram buckets made cumulative with a _count."""
        out: list[Metric] = []
        for name in sorted(self._families):
            family = self._families[name]
            metric = Metric(name, family.help, family.typ)
            if family.typ == "histogram":
                self._histogram(metric, family)
            else:
                for (sample, labels), value in sorted(family.samples.items()):
                    metric.add_sample(sample, dict(labels), value)
            out.append(metric)
        return out

    @staticmethod
    def _histogram(metric: Metric, family: _Family) -> None:
        sums = {labels: value for (sample, labels), value in family.samples.items()
                if sample.endswith("_sum")}
        for labels in sorted(set(family.buckets) | set(sums)):
            per_le = family.buckets.get(labels, {})
            plain = dict(labels)
            total = 0.0
            for le in sorted(per_le):
                total += per_le[le]
                metric.add_sample(f"{metric.name}_bucket",
                                  {**plain, "le": format_le(le)}, total)
            if math.inf not in per_le:
                metric.add_sample(f"{metric.name}_bucket", {**plain, "le": "+Inf"}, total)
            metric.add_sample(f"{metric.name}_count", plain, total)
            metric.add_sample(f"{metric.name}_sum", plain, sums.get(labels, 0.0))
