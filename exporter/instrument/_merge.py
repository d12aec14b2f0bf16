"""Merging per-process metric values (files or in-memory) into Prometheus metric families."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from exporter.instrument._store import BAD_ENTRY, RESERVED_NAME, entry_at

_Labels = tuple[tuple[str, str], ...]
_ParsedKey = tuple[str, str, _Labels, str, float | None]

# Keys that carry bookkeeping rather than metrics (the compaction's record of folded files).
MARKER_PREFIX = "__"
# Routes past FileMerger's route_limit are summed under this route (the instrument's overflow
# name), ranked by this family's request counts.
ROUTE_OVERFLOW = "<other>"
ROUTE_RANKING = "qatoolbox_http_requests"
_KEY_CACHE_LIMIT = 200_000
# Names the text format accepts without quoting (what Prometheus before 3.0 and promtool
# parse); a file declaring any other name is not served, so it cannot break the exposition.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The sample names a family of each type may have besides its own name.
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": (),
             "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created")}


def _name_problem(typ: str, mode: str, parsed: _ParsedKey) -> str | None:
    """BAD_ENTRY when an entry's names cannot be served as they are: not valid in the text
    format, a sample name that is not its family's, a label the merge adds itself, or an le
    bound outside a histogram's buckets."""
    metric, sample, labels, _, le = parsed
    if not _METRIC_NAME.fullmatch(metric) or not (
            sample == metric or sample in [metric + s for s in _SUFFIXES.get(typ, ())]):
        return BAD_ENTRY
    if (le is not None) != (typ == "histogram" and sample == f"{metric}_bucket"):
        return BAD_ENTRY
    for name, _ in labels:
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__") or (
                name == "pid" and typ == "gauge" and mode in _PID_MODES):
            return BAD_ENTRY
    return None


def format_le(bound: float) -> str:
    """A bucket bound as the le label writes it ("0.5", "+Inf")."""
    return "+Inf" if bound == math.inf else repr(float(bound))


@dataclass(frozen=True)
class _Slot:
    family: str
    typ: str
    mode: str
    help: str
    sample: str
    labels: _Labels
    le: float | None


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
        except (ValueError, TypeError, RecursionError):
            # RecursionError: a key of thousands of nested brackets.
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
            if typ == "gauge" and mode in ("all", "liveall", "mostrecent", "livemostrecent"):
                labels = (*labels, ("pid", ident))
            self.add_parsed(_Slot(metric, typ, mode, help_text, sample, labels, le), value)

    def add_parsed(self, meta: _Slot, value: float) -> None:
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


# --- merging files, fast: layouts cached, values unpacked in one C call per file -------------

_SUM_MODES = frozenset(("", "sum", "livesum", "all", "liveall", "mostrecent", "livemostrecent"))
_PID_MODES = frozenset(("all", "liveall", "mostrecent", "livemostrecent"))


@dataclass
class _Layout:
    """What a file's entries mean, cached: files only ever grow by appending entries."""

    ino: int
    used: int
    check_at: int
    check: bytes
    slots: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    unpack: struct.Struct | None = None
    simple: bool = True
    snapshot: bytes | None = None
    # Entries not served: (reason, the first offending name or key) per reason.
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileValues:
    """One file's values this scrape, aligned with its layout's slots."""

    slots: list[int]
    values: tuple[float, ...]
    simple: bool
    markers: list[str]
    refused: tuple[tuple[str, str], ...] = ()


_EMPTY = FileValues([], (), True, [])


class FileMerger:
    """Reads metrics files into numbered series ("slots") and adds them up.

    Parsing a file's keys is the expensive part and a file's layout never changes once
    written (entries are only appended), so each layout is parsed once and the values are then
    read with one precompiled struct per file. A scrape costs a few C calls per file plus one
    Python addition per entry.
    """

    def __init__(self, route_limit: int | None = None, *,
                 reserved_prefixes: tuple[str, ...] = (), allowed_prefixes: tuple[str, ...] = (),
                 reserved_names: Iterable[str] = ()) -> None:
        """reserved_*: names the files may not declare (other than allowed_prefixes), as a
        family or as a sample name: the exporter's own families."""
        self._keys = Merger()
        self._reserved_prefixes = reserved_prefixes
        self._allowed_prefixes = allowed_prefixes
        self._reserved_names = frozenset(reserved_names)
        self._verdicts: dict[tuple[str, str], str | None] = {}
        self._slots: dict[tuple[str, str, _Labels, str, float | None, str], int] = {}
        self._meta: list[_Slot] = []
        self._types: dict[str, str] = {}
        self._layouts: dict[str, _Layout] = {}
        self.conflicts = 0
        self._route_limit = route_limit
        self._kept_routes: set[str] = set()
        self._slot_routes: dict[int, str | None] = {}
        self._fold: dict[int, _Slot | None] = {}
        self._other_series: dict[tuple[str, str, _Labels, float | None], _Slot] = {}

    def forget(self, keep: set[str]) -> None:
        """Drop cached layouts of files not in keep (deleted ones)."""
        for path in [p for p in self._layouts if p not in keep]:
            del self._layouts[path]

    def refusal(self, prefix: str, key: str) -> str | None:
        """Why an entry of a file of type prefix is not served (BAD_ENTRY, RESERVED_NAME), or
        None. Markers (the compaction's bookkeeping) are not entries: BAD_ENTRY."""
        verdict = self._verdicts.get((prefix, key), "")
        if verdict != "":
            return verdict
        parsed = self._keys._parse(key)
        if parsed is None:
            verdict = BAD_ENTRY
        else:
            typ, _, mode = prefix.partition("_")
            verdict = _name_problem(typ, mode, parsed)
            if verdict is None and (self._reserved(parsed[0]) or self._reserved(parsed[1])):
                verdict = RESERVED_NAME
        if len(self._verdicts) >= _KEY_CACHE_LIMIT:
            self._verdicts = {}
        self._verdicts[(prefix, key)] = verdict
        return verdict

    def _offender(self, key: str) -> str:
        """What to name in the log for a refused entry: its reserved name, or its key."""
        parsed = self._keys._parse(key)
        if parsed is not None:
            for name in parsed[:2]:
                if self._reserved(name):
                    return name
        return key if len(key) <= 200 else key[:200] + "..."

    def _reserved(self, name: str) -> bool:
        return name in self._reserved_names or (
            name.startswith(self._reserved_prefixes)
            and not name.startswith(self._allowed_prefixes))

    def _slot(self, prefix: str, key: str, ident: str) -> int:
        parsed = self._keys._parse(key)
        if parsed is None:
            return -1
        metric, sample, labels, help_text, le = parsed
        typ, _, mode = prefix.partition("_")
        known = self._types.setdefault(metric, typ)
        if known != typ:
            self.conflicts += 1
            return -1
        pid = ident if typ == "gauge" and mode in _PID_MODES else ""
        if pid:
            labels = (*labels, ("pid", pid))
        slot_key = (metric, sample, labels, mode if typ == "gauge" else "", le, pid)
        slot = self._slots.get(slot_key)
        if slot is None:
            slot = self._slots[slot_key] = len(self._meta)
            self._meta.append(_Slot(metric, typ, mode, help_text, sample, labels, le))
        return slot

    def values(self, path: str, data: bytes, ino: int, prefix: str, *, ident: str,
               rewritten: bool = False) -> FileValues:
        """One file's values from its used bytes (store.read_used(): b"" for a file whose
        header is not written yet); raises ValueError when an entry is malformed.

        path: the cache key of the file's layout. rewritten: the file is replaced whole
        rather than appended to (an accumulator), so its cached layout holds only while its
        bytes are all the same.
        """
        used = len(data)
        if used < 8:
            return _EMPTY
        layout = self._layouts.get(path)
        if layout is not None and rewritten and layout.snapshot == data:
            return self._file_values(layout, data)
        if (layout is None or rewritten or layout.ino != ino or used < layout.used
                or data[layout.check_at:layout.check_at + len(layout.check)] != layout.check):
            layout = _Layout(ino=ino, used=8, check_at=0, check=b"")
        if used > layout.used:
            self._extend(layout, data, used, prefix, ident, markers=rewritten)
        if rewritten:
            layout.snapshot = data
        self._layouts[path] = layout
        return self._file_values(layout, data)

    @staticmethod
    def _file_values(layout: _Layout, data: bytes) -> FileValues:
        return FileValues(layout.slots,
                          layout.unpack.unpack_from(data) if layout.unpack is not None else (),
                          layout.simple, layout.markers, tuple(layout.refused.items()))

    def _extend(self, layout: _Layout, data: bytes, used: int, prefix: str, ident: str, *,
                markers: bool) -> None:
        """Parse the entries appended since layout was made; markers: whether the file may
        carry markers (only the accumulators the exporter writes may)."""
        pos = layout.used
        mode = prefix.partition("_")[2]
        name = f"{prefix}_{ident}.db"
        while pos < used:
            key, value_at = entry_at(data, pos, used, name)
            layout.check_at, layout.check = pos, data[pos:value_at]
            if markers and key.startswith(f'["{MARKER_PREFIX}'):
                layout.markers.append(key)
            elif (refusal := self.refusal(prefix, key)) is not None:
                if refusal not in layout.refused:
                    layout.refused[refusal] = self._offender(key)
            else:
                slot = self._slot(prefix, key, ident)
                if slot >= 0:
                    layout.slots.append(slot)
                    layout.offsets.append(value_at)
            pos = value_at + 16
        layout.used = used
        layout.simple = prefix.partition("_")[0] != "gauge" or mode in _SUM_MODES
        parts = ["<"]
        end = 0
        for offset in layout.offsets:
            parts.append(f"{offset - end}xd")
            end = offset + 8
        layout.unpack = struct.Struct("".join(parts)) if layout.offsets else None

    def families(self, files: list[FileValues]) -> list[Metric]:
        """Add the files up and build the families."""
        acc = [0.0] * len(self._meta)
        present: set[int] = set()
        special: dict[int, float] = {}
        for file in files:
            present.update(file.slots)
            if file.simple:
                for slot, value in zip(file.slots, file.values, strict=True):
                    acc[slot] += value
                continue
            for slot, value in zip(file.slots, file.values, strict=True):
                old = special.get(slot)
                mode = self._meta[slot].mode
                if old is None:
                    special[slot] = value
                elif mode in ("max", "livemax"):
                    special[slot] = max(old, value)
                elif mode in ("min", "livemin"):
                    special[slot] = min(old, value)
                else:
                    special[slot] = old + value
        merger = Merger()
        meta = self._meta
        folded = None if self._route_limit is None else self._route_cap(present, acc, special)
        others: dict[int, tuple[_Slot, float]] = {}
        for slot in present:
            value = special[slot] if slot in special else acc[slot]
            other = folded[slot] if folded is not None else None
            if other is None:
                merger.add_parsed(meta[slot], value)
            else:
                # Summed here first: one add_parsed per "<other>" series, not per folded one.
                previous = others.get(id(other))
                others[id(other)] = (other, value if previous is None else previous[1] + value)
        for other, value in others.values():
            merger.add_parsed(other, value)
        return merger.families()

    def _route_cap(self, present: set[int], acc: list[float],
                   special: dict[int, float]) -> dict[int, _Slot | None]:
        """Where each present slot goes: None for its own series, or the route="<other>"
        series it adds up in, for the routes past route_limit. So the app's series stay flat
        however many routes it has.

        The kept routes are the busiest (most requests) when the exporter starts, then any new
        route while there is room; once kept, a route stays kept, so no route ever moves into
        "<other>" after having had series of its own and "<other>"'s counters never go down.
        """
        kept, fold = self._kept_routes, self._fold
        limit = self._route_limit or 0
        if len(kept) < limit:
            counts: dict[str, float] = {}
            for slot in present:
                route = self._route_of(slot)
                if route is not None and self._meta[slot].family == ROUTE_RANKING:
                    value = special[slot] if slot in special else acc[slot]
                    counts[route] = counts.get(route, 0.0) + value
            before = len(kept)
            for route in sorted(counts, key=lambda r: (-counts[r], r)):
                if len(kept) >= limit:
                    break
                kept.add(route)
            if len(kept) != before:
                fold.clear()
        for slot in present:
            if slot not in fold:
                fold[slot] = self._fold_target(slot)
        return fold

    def _route_of(self, slot: int) -> str | None:
        """The route label of a summed (counter, histogram) slot, None otherwise (cached)."""
        if slot not in self._slot_routes:
            meta = self._meta[slot]
            route = None if meta.typ == "gauge" else dict(meta.labels).get("route")
            self._slot_routes[slot] = None if route == ROUTE_OVERFLOW else route
        return self._slot_routes[slot]

    def _fold_target(self, slot: int) -> _Slot | None:
        route = self._route_of(slot)
        if route is None or route in self._kept_routes:
            return None
        meta = self._meta[slot]
        labels = tuple((k, ROUTE_OVERFLOW if k == "route" else v) for k, v in meta.labels)
        # One object per "<other>" series, shared by every slot folded into it.
        return self._other_series.setdefault((meta.family, meta.sample, labels, meta.le),
                                             replace(meta, labels=labels))
