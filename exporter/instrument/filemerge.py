"""Merging the metrics files of a folder into Prometheus metric families, fast: each entry
classified once (series.py), each file's layout compiled once (readplan.py), the values read
at every scrape added up per served series, and the families built (families.py).

Public: the app collector (exporter/collectors/app.py) folds and merges folders with it.
"""

from __future__ import annotations

import operator
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from exporter.instrument.families import FamilyPlan
from exporter.instrument.keys import MARKER_PREFIX, PID_MODES, SUM_MODES, combine
from exporter.instrument.readplan import FileLayout, Written, read_values
from exporter.instrument.safefiles import FileWindows
from exporter.instrument.series import (
    ROUTE_RANKING,
    Routed,
    SeriesIndex,
    blake2b,
    refusal_reason,
    refused,
)

_MARKER_BYTES = f'["{MARKER_PREFIX}'.encode()


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
        self.pending: list[tuple[FileLayout, array[float]]] = []  # the waiting entries' values


class FileMerger(SeriesIndex):
    """Reads metrics files into the numbered series of its index and adds them up."""

    def __init__(self, route_limit: int | None = None, *,
                 reserved_prefixes: tuple[str, ...] = (), allowed_prefixes: tuple[str, ...] = (),
                 reserved_names: Iterable[str] = ()) -> None:
        """reserved_*: names the files may not declare (other than allowed_prefixes), as a
        family or as a sample name: the exporter's own families."""
        super().__init__(route_limit, reserved_prefixes=reserved_prefixes,
                         allowed_prefixes=allowed_prefixes, reserved_names=reserved_names)
        self._layouts: dict[str, FileLayout] = {}
        self._plan: FamilyPlan | None = None

    def seed(self, path: str, stat: os.stat_result, prefix: str, written: Written) -> None:
        """The layout of a file the caller just wrote (an accumulator), so that reading it
        parses nothing: written holds its used size, last entry and each entry's verdict."""
        layout = FileLayout(stat.st_ino, stat.st_mtime_ns)
        layout.used = written.used
        layout.check_at, layout.check = written.check_at, written.check
        layout.markers = written.markers
        typ, _, mode = prefix.partition("_")
        layout.simple = typ != "gauge" or mode in SUM_MODES
        offsets, slots = array("I"), array("I")
        for offset, found in zip(written.offsets, written.verdicts, strict=True):
            slot = self._decide(found) if isinstance(found, Routed) else found
            if isinstance(found, Routed) and slot < 0:
                layout.waiting.append(found)
                layout.waiting_at.append(offset)
            elif slot >= 0:
                offsets.append(offset)
                slots.append(slot)
        layout.add(offsets, slots)
        self._layouts[path] = layout

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
            layout = FileLayout(ino, mtime)
        if used > layout.used:
            self._extend(layout, data, prefix, ident, markers=rewritten)
        self._layouts[path] = layout
        if layout.waiting:
            self._retry(layout)
        self._gather(part, layout, data, zero=zero, keep=rewritten)
        if not layout.markers and not layout.refused:
            return _NOTHING
        return FileInfo(tuple(layout.markers), tuple(layout.refused.items()))

    def _extend(self, layout: FileLayout, data: FileWindows, prefix: str, ident: str, *,
                markers: bool) -> None:
        """Classify the entries appended since layout was made; markers: whether the file may
        carry markers (only the accumulators the exporter writes may). The layout changes
        only once the whole new part is read: a malformed entry leaves it as it was."""
        typ, _, mode = prefix.partition("_")
        pid = ident if typ == "gauge" and mode in PID_MODES else ""
        cache = self._cache(prefix, pid)
        digest_of = blake2b  # a local: looked up once per entry in the loop below
        offsets, slots = array("I"), array("I")
        waiting: list[Routed] = []
        waiting_at = array("I")
        found_markers: list[str] = []
        refusals: dict[str, str] = {}
        check_at = value_at = layout.used
        for position, key, value_at, _ in data.entries(layout.used):
            check_at = position
            if markers and key.startswith(_MARKER_BYTES):
                found_markers.append(key.decode("utf-8"))
            else:
                digest = digest_of(key, digest_size=16).digest()
                found = cache.get(digest)
                if found is None or found.__class__ is Routed:
                    found = self._find(prefix, pid, digest, key)
                    cache = self._cache(prefix, pid)  # (a new one when the cache was full)
                if isinstance(found, Routed):
                    waiting.append(found)
                    waiting_at.append(value_at)
                elif found >= 0:
                    offsets.append(value_at)
                    slots.append(found)
                elif refused(found):
                    why = refusal_reason(found)
                    if why not in refusals and why not in layout.refused:
                        refusals[why] = self._offender(key)
        layout.check_at, layout.check = check_at, bytes(data.read(check_at, value_at - check_at))
        layout.used = data.used
        layout.markers.extend(found_markers)
        for why, offender in refusals.items():
            layout.refused.setdefault(why, offender)
        layout.waiting.extend(waiting)
        layout.waiting_at.extend(waiting_at)
        layout.simple = typ != "gauge" or mode in SUM_MODES
        layout.add(offsets, slots)

    def _retry(self, layout: FileLayout) -> None:
        """Move the layout's undecided entries whose route is now decided into its series."""
        offsets, slots = array("I"), array("I")
        still: list[Routed] = []
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

    def _gather(self, part: MergePart, layout: FileLayout, data: FileWindows, *, zero: bool,
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
            values = read_values(layout, data)
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
            value = combine(self._series[slot].mode, in_window)
            old = special.get(slot)
            special[slot] = value if old is None else combine(
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
                special[slot] = value if old is None else combine(
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
                plan = self._plan = FamilyPlan(present, self._series)
            plan.sets = sets
        return plan.build(values)


