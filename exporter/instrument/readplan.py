"""What the merger knows of each metrics file: where the values of the series it serves are,
compiled into structs by window of the file, and reading them (a window at a time).

A file's entries are appended, never moved, so what each entry is is worked out once per
file (series.py) and its layout only grows. A scrape then reads each file's used bytes a
window at a time, unpacks its values with the precompiled structs and sums them: one struct
per window for the series that have one entry in it, and one per series that several entries
add up to (the "<other>" series), summed in C.
"""

from __future__ import annotations

import itertools
import operator
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from exporter.instrument.safefiles import WINDOW, FileWindows
from exporter.instrument.series import Routed, Verdict

# Appended chunks of a file are compiled on their own; past this many they are compiled into
# one again (so a file that grows scrape after scrape costs a few struct calls, not dozens).
_MAX_CHUNKS = 8
_SPREAD_MIN = 64
# Values are native doubles (the writers' byte order), at 8-byte aligned offsets.
_UNPACK = struct.Struct.unpack_from
_NO_VALUES = struct.Struct("=")


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


class FileLayout:
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
        self.waiting: list[Routed] = []
        self.waiting_at = array("I")
        self.markers: list[str] = []
        self.refused: dict[str, str] = {}  # reason -> the first offending name or key
        self.simple = True
        # The values last read, kept for a file that is replaced whole rather than written in
        # place (an accumulator): while its inode, mtime and size stay, so do its values.
        self.values: Values | None = None

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


@dataclass
class Written:
    """What the writer of a file in the layout knows of it: what FileMerger.seed() needs."""

    used: int = 8
    check_at: int = 0
    check: bytes = b""
    offsets: array[int] = field(default_factory=lambda: array("I"))
    verdicts: list[Verdict] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)


# A file's values as read_values() gives them: per chunk, the singles' values and the group
# sums (simple files), or (slot, values) of each series and window (min/max gauges).
Values = tuple[list[tuple[float, ...]], list[list[float]], list[tuple[int, tuple[float, ...]]]]


def read_values(layout: FileLayout, data: FileWindows) -> Values:
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


