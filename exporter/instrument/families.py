"""Building the metric families of the app collector from the merged values of its series.

Sorted, label dicts made once (prometheus_client's encoders only read them), and each sample
kept for the next scrape, which reuses it while its value stays the same.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence, Set

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from exporter.instrument.keys import Labels, Series, combine, format_le


class FamilyPlan:
    """How to build the families from the values of a set of present series: sorted, label
    dicts made once (prometheus_client's encoders only read them), and each sample kept for
    the next scrape, which reuses it while its value stays the same.

    A scrape changes few values, so each family's (or histogram row's) values are picked out
    and compared with the last scrape's in C (itemgetter, tuple ==), and only the samples of
    values that changed are made again.
    """

    def __init__(self, present: frozenset[int], series: list[Series]) -> None:
        self.present = present
        self.sets: list[Set[int]] = []  # what present was made of (FileMerger.families)
        by_family: dict[str, list[int]] = {}
        for slot in sorted(present):
            by_family.setdefault(series[slot].family, []).append(slot)
        self.families: list[_SamplesPlan | _HistogramPlan] = []
        for name in sorted(by_family):
            slots = by_family[name]
            first = series[slots[0]]
            if first.typ == "histogram":
                self.families.append(_HistogramPlan(name, first.help, slots, series))
            else:
                self.families.append(_SamplesPlan(name, first.help, first.typ, slots, series))

    def build(self, values: list[float]) -> list[Metric]:
        return [family.build(values) for family in self.families]


def _getter(indices: Sequence[int]) -> Callable[[Sequence[float]], tuple[float, ...]]:
    """A function picking values[i] for each of indices, as a tuple (in C when it can)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    if indices:
        single = operator.itemgetter(indices[0])
        return lambda values: (single(values),)
    return lambda values: ()


def _update(samples: list[Sample], start: int, names: Sequence[str],
            labels: Sequence[dict[str, str]], *, new: Sequence[float],
            old: Sequence[float]) -> None:
    """Make again the samples (from start) whose value is not the last scrape's."""
    for i in itertools.compress(range(len(new)), map(operator.ne, new, old)):
        samples[start + i] = Sample(names[i], labels[i], new[i])


class _SamplesPlan:
    """A counter, gauge or summary family: one sample per (sample name, labels)."""

    def __init__(self, name: str, help_text: str, typ: str, slots: list[int],
                 series: list[Series]) -> None:
        self.name, self.help, self.typ = name, help_text, typ
        groups: dict[tuple[str, Labels], list[int]] = {}
        for slot in slots:
            groups.setdefault((series[slot].sample, series[slot].labels), []).append(slot)
        rows = sorted(groups.items())
        self.names = [sample for (sample, _), _ in rows]
        self.labels = [dict(labels) for (_, labels), _ in rows]
        # Several slots per sample: gauges whose series several files add up by their mode.
        self.combined = [(group, series[group[0]].mode) for _, group in rows]
        self.pick = _getter([group[0] for _, group in rows])
        if all(len(group) == 1 for _, group in rows):
            self.combined = []
        self.values: tuple[float, ...] = ()
        self.samples: list[Sample] = []

    def build(self, values: list[float]) -> Metric:
        metric = Metric(self.name, self.help, self.typ)
        new = self.pick(values) if not self.combined else tuple(
            values[group[0]] if len(group) == 1 else combine(mode, [values[s] for s in group])
            for group, mode in self.combined)
        if not self.samples:
            self.samples = list(map(Sample, self.names, self.labels, new))
        elif new != self.values:
            _update(self.samples, 0, self.names, self.labels, new=new, old=self.values)
        self.values = new
        metric.samples = list(self.samples)
        return metric


class _HistogramPlan:
    """A histogram family: per label set its cumulative buckets by le (+Inf added when no
    file has it), _count and _sum, as Merger._histogram makes them."""

    def __init__(self, name: str, help_text: str, slots: list[int],
                 series: list[Series]) -> None:
        self.name, self.help = name, help_text
        buckets: dict[Labels, dict[float, list[int]]] = {}
        sums: dict[Labels, list[int]] = {}
        for slot in slots:
            s = series[slot]
            if s.le is not None:
                buckets.setdefault(s.labels, {}).setdefault(s.le, []).append(slot)
            elif s.sample.endswith("_sum"):
                sums.setdefault(s.labels, []).append(slot)
        bucket, count, total = f"{name}_bucket", f"{name}_count", f"{name}_sum"
        self.rows: list[_HistogramRow] = []
        start = 0
        for labels in sorted(set(buckets) | set(sums)):
            plain = dict(labels)
            per_le = buckets.get(labels, {})
            bounds = sorted(per_le)
            names = [bucket] * len(bounds)
            sample_labels = [{**plain, "le": format_le(le)} for le in bounds]
            if math.inf not in per_le:
                names.append(bucket)
                sample_labels.append({**plain, "le": "+Inf"})
            names += [count, total]
            sample_labels += [plain, plain]
            flat = [slot for le in bounds for slot in per_le[le]]
            ends = list(itertools.accumulate(len(per_le[le]) for le in bounds))
            row = _HistogramRow(start, names, sample_labels,
                                pick=_getter(flat + sums.get(labels, [])), buckets=len(flat),
                                ends=_getter(ends), inf=math.inf not in per_le)
            self.rows.append(row)
            start += len(names)
        self.samples: list[Sample] = []

    def build(self, values: list[float]) -> Metric:
        metric = Metric(self.name, self.help, "histogram")
        fresh = not self.samples
        for row in self.rows:
            picked = row.pick(values)
            if not fresh and picked == row.picked:
                continue
            row.picked = picked
            # The same additions, in the same order, as summing bucket after bucket.
            cumulative = tuple(itertools.accumulate(picked[:row.buckets], initial=0.0))
            total = cumulative[-1]
            new = (*row.ends(cumulative), *((total,) if row.inf else ()), total,
                   sum(picked[row.buckets:]))
            if fresh:
                self.samples.extend(map(Sample, row.names, row.labels, new))
            else:
                _update(self.samples, row.start, row.names, row.labels, new=new,
                        old=row.values)
            row.values = new
        metric.samples = list(self.samples)
        return metric


class _HistogramRow:
    """One label set of a histogram family: where its samples start in the family's, their
    names and labels, and how to pick its values (bucket slots by le, then its _sum's)."""

    __slots__ = ("buckets", "ends", "inf", "labels", "names", "pick", "picked", "start",
                 "values")

    def __init__(self, start: int, names: list[str], labels: list[dict[str, str]], *,
                 pick: Callable[[Sequence[float]], tuple[float, ...]], buckets: int,
                 ends: Callable[[Sequence[float]], tuple[float, ...]], inf: bool) -> None:
        self.start, self.names, self.labels, self.pick = start, names, labels, pick
        self.buckets, self.ends, self.inf = buckets, ends, inf
        self.picked: tuple[float, ...] = ()
        self.values: tuple[float, ...] = ()
