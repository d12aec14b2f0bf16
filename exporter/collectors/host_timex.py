"""The kernel clock's state via adjtimex(2), and the values node_exporter derives from it."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

# adjtimex(2) status bits and its TIME_ERROR return value (clock not synchronised).
STA_UNSYNC = 0x0040
STA_NANO = 0x2000
TIME_ERROR = 5


@dataclass(frozen=True)
class Timex:
    """The fields of the kernel's struct timex the collector reports, as the kernel gives them."""

    state: int  # adjtimex's return value: TIME_OK (0) ... TIME_ERROR (5)
    status: int
    offset: int  # microseconds, or nanoseconds when STA_NANO is set
    freq: int  # parts per million with a 16-bit fraction
    maxerror: int  # microseconds
    esterror: int  # microseconds


def timex_values(tx: Timex) -> dict[str, float]:
    """Seconds, ratios and the sync flag, as node_exporter's timex collector derives them."""
    offset_unit = 1e9 if tx.status & STA_NANO else 1e6
    return {
        "offset_seconds": tx.offset / offset_unit,
        "sync_status": 0.0 if tx.state == TIME_ERROR else 1.0,
        "maxerror_seconds": tx.maxerror / 1e6,
        "estimated_error_seconds": tx.esterror / 1e6,
        "frequency_adjustment_ratio": 1.0 + tx.freq / 65536.0 / 1e6,
    }


class _TimexStruct(ctypes.Structure):
    # struct timex of <sys/timex.h> (glibc, LP64 and ILP32 alike): the kernel writes 208
    # bytes on 64-bit systems, so the tail is padded generously.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("tv_sec", ctypes.c_long),
        ("tv_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 16),
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # The process's own symbols, libc's among them: ctypes.util.find_library would cost 1.5 MB
    # of RSS (it imports its helpers and runs ldconfig) for a name we never need.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def read_timex() -> Timex | None:
    """The kernel clock's state via adjtimex(2) with no modes set (a read, no privilege
    needed); None where libc or the call is unavailable (a seccomp filter, another OS)."""
    libc = _libc()
    if libc is None:
        return None
    buf = _TimexStruct()
    state = libc.adjtimex(ctypes.byref(buf))
    if state < 0:
        return None
    return Timex(state, buf.status, buf.offset, buf.freq, buf.maxerror, buf.esterror)

