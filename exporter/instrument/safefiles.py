"""Reading and writing the entries of a metrics folder safely: the folder is shared with the
application's code, so to the exporter every entry in it is hostile input.

Entries are opened relative to one descriptor of the folder, never through a symlink and
without blocking, checked with fstat after opening (a regular file, one link, an expected
owner, at most MAX_FILE_BYTES), read no further than their header says, a window at a time,
and written only as new files of random names renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator, Sequence

from exporter.instrument.fileformat import (
    CREATE_FLAGS,
    DOUBLE,
    HEADER,
    INT,
    READ_FLAGS,
    encode_entry,
    file_header,
    parse_entries,
    tmp_name,
)

# The largest folder entry the exporter reads. A worker at the instrument's series caps (2000
# route/method pairs, 2000 tasks, the DB histograms) with 100-character routes fills about
# 40 MB of its histogram file, which doubling from 32 KiB makes a 64 MiB file; anything bigger
# was not written by the instrument and is refused before a byte of it is read.
MAX_FILE_BYTES = 64 << 20

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
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
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
    head = os.pread(fd, HEADER, 0)
    if len(head) < HEADER or head[:4] == b"\0\0\0\0":
        return 0
    used: int = INT.unpack_from(head, 0)[0]
    if used > info.st_size:
        # The writer grows the file before publishing a larger header: look again.
        info = os.fstat(fd)
        if info.st_size > MAX_FILE_BYTES:
            raise _too_large(info.st_size)
    if not HEADER <= used <= info.st_size:
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
            # A new buffer rather than a resize: a view of the old one may still exist. Sized
            # to the largest read so far (in powers of two from 64 KiB, up to WINDOW; a longer
            # read, exactly): small folders, most of them, never pay for a whole WINDOW of
            # resident memory, and no read gets more than it asked for past WINDOW.
            size = max(1 << 16, 1 << (length - 1).bit_length()) if length <= WINDOW else length
            self._buffer = bytearray(size)
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
                length = INT.unpack_from(view, at)[0]
                size = 4 + length + (8 - (length + 4) % 8) + 16
                if length <= 0 or pos + at + size > used:
                    raise ValueError(f"{name}: truncated entry")
                if at + size > end:
                    if at:
                        break  # the entry is in the next window
                    view = self.read(pos, size)  # an entry larger than a window
                    end = size
                yield (pos + at, bytes(view[at + 4:at + 4 + length]), pos + at + size - 16,
                       DOUBLE.unpack_from(view, at + size - 16)[0])
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
            out.append(DOUBLE.unpack_from(view, offset - start)[0])
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
    fd = os.open(tmp, os.O_WRONLY | CREATE_FLAGS, 0o644, dir_fd=dir_fd)
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


