"""The app collector's folders: opening them safely, listing them, reaching their entries
(exporter/collectors/app.py serves what this reads; app_fold.py folds exited workers' files,
app_routes.py saves the kept route set).

The folders are writable by the application's code, so every entry in them is hostile input
(docs/app.md, "The folder is untrusted"): each scrape opens the folder once and reaches its
entries only through that descriptor, never through a symlink and never waiting on one; an
entry is used only if it is a regular file of the expected owner and size, files are only
ever created new and renamed into place, and families the exporter serves itself are refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from exporter.instrument.fileformat import (
    FILE_TYPES,
    FOLDABLE_TYPES,
    GAUGE_MODE,
    is_writer_ident,
    parse_name,
    tmp_target,
)
from exporter.instrument.safefiles import (
    HARDLINK,
    MALFORMED,
    OWNER,
    TOO_LARGE,
    UNREADABLE,
    FileWindows,
    ReadBuffer,
    ReadFailedError,
    RefusedEntryError,
    open_entry,
    used_size,
)
from exporter.instrument.store import flock_held

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
# The kept routes, saved so that a restarted exporter keeps the same ones (docs/app.md, "The
# route cap"): in each folder (when the exporter may write there: app.compact), or in
# app.state_dir when that is set.
ROUTES_FILE = ".qatoolbox-exporter-routes.json"
STATE_ROUTES_FILE = "app-routes.json"

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
