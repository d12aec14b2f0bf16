"""Merging per-process metric values held in memory into Prometheus metric families.

What the application serves itself in single-process mode (exporter.instrument.collector);
also the reference the tests hold the app collector's file merging (filemerge.py) to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from exporter.instrument.keys import (
    KEY_CACHE_LIMIT,
    Labels,
    ParsedKey,
    Series,
    format_le,
    parse_key_text,
)

__all__ = ["Merger", "format_le"]


@dataclass
class _Family:
    typ: str
    help: str
    mode: str
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)
    buckets: dict[Labels, dict[float, float]] = field(default_factory=dict)


class Merger:
    """Adds up values from many processes the way prometheus_client's multiprocess mode does.

    Counters, histogram buckets and sums add up; gauges follow their file's mode (sum, max,
    min, or one series per process for "all"). Parsed keys are cached across merges: the keys
    are the same scrape after scrape, and parsing their JSON is most of the cost.
    """

    def __init__(self) -> None:
        self._keys: dict[str, ParsedKey | None] = {}
        self._families: dict[str, _Family] = {}
        self.conflicts = 0

    def reset(self) -> None:
        """Forget the values (not the key cache) before the next merge."""
        self._families = {}
        self.conflicts = 0
        if len(self._keys) > KEY_CACHE_LIMIT:
            self._keys = {}

    def _parse(self, key: str) -> ParsedKey | None:
        try:
            return self._keys[key]
        except KeyError:
            pass
        parsed = self._keys[key] = parse_key_text(key)
        return parsed

    def add(self, prefix: str, entries: Iterable[tuple[str, float]], ident: str = "") -> None:
        """Add one process's entries; prefix is the file's type ("counter", "gauge_livesum")."""
        typ, _, mode = prefix.partition("_")
        for key, value in entries:
            parsed = self._parse(key)
            if parsed is None:
                continue
            metric, sample, labels, help_text, le = parsed
            if typ == "gauge" and mode in ("all", "liveall", "mostrecent", "livemostrecent"):
                labels = (*labels, ("pid", ident))
            self.add_parsed(Series(metric, typ, mode, help_text, sample, labels, le), value)

    def add_parsed(self, meta: Series, value: float) -> None:
        """Add one value whose key is already parsed (pid label already added)."""
        typ, mode, metric, labels, le = meta.typ, meta.mode, meta.family, meta.labels, meta.le
        family = self._families.get(metric)
        if family is None:
            family = self._families[metric] = _Family(typ, meta.help, mode)
        elif family.typ != typ:
            self.conflicts += 1
            return
        if typ == "histogram" and le is not None:
            per_le = family.buckets.setdefault(labels, {})
            per_le[le] = per_le.get(le, 0.0) + value
            return
        slot = (meta.sample, labels)
        old = family.samples.get(slot)
        if old is None:
            family.samples[slot] = value
        elif typ == "gauge" and mode in ("max", "livemax"):
            family.samples[slot] = max(old, value)
        elif typ == "gauge" and mode in ("min", "livemin"):
            family.samples[slot] = min(old, value)
        else:
            family.samples[slot] = old + value

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
        bucket, count, total_name = (f"{metric.name}_bucket", f"{metric.name}_count",
                                     f"{metric.name}_sum")
        les: dict[float, str] = {}
        samples = metric.samples
        for labels in sorted(set(family.buckets) | set(sums)):
            per_le = family.buckets.get(labels, {})
            plain = dict(labels)
            total = 0.0
            for le in sorted(per_le):
                total += per_le[le]
                text = les.get(le)
                if text is None:
                    text = les[le] = format_le(le)
                samples.append(Sample(bucket, {**plain, "le": text}, total))
            if math.inf not in per_le:
                samples.append(Sample(bucket, {**plain, "le": "+Inf"}, total))
            samples.append(Sample(count, plain, total))
            samples.append(Sample(total_name, plain, sums.get(labels, 0.0)))


