"""Folding exited workers' files into the app folders' accumulators (exporter/collectors/app.py
runs it under the folder lock, exporter/collectors/app_folder.py reaches the files).

Each metric type has one accumulator `<type>_folded.db` holding everything dead workers
counted, with a marker entry per worker whose file it already holds, so that a fold
interrupted anywhere neither loses nor double-counts (docs/app.md, the crash-safety argument).
"""

from __future__ import annotations

import contextlib
import json
import os
from array import array
from collections.abc import Callable, Iterator

from exporter.collectors.app_folder import (
    BARE_TMP_LOCK_AGE,
    LIVE_GAUGES,
    Folder,
    accumulator_name,
    open_folder,
)
from exporter.instrument.fileformat import (
    FOLDABLE_TYPES,
    encode_entry_bytes,
    entry_size,
    file_header,
    mmap_key,
    parse_name,
)
from exporter.instrument.filemerge import FileMerger
from exporter.instrument.keys import MARKER_PREFIX
from exporter.instrument.readplan import Written
from exporter.instrument.safefiles import (
    FileWindows,
    RefusedEntryError,
    open_entry,
    write_stream_at,
)
from exporter.instrument.series import Verdict, blake2b, key_digest, refused
from exporter.instrument.store import flock_held

_MARKER = MARKER_PREFIX + "folded__"
_MARKER_BYTES = f'["{_MARKER}"'.encode()


def marker_key(ident: str) -> str:
    """The accumulator entry recording that ident's file of that type is already in it."""
    return mmap_key(_MARKER, ident, {}, "")


def marker_ident(key: str) -> str | None:
    """The worker ident a marker key names, or None for a metric key."""
    if not key.startswith(f'["{_MARKER}"'):
        return None
    try:
        return str(json.loads(key)[1])
    except (ValueError, IndexError, RecursionError):
        return None


def remove_dead_locks(folder: Folder, names: list[str], now: float) -> None:
    """Delete bare lock files nobody holds. A `.tmp` one is left alone for a minute: its writer
    may be between creating it and locking it. One that is refused stays where it is."""
    for name in names:
        try:
            fd, info = open_entry(folder.fd, name, folder.owners)
        except FileNotFoundError:
            continue
        except RefusedEntryError as exc:
            folder.refuse(name, exc.reason, str(exc))
            continue
        try:
            if name.endswith(".tmp") and now - info.st_mtime < BARE_TMP_LOCK_AGE:
                continue
            if flock_held(fd):
                continue  # its writer lives
        finally:
            os.close(fd)
        folder.unlink(name)


def fold(directory: str, dead: list[str]) -> int:
    """fold_folder() by path, with a merger of its own (tests and tools)."""
    fd, info = open_folder(directory)
    try:
        folder = Folder(fd, directory, info.st_uid)
        return fold_folder(folder, dead, folder.listing().names, FileMerger())
    finally:
        os.close(fd)


def fold_folder(folder: Folder, dead: list[str], names: set[str], merger: FileMerger) -> int:
    """Fold dead workers' counters and histograms into the accumulators, then delete their files.

    Caller holds the folder lock exclusively; names is the folder's listing taken under it;
    the merger judges which entries may be kept (and is told the new accumulators' layouts,
    so that reading them parses nothing). Returns how many workers were folded.
    Safe to interrupt anywhere: each accumulator is replaced atomically together with its
    record of which workers' files it contains, and files are deleted only after that.
    Entries refused as never the app's (a symlink, FIFO, ...) are neither folded nor deleted;
    a refused file that could be the app's raises RefusedEntryError and nothing more is done.
    """
    if not dead:
        return 0
    kept: set[str] = set()
    for prefix in FOLDABLE_TYPES:
        # Markers come only from the accumulator, never from a worker's file: a worker's
        # file cannot declare another worker's file as already folded.
        kept |= _fold_type(folder, prefix, dead, names, merger)
    kept |= _fold_gauge_names(folder, dead, names, merger)
    count = 0
    for ident in dead:
        own = [name for name in names if (parsed := parse_name(name)) and parsed[1] == ident]
        for name in own:
            if name not in kept:
                folder.unlink(name)
        count += any(name not in kept for name in own)
        # The lock file goes last: while data files remain it marks them as of a dead writer.
        lock = f"{ident}.lock"
        if not kept.intersection(own) and not folder.is_refused(lock):
            folder.unlink(lock)
    return count


def _fold_type(folder: Folder, prefix: str, dead: list[str], names: set[str],
               merger: FileMerger) -> set[str]:
    """Fold one type's files; the names of refused files left in place."""
    name = accumulator_name(prefix)
    acc = _Accumulation(prefix, merger)
    kept: set[str] = set()
    with contextlib.ExitStack() as stack:
        old = _open_accumulator(stack, folder, name, acc)
        changed = False
        for ident in dead:
            source = f"{prefix}_{ident}.db"
            if source not in names or ident in acc.markers or not _add_dead_file(
                    folder, acc, source, kept):
                continue
            acc.markers[ident] = marker_key(ident).encode()
            changed = True
        # A marker is only needed while its source file exists (a fold interrupted between
        # replacing the accumulator and deleting the sources); drop the others.
        for ident in [i for i in acc.markers if f"{prefix}_{i}.db" not in names]:
            del acc.markers[ident]
            changed = True
        if changed:
            acc.write(folder, name, None if old is None else old[0])
    return kept


def _add_dead_file(folder: Folder, acc: _Accumulation, source: str, kept: set[str]) -> bool:
    """Add a dead worker's file to acc; False when it is gone, or refused as something the app
    never writes (then it is added to kept: left in place)."""
    try:
        with folder.data(source) as opened:
            if opened is None:
                kept.add(source)
                return False
            acc.add_file(opened[0])
    except FileNotFoundError:
        return False
    return True


def _open_accumulator(stack: contextlib.ExitStack, folder: Folder, name: str,
                      acc: _Accumulation) -> tuple[FileWindows, os.stat_result] | None:
    """Open the folder's accumulator `name`, if it exists, for the rest of the fold (its keys
    are read again, not kept in memory, to write the new one) and load it into acc."""
    try:
        old = stack.enter_context(folder.data(name))
    except FileNotFoundError:
        return None
    if old is not None:
        acc.load(old[0])
    return old


class _Accumulation:
    """An accumulator being rebuilt: where each key's sum is (by key digest), the sums, and
    the markers. No key is kept: the new file is written by reading the keys again, in
    order (the old accumulator's, then those new to it from the dead workers' files, then
    the markers), as it is encoded, and each file read again is checked to hold the keys it
    held. So a fold holds a window of one file, and a digest and a double per key."""

    def __init__(self, prefix: str, merger: FileMerger, *, zero: bool = False) -> None:
        self.prefix, self.merger, self.zero = prefix, merger, zero
        self.known = merger.verdicts(prefix)
        self.index: dict[bytes, int] = {}  # key_digest -> position in values
        self.values = array("d")
        self.verdicts: list[Verdict] = []  # per position
        self.size = 0  # bytes of the entries (markers apart)
        self.old: _Reading | None = None
        # Dead workers' files with keys new to the accumulator.
        self.sources: list[_Reading] = []
        self.markers: dict[str, bytes] = {}  # ident -> its marker's key

    def load(self, data: FileWindows) -> None:
        """Start from the old accumulator."""
        self.old = self._read(data, markers=True)

    def add_file(self, data: FileWindows) -> None:
        """Add a dead worker's file."""
        reading = self._read(data, markers=False)
        if reading.written:
            self.sources.append(reading)

    def _read(self, data: FileWindows, *, markers: bool) -> _Reading:
        reading = _Reading(data.name)
        for _, key, _, value in data.entries(8):
            reading.keys.update(key)
            reading.count += 1
            at = self._add(key, value, markers=markers)
            if at >= 0:
                reading.written.append(reading.count - 1)
                reading.positions.append(at)
        return reading

    def _add(self, key: bytes, value: float, *, markers: bool) -> int:
        """Add an entry; the position of its key when the key is new, else -1."""
        if key.startswith(_MARKER_BYTES):
            try:
                ident = marker_ident(key.decode("utf-8"))
            except UnicodeDecodeError:
                return -1
            if markers and ident:
                self.markers[ident] = key
            return -1
        digest = key_digest(key)
        verdict = self.known.get(digest)
        if verdict is None:
            verdict = self.merger.verdict(self.prefix, digest, key)
            self.known = self.merger.verdicts(self.prefix)  # (a new one if it was full)
        if refused(verdict):
            return -1
        value = 0.0 if self.zero else value
        at = self.index.get(digest)
        if at is not None:
            self.values[at] += value
            return -1
        at = self.index[digest] = len(self.values)
        self.values.append(value)
        self.verdicts.append(verdict)
        self.size += entry_size(key)
        return at

    def write(self, folder: Folder, name: str, old: FileWindows | None) -> None:
        """Write the new accumulator and tell the merger its layout."""
        written = Written()
        stat_info = write_stream_at(folder.fd, name, self.encoded(old, folder.data, written))
        self.merger.seed(os.path.join(folder.path, name), stat_info, self.prefix, written)

    def encoded(self, old: FileWindows | None,
                reopen: Callable[[str], contextlib.AbstractContextManager[
                    tuple[FileWindows, os.stat_result] | None]],
                written: Written) -> Iterator[bytes]:
        """The new file: header, the entries, the markers; written is told its layout.
        ValueError when a file read again no longer holds the keys it held; OSError when it
        is gone."""
        markers = list(self.markers.values())
        written.used = 8 + self.size + sum(entry_size(key) for key in markers)
        yield file_header(written.used - 8)
        out = _Encoder(self.values, self.verdicts, written)
        if old is not None and self.old is not None:
            yield from self.old.encode(old, out)
        for source in self.sources:
            with reopen(source.name) as opened:
                if opened is None:
                    raise ValueError(f"{source.name}: refused while it was folded")
                yield from source.encode(opened[0], out)
        for key in markers:
            out.marker(key)
        yield out.flush()


class _Encoder:
    """Entries of a new accumulator as they are written: encoded into chunks, and their
    places noted for the merger."""

    def __init__(self, values: array[float], verdicts: list[Verdict], written: Written) -> None:
        self.values, self.verdicts, self.written = values, verdicts, written
        self.chunk: list[bytes] = []
        self.pos = 8

    def entry(self, key: bytes, at: int) -> bytes | None:
        """Add the entry of key (at its position); a chunk to write when one is full."""
        self._add(encode_entry_bytes(key, self.values[at]))
        self.written.offsets.append(self.pos - 16)
        self.written.verdicts.append(self.verdicts[at])
        return self.flush() if len(self.chunk) >= 1024 else None

    def marker(self, key: bytes) -> None:
        self._add(encode_entry_bytes(key, 1.0))
        self.written.markers.append(key.decode("utf-8"))

    def _add(self, entry: bytes) -> None:
        self.written.check_at, self.written.check = self.pos, entry[:-16]
        self.chunk.append(entry)
        self.pos += len(entry)

    def flush(self) -> bytes:
        chunk = b"".join(self.chunk)
        self.chunk.clear()
        return chunk


class _Reading:
    """What a fold read of one file: which of its entries (by ordinal) hold the keys it gave
    the accumulator first, their positions, and a digest of all its keys."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys = blake2b(digest_size=16)
        self.count = 0
        self.written = array("i")
        self.positions = array("i")

    def encode(self, data: FileWindows, out: _Encoder) -> Iterator[bytes]:
        """Encode this file's written entries with their sums (chunks yielded when full)."""
        again = blake2b(digest_size=16)
        count = 0
        step = 0
        for _, key, _, _ in data.entries(8):
            again.update(key)
            if step < len(self.written) and self.written[step] == count:
                full = out.entry(key, self.positions[step])
                step += 1
                if full is not None:
                    yield full
            count += 1
        if count != self.count or again.digest() != self.keys.digest():
            raise ValueError(f"{self.name}: changed while it was folded")


def _fold_gauge_names(folder: Folder, dead: list[str], names: set[str],
                      merger: FileMerger) -> set[str]:
    """Keep the dead workers' gauge series, at 0, in a gauge accumulator; return the names
    of refused files left in place.

    Their values are no longer true (nothing is in flight in a dead worker), but the series
    stay: `qatoolbox_http_requests_in_flight 0` rather than no series when no worker lives.
    Adding zeros twice changes nothing, so this needs no markers.
    """
    name = accumulator_name(LIVE_GAUGES)
    acc = _Accumulation(LIVE_GAUGES, merger, zero=True)
    kept: set[str] = set()
    with contextlib.ExitStack() as stack:
        old = _open_accumulator(stack, folder, name, acc)
        known = len(acc.values)
        for ident in dead:
            source = f"{LIVE_GAUGES}_{ident}.db"
            if source in names:
                _add_dead_file(folder, acc, source, kept)
        if len(acc.values) != known:
            acc.markers.clear()
            acc.write(folder, name, None if old is None else old[0])
    return kept
