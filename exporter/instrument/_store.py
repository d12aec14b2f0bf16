"""Per-process metric storage: floats in memory, mirrored into mmap files the exporter merges.

File layout is prometheus_client's multiprocess format (a used-bytes header, then entries of
length, JSON key padded to 8 bytes, value and timestamp doubles), one file per metric type and
process, so the exporter's `app` collector and prometheus_client's own reader both understand it.

Files are named `<type>_<pid>-<token>.db` (`gauge_livesum_<pid>-<token>.db` for gauges) and come
with a lock file `<pid>-<token>.lock` that the writing process holds with flock(2) for its whole
life. The kernel drops that lock when the process dies however it dies, so the exporter can tell
a dead writer's files from a live one's without trusting pids (which are reused, and not even
visible across container pid namespaces); the random token means a reused pid never writes into
a dead process's file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Iterator, Sequence

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"

_INITIAL_SIZE = 1 << 15
_HEADER = 8
_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_ENTRY_TAIL = struct.Struct("dd")

# Types whose files the exporter folds into an accumulator when the writer is gone.
FOLDABLE_TYPES = ("counter", "histogram")
_HEX_DIGITS = frozenset("0123456789abcdef")
GAUGE_MODE = "livesum"


def mmap_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The entry key, the same JSON prometheus_client writes (so either reader can parse it)."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def encode_entry(key: str, value: float) -> bytes:
    """One entry in the file layout: length, key padded to 8-byte alignment, value, timestamp."""
    encoded = key.encode("utf-8")
    padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
    return _INT.pack(len(encoded)) + padded + _ENTRY_TAIL.pack(value, 0.0)


def read_entries(path: str) -> Iterator[tuple[str, float]]:
    """(key, value) of every entry of a file; raises OSError or ValueError."""
    with open(path, "rb") as handle:
        data = handle.read()
    return parse_entries(data, os.path.basename(path))


def parse_entries(data: bytes, name: str = "buffer") -> Iterator[tuple[str, float]]:
    """(key, value) of every entry in the file layout; raises ValueError when malformed."""
    if len(data) < _HEADER or data[:4] == b"\0\0\0\0":
        return  # a file being created: its header is not written yet
    used = _INT.unpack_from(data, 0)[0]
    if used > len(data) or used < _HEADER:
        raise ValueError(f"{name}: bad header")
    pos = _HEADER
    while pos < used:
        key, value_at = entry_at(data, pos, used, name)
        yield key, _DOUBLE.unpack_from(data, value_at)[0]
        pos = value_at + 16


def entry_at(data: bytes, pos: int, used: int, name: str) -> tuple[str, int]:
    """The key of the entry at pos and where its value is (the next entry starts 16 bytes
    after that); ValueError naming the file when the entry runs past the used part."""
    length = _INT.unpack_from(data, pos)[0]
    value_at = pos + 4 + length + (8 - (length + 4) % 8)
    if length <= 0 or value_at + 16 > used:
        raise ValueError(f"{name}: truncated entry")
    return data[pos + 4:pos + 4 + length].decode("utf-8"), value_at


def write_file(path: str, entries: Sequence[tuple[str, float]]) -> None:
    """Write a complete file atomically: a temporary sibling, fsync, then rename over path."""
    body = b"".join(encode_entry(k, v) for k, v in entries)
    header = _INT.pack(_HEADER + len(body)) + b"\0" * 4
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, header + body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.ftruncate(self._fd, self._size)
            self.buf = mmap.mmap(self._fd, self._size)
        self.doubles = memoryview(self.buf).cast("d")
        self.used = _HEADER
        self.buf[0:4] = _INT.pack(self.used)

    def slot(self, key: str) -> int:
        """Add a zero-valued entry for key; return the index of its value in doubles."""
        entry = encode_entry(key, 0.0)
        while self.used + len(entry) > self._size:
            self._grow()
        self.buf[self.used:self.used + len(entry)] = entry
        index = (self.used + len(entry) - 16) // 8
        self.used += len(entry)
        # Publish the entry only once its bytes are in place.
        self.buf[0:4] = _INT.pack(self.used)
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
        self.ident = f"{os.getpid()}-{secrets.token_hex(8)}"
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
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
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
    """Whether some process holds the flock of path (FileNotFoundError when it is gone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def parse_name(name: str) -> tuple[str, str] | None:
    """(type prefix, ident) of a data file name like `gauge_livesum_12-ab.db`, or None."""
    if not name.endswith(".db"):
        return None
    stem = name[:-3]
    prefix, sep, ident = stem.rpartition("_")
    if not sep or not prefix:
        return None
    return prefix, ident


def is_writer_ident(ident: str) -> bool:
    """Whether ident is ours (`<pid>-<hex token>`), as opposed to a plain prometheus_client pid."""
    pid, sep, token = ident.partition("-")
    return bool(sep) and pid.isdigit() and len(token) >= 8 and set(token) <= _HEX_DIGITS

