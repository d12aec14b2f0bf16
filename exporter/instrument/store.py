"""Per-process metric storage: floats in memory, mirrored into mmap files the exporter merges.

Public: the file layout, its constants and readers are what the exporter's app collector uses
(exporter/collectors/app.py), alongside exporter.instrument.merge.

File layout is prometheus_client's multiprocess format (a used-bytes header, then entries of
length, JSON key padded to 8 bytes, value and timestamp doubles), one file per metric type and
process, so the exporter's `app` collector and prometheus_client's own reader both understand it.

Files are named `<type>_<pid>-<token>.db` (`gauge_livesum_<pid>-<token>.db` for gauges) and come
with a lock file `<pid>-<token>.lock` that the writing process holds with flock(2) for its whole
life. The kernel drops that lock when the process dies however it dies, so the exporter can tell
a dead writer's files from a live one's without trusting pids (which are reused, and not even
visible across container pid namespaces); the random token means a reused pid never writes into
a dead process's file.

The folder is shared with the application's code, so to the exporter every entry in it is
hostile input: entries are opened relative to one descriptor of the folder, never through a
symlink and without blocking, checked with fstat after opening (a regular file, one link, an
expected owner, at most MAX_FILE_BYTES), read no further than their header says, and written
only as new files of random names renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence

try:  # CPython's built-in BLAKE2: hashlib would load OpenSSL's libcrypto (3.4 MB RSS) for it
    from _blake2 import blake2b as blake2b  # noqa: PLC0414 - re-exported (mypy)
except ImportError:  # another interpreter
    from hashlib import blake2b as blake2b  # noqa: PLC0414

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
# The file types prometheus_client's multiprocess mode writes (`<type>_<pid>.db`); any other
# `.db` name is not a metrics file.
FILE_TYPES = frozenset(("counter", "histogram", "summary", *(
    f"gauge_{live}{mode}" for live in ("", "live")
    for mode in ("all", "min", "max", "sum", "mostrecent"))))

# The largest folder entry the exporter reads. A worker at the instrument's series caps (2000
# route/method pairs, 2000 tasks, the DB histograms) with 100-character routes fills about
# 40 MB of its histogram file, which doubling from 32 KiB makes a 64 MiB file; anything bigger
# was not written by the instrument and is refused before a byte of it is read.
MAX_FILE_BYTES = 64 << 20

# Opening a folder entry never follows a symlink (a link to /etc/shadow or /dev/watchdog is
# refused, not opened), never waits (a FIFO opens at once and is then refused), and never
# makes a terminal the exporter's.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")

# Why an entry was refused (the reason label of qatoolbox_app_files_rejected_total).
SYMLINK = "symlink"
NOT_REGULAR = "not_regular"
HARDLINK = "hardlink"
OWNER = "owner"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
MALFORMED = "malformed"
RESERVED_NAME = "reserved_name"
BAD_ENTRY = "bad_entry"
REFUSAL_REASONS = (SYMLINK, NOT_REGULAR, HARDLINK, OWNER, UNREADABLE, TOO_LARGE, MALFORMED,
                   RESERVED_NAME, BAD_ENTRY)


class RefusedEntryError(Exception):
    """A folder entry the exporter will not use; reason is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def mmap_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The entry key, the same JSON prometheus_client writes (so either reader can parse it)."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def encode_entry(key: str, value: float) -> bytes:
    """One entry in the file layout: length, key padded to 8-byte alignment, value, timestamp."""
    return encode_entry_bytes(key.encode("utf-8"), value)


def encode_entry_bytes(key: bytes, value: float) -> bytes:
    """encode_entry() of a key already encoded."""
    return (_INT.pack(len(key)) + key + b" " * (8 - (len(key) + 4) % 8)
            + _ENTRY_TAIL.pack(value, 0.0))


def entry_size(key: bytes) -> int:
    """The bytes encode_entry_bytes() makes of key."""
    return 4 + len(key) + (8 - (len(key) + 4) % 8) + 16


def file_header(body: int) -> bytes:
    """The header of a file whose entries take body bytes."""
    return _INT.pack(_HEADER + body) + b"\0" * 4


def open_entry(dir_fd: int, name: str,
               owners: frozenset[int] | None) -> tuple[int, os.stat_result]:
    """Open a folder entry for reading, relative to the folder's descriptor; the descriptor and
    its fstat. Raises RefusedEntryError for anything but a regular file with one link, owned
    by one of owners (None: any owner) and at most MAX_FILE_BYTES; FileNotFoundError when it
    is gone.

    The checks are made on the open file, never on the path before opening it, so swapping
    the entry between a check and the open gains nothing.
    """
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedEntryError(SYMLINK, "a symlink (not followed)") from None
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP, errno.ENODEV):
            raise RefusedEntryError(NOT_REGULAR, "not a regular file") from None
        raise RefusedEntryError(UNREADABLE, f"cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _check(info, owners)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _check(info: os.stat_result, owners: frozenset[int] | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise RefusedEntryError(NOT_REGULAR, f"not a regular file ({_kind(info.st_mode)})")
    if info.st_nlink != 1:
        # The instrument and the exporter only make files with one name; a second name is
        # a hard link to some other file (perhaps outside the folder).
        raise RefusedEntryError(HARDLINK, f"has {info.st_nlink} hard links")
    if owners is not None and info.st_uid not in owners:
        expected = ", ".join(str(uid) for uid in sorted(owners))
        raise RefusedEntryError(OWNER, f"owned by uid {info.st_uid}, not by uid {expected}")
    if info.st_size > MAX_FILE_BYTES:
        raise _too_large(info.st_size)


def _too_large(size: int) -> RefusedEntryError:
    return RefusedEntryError(TOO_LARGE, f"{size} bytes, over the {MAX_FILE_BYTES}-byte limit")


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "unknown type"


def read_used(fd: int, info: os.stat_result, name: str) -> bytes:
    """The used part of an open metrics file (header included), or b"" while its header is
    not written yet. Reads no more than the header declares and the file holds; raises
    RefusedEntryError (too large) or ValueError (the header claims more than the file holds)."""
    used = used_size(fd, info, name)
    if not used:
        return b""
    data = os.pread(fd, used, 0)
    if len(data) != used:
        raise ValueError(f"{name}: shorter than its header says")
    return data


def used_size(fd: int, info: os.stat_result, name: str) -> int:
    """How many bytes of an open metrics file its header declares used (header included), 0
    while its header is not written yet; errors as read_used()."""
    head = os.pread(fd, _HEADER, 0)
    if len(head) < _HEADER or head[:4] == b"\0\0\0\0":
        return 0
    used: int = _INT.unpack_from(head, 0)[0]
    if used > info.st_size:
        # The writer grows the file before publishing a larger header: look again.
        info = os.fstat(fd)
        if info.st_size > MAX_FILE_BYTES:
            raise _too_large(info.st_size)
    if not _HEADER <= used <= info.st_size:
        raise ValueError(f"{name}: bad header (declares {used} bytes, the file has "
                         f"{info.st_size})")
    return used


# Files are read a window at a time through one buffer (ReadBuffer) shared by the files of a
# scrape: reading a 6 MB file costs 1 MiB of memory, and the same 1 MiB every time.
WINDOW = 1 << 20


class ReadBuffer:
    """The memory files are read into, one read at a time: a view it returns is valid until
    the next read."""

    def __init__(self) -> None:
        self._buffer = bytearray(0)

    def view(self, length: int) -> memoryview:
        if length > len(self._buffer):
            # A new buffer rather than a resize: a view of the old one may still exist.
            self._buffer = bytearray(max(length, WINDOW))
        return memoryview(self._buffer)[:length]


class ReadFailedError(Exception):
    """A read of an open file failed (EIO, ...): the message says why."""


class FileWindows:
    """The used part of one open metrics file, read in windows through a ReadBuffer (one file
    at a time: a view or iteration is valid until the next read of any file)."""

    def __init__(self, fd: int, used: int, name: str, buffer: ReadBuffer) -> None:
        self.fd, self.used, self.name, self._buffer = fd, used, name, buffer

    def read(self, offset: int, length: int) -> memoryview:
        """length bytes from offset (within the used part); ValueError when the file holds
        fewer (it shrank since its header was read)."""
        view = self._buffer.view(length)
        try:
            got = os.preadv(self.fd, [view], offset)
        except OSError as exc:
            raise ReadFailedError(exc.strerror or str(exc)) from None
        if got != length:
            raise ValueError(f"{self.name}: shorter than its header says")
        return view

    def entries(self, start: int) -> Iterator[tuple[int, bytes, int, float]]:
        """(position, key, offset of the value, value) of each entry from start to the end of
        the used part; ValueError naming the file when an entry runs past it."""
        pos, used, name = start, self.used, self.name
        while pos < used:
            view = self.read(pos, min(used - pos, WINDOW))
            end = len(view)
            at = 0
            while pos + at < used:
                if pos + at + 4 > used:
                    raise ValueError(f"{name}: truncated entry")
                if at + 4 > end:
                    break  # the entry's length is in the next window
                length = _INT.unpack_from(view, at)[0]
                size = 4 + length + (8 - (length + 4) % 8) + 16
                if length <= 0 or pos + at + size > used:
                    raise ValueError(f"{name}: truncated entry")
                if at + size > end:
                    if at:
                        break  # the entry is in the next window
                    view = self.read(pos, size)  # an entry larger than a window
                    end = size
                yield (pos + at, bytes(view[at + 4:at + 4 + length]), pos + at + size - 16,
                       _DOUBLE.unpack_from(view, at + size - 16)[0])
                at += size
            pos += at

    def values_at(self, offsets: Iterable[int]) -> list[float]:
        """The doubles at offsets (ascending), a window read at a time."""
        out: list[float] = []
        start, view = -1, memoryview(b"")
        for offset in offsets:
            if not start <= offset <= start + len(view) - 8:
                start = offset
                view = self.read(start, min(self.used - start, WINDOW))
            out.append(_DOUBLE.unpack_from(view, offset - start)[0])
        return out


def read_entries(path: str) -> Iterator[tuple[str, float]]:
    """(key, value) of every entry of a file, read as the exporter reads folder entries (any
    owner); raises OSError, RefusedEntryError or ValueError."""
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd, info = open_entry(dir_fd, name, None)
    finally:
        os.close(dir_fd)
    try:
        data = read_used(fd, info, name)
    finally:
        os.close(fd)
    return parse_entries(data, name)


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
    after that); ValueError naming the file when the entry runs past the used part or its key
    is not UTF-8."""
    key, value_at = key_at(data, pos, used, name)
    try:
        return key.decode("utf-8"), value_at
    except UnicodeDecodeError:
        raise ValueError(f"{name}: a key is not UTF-8") from None


def key_at(data: bytes, pos: int, used: int, name: str) -> tuple[bytes, int]:
    """entry_at() with the key's bytes, not decoded."""
    if pos + 4 > used:
        raise ValueError(f"{name}: truncated entry")
    length = _INT.unpack_from(data, pos)[0]
    value_at = pos + 4 + length + (8 - (length + 4) % 8)
    if length <= 0 or value_at + 16 > used:
        raise ValueError(f"{name}: truncated entry")
    return data[pos + 4:pos + 4 + length], value_at


def tmp_name(name: str) -> str:
    """A fresh, unguessable temporary name for a new version of name."""
    return f".{name}.{os.urandom(8).hex()}.tmp"


def tmp_target(name: str) -> str | None:
    """The file a tmp_name() name was made for, or None for any other name."""
    match = _TMP_NAME.fullmatch(name)
    return match.group(1) if match else None


def write_file_at(dir_fd: int, name: str, entries: Sequence[tuple[str, float]]) -> None:
    """Write a complete file atomically: a new temporary sibling, fsync, rename over name.

    Nothing is ever written through an existing entry: the temporary file is created with
    O_EXCL under a random name (a symlink or FIFO planted there makes the creation fail), and
    rename() replaces whatever name was (a symlink included) instead of following it.
    """
    body = b"".join(encode_entry(k, v) for k, v in entries)
    write_bytes_at(dir_fd, name, file_header(len(body)) + body)


def write_bytes_at(dir_fd: int, name: str, content: bytes) -> None:
    """Replace name with a file holding content, as write_file_at() does."""
    write_stream_at(dir_fd, name, (content,))


def write_stream_at(dir_fd: int, name: str, chunks: Iterable[bytes]) -> os.stat_result:
    """Replace name with a file holding the chunks, as write_file_at() does, writing each as
    it comes (a large file is never all in memory); the new file's fstat."""
    tmp = tmp_name(name)
    fd = os.open(tmp, os.O_WRONLY | _CREATE_FLAGS, 0o644, dir_fd=dir_fd)
    try:
        for chunk in chunks:
            data = memoryview(chunk)
            while data:
                data = data[os.write(fd, data):]
        os.fsync(fd)
        info = os.fstat(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return info
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_file(path: str, entries: Sequence[tuple[str, float]]) -> None:
    """write_file_at() by path."""
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_file_at(dir_fd, name, entries)
    finally:
        os.close(dir_fd)


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
            self._fd = os.open(path, os.O_RDWR | _CREATE_FLAGS, 0o644)
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
    fd = os.open(tmp, os.O_RDWR | _CREATE_FLAGS, 0o644)
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
        fd = os.open(path, _READ_FLAGS)
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

