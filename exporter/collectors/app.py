"""App collector: merges the metrics the application's workers record (exporter.instrument).

Each folder in app.multiprocess_dirs holds one set of files per worker process plus, per
metric type, one accumulator file `<type>_folded.db` holding everything dead workers counted.
On each scrape the collector folds the files of workers that are gone into the accumulators,
so the files read per scrape are those of live workers plus a constant few, however many
workers have come and gone. See docs/app.md for the crash-safety argument.

The folders are writable by the application's code, so every entry in them is hostile input
(docs/app.md, "The folder is untrusted"): each scrape opens the folder once and reaches its
entries only through that descriptor, never through a symlink and never waiting on one; an
entry is used only if it is a regular file of the expected owner and size, files are only
ever created new and renamed into place, and families the exporter serves itself are refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import stat
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.config import AppConfig
from exporter.instrument.merge import (
    MARKER_PREFIX,
    ROUTE_OVERFLOW,
    FileInfo,
    FileMerger,
    MergePart,
    Verdict,
    Written,
    key_digest,
    refused,
)
from exporter.instrument.store import (
    FILE_TYPES,
    FOLDABLE_TYPES,
    GAUGE_MODE,
    HARDLINK,
    MALFORMED,
    OWNER,
    REFUSAL_REASONS,
    TOO_LARGE,
    UNREADABLE,
    FileWindows,
    ReadBuffer,
    ReadFailedError,
    RefusedEntryError,
    blake2b,
    encode_entry_bytes,
    entry_size,
    file_header,
    flock_held,
    is_writer_ident,
    mmap_key,
    open_entry,
    parse_name,
    tmp_target,
    used_size,
    write_bytes_at,
    write_stream_at,
)

log = logging.getLogger("exporter.collectors.app")

DIR_LOCK = ".qatoolbox-exporter.lock"
# Routes with series of their own (~57 series each); the requests of any further route are
# summed under route="<other>", so the series budget holds however many routes the app has
# (docs/bench-compare.md).
MAX_ROUTES = 50
# How long a read waits for another exporter's fold of the same folder.
LOCK_WAIT = 1.0
# A bare `.lock.tmp` file younger than this may belong to a writer that is starting.
BARE_TMP_LOCK_AGE = 60.0
# A folder with more entries than this is not read: listing it would cost more than any
# real one (3 files and a lock per live worker, a few hundred at most, or some thousands of
# exited workers' files with folding off).
MAX_DIR_ENTRIES = 100_000
LIVE_GAUGES = f"gauge_{GAUGE_MODE}"
FOLDED_IDENT = "folded"
_MARKER = MARKER_PREFIX + "folded__"
_MARKER_BYTES = f'["{_MARKER}"'.encode()
# The kept routes, saved so that a restarted exporter keeps the same ones (docs/app.md, "The
# route cap"): in each folder (when the exporter may write there: app.compact), or in
# app.state_dir when that is set.
ROUTES_FILE = ".qatoolbox-exporter-routes.json"
STATE_ROUTES_FILE = "app-routes.json"
ROUTES_VERSION = 1
# A saved set is read only up to this size, and a route longer than this is not saved (a
# route template is a few dozen characters; 50 at the limit, as UTF-8, fit well within).
MAX_ROUTES_BYTES = 1 << 20
MAX_ROUTE_CHARS = 2048

# Families the exporter's other collectors serve (and this collector's own): a file in the
# folder may not declare them, as a family or a sample name, or it could pass off values as
# the exporter's (and two families of one name break the exposition).
RESERVED_PREFIXES = (
    "qatoolbox_exporter_", "qatoolbox_host_", "qatoolbox_process_", "qatoolbox_postgres_",
    "qatoolbox_redis_", "qatoolbox_business_", "qatoolbox_app_", "qatoolbox_celery_",
)
# ... except the app's own: exporter.instrument records qatoolbox_http_* (never reserved) and
# qatoolbox_celery_tasks / qatoolbox_celery_task_duration_seconds; the other qatoolbox_celery_
# names (queue length, unacked messages) are the redis collector's.
APP_PREFIXES = ("qatoolbox_celery_task",)

# Refusals of a regular file that could hold the app's counts: the folder then contributes
# nothing this scrape (dir_up 0), rather than totals that are too low, which Prometheus would
# take for a counter reset. Anything else refused (a symlink, FIFO, socket, folder) is never a
# file the app wrote: it is skipped and the rest of the folder is served.
_DOWN_REASONS = frozenset((OWNER, HARDLINK, UNREADABLE, TOO_LARGE, MALFORMED))
# Refusal log lines per minute, all folders together: a folder of ever-new bad names cannot
# flood the log (the counter counts every refusal).
_LOG_BURST = 20
_LOG_WINDOW = 60.0


def accumulator_path(directory: str, prefix: str) -> str:
    """Where the dead workers' values of one metric type are kept."""
    return os.path.join(directory, _accumulator(prefix))


def _accumulator(prefix: str) -> str:
    return f"{prefix}_{FOLDED_IDENT}.db"


_ACCUMULATORS = frozenset(_accumulator(p) for p in (*FOLDABLE_TYPES, LIVE_GAUGES))
# Files the exporter writes into a folder (as a temporary file, then renamed).
_OURS = _ACCUMULATORS | {ROUTES_FILE}


def encode_routes(routes: Sequence[str]) -> bytes:
    """The saved form of a kept route set."""
    return (json.dumps({"version": ROUTES_VERSION, "routes": list(routes)},
                       ensure_ascii=False) + "\n").encode("utf-8")


def decode_routes(data: bytes) -> list[str]:
    """The routes of a saved set; ValueError saying what is wrong with it. The file may have
    been written by anyone who can write the folder: it is taken whole or not at all."""
    if len(data) > MAX_ROUTES_BYTES:
        raise ValueError(f"over {MAX_ROUTES_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not UTF-8 JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != ROUTES_VERSION or set(doc) != {
            "version", "routes"}:
        raise ValueError(f'not {{"version": {ROUTES_VERSION}, "routes": [...]}}')
    routes = doc["routes"]
    if not isinstance(routes, list) or len(routes) > MAX_ROUTES:
        raise ValueError(f"routes: not a list of at most {MAX_ROUTES}")
    for route in routes:
        if not isinstance(route, str) or not 0 < len(route) <= MAX_ROUTE_CHARS or \
                route == ROUTE_OVERFLOW or not _encodable(route):
            raise ValueError(f"routes: not a route label: {_shown(repr(route))}")
    if len(set(routes)) != len(routes):
        raise ValueError("routes: a route is listed twice")
    return routes


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800 in the JSON)
        return False
    return True


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


class _UnusableFolderError(Exception):
    """The folder itself cannot be used this scrape; the message says why."""


def _open_folder(path: str) -> tuple[int, os.stat_result]:
    """A descriptor of the folder and its fstat; _UnusableFolderError when it is missing, a
    symlink, not a folder, or writable by every user without the sticky bit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _UnusableFolderError("does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            # Whoever can write the folder's parent could point the link anywhere.
            raise _UnusableFolderError("is a symlink: configure the folder it points to") from None
        if exc.errno == errno.ENOTDIR:
            # O_DIRECTORY fails first on a symlink to a folder; lstat only words the message.
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise _UnusableFolderError(
                        "is a symlink: configure the folder it points to") from None
            raise _UnusableFolderError("is not a folder") from None
        raise _UnusableFolderError(f"cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        os.close(fd)
        # Every local user could then rename or delete the app's files.
        raise _UnusableFolderError(
            f"is writable by every user (mode {stat.S_IMODE(info.st_mode):04o}): remove write "
            "access for others (chmod o-w)")
    return fd, info


def _shown(text: str) -> str:
    """text as it may go into a log line: control characters and odd bytes escaped."""
    text = text if len(text) <= 300 else text[:300] + "..."
    return text if text.isprintable() else ascii(text)[1:-1]


@dataclass
class _Listing:
    """A folder's files by role."""

    workers: dict[str, list[str]] = field(default_factory=dict)  # ident -> data file names
    foreign: list[str] = field(default_factory=list)  # plain prometheus_client files
    # Lock files of writers without data files: a writer that died between creating its
    # lock and its first data file leaves only these (`<ident>.lock`, `.<ident>.lock.tmp`).
    bare_locks: list[str] = field(default_factory=list)
    # Temporary files of an exporter that died writing an accumulator.
    tmps: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


def _listing(names: Iterable[str]) -> _Listing:
    listing = _Listing()
    locks: dict[str, str] = {}
    for name in names:
        listing.names.add(name)
        parsed = parse_name(name)
        if parsed is None:
            ident = name.removeprefix(".").removesuffix(".tmp").removesuffix(".lock")
            if name.endswith((".lock", ".lock.tmp")) and is_writer_ident(ident):
                locks[name] = ident
            elif tmp_target(name) in _OURS:
                listing.tmps.append(name)
            continue
        prefix, ident = parsed
        if ident == FOLDED_IDENT or prefix not in FILE_TYPES:
            continue  # an accumulator, or not a metrics file
        if is_writer_ident(ident):
            listing.workers.setdefault(ident, []).append(name)
        else:
            listing.foreign.append(name)
    listing.bare_locks = [name for name, ident in locks.items() if ident not in listing.workers]
    return listing


class _Folder:
    """One scrape's handle on one folder: entries are reached only relative to one descriptor
    of it (so renaming the folder or a parent mid-scrape changes nothing), opened without
    following symlinks or blocking, and checked after opening. Refusals are recorded."""

    def __init__(self, fd: int, path: str, owner: int, buffer: ReadBuffer | None = None) -> None:
        self.fd = fd
        self.path = path
        self.buffer = buffer or ReadBuffer()
        # Who may own an entry: the app (the folder's owner), this exporter, root.
        self.owners = frozenset((owner, os.geteuid(), 0))
        self.refused: dict[tuple[str, str], str] = {}  # (name, reason) -> detail

    def refuse(self, name: str, reason: str, detail: str) -> None:
        self.refused.setdefault((name, reason), detail)

    def is_refused(self, name: str) -> bool:
        return any(refused == name for refused, _ in self.refused)

    def listing(self) -> _Listing:
        names: list[str] = []
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if len(names) >= MAX_DIR_ENTRIES:
                    raise _UnusableFolderError(f"holds more than {MAX_DIR_ENTRIES} entries")
                names.append(entry.name)
        return _listing(names)

    @contextlib.contextmanager
    def data(self, name: str) -> Iterator[tuple[FileWindows, os.stat_result] | None]:
        """A data file's used part (read through the scrape's buffer while the block runs) and
        its fstat; None when it is refused as something the app never writes. Raises
        RefusedEntryError when it is refused as a file that could be the app's, including
        for what the block reads of it (malformed, unreadable); FileNotFoundError when it is
        gone."""
        try:
            fd, info = open_entry(self.fd, name, self.owners)
        except RefusedEntryError as exc:
            self.refuse(name, exc.reason, str(exc))
            if exc.reason in _DOWN_REASONS:
                raise
            yield None
            return
        try:
            try:
                used = used_size(fd, info, name)
            except RefusedEntryError as exc:
                self.refuse(name, exc.reason, str(exc))
                raise
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise self._unreadable(name, exc.strerror or str(exc)) from None
            yield FileWindows(fd, used, name, self.buffer), info
        except ValueError as exc:
            # What the block found malformed in this file (a file read in a nested block
            # raises its own RefusedEntryError, which passes through).
            raise self.malformed(name, exc) from None
        except ReadFailedError as exc:
            raise self._unreadable(name, str(exc)) from None
        finally:
            os.close(fd)

    def _unreadable(self, name: str, detail: str) -> RefusedEntryError:
        self.refuse(name, UNREADABLE, f"cannot be read: {detail}")
        return RefusedEntryError(UNREADABLE, f"cannot be read: {detail}")

    def malformed(self, name: str, exc: ValueError) -> RefusedEntryError:
        detail = str(exc).removeprefix(f"{name}: ")
        self.refuse(name, MALFORMED, detail)
        return RefusedEntryError(MALFORMED, detail)

    def writer_alive(self, ident: str) -> bool:
        """Whether the process that wrote ident's files still holds its lock.

        A missing lock file means dead too: writers create it before any data file and only
        the exporter's compaction removes it, after the data files. So does a lock that is
        not a regular file: no writer holds that one.
        """
        return self.lock_held(f"{ident}.lock") is True

    def lock_held(self, name: str) -> bool | None:
        """Whether a writer holds that lock file; None when it is gone or refused."""
        try:
            fd, _ = open_entry(self.fd, name, self.owners)
        except FileNotFoundError:
            return None
        except RefusedEntryError as exc:
            self.refuse(name, exc.reason, str(exc))
            return None
        try:
            return flock_held(fd)
        finally:
            os.close(fd)

    def open_lock(self) -> int | None:
        """The folder lock's descriptor (created if missing); None when it cannot be had
        (a read-only folder, or a lock entry that is refused)."""
        for _ in range(2):
            try:
                return open_entry(self.fd, DIR_LOCK, self.owners)[0]
            except FileNotFoundError:
                pass
            except RefusedEntryError as exc:
                self.refuse(DIR_LOCK, exc.reason, str(exc))
                return None
            try:
                return os.open(DIR_LOCK, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o644, dir_fd=self.fd)
            except FileExistsError:
                continue  # another exporter made it meanwhile
            except OSError:
                # A read-only folder: no folding, reads are still right (dead workers' files
                # are read as they are).
                return None
        return None

    def unlink(self, name: str) -> None:
        # Removes the entry itself, whatever it is; never anything it points to.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def _remove_dead_locks(folder: _Folder, names: list[str], now: float) -> None:
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
    fd, info = _open_folder(directory)
    try:
        folder = _Folder(fd, directory, info.st_uid)
        return fold_folder(folder, dead, folder.listing().names, FileMerger())
    finally:
        os.close(fd)


def fold_folder(folder: _Folder, dead: list[str], names: set[str], merger: FileMerger) -> int:
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


def _fold_type(folder: _Folder, prefix: str, dead: list[str], names: set[str],
               merger: FileMerger) -> set[str]:
    """Fold one type's files; the names of refused files left in place."""
    name = _accumulator(prefix)
    acc = _Accumulation(prefix, merger)
    kept: set[str] = set()
    with contextlib.ExitStack() as stack:
        # The accumulator stays open for the whole fold: its keys are read again (not kept
        # in memory) to write the new one.
        try:
            old = stack.enter_context(folder.data(name))
        except FileNotFoundError:
            old = None
        if old is not None:
            acc.load(old[0])
        changed = False
        for ident in dead:
            source = f"{prefix}_{ident}.db"
            if source not in names or ident in acc.markers:
                continue
            try:
                with folder.data(source) as opened:
                    if opened is None:
                        kept.add(source)
                        continue
                    acc.add_file(opened[0])
            except FileNotFoundError:
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

    def write(self, folder: _Folder, name: str, old: FileWindows | None) -> None:
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


def _fold_gauge_names(folder: _Folder, dead: list[str], names: set[str],
                      merger: FileMerger) -> set[str]:
    """Keep the dead workers' gauge series, at 0, in a gauge accumulator; return the names
    of refused files left in place.

    Their values are no longer true (nothing is in flight in a dead worker), but the series
    stay: `qatoolbox_http_requests_in_flight 0` rather than no series when no worker lives.
    Adding zeros twice changes nothing, so this needs no markers.
    """
    name = _accumulator(LIVE_GAUGES)
    acc = _Accumulation(LIVE_GAUGES, merger, zero=True)
    kept: set[str] = set()
    with contextlib.ExitStack() as stack:
        try:
            old = stack.enter_context(folder.data(name))
        except FileNotFoundError:
            old = None
        if old is not None:
            acc.load(old[0])
        known = len(acc.values)
        for ident in dead:
            source = f"{LIVE_GAUGES}_{ident}.db"
            if source not in names:
                continue
            try:
                with folder.data(source) as opened:
                    if opened is None:
                        kept.add(source)
                        continue
                    acc.add_file(opened[0])
            except FileNotFoundError:
                continue
        if len(acc.values) != known:
            acc.markers.clear()
            acc.write(folder, name, None if old is None else old[0])
    return kept


@dataclass
class _DirResult:
    up: bool = False
    workers: int = 0
    files: int = 0
    part: MergePart | None = None
    paths: set[str] = field(default_factory=set)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)


class _RefusalLog:
    """One log line per refused entry and reason while it stays in the folder (again if it
    comes back), at most _LOG_BURST lines a minute; the rest wait for the next minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logged: dict[str, set[tuple[str, str]]] = {}
        self._window = -math.inf
        self._lines = 0
        self._held = False

    def report(self, directory: str, refused: dict[tuple[str, str], str]) -> None:
        logged = self._logged.setdefault(directory, set())
        logged.intersection_update(refused)
        for key, detail in refused.items():
            if key in logged:
                continue
            if not self._take():
                return
            logged.add(key)
            name, reason = key
            log.warning("app metrics file refused",
                        extra={"dir": directory, "file": _shown(name), "reason": reason,
                               "detail": _shown(detail)})

    def _take(self) -> bool:
        now = self._clock()
        if now - self._window >= _LOG_WINDOW:
            self._window, self._lines, self._held = now, 0, False
        if self._lines < _LOG_BURST:
            self._lines += 1
            return True
        if not self._held:
            self._held = True
            log.warning("more app metrics files refused than are logged; the others follow at "
                        f"up to {_LOG_BURST} lines a minute "
                        "(qatoolbox_app_files_rejected_total counts them all)")
        return False


class AppCollector:
    """Merges the app's worker files; also reports on the folders themselves.

        qatoolbox_http_requests_total{route="api/chat/rooms/<str:id>/",method="GET",status="200"} 2
        qatoolbox_http_request_duration_seconds_bucket{route="...",method="GET",le="0.1"} 9
        qatoolbox_http_requests_in_flight 1
        qatoolbox_celery_tasks_total{task="chat.cleanup_expired_rooms",state="succeeded"} 3
        qatoolbox_app_multiprocess_dir_up{dir="/run/qatoolbox/metrics/web"} 1
        qatoolbox_app_workers{dir="/run/qatoolbox/metrics/web"} 3
        qatoolbox_app_workers_folded_total{dir="/run/qatoolbox/metrics/web"} 17
        qatoolbox_app_files_rejected_total{dir="/run/qatoolbox/metrics/web",reason="symlink"} 0
    """

    name = "app"

    def __init__(self, config: AppConfig, reserved_names: Iterable[str] = ()) -> None:
        """reserved_names: further families the exporter serves (the business queries')."""
        self._dirs = config.multiprocess_dirs
        self._compact = config.compact
        self._merger = FileMerger(route_limit=MAX_ROUTES, reserved_prefixes=RESERVED_PREFIXES,
                                  allowed_prefixes=APP_PREFIXES, reserved_names=reserved_names)
        self._folded = dict.fromkeys(self._dirs, 0)
        self._rejected = {d: dict.fromkeys(REFUSAL_REASONS, 0) for d in self._dirs}
        self._refusal_log = _RefusalLog()
        # Files are read through this, a window at a time (scrapes of one collector never
        # overlap: the scrape runner runs one collection at a time).
        self._buffer = ReadBuffer()
        self._problems: dict[str, str | None] = {}
        self._fold_errors: dict[str, str | None] = {}
        # The kept routes are saved in app.state_dir when it is set, else in each folder.
        self._state_dir = config.state_dir or None
        self._routes_saved: dict[str, int] = {}  # where -> kept_generation last written there
        self._routes_errors: dict[str, str | None] = {}
        self._routes_full_logged = False
        for directory in self._dirs:
            self._check_at_start(directory)
        if self._state_dir is not None:
            self._merger.adopt(self._load_state_dir(self._state_dir))

    def _check_at_start(self, directory: str) -> None:
        """Log what is wrong with a folder's ownership and mode (docs/app.md)."""
        try:
            fd, info = _open_folder(directory)
        except _UnusableFolderError as exc:
            self._problem(directory, str(exc))
            return
        os.close(fd)
        self._problems[directory] = None
        mode, owner, me = stat.S_IMODE(info.st_mode), info.st_uid, os.geteuid()
        if mode & stat.S_IWOTH:
            log.warning("app metrics folder is writable by every user (sticky); files of "
                        "other owners are refused",
                        extra={"dir": directory, "mode": f"{mode:04o}", "owner_uid": owner})
        elif mode & stat.S_IWGRP and owner in (0, me):
            log.warning("app metrics folder is owned by root or the exporter and writable by "
                        "its group: files the app writes as a group member are refused for "
                        "their owner; make the app's user the folder's owner",
                        extra={"dir": directory, "mode": f"{mode:04o}", "owner_uid": owner})
        if self._compact and not os.access(directory, os.W_OK | os.X_OK,
                                           effective_ids=os.access in os.supports_effective_ids):
            log.warning("app metrics folder is not writable by the exporter: exited workers' "
                        "files cannot be folded (reads grow with worker restarts)",
                        extra={"dir": directory, "mode": f"{mode:04o}", "owner_uid": owner,
                               "exporter_uid": me})

    def _problem(self, directory: str, problem: str | None) -> None:
        """Log a folder becoming unusable (or usable again) once per change."""
        if self._problems.get(directory, "") == problem:
            return
        if problem is not None:
            log.warning("app metrics folder unusable", extra={"dir": directory,
                                                               "problem": problem})
        elif directory in self._problems:
            log.info("app metrics folder usable again", extra={"dir": directory})
        self._problems[directory] = problem

    def _fold_error(self, directory: str, error: str | None) -> None:
        if self._fold_errors.get(directory) == error:
            return
        if error is not None:
            log.warning("app metrics folder could not be folded; it serves nothing until it "
                        "can", extra={"dir": directory, "err": error})
        self._fold_errors[directory] = error

    def collect(self) -> Iterator[Metric]:
        """Fold, read and merge every folder."""
        if not self._dirs:
            return
        results = {d: self._read_dir(d) for d in self._dirs}
        if self._state_dir is not None:
            self._save_state_dir(self._state_dir)
        self._note_routes_full()
        yield from self._merger.families(
            [r.part for r in results.values() if r.up and r.part is not None])
        self._merger.forget(set().union(*(r.paths for r in results.values())))
        up = GaugeMetricFamily("qatoolbox_app_multiprocess_dir_up",
                               "Whether the app's metrics folder could be read in full.",
                               labels=["dir"])
        workers = GaugeMetricFamily("qatoolbox_app_workers",
                                    "App processes with live metrics files in the folder.",
                                    labels=["dir"])
        files = GaugeMetricFamily("qatoolbox_app_multiprocess_files",
                                  "Metrics files read from the folder in this scrape.",
                                  labels=["dir"])
        folded = CounterMetricFamily("qatoolbox_app_workers_folded",
                                     "Exited app processes whose files this exporter folded "
                                     "into the folder's accumulators.", labels=["dir"])
        rejected = CounterMetricFamily("qatoolbox_app_files_rejected",
                                       "Entries of the app's metrics folder refused, by reason, "
                                       "at every scrape that finds them.",
                                       labels=["dir", "reason"])
        for directory, result in results.items():
            up.add_metric([directory], 1.0 if result.up else 0.0)
            workers.add_metric([directory], float(result.workers))
            files.add_metric([directory], float(result.files))
            folded.add_metric([directory], float(self._folded[directory]))
            counts = self._rejected[directory]
            for _, reason in result.refused:
                counts[reason] += 1
            for reason, count in counts.items():
                rejected.add_metric([directory, reason], float(count))
            self._refusal_log.report(directory, result.refused)
        yield from (up, workers, files, folded, rejected)

    # --- the kept routes, saved ---

    def _load_routes(self, folder: _Folder) -> list[str]:
        """The route set saved in a folder; none when there is none or it is refused (counted
        and logged like any refused entry, but the folder stays up: it holds no counts)."""
        try:
            fd, info = open_entry(folder.fd, ROUTES_FILE, folder.owners)
        except FileNotFoundError:
            return []
        except RefusedEntryError as exc:
            folder.refuse(ROUTES_FILE, exc.reason, str(exc))
            return []
        try:
            data = _read_small(fd, info)
        except RefusedEntryError as exc:
            folder.refuse(ROUTES_FILE, exc.reason, str(exc))
            return []
        finally:
            os.close(fd)
        try:
            return decode_routes(data)
        except ValueError as exc:
            folder.refuse(ROUTES_FILE, MALFORMED, str(exc))
            return []

    def _save_routes(self, folder: _Folder, listing: _Listing) -> None:
        """Write the kept set into the folder when it changed since last written there, or
        when the file is gone (gunicorn empties the folder when it starts)."""
        generation = self._merger.kept_generation
        if not self._merger.kept_routes or (
                self._routes_saved.get(folder.path) == generation
                and ROUTES_FILE in listing.names):
            return
        try:
            write_bytes_at(folder.fd, ROUTES_FILE, self._routes_to_save(folder.path))
        except OSError as exc:
            self._routes_error(folder.path, exc.strerror or str(exc))
            return
        self._routes_saved[folder.path] = generation
        self._routes_error(folder.path, None)

    def _routes_to_save(self, where: str) -> bytes:
        routes = self._merger.kept_routes
        saved = [r for r in routes if len(r) <= MAX_ROUTE_CHARS]
        if len(saved) != len(routes):
            self._routes_error(where, f"routes over {MAX_ROUTE_CHARS} characters are not "
                                      "saved")
        return encode_routes(saved)

    def _routes_error(self, where: str, error: str | None) -> None:
        if self._routes_errors.get(where) == error:
            return
        if error is not None:
            log.warning("app kept routes cannot be saved; a restart may choose other routes "
                        "to keep", extra={"dir": where, "err": error})
        self._routes_errors[where] = error

    def _load_state_dir(self, directory: str) -> list[str]:
        """The route set saved in app.state_dir (a folder of the exporter's own)."""
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("app.state_dir cannot be opened; the kept routes are not saved",
                        extra={"dir": directory, "err": exc.strerror or str(exc)})
            return []
        try:
            fd, info = open_entry(dir_fd, STATE_ROUTES_FILE, frozenset((os.geteuid(), 0)))
            try:
                return decode_routes(_read_small(fd, info))
            finally:
                os.close(fd)
        except FileNotFoundError:
            return []
        except (RefusedEntryError, ValueError) as exc:
            log.warning("app saved routes refused; routes are chosen again",
                        extra={"dir": directory, "file": STATE_ROUTES_FILE,
                               "detail": _shown(str(exc))})
            return []
        finally:
            os.close(dir_fd)

    def _save_state_dir(self, directory: str) -> None:
        generation = self._merger.kept_generation
        if not self._merger.kept_routes or self._routes_saved.get(directory) == generation:
            return
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                write_bytes_at(dir_fd, STATE_ROUTES_FILE, self._routes_to_save(directory))
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self._routes_error(directory, exc.strerror or str(exc))
            return
        self._routes_saved[directory] = generation
        self._routes_error(directory, None)

    def _note_routes_full(self) -> None:
        """Say once that routes are now being folded, and where the kept set is saved."""
        if self._routes_full_logged or not self._merger.routes_full():
            return
        self._routes_full_logged = True
        where = self._state_dir or ("each app folder" if self._compact else None)
        if where is None:
            log.warning(f"app routes past the first {MAX_ROUTES} are summed under "
                        f'route="{ROUTE_OVERFLOW}"; the kept set is not saved (app.compact is '
                        "off): set app.state_dir so that a restart keeps the same routes")
        else:
            log.info(f"app routes past the first {MAX_ROUTES} are summed under "
                     f'route="{ROUTE_OVERFLOW}"', extra={"saved_in": where})

    def _read_dir(self, directory: str) -> _DirResult:
        result = _DirResult()
        try:
            fd, info = _open_folder(directory)
        except _UnusableFolderError as exc:
            self._problem(directory, str(exc))
            return result
        folder = _Folder(fd, directory, info.st_uid, self._buffer)
        lock_fd = None
        try:
            listing = folder.listing()
            self._problem(directory, None)
            lock_fd = folder.open_lock()
            alive = {ident: folder.writer_alive(ident) for ident in listing.workers}
            dead = [ident for ident, live in alive.items() if not live]
            if (dead or listing.bare_locks or listing.tmps) and self._compact and \
                    lock_fd is not None and _try_lock(lock_fd, fcntl.LOCK_EX):
                # Under the lock: another exporter may have folded these meanwhile.
                listing = folder.listing()
                self._fold(folder, [i for i in dead if i in listing.workers], listing)
                listing = folder.listing()
                alive = {ident: alive[ident] if ident in alive else folder.writer_alive(ident)
                         for ident in listing.workers}
            # Readers share the lock: a fold elsewhere never runs halfway through this read.
            if lock_fd is not None and not _try_lock(lock_fd, fcntl.LOCK_SH, LOCK_WAIT):
                # Another exporter holds the folder (a fold, or it is stuck): skip this
                # folder for this scrape rather than read it halfway through a fold.
                return result
            if self._state_dir is None and not self._merger.routes_full():
                # Before any route of this folder is decided: the set saved here (by this
                # exporter before a restart, or by another one reading the same folder).
                self._merger.adopt(self._load_routes(folder))
            self._read_files(folder, listing, alive, result)
            if self._state_dir is None and self._compact and lock_fd is not None:
                self._save_routes(folder, listing)
        except _UnusableFolderError as exc:
            self._problem(directory, str(exc))
            result.part = None
            return result
        except (OSError, ValueError, RefusedEntryError):
            # A file we cannot read or parse: serve nothing from this folder rather than
            # totals that are too low (Prometheus would take the drop for a counter reset).
            result.part = None
            return result
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(fd)
            result.refused = folder.refused
        result.up = True
        return result

    def _fold(self, folder: _Folder, dead: list[str], listing: _Listing) -> None:
        """Fold under the exclusive lock; an error (a full disk) takes the folder down for
        this scrape, logged once until a fold succeeds again."""
        directory = folder.path
        try:
            self._folded[directory] += fold_folder(folder, dead, listing.names, self._merger)
            _remove_dead_locks(folder, listing.bare_locks, time.time())
            for name in listing.tmps:
                # Under the exclusive lock nobody is writing one: a dead exporter's leftover.
                folder.unlink(name)
        except (OSError, ValueError) as exc:
            self._fold_error(directory, exc.strerror if isinstance(exc, OSError) and
                             exc.strerror else str(exc))
            raise
        self._fold_error(directory, None)

    def _read_files(self, folder: _Folder, listing: _Listing, alive: dict[str, bool],
                    result: _DirResult) -> None:
        result.part = self._merger.part()
        folded: dict[str, set[str]] = {}
        for prefix in FOLDABLE_TYPES:
            info = self._read(folder, _accumulator(prefix), prefix, FOLDED_IDENT, result,
                              rewritten=True)
            folded[prefix] = set() if info is None else {
                i for i in map(marker_ident, info.markers) if i}
        self._read(folder, _accumulator(LIVE_GAUGES), LIVE_GAUGES, FOLDED_IDENT, result,
                   rewritten=True)
        for ident, names in listing.workers.items():
            live = alive.get(ident, False)
            result.workers += live
            for name in names:
                prefix = name[:-3].rpartition("_")[0]
                if prefix in FOLDABLE_TYPES:
                    if ident in folded[prefix]:
                        # Already in the accumulator (a fold stopped before deleting it).
                        continue
                elif not live:
                    # A dead worker's gauges (requests in flight) are no longer true: its
                    # series count as 0 (the fold keeps them at 0 in the gauge accumulator).
                    self._read(folder, name, prefix, ident, result, zero=True)
                    continue
                self._read(folder, name, prefix, ident, result)
        for name in listing.foreign:
            prefix, _, ident = name[:-3].rpartition("_")
            self._read(folder, name, prefix, ident, result)
        # The routes first seen in this folder are kept or folded now that all its files
        # are read (the busiest kept first).
        self._merger.settle(result.part)

    def _read(self, folder: _Folder, name: str, prefix: str, ident: str, result: _DirResult, *,
              rewritten: bool = False, zero: bool = False) -> FileInfo | None:
        """Add one file's values to the folder's part; None when it is gone or skipped. Raises
        RefusedEntryError when the folder cannot be served this scrape."""
        assert result.part is not None
        path = os.path.join(folder.path, name)
        try:
            with folder.data(name) as opened:
                if opened is None:
                    return None
                data, stat_info = opened
                info = self._merger.add(result.part, path, data, stat_info.st_ino, prefix,
                                        ident=ident, mtime=stat_info.st_mtime_ns,
                                        rewritten=rewritten, zero=zero)
        except FileNotFoundError:
            # Removed since the listing: a dead worker's gauges (gunicorn child_exit), an app
            # restart emptying the folder, or no accumulator yet.
            return None
        for reason, offender in info.refused:
            folder.refuse(name, reason, f"declares {offender}")
        result.files += 1
        result.paths.add(path)
        return info


def _read_small(fd: int, info: os.stat_result) -> bytes:
    """A saved route set's bytes: RefusedEntryError when over MAX_ROUTES_BYTES or unreadable."""
    if info.st_size > MAX_ROUTES_BYTES:
        raise RefusedEntryError(TOO_LARGE, f"{info.st_size} bytes, over the "
                                           f"{MAX_ROUTES_BYTES}-byte limit")
    try:
        data = os.pread(fd, MAX_ROUTES_BYTES + 1, 0)
    except OSError as exc:
        raise RefusedEntryError(UNREADABLE, f"cannot be read: {exc.strerror}") from None
    if len(data) > MAX_ROUTES_BYTES:
        raise RefusedEntryError(TOO_LARGE, f"over the {MAX_ROUTES_BYTES}-byte limit")
    return data


def _try_lock(fd: int, kind: int, wait: float = 0.0) -> bool:
    """Take the folder lock without ever blocking for long (a stopped peer holds it forever)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
