"""The app collector's folders: opening them safely, listing, folding dead workers' files into
accumulators, and the kept route set (exporter/collectors/app.py serves what this reads).

The folders are writable by the application's code, so every entry in them is hostile input
(docs/app.md, "The folder is untrusted"): each scrape opens the folder once and reaches its
entries only through that descriptor, never through a symlink and never waiting on one; an
entry is used only if it is a regular file of the expected owner and size, files are only
ever created new and renamed into place, and families the exporter serves itself are refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from exporter.instrument.merge import (
    MARKER_PREFIX,
    ROUTE_OVERFLOW,
    FileMerger,
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
LOG_BURST = 20
LOG_WINDOW = 60.0


def accumulator_path(directory: str, prefix: str) -> str:
    """Where the dead workers' values of one metric type are kept."""
    return os.path.join(directory, accumulator_name(prefix))


def accumulator_name(prefix: str) -> str:
    return f"{prefix}_{FOLDED_IDENT}.db"


_ACCUMULATORS = frozenset(accumulator_name(p) for p in (*FOLDABLE_TYPES, LIVE_GAUGES))
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
            raise ValueError(f"routes: not a route label: {shown(repr(route))}")
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


class UnusableFolderError(Exception):
    """The folder itself cannot be used this scrape; the message says why."""


def open_folder(path: str) -> tuple[int, os.stat_result]:
    """A descriptor of the folder and its fstat; UnusableFolderError when it is missing, a
    symlink, not a folder, or writable by every user without the sticky bit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnusableFolderError("does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            # Whoever can write the folder's parent could point the link anywhere.
            raise UnusableFolderError("is a symlink: configure the folder it points to") from None
        if exc.errno == errno.ENOTDIR:
            # O_DIRECTORY fails first on a symlink to a folder; lstat only words the message.
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise UnusableFolderError(
                        "is a symlink: configure the folder it points to") from None
            raise UnusableFolderError("is not a folder") from None
        raise UnusableFolderError(f"cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        os.close(fd)
        # Every local user could then rename or delete the app's files.
        raise UnusableFolderError(
            f"is writable by every user (mode {stat.S_IMODE(info.st_mode):04o}): remove write "
            "access for others (chmod o-w)")
    return fd, info


def shown(text: str) -> str:
    """text as it may go into a log line: control characters and odd bytes escaped."""
    text = text if len(text) <= 300 else text[:300] + "..."
    return text if text.isprintable() else ascii(text)[1:-1]


@dataclass
class Listing:
    """A folder's files by role."""

    workers: dict[str, list[str]] = field(default_factory=dict)  # ident -> data file names
    foreign: list[str] = field(default_factory=list)  # plain prometheus_client files
    # Lock files of writers without data files: a writer that died between creating its
    # lock and its first data file leaves only these (`<ident>.lock`, `.<ident>.lock.tmp`).
    bare_locks: list[str] = field(default_factory=list)
    # Temporary files of an exporter that died writing an accumulator.
    tmps: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


def _listing(names: Iterable[str]) -> Listing:
    listing = Listing()
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


class Folder:
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

    def listing(self) -> Listing:
        names: list[str] = []
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if len(names) >= MAX_DIR_ENTRIES:
                    raise UnusableFolderError(f"holds more than {MAX_DIR_ENTRIES} entries")
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
