"""Log setup: logfmt or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _RESERVED and not key.startswith("_"):
            fields[key] = value
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = str(record.exc_info[1])
    return fields


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{ord(char):02x}")


# Values can hold bytes a client sent (a request path at debug level): a control character
# must never start a new line or rewrite the terminal.
_NEEDS_QUOTES = re.compile(r'[ ="\\\x00-\x1f\x7f-\x9f]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        text = '"' + _CONTROL.sub(_escape_control,
                                  text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    """key=value pairs, one record per line."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def setup(level: str, fmt: str) -> None:
    """Send the exporter's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # psycopg and redis log connection details at debug level; keep them out of our stream.
    for noisy in ("psycopg", "redis", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


def format_seconds(seconds: float) -> str:
    """A whole number of seconds as the config writes durations ("60s", "1.5s")."""
    return f"{seconds:g}s"


class Throttled:
    """A log line for the first of a kind of event, then at most one summary line per interval
    ("N more ... from M clients in the last 60s") for as long as the events keep coming.

    For events a client can cause at will (malformed requests, a flood of connections): a
    line each would let anyone who can reach the port fill the disk and drown the log. The
    summary goes out on the next event or flush() after the interval; call flush() from a loop
    that runs anyway so that the count of a burst is not held back until the next burst.
    """

    # Distinct clients remembered per interval; beyond this the count is a lower bound.
    MAX_CLIENTS = 10_000

    def __init__(self, logger: logging.Logger, level: int, message: str,
                 interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.message = message
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the current interval; None when quiet
        self._more = 0
        self._clients: set[str] = set()

    def __call__(self, client: str = "", **fields: object) -> None:
        """One event: logged in full when it is the first in an interval, else counted."""
        with self._lock:
            now = self._clock()
            self._flush(now)
            if self._since is None:
                self._since = now
                extra = {"client": client, **fields} if client else dict(fields)
                self.logger.log(self.level, self.message, extra=extra)
                return
            self._more += 1
            if client and len(self._clients) < self.MAX_CLIENTS:
                self._clients.add(client)

    def quiet(self) -> bool:
        """Whether the next event would be logged in full (with all its fields)."""
        with self._lock:
            now = self._clock()
            return self._since is None or (now - self._since >= self.interval
                                           and not self._more)

    def flush(self) -> None:
        """Write the summary of the interval if it is over and anything was counted."""
        with self._lock:
            self._flush(self._clock())

    def _flush(self, now: float) -> None:
        if self._since is None or now - self._since < self.interval:
            return
        if not self._more:
            self._since = None  # quiet for a whole interval: the next event is logged in full
            return
        clients = len(self._clients)
        self.logger.log(
            self.level,
            f"{self.message}: {self._more} more from {clients} clients in the last "
            f"{format_seconds(self.interval)}",
            extra={"more": self._more, "clients": clients})
        self._since, self._more = now, 0
        self._clients.clear()


class OnChange:
    """Decides when a state worth reporting (an error, a refusal) is logged: when it first
    appears, when it changes, and again after repeat_interval if it persists, never on every
    occurrence."""

    # Keys remembered; past this the oldest are forgotten (and may be logged again).
    MAX_KEYS = 1000

    def __init__(self, repeat_interval: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repeat_interval = repeat_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[Hashable, tuple[Hashable, float]] = {}

    def changed(self, key: Hashable, state: Hashable) -> bool:
        """Record key's state; True when it should be logged now."""
        with self._lock:
            now = self._clock()
            previous = self._states.get(key)
            if previous is not None and previous[0] == state and \
                    now - previous[1] < self.repeat_interval:
                return False
            self._states.pop(key, None)
            if len(self._states) >= self.MAX_KEYS:
                del self._states[next(iter(self._states))]
            self._states[key] = (state, now)
            return True

    def clear(self, key: Hashable) -> bool:
        """Forget key's state; True when it had one (a recovery worth a line)."""
        with self._lock:
            return self._states.pop(key, None) is not None
