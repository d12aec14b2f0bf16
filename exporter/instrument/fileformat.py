"""The metrics file format: encoding and parsing entries, and the names of the files.

The format is prometheus_client's multiprocess one (a used-bytes header, then entries of
length, JSON key padded to 8 bytes, value and timestamp doubles), one file per metric type and
process, so the exporter's `app` collector and prometheus_client's own reader both understand it.

Files are named `<type>_<pid>-<token>.db` (`gauge_livesum_<pid>-<token>.db` for gauges) and come
with a lock file `<pid>-<token>.lock` (store.py); the random token means a reused pid never
writes into a dead process's file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator

HEADER = 8
INT = struct.Struct("i")
DOUBLE = struct.Struct("d")
_ENTRY_TAIL = struct.Struct("dd")

# Types whose files the exporter folds into an accumulator when the writer is gone.
FOLDABLE_TYPES = ("counter", "histogram")
GAUGE_MODE = "livesum"
# The file types prometheus_client's multiprocess mode writes (`<type>_<pid>.db`); any other
# `.db` name is not a metrics file.
FILE_TYPES = frozenset(("counter", "histogram", "summary", *(
    f"gauge_{live}{mode}" for live in ("", "live")
    for mode in ("all", "min", "max", "sum", "mostrecent"))))

_HEX_DIGITS = frozenset("0123456789abcdef")
# Opening a folder entry never follows a symlink (a link to /etc/shadow or /dev/watchdog is
# refused, not opened), never waits (a FIFO opens at once and is then refused), and never
# makes a terminal the exporter's.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")


def mmap_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The entry key, the same JSON prometheus_client writes (so either reader can parse it)."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def encode_entry(key: str, value: float) -> bytes:
    """One entry in the file layout: length, key padded to 8-byte alignment, value, timestamp."""
    return encode_entry_bytes(key.encode("utf-8"), value)


def encode_entry_bytes(key: bytes, value: float) -> bytes:
    """encode_entry() of a key already encoded."""
    return (INT.pack(len(key)) + key + b" " * (8 - (len(key) + 4) % 8)
            + _ENTRY_TAIL.pack(value, 0.0))


def entry_size(key: bytes) -> int:
    """The bytes encode_entry_bytes() makes of key."""
    return 4 + len(key) + (8 - (len(key) + 4) % 8) + 16


def file_header(body: int) -> bytes:
    """The header of a file whose entries take body bytes."""
    return INT.pack(HEADER + body) + b"\0" * 4


def parse_entries(data: bytes, name: str = "buffer") -> Iterator[tuple[str, float]]:
    """(key, value) of every entry in the file layout; raises ValueError when malformed."""
    if len(data) < HEADER or data[:4] == b"\0\0\0\0":
        return  # a file being created: its header is not written yet
    used = INT.unpack_from(data, 0)[0]
    if used > len(data) or used < HEADER:
        raise ValueError(f"{name}: bad header")
    pos = HEADER
    while pos < used:
        key, value_at = entry_at(data, pos, used, name)
        yield key, DOUBLE.unpack_from(data, value_at)[0]
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
    length = INT.unpack_from(data, pos)[0]
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

