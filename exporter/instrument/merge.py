"""Merging per-process metric values (files or in-memory) into Prometheus metric families.

Public: the app collector (exporter/collectors/app.py) folds and merges folders with it.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import re
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from exporter.instrument.store import BAD_ENTRY, RESERVED_NAME, WINDOW, FileWindows, blake2b

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
            self.add_parsed(_Series(metric, typ, mode, help_text, sample, labels, le), value)

    def add_parsed(self, meta: _Series, value: float) -> None:
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


# --- merging files, fast: each entry classified once, values summed per served series ------
#
# A file's entries are appended, never moved, so what each entry is (which series it adds to,
# or why it is refused) is worked out once per file. Entries of many files share their keys,
# so the verdict on a key is cached too, under a digest of its bytes (a few dozen bytes per
# key however long the key is). Entries of routes past the route cap are mapped straight to
# their route="<other>" series: nothing of theirs is kept but that mapping. A scrape then
# reads each file's used bytes, unpacks its values with precompiled structs and adds them
# into the served series: one struct per file for the series that have one entry in it, and
# one per series that several entries add up to (the "<other>" series), summed in C.

_SUM_MODES = frozenset(("", "sum", "livesum", "all", "liveall", "mostrecent", "livemostrecent"))
_PID_MODES = frozenset(("all", "liveall", "mostrecent", "livemostrecent"))
_MAX_MODES = frozenset(("max", "livemax"))
# What a cached key maps to besides a served series' index.
_BAD, _RESERVED, _CONFLICT = -1, -2, -3
_CODES = {BAD_ENTRY: _BAD, RESERVED_NAME: _RESERVED}
_REASONS = {_BAD: BAD_ENTRY, _RESERVED: RESERVED_NAME}
_MARKER_BYTES = f'["{MARKER_PREFIX}'.encode()
# Appended chunks of a file are compiled on their own; past this many they are compiled into
# one again (so a file that grows scrape after scrape costs a few struct calls, not dozens).
_MAX_CHUNKS = 8
_SPREAD_MIN = 64
# Values are native doubles (the writers' byte order), at 8-byte aligned offsets.
_DOUBLE = struct.Struct("=d")
_UNPACK = struct.Struct.unpack_from
_NO_VALUES = struct.Struct("=")


@dataclass(frozen=True, slots=True)
class _Series:
    """One served series: what a slot index stands for (mode: a gauge's, else "")."""

    family: str
    typ: str
    mode: str
    help: str
    sample: str
    labels: _Labels
    le: float | None


class _Routed:
    """A key of a route not yet kept or folded: its series with the route left open."""

    __slots__ = ("route", "template")

    def __init__(self, template: int, route: str) -> None:
        self.template, self.route = template, route


@dataclass(frozen=True)
class _Template:
    """A routed series without its route: labels[index] is the route label."""

    family: str
    typ: str
    help: str
    sample: str
    labels: _Labels
    index: int
    le: float | None


class _Chunk:
    """Compiled entries of (part of) a file, by window of the file (WINDOW bytes each).

    In each window, the values of series with a single entry in the chunk are unpacked in
    one call, and those of each series that several entries add up to (the "<other>" route
    series) in one call per series, summed at once (the groups: structs aligned with
    group_slots in every window, an empty one where a series has no entry). A scrape then
    spreads the chunk's values (singles, then group sums) into the series in one C pass when
    they are many and close together, else adds them one by one.
    """

    __slots__ = ("group_slots", "reach", "slots", "spread", "windows")

    def __init__(self, offsets: Iterable[int], slots: Iterable[int], *, summed: bool) -> None:
        """summed: the file's groups are summed (not a min/max gauge's)."""
        by_slot: dict[int, list[int]] = {}
        for offset, slot in zip(offsets, slots, strict=True):
            by_slot.setdefault(slot, []).append(offset)
        singles = sorted((found[0], slot) for slot, found in by_slot.items() if len(found) == 1)
        self.group_slots = [slot for slot, found in by_slot.items() if len(found) > 1]
        # Every value's slot, in the order a scrape gives the values: singles, then groups.
        self.slots = [slot for _, slot in singles] + self.group_slots
        single_windows = dict(_by_window([offset for offset, _ in singles]))
        group_windows = [dict(_by_window(sorted(by_slot[slot]))) for slot in self.group_slots]
        self.windows: dict[int, _Window] = {}
        for window in sorted(set(single_windows).union(*group_windows)):
            found = single_windows.get(window)
            self.windows[window] = _Window(
                None if found is None else _struct(found),
                [group.get(window, []) for group in group_windows]
                if any(window in group for group in group_windows) else [], bits=summed)
        # How far into each window its values go.
        self.reach = {window: max(found) + 8
                      for window, found in _by_window(sorted(_all_offsets(by_slot)))}
        # Many values close together in slot order (a worker's file): an itemgetter over the
        # values and a trailing 0.0 puts them in slot order, and map() adds them in C.
        self.spread: Callable[[tuple[float, ...]], tuple[float, ...]] | None = None
        span = max(self.slots, default=-1) + 1
        if len(self.slots) >= _SPREAD_MIN and span <= 4 * len(self.slots):
            where = dict.fromkeys(range(span), len(self.slots))
            for index, slot in enumerate(self.slots):
                where[slot] = index
            self.spread = operator.itemgetter(*where.values())


class _Window:
    """One window of a chunk: the struct of its singles, those of its groups.

    Most groups of a histogram file are the "<other>" route's buckets far from where the
    requests fall, all zeros scrape after scrape. So a group (of a summed file) is first read
    as 64-bit integers: zeros unpack to Python's one cached 0, made and summed at no cost, and
    a sum of 0 means every value is +0.0. The first time a group holds anything else, it is
    read as doubles from then on (counts only grow: it stays so).
    """

    __slots__ = ("bits", "groups", "single")

    def __init__(self, single: struct.Struct | None, groups: list[list[int]], *,
                 bits: bool) -> None:
        self.single = single
        self.groups = [_struct(found, "Q" if bits and found else "d") for found in groups]
        # The groups still read as integers.
        self.bits = [i for i, found in enumerate(groups) if found] if bits else []

    def sums(self, view: memoryview) -> list[float]:
        """The sum of each group's values in view."""
        found: list[float] = list(map(sum, map(_UNPACK, self.groups, itertools.repeat(view))))
        if self.bits and any(found[i] for i in self.bits):
            for i in [i for i in self.bits if found[i]]:
                self.groups[i] = struct.Struct(self.groups[i].format.replace("Q", "d"))
                found[i] = sum(self.groups[i].unpack_from(view))
            self.bits = [i for i in self.bits if not found[i]]
        return found


def _all_offsets(by_slot: dict[int, list[int]]) -> Iterator[int]:
    for found in by_slot.values():
        yield from found


def _by_window(offsets: list[int]) -> Iterator[tuple[int, list[int]]]:
    """(window, offsets within it, relative to its start) of ascending offsets."""
    window, inside = -1, list[int]()
    for offset in offsets:
        if offset // WINDOW != window:
            if inside:
                yield window, inside
            window, inside = offset // WINDOW, []
        inside.append(offset - window * WINDOW)
    if inside:
        yield window, inside


def _struct(offsets: list[int], code: str = "d") -> struct.Struct:
    """A struct reading the doubles at offsets (ascending) of a buffer (code "Q": their
    bits, as integers)."""
    if not offsets:
        return _NO_VALUES
    parts = ["="]
    end = 0
    for offset in offsets:
        parts.append(f"{offset - end}x{code}" if offset > end else code)
        end = offset + 8
    return struct.Struct("".join(parts))


class _Layout:
    """What a file's entries are, as far as they were read (files only grow by appending)."""

    __slots__ = ("check", "check_at", "chunks", "ino", "markers", "mtime", "offsets", "present",
                 "reads", "refused", "simple", "slots", "used", "values", "waiting",
                 "waiting_at")

    def __init__(self, ino: int, mtime: int) -> None:
        self.ino, self.mtime = ino, mtime
        self.used = 8
        self.check_at, self.check = 0, b""
        self.offsets = array("I")  # where each served entry's value is
        self.slots = array("I")  # and which series it adds to
        self.chunks: list[_Chunk] = []
        self.reads: list[tuple[int, int]] = []  # (window, bytes of it to read)
        # The slots this file adds to: a new set whenever it changes (so that a scrape can tell
        # by identity that the files it read add to the same series as the last one).
        self.present: frozenset[int] = frozenset()
        # Entries of routes not decided yet (first seen in this read): their keys and offsets.
        self.waiting: list[_Routed] = []
        self.waiting_at = array("I")
        self.markers: list[str] = []
        self.refused: dict[str, str] = {}  # reason -> the first offending name or key
        self.simple = True
        # The values last read, kept for a file that is replaced whole rather than written in
        # place (an accumulator): while its inode, mtime and size stay, so do its values.
        self.values: _Values | None = None

    def add(self, offsets: array[int], slots: array[int]) -> None:
        if not offsets:
            return
        self.values = None
        self.offsets.extend(offsets)
        self.slots.extend(slots)
        self.present = self.present.union(slots)
        if len(self.chunks) >= _MAX_CHUNKS:
            self.chunks = [_Chunk(self.offsets, self.slots, summed=self.simple)]
        else:
            self.chunks.append(_Chunk(offsets, slots, summed=self.simple))
        reach: dict[int, int] = {}
        for chunk in self.chunks:
            for window, length in chunk.reach.items():
                reach[window] = max(length, reach.get(window, 0))
        self.reads = sorted(reach.items())


# What a key is: a served series' index, a code (_BAD, _RESERVED, _CONFLICT), or _Routed.
Verdict = int | _Routed


def refused(verdict: Verdict) -> bool:
    """Whether an entry with this verdict is refused (never served, never folded)."""
    return verdict.__class__ is int and verdict in _REASONS


@dataclass
class Written:
    """What the writer of a file in the layout knows of it: what FileMerger.seed() needs."""

    used: int = 8
    check_at: int = 0
    check: bytes = b""
    offsets: array[int] = field(default_factory=lambda: array("I"))
    verdicts: list[Verdict] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileInfo:
    """What the caller needs of a file besides its values: markers, entries refused."""

    markers: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()


_NOTHING = FileInfo()


class MergePart:
    """The values of one folder's files in one scrape, served only if the folder is read in
    full (FileMerger.families)."""

    __slots__ = ("acc", "added", "pending", "present", "special")

    def __init__(self) -> None:
        self.acc: list[float] = []
        # The slots the files read add to: each file's set (FileMerger.families() unites them
        # only when they are not the same sets as last time), and the slots of routes decided
        # by settle().
        self.present: list[frozenset[int]] = []
        self.added: set[int] = set()
        self.special: dict[int, float] = {}  # series of min/max gauges
        self.pending: list[tuple[_Layout, array[float]]] = []  # the waiting entries' values


class FileMerger:
    """Reads metrics files into numbered series ("slots") and adds them up.

    Routes past route_limit are summed under route="<other>". The kept routes are those
    adopted (the collector's saved set), then the busiest (most requests) among those first
    seen in one read, then any new route while there is room; once kept, a route stays kept
    and once folded it stays folded, so no series ever moves into or out of "<other>" and
    "<other>"'s counters never go down.
    """

    def __init__(self, route_limit: int | None = None, *,
                 reserved_prefixes: tuple[str, ...] = (), allowed_prefixes: tuple[str, ...] = (),
                 reserved_names: Iterable[str] = ()) -> None:
        """reserved_*: names the files may not declare (other than allowed_prefixes), as a
        family or as a sample name: the exporter's own families."""
        self._reserved_prefixes = reserved_prefixes
        self._allowed_prefixes = allowed_prefixes
        self._reserved_names = frozenset(reserved_names)
        self._route_limit = route_limit
        self._keys: dict[tuple[str, str], dict[bytes, int | _Routed]] = {}
        self._key_count = 0
        self._types: dict[str, str] = {}
        self._series: list[_Series] = []
        self._series_index: dict[tuple[str, str, _Labels, str, float | None, str], int] = {}
        self._templates: list[_Template] = []
        self._template_index: dict[_Template, int] = {}
        self._routed_slots: dict[tuple[int, str], int] = {}
        self._route_names: dict[str, str] = {}  # one string per undecided route
        self._kept: dict[str, None] = {}  # insertion-ordered set
        self._layouts: dict[str, _Layout] = {}
        self._plan: _Plan | None = None
        self.conflicts = 0
        self.kept_generation = 0

    # --- the kept routes ---

    @property
    def kept_routes(self) -> list[str]:
        """The kept routes, in the order they were kept."""
        return list(self._kept)

    def routes_full(self) -> bool:
        """Whether no further route can be kept (every new one is folded)."""
        return self._route_limit is not None and len(self._kept) >= self._route_limit

    def adopt(self, routes: Iterable[str]) -> int:
        """Keep these routes (a saved set) while there is room; how many were new.

        Safe at any time: while there is room every route ever seen is kept, so a route not
        kept yet has never been served, under its own label or under "<other>"."""
        added = 0
        for route in routes:
            if self.routes_full():
                break
            if route != ROUTE_OVERFLOW and route not in self._kept:
                self._kept[route] = None
                added += 1
        if added:
            self.kept_generation += 1
            self._resolve_keys()
        return added

    # --- classifying keys ---

    def verdicts(self, prefix: str) -> dict[bytes, Verdict]:
        """The verdicts known on keys of files of type prefix (not a gauge with one series
        per process), by key_digest(); verdict() for the others."""
        return self._cache(prefix, "")

    def verdict(self, prefix: str, digest: bytes, key: bytes) -> Verdict:
        """What an entry (key_digest(key), key) of a file of type prefix is: refused() tells
        whether it may be kept (a type conflict is not a refusal). Raises ValueError when key
        is not UTF-8."""
        return self._find(prefix, "", digest, key)

    def seed(self, path: str, stat: os.stat_result, prefix: str, written: Written) -> None:
        """The layout of a file the caller just wrote (an accumulator), so that reading it
        parses nothing: written holds its used size, last entry and each entry's verdict."""
        layout = _Layout(stat.st_ino, stat.st_mtime_ns)
        layout.used = written.used
        layout.check_at, layout.check = written.check_at, written.check
        layout.markers = written.markers
        typ, _, mode = prefix.partition("_")
        layout.simple = typ != "gauge" or mode in _SUM_MODES
        offsets, slots = array("I"), array("I")
        for offset, found in zip(written.offsets, written.verdicts, strict=True):
            slot = self._decide(found) if isinstance(found, _Routed) else found
            if isinstance(found, _Routed) and slot < 0:
                layout.waiting.append(found)
                layout.waiting_at.append(offset)
            elif slot >= 0:
                offsets.append(offset)
                slots.append(slot)
        layout.add(offsets, slots)
        self._layouts[path] = layout

    def _cache(self, prefix: str, pid: str) -> dict[bytes, int | _Routed]:
        """The verdicts on the keys of one file type (and pid, for gauges with one series
        per process), by key_digest()."""
        cache = self._keys.get((prefix, pid))
        if cache is None:
            cache = self._keys[(prefix, pid)] = {}
        return cache

    def _find(self, prefix: str, pid: str, digest: bytes, key: bytes) -> int | _Routed:
        cache = self._cache(prefix, pid)
        found = cache.get(digest)
        if found is None:
            if self._key_count >= _KEY_CACHE_LIMIT:
                self._keys, self._key_count = {}, 0
                cache = self._cache(prefix, pid)
            typ, _, mode = prefix.partition("_")
            found = cache[digest] = self._classify(typ, mode, pid, key)
            self._key_count += 1
        elif type(found) is _Routed:
            decided = self._decide(found)
            if decided >= 0:
                cache[digest] = found = decided
        return found

    def _classify(self, typ: str, mode: str, pid: str, key: bytes) -> int | _Routed:
        parsed = _parse_key(key)
        if parsed is None:
            return _BAD
        problem = _name_problem(typ, mode, parsed)
        if problem is not None:
            return _CODES[problem]
        metric, sample, labels, help_text, le = parsed
        if self._reserved(metric) or self._reserved(sample):
            return _RESERVED
        if self._types.setdefault(metric, typ) != typ:
            self.conflicts += 1
            return _CONFLICT
        if pid:
            labels = (*labels, ("pid", pid))
        gauge_mode = mode if typ == "gauge" else ""
        if self._route_limit is not None and typ != "gauge":
            index = next((i for i, (name, _) in enumerate(labels) if name == "route"), -1)
            if index >= 0 and labels[index][1] != ROUTE_OVERFLOW:
                route = labels[index][1]
                # One template for all the routes of a series (the route left blank): the
                # keys of folded routes leave nothing of theirs behind but their digest.
                template = _Template(metric, typ, help_text, sample,
                                     (*labels[:index], ("route", ""), *labels[index + 1:]),
                                     index, le)
                number = self._template_index.get(template)
                if number is None:
                    number = self._template_index[template] = len(self._templates)
                    self._templates.append(template)
                routed = _Routed(number, self._route_names.setdefault(route, route))
                decided = self._decide(routed)
                return routed if decided < 0 else decided
        return self._slot(_Series(metric, typ, gauge_mode, help_text, sample, labels, le))

    def _slot(self, series: _Series) -> int:
        """The index of a series (the first one's help text stays)."""
        key = (series.family, series.sample, series.labels, series.mode, series.le, series.typ)
        slot = self._series_index.get(key)
        if slot is None:
            slot = self._series_index[key] = len(self._series)
            self._series.append(series)
        return slot

    def _decide(self, routed: _Routed) -> int:
        """The series a routed key adds to, or -1 while its route is undecided."""
        route = routed.route
        if route in self._kept:
            target = route
        elif self.routes_full():
            target = ROUTE_OVERFLOW
        else:
            return -1
        slot = self._routed_slots.get((routed.template, target))
        if slot is None:
            t = self._templates[routed.template]
            labels = (*t.labels[:t.index], ("route", target), *t.labels[t.index + 1:])
            slot = self._slot(_Series(t.family, t.typ, "", t.help, t.sample, labels, t.le))
            self._routed_slots[(routed.template, target)] = slot
        return slot

    def _resolve_keys(self) -> None:
        """Replace cached undecided keys whose route is now decided by their series."""
        for cache in self._keys.values():
            for digest, found in cache.items():
                if type(found) is _Routed:
                    decided = self._decide(found)
                    if decided >= 0:
                        cache[digest] = decided
        self._route_names.clear()

    def _reserved(self, name: str) -> bool:
        return name in self._reserved_names or (
            name.startswith(self._reserved_prefixes)
            and not name.startswith(self._allowed_prefixes))

    def _offender(self, key: bytes) -> str:
        """What to name in the log for a refused entry: its reserved name, or its key."""
        parsed = _parse_key(key)
        if parsed is not None:
            for name in parsed[:2]:
                if self._reserved(name):
                    return name
        text = key.decode("utf-8", "replace")
        return text if len(text) <= 200 else text[:200] + "..."

    # --- reading files ---

    @staticmethod
    def part() -> MergePart:
        """A new, empty part (one folder's files in one scrape)."""
        return MergePart()

    def forget(self, keep: set[str]) -> None:
        """Drop cached layouts of files not in keep (deleted ones)."""
        for path in [p for p in self._layouts if p not in keep]:
            del self._layouts[path]

    def add(self, part: MergePart, path: str, data: FileWindows, ino: int, prefix: str, *,
            ident: str, mtime: int = 0, rewritten: bool = False, zero: bool = False
            ) -> FileInfo:
        """Add one file's values (its used part; data.used is 0 for a file whose header is not
        written yet) to part; raises ValueError when an entry is malformed.

        path: the cache key of the file's layout. rewritten: the file is replaced whole
        rather than appended to (an accumulator), so its layout holds only while its inode,
        mtime and size stay the same. zero: serve the file's series at 0 (a dead worker's
        gauges).
        """
        used = data.used
        if used < 8:
            return _NOTHING
        layout = self._layouts.get(path)
        if (layout is None or layout.ino != ino or used < layout.used
                or (rewritten and (layout.mtime != mtime or used != layout.used))
                or data.read(layout.check_at, len(layout.check)) != layout.check):
            layout = _Layout(ino, mtime)
        if used > layout.used:
            self._extend(layout, data, prefix, ident, markers=rewritten)
        self._layouts[path] = layout
        if layout.waiting:
            self._retry(layout)
        self._gather(part, layout, data, zero=zero, keep=rewritten)
        if not layout.markers and not layout.refused:
            return _NOTHING
        return FileInfo(tuple(layout.markers), tuple(layout.refused.items()))

    def _extend(self, layout: _Layout, data: FileWindows, prefix: str, ident: str, *,
                markers: bool) -> None:
        """Classify the entries appended since layout was made; markers: whether the file may
        carry markers (only the accumulators the exporter writes may). The layout changes
        only once the whole new part is read: a malformed entry leaves it as it was."""
        typ, _, mode = prefix.partition("_")
        pid = ident if typ == "gauge" and mode in _PID_MODES else ""
        cache = self._cache(prefix, pid)
        digest_of = blake2b  # a local: looked up once per entry in the loop below
        offsets, slots = array("I"), array("I")
        waiting: list[_Routed] = []
        waiting_at = array("I")
        found_markers: list[str] = []
        refused: dict[str, str] = {}
        check_at = value_at = layout.used
        for position, key, value_at, _ in data.entries(layout.used):
            check_at = position
            if markers and key.startswith(_MARKER_BYTES):
                found_markers.append(key.decode("utf-8"))
            else:
                digest = digest_of(key, digest_size=16).digest()
                found = cache.get(digest)
                if found is None or found.__class__ is _Routed:
                    found = self._find(prefix, pid, digest, key)
                    cache = self._cache(prefix, pid)  # (a new one when the cache was full)
                if isinstance(found, _Routed):
                    waiting.append(found)
                    waiting_at.append(value_at)
                elif found >= 0:
                    offsets.append(value_at)
                    slots.append(found)
                elif found != _CONFLICT:
                    reason = _REASONS[found]
                    if reason not in refused and reason not in layout.refused:
                        refused[reason] = self._offender(key)
        layout.check_at, layout.check = check_at, bytes(data.read(check_at, value_at - check_at))
        layout.used = data.used
        layout.markers.extend(found_markers)
        for reason, offender in refused.items():
            layout.refused.setdefault(reason, offender)
        layout.waiting.extend(waiting)
        layout.waiting_at.extend(waiting_at)
        layout.simple = typ != "gauge" or mode in _SUM_MODES
        layout.add(offsets, slots)

    def _retry(self, layout: _Layout) -> None:
        """Move the layout's undecided entries whose route is now decided into its series."""
        offsets, slots = array("I"), array("I")
        still: list[_Routed] = []
        still_at = array("I")
        for offset, routed in zip(layout.waiting_at, layout.waiting, strict=True):
            slot = self._decide(routed)
            if slot < 0:
                still.append(routed)
                still_at.append(offset)
            else:
                offsets.append(offset)
                slots.append(slot)
        layout.waiting, layout.waiting_at = still, still_at
        layout.add(offsets, slots)

    def _gather(self, part: MergePart, layout: _Layout, data: FileWindows, *, zero: bool,
                keep: bool) -> None:
        """Add a file's values to part; keep: the file is replaced whole, never written in
        place, so its values stay those last read while its layout holds."""
        acc = part.acc
        if len(acc) < len(self._series):
            acc.extend([0.0] * (len(self._series) - len(acc)))
        part.present.append(layout.present)
        if layout.waiting:
            part.pending.append((layout, array("d", [0.0] * len(layout.waiting) if zero
                                                else data.values_at(layout.waiting_at))))
        if zero:
            return
        values = layout.values if keep else None
        if values is None:
            values = _read_values(layout, data)
            if keep:
                layout.values = values
        singles, sums, grouped = values
        if layout.simple:
            for chunk, found, group_sums in zip(layout.chunks, singles, sums, strict=True):
                if chunk.spread is not None:
                    spread = chunk.spread((*found, *group_sums, 0.0))
                    acc[:len(spread)] = map(operator.add, acc, spread)
                else:
                    for slot, value in zip(chunk.slots, (*found, *group_sums), strict=True):
                        acc[slot] += value
            return
        special = part.special
        for slot, in_window in grouped:
            value = _combine(self._series[slot].mode, in_window)
            old = special.get(slot)
            special[slot] = value if old is None else _combine(
                self._series[slot].mode, (old, value))

    def settle(self, part: MergePart) -> None:
        """Decide the routes first seen in this part (the busiest first while there is room,
        the others to "<other>") and add their entries' values."""
        if not part.pending:
            return
        counts: dict[str, float] = {}
        for layout, values in part.pending:
            for routed, value in zip(layout.waiting, values, strict=True):
                if self._decide(routed) < 0:
                    ranked = self._templates[routed.template].family == ROUTE_RANKING
                    counts[routed.route] = counts.get(routed.route, 0.0) + (
                        value if ranked else 0.0)
        before = len(self._kept)
        for route in sorted(counts, key=lambda r: (-counts[r], r)):
            if self.routes_full():
                break
            self._kept[route] = None
        if len(self._kept) != before:
            self.kept_generation += 1
        self._resolve_keys()
        acc = part.acc
        if len(acc) < len(self._series):
            acc.extend([0.0] * (len(self._series) - len(acc)))
        for layout, values in part.pending:
            offsets, slots = array("I"), array("I")
            for offset, routed, value in zip(layout.waiting_at, layout.waiting, values,
                                             strict=True):
                slot = self._decide(routed)
                offsets.append(offset)
                slots.append(slot)
                acc[slot] += value  # routed series are counters and histograms: summed
                part.added.add(slot)
            layout.waiting, layout.waiting_at = [], array("I")
            layout.add(offsets, slots)
        part.pending = []

    # --- building the families ---

    def families(self, parts: list[MergePart]) -> list[Metric]:
        """Add the parts up and build the families."""
        count = len(self._series)
        values = [0.0] * count
        special: dict[int, float] = {}
        for part in parts:
            acc = part.acc
            if len(acc) < count:
                acc.extend([0.0] * (count - len(acc)))
            values = acc if len(parts) == 1 else list(map(operator.add, values, acc))
            for slot, value in part.special.items():
                old = special.get(slot)
                special[slot] = value if old is None else _combine(
                    self._series[slot].mode, (old, value))
        if special:
            values = list(values)
            for slot, value in special.items():
                values[slot] = value
        plan = self._plan
        sets = [found for part in parts for found in (*part.present, part.added) if found]
        if plan is None or len(sets) != len(plan.sets) or any(
                new is not old for new, old in zip(sets, plan.sets, strict=True)):
            # Not the same sets as last time (by identity: each file's set is replaced when
            # it changes, settle()'s is new at every scrape that decides routes).
            present = frozenset().union(*sets)
            if plan is None or plan.present != present:
                plan = self._plan = _Plan(present, self._series)
            plan.sets = sets
        return plan.build(values)


def key_digest(key: bytes) -> bytes:
    """What the caches know a key by: 16 bytes, however long the key."""
    return blake2b(key, digest_size=16).digest()


# A file's values as _read_values() gives them: per chunk, the singles' values and the group
# sums (simple files), or (slot, values) of each series and window (min/max gauges).
_Values = tuple[list[tuple[float, ...]], list[list[float]], list[tuple[int, tuple[float, ...]]]]


def _read_values(layout: _Layout, data: FileWindows) -> _Values:
    """Read a file's values a window at a time, as its layout's chunks say where they are."""
    chunks = layout.chunks
    singles: list[tuple[float, ...]] = [()] * len(chunks)
    simple = layout.simple
    sums: list[list[float]] = [[0.0] * len(chunk.group_slots) for chunk in chunks]
    grouped: list[tuple[int, tuple[float, ...]]] = []
    for window, length in layout.reads:
        view = data.read(window * WINDOW, length)
        for i, chunk in enumerate(chunks):
            found = chunk.windows.get(window)
            if found is None:
                continue
            if found.single is not None:
                singles[i] += found.single.unpack_from(view)
            if not found.groups:
                continue
            if simple:
                sums[i] = list(map(operator.add, sums[i], found.sums(view)))
            else:
                unpacked = map(_UNPACK, found.groups, itertools.repeat(view))
                grouped.extend(item for item in zip(chunk.group_slots, unpacked, strict=True)
                               if item[1])  # (not a series with no entry in that window)
    if not simple:
        for chunk, values in zip(chunks, singles, strict=True):
            grouped.extend(zip(chunk.slots[:len(values)], ((value,) for value in values),
                               strict=True))
    return singles, sums, grouped


def _combine(mode: str, values: Iterable[float]) -> float:
    """Values of one gauge series from several places, as its mode adds them up."""
    if mode in _MAX_MODES:
        return max(values)
    if mode in ("min", "livemin"):
        return min(values)
    return sum(values)


def _parse_key(key: bytes) -> _ParsedKey | None:
    """(metric, sample, sorted labels without le, help, le) of a key, None when it is not a
    metric's (not JSON of that shape, or a marker). Raises ValueError when not UTF-8."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("a key is not UTF-8") from None
    try:
        metric, sample, labels, help_text = json.loads(text)
        le = labels.pop("le", None) if isinstance(labels, dict) else None
        if (isinstance(metric, str) and isinstance(sample, str) and isinstance(labels, dict)
                and not metric.startswith(MARKER_PREFIX)):
            return (metric, sample, tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                    str(help_text), None if le is None else float(le))
    except (ValueError, TypeError, RecursionError):
        # RecursionError: a key of thousands of nested brackets.
        pass
    return None


class _Plan:
    """How to build the families from the values of a set of present series: sorted, label
    dicts made once (prometheus_client's encoders only read them), and each sample kept for
    the next scrape, which reuses it while its value stays the same.

    A scrape changes few values, so each family's (or histogram row's) values are picked out
    and compared with the last scrape's in C (itemgetter, tuple ==), and only the samples of
    values that changed are made again.
    """

    def __init__(self, present: frozenset[int], series: list[_Series]) -> None:
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
                 series: list[_Series]) -> None:
        self.name, self.help, self.typ = name, help_text, typ
        groups: dict[tuple[str, _Labels], list[int]] = {}
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
            values[group[0]] if len(group) == 1 else _combine(mode, [values[s] for s in group])
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
                 series: list[_Series]) -> None:
        self.name, self.help = name, help_text
        buckets: dict[_Labels, dict[float, list[int]]] = {}
        sums: dict[_Labels, list[int]] = {}
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
