"""The writing side: this process's metric values, in memory or in mmap files the exporter
merges (one per metric type, fileformat.py), and the lock that tells the exporter whether
the writer lives.

Each writer holds its lock file `<pid>-<token>.lock` with flock(2) for its whole life. The
kernel drops that lock when the process dies however it dies, so the exporter can tell a dead
writer's files from a live one's without trusting pids (which are reused, and not even visible
across container pid namespaces).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import threading

from exporter.instrument.fileformat import (
    CREATE_FLAGS,
    GAUGE_MODE,
    HEADER,
    INT,
    READ_FLAGS,
    encode_entry,
    parse_entries,
)

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"

_INITIAL_SIZE = 1 << 15


class ValueFile:
    """One metric type's values for this process, in the file layout: in an mmap of the file
    when a path is given, else in memory.

    Values are read and written in place through a memoryview of doubles (values sit at
    8-byte aligned offsets): one aligned 8-byte store per update, so a reader never sees a
    half-written double (unlike struct.pack_into, which zeroes the bytes first), and no Python
    copy of the values to keep in step.
    """

    __slots__ = ("_fd", "_final", "_size", "buf", "doubles", "used")

    def __init__(self, path: str | None) -> None:
        self._fd = -1
        self._size = _INITIAL_SIZE
        self._final: bytes | None = None
        self.buf: mmap.mmap | bytearray
        if path is None:
            self.buf = bytearray(self._size)
        else:
            self._fd = os.open(path, os.O_RDWR | CREATE_FLAGS, 0o644)
            os.ftruncate(self._fd, self._size)
            self.buf = mmap.mmap(self._fd, self._size)
        self.doubles = memoryview(self.buf).cast("d")
        self.used = HEADER
        self.buf[0:4] = INT.pack(self.used)

    def slot(self, key: str) -> int:
        """Add a zero-valued entry for key; return the index of its value in doubles."""
        entry = encode_entry(key, 0.0)
        while self.used + len(entry) > self._size:
            self._grow()
        self.buf[self.used:self.used + len(entry)] = entry
        index = (self.used + len(entry) - 16) // 8
        self.used += len(entry)
        # Publish the entry only once its bytes are in place.
        self.buf[0:4] = INT.pack(self.used)
        return index

    def _grow(self) -> None:
        # Double the space; entries never move, only the mapping (and the view) is replaced.
        self.doubles.release()
        self._size *= 2
        if isinstance(self.buf, bytearray):
            self.buf.extend(bytes(self._size - len(self.buf)))
        else:
            os.ftruncate(self._fd, self._size)
            self.buf.close()
            self.buf = mmap.mmap(self._fd, self._size)
        self.doubles = memoryview(self.buf).cast("d")

    def add(self, index: int, amount: float) -> None:
        """Add amount to the value at index (the recorder inlines this on its hot path)."""
        self.doubles[index] += amount

    def entries(self) -> list[tuple[str, float]]:
        """(key, value) of every entry (also after close)."""
        data = self._final if self._final is not None else bytes(self.buf[:self.used])
        return list(parse_entries(data))

    def close(self) -> None:
        """Unmap and close (the file stays for the exporter)."""
        if self._final is not None:
            return
        self._final = bytes(self.buf[:self.used])
        self.doubles.release()
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Store:
    """This process's metrics: one ValueFile per type, a flock-held lock file when file-backed."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.ident = f"{os.getpid()}-{os.urandom(8).hex()}"
        self._lock_fd = -1
        if directory is not None:
            self._lock_fd = _hold_lock(directory, self.ident)

        def path(prefix: str) -> str | None:
            if directory is None:
                return None
            return os.path.join(directory, f"{prefix}_{self.ident}.db")

        self.counters = ValueFile(path("counter"))
        self.histograms = ValueFile(path("histogram"))
        self.gauges = ValueFile(path(f"gauge_{GAUGE_MODE}"))

    def files(self) -> dict[str, ValueFile]:
        """The files by type name, for in-process reading."""
        return {"counter": self.counters, "histogram": self.histograms,
                "gauge_" + GAUGE_MODE: self.gauges}

    def close(self) -> None:
        """Close the files and drop the lock: the exporter will see this writer as gone."""
        for file in (self.counters, self.histograms, self.gauges):
            file.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def lock_path(directory: str, ident: str) -> str:
    """The lock file a writer holds while it lives."""
    return os.path.join(directory, f"{ident}.lock")


def _hold_lock(directory: str, ident: str) -> int:
    # Lock under a temporary name, then rename: nobody can ever see the lock file unlocked
    # while its writer lives (the exporter would take the writer for dead).
    tmp = os.path.join(directory, f".{ident}.lock.tmp")
    fd = os.open(tmp, os.O_RDWR | CREATE_FLAGS, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, lock_path(directory, ident))
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def writer_alive(directory: str, ident: str) -> bool:
    """Whether the process that wrote ident's files still holds its lock.

    A missing lock file means dead too: writers create it before any data file and only the
    exporter's compaction removes it, after the data files.
    """
    try:
        return lock_held(lock_path(directory, ident))
    except FileNotFoundError:
        return False


def lock_held(path: str) -> bool:
    """Whether some process holds the flock of path (FileNotFoundError when it is gone).

    A symlink, FIFO or anything else but a regular file at path is no writer's lock: False,
    without following or waiting on it.
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return False
        raise
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and flock_held(fd)
    finally:
        os.close(fd)


def flock_held(fd: int) -> bool:
    """Whether some other open file description holds a flock on fd's file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


