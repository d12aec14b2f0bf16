"""Redis collector: health, memory, cache effectiveness, latency, key groups, Celery queues."""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from exporter.config import KeyGroup, RedisConfig
from exporter.redact import redact_url, scrub, url_secrets

log = logging.getLogger("exporter.redis")

# Sections read on every scrape. INFO takes several sections only from Redis 7.0 on;
# older servers get "all", which holds the same lines and a few more.
INFO_SECTIONS = ("server", "clients", "memory", "persistence", "stats", "replication",
                 "keyspace", "commandstats")
KOMBU_SEP = "\x06\x16"
KOMBU_UNACKED = "unacked"
# kombu's Redis transport records each binding of a queue to an exchange as a member
# "<routing key>\x06\x16<pattern>\x06\x16<queue>" of the set "_kombu.binding.<exchange>".
KOMBU_BINDING = "_kombu.binding."
# Celery's own exchanges for remote control and events: their queues belong to one worker or
# one monitor each (celery@host.celery.pidbox, celeryev.<uuid>), they come and go, and kombu
# delivers to them by PUBLISH, not through a list. They are not task queues.
KOMBU_EXCHANGES_SKIPPED = ("celeryev",)
KOMBU_EXCHANGE_SUFFIXES_SKIPPED = (".pidbox",)
# Binding sets read per count, members read per set (SSCAN, 100 at a time): what a key that
# only looks like a binding set can cost.
MAX_BINDING_SETS = 100
MAX_BINDING_MEMBERS = 1000
# Databases db0 to db15 (Redis's default `databases 16`) get their own qatoolbox_redis_db_keys
# series; any higher-numbered one is summed under db="other", so a server configured with
# thousands of databases adds at most one series more.
MAX_DB_LABELS = 16
_LABELLED_DB_NUMBERS = frozenset(str(n) for n in range(MAX_DB_LABELS))

# (metric name, INFO field, help)
INFO_GAUGES = (
    ("qatoolbox_redis_uptime_seconds", "uptime_in_seconds", "Time since the server started."),
    ("qatoolbox_redis_connected_clients", "connected_clients",
     "Client connections open now, replicas excluded."),
    ("qatoolbox_redis_blocked_clients", "blocked_clients",
     "Clients waiting in a blocking command such as BRPOP."),
    ("qatoolbox_redis_memory_used_bytes", "used_memory", "Memory allocated by Redis."),
    ("qatoolbox_redis_memory_rss_bytes", "used_memory_rss",
     "Resident memory of the Redis process as the kernel counts it."),
    ("qatoolbox_redis_memory_peak_bytes", "used_memory_peak",
     "Most memory Redis has had allocated since it started."),
    ("qatoolbox_redis_memory_max_bytes", "maxmemory",
     "The maxmemory limit, 0 when there is none."),
    ("qatoolbox_redis_memory_fragmentation_ratio", "mem_fragmentation_ratio",
     "Resident memory divided by allocated memory."),
    ("qatoolbox_redis_connected_replicas", "connected_slaves", "Replicas connected now."),
    ("qatoolbox_redis_rdb_last_save_timestamp_seconds", "rdb_last_save_time",
     "Unix time of the last successful RDB save."),
    ("qatoolbox_redis_rdb_changes_since_last_save", "rdb_changes_since_last_save",
     "Writes since the last RDB save."),
)
INFO_COUNTERS = (
    ("qatoolbox_redis_rejected_connections_total", "rejected_connections",
     "Connections refused because maxclients was reached."),
    ("qatoolbox_redis_connections_received_total", "total_connections_received",
     "Connections accepted by the server."),
    ("qatoolbox_redis_evicted_keys_total", "evicted_keys",
     "Keys evicted because of the maxmemory limit."),
    ("qatoolbox_redis_expired_keys_total", "expired_keys",
     "Keys deleted because their TTL ran out."),
    ("qatoolbox_redis_commands_processed_total", "total_commands_processed",
     "Commands the server has run."),
    ("qatoolbox_redis_net_input_bytes_total", "total_net_input_bytes",
     "Bytes the server has read from the network."),
    ("qatoolbox_redis_net_output_bytes_total", "total_net_output_bytes",
     "Bytes the server has written to the network."),
)

# LATENCY HISTOGRAM's buckets are powers of two of 1.024 us (hdr_histogram counting in ns from
# 1024). Every second one from 8.2 us to 33.6 ms is kept: the bounds line up exactly, and a
# command slower than 33 ms is an incident whatever its exact time. 10 series per command.
HISTOGRAM_EXPONENTS = (3, 5, 7, 9, 11, 13, 15)
HISTOGRAM_BOUNDS = tuple(2 ** (10 + k) / 1e9 for k in HISTOGRAM_EXPONENTS)
# Connection handling and introspection (the exporter's own INFO among them) are not what the
# application waits for: their time stays in commands_duration_seconds_total, but they get no
# histogram, which keeps its cost to the commands that matter.
NO_HISTOGRAM = frozenset({"auth", "hello", "ping", "select", "quit", "reset", "echo", "info",
                          "monitor", "debug"})
NO_HISTOGRAM_PREFIXES = ("client|", "config|", "slowlog|", "latency|", "acl|", "command|",
                         "module|", "memory|")


def wants_histogram(cmd: str) -> bool:
    """Whether a command gets a latency histogram (see NO_HISTOGRAM)."""
    return cmd not in NO_HISTOGRAM and not cmd.startswith(NO_HISTOGRAM_PREFIXES)


# --- pure parsing -------------------------------------------------------------------------------


def parse_info(text: str) -> dict[str, str]:
    """INFO's "field:value" lines as a mapping (section headers and blank lines skipped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, sep, value = line.partition(":")
            if sep:
                fields[key] = value.strip()
    return fields


def parse_fields(value: str) -> dict[str, str]:
    """A "calls=2,usec=9" value as a mapping."""
    pairs = (item.partition("=") for item in value.split(","))
    return {k: v for k, sep, v in pairs if sep}


def number(info: Mapping[str, str], key: str) -> float | None:
    """INFO field as a float, None when absent or not a number."""
    try:
        return float(info[key])
    except (KeyError, ValueError):
        return None


def command_stats(info: Mapping[str, str]) -> dict[str, tuple[float, float]]:
    """(calls, seconds spent) by command name from the commandstats section."""
    stats: dict[str, tuple[float, float]] = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            fields = parse_fields(value)
            try:
                stats[key[8:]] = (float(fields["calls"]), float(fields["usec"]) / 1e6)
            except (KeyError, ValueError):
                continue
    return stats


def keyspace(info: Mapping[str, str]) -> dict[str, tuple[float, float]]:
    """(keys, keys with a TTL) by database ("db0") from the keyspace section."""
    dbs: dict[str, tuple[float, float]] = {}
    for key, value in info.items():
        if key.startswith("db") and key[2:].isdigit():
            fields = parse_fields(value)
            try:
                dbs[key] = (float(fields["keys"]), float(fields.get("expires", 0)))
            except (KeyError, ValueError):
                continue
    return dbs


def db_labels(dbs: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """keyspace()'s result with the databases from MAX_DB_LABELS on summed under "other"."""
    labelled: dict[str, tuple[float, float]] = {}
    for db, (count, expires) in dbs.items():
        label = db if db[2:] in _LABELLED_DB_NUMBERS else "other"
        previous = labelled.get(label, (0.0, 0.0))
        labelled[label] = (previous[0] + count, previous[1] + expires)
    return labelled


def _pairs(value: Any) -> dict[Any, Any]:
    """A RESP2 flat [k1, v1, k2, v2] list or a RESP3 map as a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)):
        return dict(zip(value[::2], value[1::2], strict=False))
    return {}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_latency_histogram(reply: Any) -> dict[str, tuple[int, dict[float, int]]]:
    """LATENCY HISTOGRAM's reply as {command: (calls, {bucket upper bound in us: cumulative})}."""
    result: dict[str, tuple[int, dict[float, int]]] = {}
    for name, body in _pairs(reply).items():
        fields = {_text(k): v for k, v in _pairs(body).items()}
        points = {float(k): int(v) for k, v in _pairs(fields.get("histogram_usec")).items()}
        result[_text(name)] = (int(fields.get("calls", 0)), points)
    return result


def histogram_counts(points: Mapping[float, int]) -> list[int]:
    """Cumulative counts at HISTOGRAM_BOUNDS from Redis's sparse cumulative buckets.

    Redis lists a bucket only where the count changes, labelled with its upper bound in whole
    microseconds (1, 2, 4, ..., 65, 131, ...): that is 1.024 us * 2**k rounded down.
    """
    steps = sorted((round(math.log2(usec / 1.024)), count)
                   for usec, count in points.items() if usec > 0)
    counts: list[int] = []
    best, i = 0, 0
    for bound in HISTOGRAM_EXPONENTS:
        while i < len(steps) and steps[i][0] <= bound:
            best = max(best, steps[i][1])
            i += 1
        counts.append(best)
    return counts


def glob_to_regex(pattern: str) -> str:
    """A Redis glob (*, ?, [a-z], [^a], \\x) as an equivalent Python regular expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif char == "[":
            # As Redis does: "\\" escapes inside the class, an unclosed class runs to the end,
            # "[]" matches nothing and "[^]" any one character.
            i += 1
            negate = pattern[i: i + 1] == "^"
            i += negate
            parts: list[str] = []
            while i < n and pattern[i] != "]":
                if pattern[i] == "\\" and i + 1 < n:
                    parts.append(re.escape(pattern[i + 1]))
                    i += 2
                elif i + 2 < n and pattern[i + 1] == "-" and pattern[i + 2] != "]":
                    low, high = sorted((pattern[i], pattern[i + 2]))
                    parts.append(f"{re.escape(low)}-{re.escape(high)}")
                    i += 3
                else:
                    parts.append(re.escape(pattern[i]))
                    i += 1
            if parts:
                out.append(f"[{'^' if negate else ''}{''.join(parts)}]")
            else:
                out.append("." if negate else "(?!)")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


# --- key structure ------------------------------------------------------------------------

# Django's cache key: KEY_PREFIX, version, then what the code passed ("qatoolbox:1:<key>").
_CACHE_KEY = re.compile(r"[^:]{1,100}:\d{1,9}:(.*)", re.DOTALL)
# Django's session backends store a session under this prefix and the session key, with no
# separator (cache: "django.contrib.sessions.cache<key>", cached_db: "...cached_db<key>").
_SESSION_PREFIX = "django.contrib.sessions.cache"
SESSION_GROUP = "session"
ID = "{id}"
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# Tokens are runs of letters and digits (an underscore separates, as in "boss_login_12"). Each
# pattern below is one C-level substitution: no Python call per token, so a million keys cost
# about a second. An id is a token with a digit that is a hex string of 8 or more characters
# or any run of 16 or more (hashes, random tokens, session keys), a number, or the number
# that ends a word ("user123456": 4 digits or more).
_EDGE_BEFORE, _EDGE_AFTER = r"(?<![^\W_])", r"(?![^\W_])"
_RANDOM = re.compile(_EDGE_BEFORE + r"(?=[^\W_]*\d)(?:[0-9A-Fa-f]{8,}|[^\W_]{16,})"
                     + _EDGE_AFTER)
_WORD_NUMBER = re.compile(_EDGE_BEFORE + r"([^\W\d_]+)\d{4,}" + _EDGE_AFTER)
_NUMBER = re.compile(_EDGE_BEFORE + r"\d+" + _EDGE_AFTER)
_PRIORITY_LIST = re.compile(KOMBU_SEP + r"\d{1,3}\Z")
# A group name is a label value: at most this long, printable characters only.
MAX_GROUP_NAME = 100
# Structures counted in one pass before further new ones go straight to "other": memory stays
# bounded whatever the keyspace holds.
MAX_TRACKED_SHAPES = 10_000
# key_shape() decides where ids are from where the digits are and how many, not from their
# values: two keys that differ only in digit values (UUIDs replaced first) get the same
# structure, unless it keeps some of those digits ("v2_{id}"). Such structures are looked up by
# that skeleton, which costs a fraction of computing them. At most this many are kept.
MAX_CACHED_SKELETONS = 50_000
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_UUID_BYTES = re.compile(_UUID.pattern.encode())
_ID_BYTES = ID.encode()
_HAS_DIGIT = re.compile(r"[0-9]").search


def key_shape(key: bytes) -> str:
    """The structure a key belongs to: the part after a Django cache prefix and version, with
    each id in it (digits, UUIDs, hex strings, long random tokens) replaced by {id}. Every
    session key is "session"; "qatoolbox:1:user:42" is "user:{id}",
    "qatoolbox:1:chat_room:<uuid>:messages" is "chat_room:{id}:messages",
    "qatoolbox:1:shard_stats" is "shard_stats"."""
    text = key.decode("utf-8", "replace")
    cached = _CACHE_KEY.fullmatch(text)
    if cached is not None:
        text = cached.group(1)
    if text.startswith(_SESSION_PREFIX):
        return SESSION_GROUP
    # A queue's priority lists ("<queue>\x06\x16<step>") go with the queue's own list.
    text = _PRIORITY_LIST.sub("", text)
    text = _NUMBER.sub(ID, _WORD_NUMBER.sub(r"\1" + ID, _RANDOM.sub(ID, _UUID.sub(ID, text))))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text[:MAX_GROUP_NAME + 1])
    return text if len(text) <= MAX_GROUP_NAME else text[:MAX_GROUP_NAME - 3] + "..."


@dataclass
class KeyTally:
    """One pass's counts: keys by configured group, the other keys by structure, keys of
    structures past MAX_TRACKED_SHAPES, and the kombu binding sets seen."""

    groups: list[int]
    shapes: dict[str, int] = field(default_factory=dict)
    untracked: int = 0
    bindings: set[bytes] = field(default_factory=set)

    @classmethod
    def empty(cls, groups: int) -> KeyTally:
        """Zero counts for that many configured groups."""
        return cls([0] * groups)

    def copy(self) -> KeyTally:
        """An independent copy."""
        return KeyTally(list(self.groups), dict(self.shapes), self.untracked,
                        set(self.bindings))

    def counts(self, names: Sequence[str], limit: int) -> dict[str, float]:
        """Keys by group: the configured ones, the `limit` structures with the most keys (ties
        by name), and "other" for the rest. A structure named like a configured group (or
        "other") adds to it. The values add up to the keys counted."""
        counts = {name: float(n) for name, n in zip(names, self.groups, strict=True)}
        other = float(self.untracked)
        ranked: list[tuple[str, int]] = []
        for shape, n in self.shapes.items():
            if shape == "other":
                other += n
            elif shape in counts:
                counts[shape] += n
            else:
                ranked.append((shape, n))
        ranked.sort(key=lambda item: (-item[1], item[0]))
        for shape, n in ranked[:limit]:
            counts[shape] = float(n)
        counts["other"] = counts.get("other", 0.0) + other + sum(n for _, n in ranked[limit:])
        return counts


class KeyClassifier:
    """Assigns keys to groups: the first group with a matching pattern, else "other"."""

    def __init__(self, groups: Sequence[KeyGroup]) -> None:
        self.names = [g.name for g in groups]
        alternatives = (
            "(" + "|".join(f"(?:{glob_to_regex(p)})" for p in g.patterns) + ")" for g in groups
        )
        # One alternation of capturing groups: lastindex names the first group that matched.
        source = "(?:" + "|".join(alternatives) + ")"
        self._regex = re.compile(source.encode(), re.DOTALL) if groups else None
        self._skeletons: dict[bytes, str] = {}

    def count(self, keys: Iterable[bytes], into: list[int]) -> None:
        """Add each key to into[group index], into[-1] being "other"."""
        regex = self._regex
        if regex is None:
            into[-1] += sum(1 for _ in keys)
            return
        fullmatch = regex.fullmatch
        for key in keys:
            match = fullmatch(key)
            into[match.lastindex - 1 if match and match.lastindex else -1] += 1

    def tally(self, keys: Iterable[bytes], into: KeyTally, binding_prefix: bytes = b"") -> None:
        """Add each key to its configured group, or by structure (key_shape) when none
        matches; note the keys that start with binding_prefix (when given)."""
        fullmatch = self._regex.fullmatch if self._regex is not None else None
        shapes, cache = into.shapes, self._skeletons
        for key in keys:
            match = fullmatch(key) if fullmatch is not None else None
            if match is not None and match.lastindex:
                into.groups[match.lastindex - 1] += 1
            else:
                skeleton = (_UUID_BYTES.sub(_ID_BYTES, key) if b"-" in key else key).translate(
                    _DIGITS_TO_ZERO)
                shape = cache.get(skeleton)
                if shape is None:
                    shape = key_shape(key)
                    if not _HAS_DIGIT(shape):
                        if len(cache) >= MAX_CACHED_SKELETONS:
                            cache.clear()
                        cache[skeleton] = shape
                if shape in shapes:
                    shapes[shape] += 1
                elif len(shapes) < MAX_TRACKED_SHAPES:
                    shapes[shape] = 1
                else:
                    into.untracked += 1
            if binding_prefix and key.startswith(binding_prefix) and \
                    len(into.bindings) < MAX_BINDING_SETS:
                into.bindings.add(key)


def binding_exchange(key: bytes, prefix: bytes) -> str | None:
    """The exchange of a binding set's key, None for Celery's control and event exchanges."""
    exchange = key[len(prefix):].decode("utf-8", "replace")
    if exchange in KOMBU_EXCHANGES_SKIPPED or exchange.endswith(KOMBU_EXCHANGE_SUFFIXES_SKIPPED):
        return None
    return exchange


def binding_queue(member: bytes) -> str | None:
    """The queue of a binding set's member, None when it is not a usable queue name."""
    parts = member.split(KOMBU_SEP.encode())
    if len(parts) != 3:
        return None
    try:
        queue = parts[2].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not queue or len(queue) > MAX_GROUP_NAME or not queue.isprintable():
        return None
    return queue


def celery_keys(queues: Sequence[str], prefix: str, steps: Sequence[int]) -> list[tuple[str, str]]:
    """(queue, list key) for every queue and priority step, the way kombu names them."""
    return [(q, f"{prefix}{q}{KOMBU_SEP}{p}" if p else f"{prefix}{q}")
            for q in queues for p in steps]


class LookupAccount:
    """The keyspace lookups the exporter made itself, to subtract from the server's counters.

    LLEN and HLEN count as a hit (key found) or a miss in keyspace_hits/keyspace_misses like any
    read. Redis resets those counters on restart (new run_id) and on CONFIG RESETSTAT, which
    shows as a counter going backwards; our own tally starts over with them.
    """

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self._run_id: str | None = None
        self._commands = 0.0

    def adjust(self, run_id: str, hits: float, misses: float, commands: float,
               lookup_calls: float | None) -> tuple[float, float]:
        """The server's hits and misses less ours, for INFO read before this scrape's lookups.

        lookup_calls is the server's LLEN+HLEN call count (commandstats), when known: fewer
        calls than we made ourselves means the statistics were reset.
        """
        reset = (run_id != self._run_id or hits < self.hits or misses < self.misses
                 or commands < self._commands
                 or (lookup_calls is not None and lookup_calls < self.hits + self.misses))
        if reset:
            self.hits = self.misses = 0
        self._run_id = run_id
        self._commands = commands
        return hits - self.hits, misses - self.misses

    def record(self, hits: int, misses: int) -> None:
        """Count this scrape's own lookups (after their replies came back)."""
        self.hits += hits
        self.misses += misses


class CommandLabels:
    """A bounded, stable set of command label values: the first `limit` commands seen (busiest
    first) keep their name for the life of the server, any other is "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chosen: set[str] = set()

    def reset(self) -> None:
        """Forget the chosen commands (the server restarted)."""
        self._chosen.clear()

    def labels(self, calls: Mapping[str, float]) -> dict[str, str]:
        """The label value of each command in calls."""
        if len(self._chosen) < self._limit:
            for cmd in sorted(calls, key=lambda c: (-calls[c], c)):
                if len(self._chosen) >= self._limit:
                    break
                self._chosen.add(cmd)
        return {cmd: cmd if cmd in self._chosen else "other" for cmd in calls}


def count_lookups(replies: Sequence[Any]) -> tuple[int, int, list[int]]:
    """(hits, misses, lengths) of LLEN/HLEN replies; a wrong-type key is a hit of length 0."""
    hits = misses = 0
    lengths: list[int] = []
    for reply in replies:
        if isinstance(reply, int):
            lengths.append(reply)
            if reply > 0:
                hits += 1
            else:
                misses += 1  # Redis deletes empty lists and hashes: 0 means no key.
        else:
            lengths.append(0)
            if isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE"):
                hits += 1
    return hits, misses, lengths


# --- connections --------------------------------------------------------------------------------


# redis-py 8 turns CLIENT SETINFO off with driver_info=None; older versions with lib_name=None.
_NO_SETINFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def _raw(response: Any, **_: Any) -> Any:
    return response


def connect(url: str, timeout: float) -> redis.Redis:
    """A client on one lazily opened connection: no retries, timeouts on every call."""
    pool = redis.ConnectionPool.from_url(
        url,
        max_connections=1,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        # RESP2 and no CLIENT SETINFO: fewer round trips and commands for the ACL to allow.
        protocol=2,
        **_NO_SETINFO,
    )
    client = redis.Redis(connection_pool=pool)
    client.set_response_callback("INFO", _raw)
    return client


class RedisUnavailableError(Exception):
    """Redis could not be reached or refused the exporter's INFO."""


def _describe(exc: Exception, secrets: list[str]) -> str:
    """The exception for a log line, with the URL's secrets scrubbed: redis-py quotes the
    host, port or socket path it failed on, where a mangled URL may have put part of the
    password, and a server's error text is not ours to trust."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return scrub(text, secrets)


# --- key groups ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyGroupCounts:
    """What the last key-group count found: keys by group, and the Celery queues kombu has
    declared (from the last complete count)."""

    counts: Mapping[str, float]
    complete: bool
    duration: float
    queues: tuple[str, ...] = ()


class KeyGroupScanner:
    """Counts keys by group with SCAN in a background thread, within key and time budgets.

    A run starts when a scrape finds the last one `interval` old; it stops at the budget and
    the next run carries on from the same cursor, so a large keyspace is still covered in
    full over several intervals. Scrapes only read the published result.
    """

    def __init__(
        self,
        cfg: RedisConfig,
        client_factory: Callable[[], redis.Redis],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._classifier = KeyClassifier(cfg.key_groups)
        self._names = self._classifier.names
        self._max_groups = cfg.max_key_groups
        self._binding_prefix = (f"{cfg.celery_key_prefix}{KOMBU_BINDING}".encode()
                                if cfg.discover_celery_queues else b"")
        self._budget = cfg.key_scan_budget
        self._time_budget = cfg.key_scan_time_budget
        self._interval = cfg.key_scan_interval
        self._batch = cfg.key_scan_batch
        self._client_factory = client_factory
        self._client: redis.Redis | None = None
        self._secrets = url_secrets(cfg.url)
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._last_start: float | None = None
        self._generation = 0
        self._cursor = 0
        self._partial = KeyTally.empty(len(self._names))
        self._published: KeyGroupCounts | None = None
        self._error: str | None = None
        # SSCAN refused (an ACL without it): queues are then the configured ones only.
        self._sscan_refused = False

    def poke(self) -> None:
        """Start a run in the background if one is due; never waits for it."""
        with self._lock:
            if self._stopping or self._running:
                return
            now = self._clock()
            if self._last_start is not None and now - self._last_start < self._interval:
                return
            self._last_start = now
            self._running = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="redis-keygroups",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def forget(self) -> None:
        """Drop all counts (the server was replaced) and count again at the next scrape."""
        with self._lock:
            self._generation += 1
            self._cursor = 0
            self._partial = KeyTally.empty(len(self._names))
            self._published = None
            self._last_start = None

    def result(self) -> KeyGroupCounts | None:
        """The published counts, None before the first run ends."""
        with self._lock:
            return self._published

    def close(self) -> None:
        """Stop the thread; it closes its connection after the SCAN call under way."""
        with self._lock:
            self._stopping = True
        self._wake.set()

    def _loop(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    self._run()
                finally:
                    with self._lock:
                        self._running = False
        finally:
            # Only this thread touches its connection: closing it from another thread
            # mid-read would break redis-py's reader.
            if self._client is not None:
                self._client.connection_pool.disconnect()

    def _run(self) -> None:
        with self._lock:
            generation, cursor, tally = self._generation, self._cursor, self._partial.copy()
            previous = self._published
        started = self._clock()
        examined = 0
        queues = previous.queues if previous else ()
        try:
            if self._client is None:
                self._client = self._client_factory()
            while True:
                cursor, keys = self._client.scan(cursor, count=self._batch)
                self._classifier.tally(cast(list[bytes], keys), tally, self._binding_prefix)
                examined += len(keys)
                if cursor == 0 or self._stopping:
                    break
                if examined >= self._budget or self._clock() - started >= self._time_budget:
                    break
            if cursor == 0 and self._binding_prefix:
                queues = self._declared_queues(self._client, tally.bindings, queues)
        except (RedisError, ValueError, TypeError) as exc:  # see RedisCollector.collect
            if self._client is not None:
                self._client.connection_pool.disconnect()
            error = _describe(exc, self._secrets)
            if error != self._error:
                log.warning("key group count failed", extra={"err": error})
            self._error = error
            with self._lock:
                if generation == self._generation:
                    self._cursor, self._partial = 0, KeyTally.empty(len(self._names))
            return
        self._error = None
        duration = self._clock() - started
        complete = cursor == 0
        with self._lock:
            if generation != self._generation:
                return
            values = tally.counts(self._names, self._max_groups)
            if complete:
                self._published = KeyGroupCounts(values, True, duration, queues)
                self._cursor, self._partial = 0, KeyTally.empty(len(self._names))
            else:
                self._cursor, self._partial = cursor, tally
                previous = self._published
                if previous is None or not previous.complete:
                    self._published = KeyGroupCounts(values, False, duration, queues)
                else:
                    self._published = KeyGroupCounts(previous.counts, True, duration, queues)

    def _declared_queues(self, client: redis.Redis, bindings: Iterable[bytes],
                         previous: tuple[str, ...]) -> tuple[str, ...]:
        """The queues bound in kombu's binding sets (SSCAN, bounded), sorted; previous when
        the server refuses SSCAN (logged once)."""
        if self._sscan_refused:
            return previous
        queues: set[str] = set()
        for key in sorted(bindings):
            if binding_exchange(key, self._binding_prefix) is None:
                continue
            read, cursor = 0, 0
            try:
                while True:
                    cursor, members = client.sscan(key, cursor, count=100)
                    for member in cast(list[bytes], members):
                        queue = binding_queue(member)
                        if queue is not None:
                            queues.add(queue)
                    read += len(members)
                    if cursor == 0 or read >= MAX_BINDING_MEMBERS:
                        break
            except ResponseError as exc:
                if str(exc).startswith("WRONGTYPE"):
                    continue  # a key that only looks like a binding set
                if str(exc).startswith("NOPERM"):
                    self._sscan_refused = True
                    log.warning("optional Redis command refused; Celery queues are the "
                                "configured ones only", extra={
                                    "part": "sscan", "err": scrub(str(exc), self._secrets)})
                    return previous
                raise
        return tuple(sorted(queues))


# --- the collector ------------------------------------------------------------------------------


class RedisCollector:
    """Reads INFO, SLOWLOG LEN, LATENCY HISTOGRAM, CONFIG GET and the Celery queue lengths in
    one pipelined round trip on one persistent connection; key groups, and the Celery queues
    kombu has declared, come from a cache filled by a background SCAN.

    qatoolbox_redis_up 1
    qatoolbox_redis_version_info{mode="standalone",role="master",version="7.0.15"} 1
    qatoolbox_redis_keyspace_hits_total 1523
    qatoolbox_redis_db_keys{db="db0"} 200004
    qatoolbox_redis_commands_total{cmd="get"} 1002
    qatoolbox_redis_command_duration_seconds_bucket{cmd="get",le="8.192e-06"} 1001
    qatoolbox_redis_key_group_keys{group="user:{id}"} 28572
    qatoolbox_redis_key_group_scan_complete 1
    qatoolbox_celery_queue_length{queue="default"} 12
    qatoolbox_celery_unacked_messages 3
    """

    name = "redis"

    def __init__(
        self,
        cfg: RedisConfig,
        timeout: float | None = None,
        client_factory: Callable[[], redis.Redis] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._where = redact_url(cfg.url)
        self._secrets = url_secrets(cfg.url)
        # Leave the runner's budget room for the connect that may precede the round trip.
        socket_timeout = min(cfg.timeout, 0.8 * timeout) if timeout else cfg.timeout
        self._factory = client_factory or (lambda: connect(cfg.url, socket_timeout))
        self._client: redis.Redis | None = None
        self._scanner = KeyGroupScanner(cfg, self._factory, clock)
        self._queues = tuple(cfg.celery_queues)
        self._celery = celery_keys(self._queues, cfg.celery_key_prefix,
                                   cfg.celery_priority_steps)
        self._unacked_key = f"{cfg.celery_key_prefix}{KOMBU_UNACKED}"
        self._account = LookupAccount()
        self._labels = CommandLabels(cfg.max_command_labels)
        self._run_id: str | None = None
        self._multi_section_info = False
        self._histogram_commands: list[str] = []
        # Optional parts, probed on first use: False once the server refused them.
        self._supported: dict[str, bool] = {}

    # -- I/O

    def _follow_queues(self) -> None:
        """Add the queues the last key count found declared to the configured ones (at most
        max_celery_queues in all, configured first)."""
        result = self._scanner.result()
        found = [q for q in (result.queues if result else ()) if q not in self._cfg.celery_queues]
        room = max(0, self._cfg.max_celery_queues - len(self._cfg.celery_queues))
        queues = (*self._cfg.celery_queues, *found[:room])
        if queues != self._queues:
            self._queues = queues
            self._celery = celery_keys(queues, self._cfg.celery_key_prefix,
                                       self._cfg.celery_priority_steps)

    def _round_trip(self) -> tuple[dict[str, str], dict[str, Any]]:
        if self._client is None:
            self._client = self._factory()
        self._follow_queues()
        pipe = self._client.pipeline(transaction=False)
        # redis-py leaves Pipeline.execute_command unannotated.
        send: Callable[..., Any] = pipe.execute_command
        sections = INFO_SECTIONS if self._multi_section_info else ("all",)
        send("INFO", *sections)
        # INFO first: the lookups below must not be in the counters it reports.
        parts: list[tuple[str, int]] = []

        def add(part: str, *commands: tuple[str, ...]) -> None:
            if self._supported.get(part, True):
                for command in commands:
                    send(*command)
                parts.append((part, len(commands)))

        add("slowlog", ("SLOWLOG", "LEN"))
        # Only the commands the last INFO listed: Redis skips the rest of the reply's work.
        add("latency", ("LATENCY", "HISTOGRAM", *self._histogram_commands))
        if self._cfg.config_get:
            add("config", ("CONFIG", "GET", "maxclients"),
                ("CONFIG", "GET", "slowlog-log-slower-than"))
        if self._celery:
            add("celery", *(("LLEN", key) for _, key in self._celery),
                ("HLEN", self._unacked_key))
        replies = pipe.execute(raise_on_error=False)
        info_reply = replies[0]
        if isinstance(info_reply, Exception):
            self._multi_section_info = False  # maybe an older server now: plain INFO next time
            raise info_reply
        info = parse_info(_text(info_reply))
        results: dict[str, Any] = {}
        position = 1
        for part, length in parts:
            chunk = replies[position: position + length]
            position += length
            refused = [r for r in chunk if isinstance(r, ResponseError)
                       and not str(r).startswith("WRONGTYPE")]
            if part == "celery":
                # Lookups that ran counted as hits or misses, even when others were refused.
                results["lookups"] = count_lookups(chunk)[:2]
            if refused:
                self._unsupported(part, str(refused[0]))
                continue
            self._supported[part] = True
            results[part] = chunk
        return info, results

    def _unsupported(self, part: str, error: str) -> None:
        if self._supported.get(part, True):
            log.warning("optional Redis command refused; its metrics are left out",
                        extra={"part": part, "err": scrub(error, self._secrets),
                               "redis": self._where})
        self._supported[part] = False

    def collect(self) -> Iterator[Metric]:
        """One round trip to Redis; raises RedisUnavailableError when it fails."""
        try:
            info, results = self._round_trip()
        except (RedisError, ValueError, TypeError) as exc:
            # ValueError and TypeError: redis-py's from_url and connection classes raise them
            # for URL query parameters they cannot use (`?db=x`, `?foo=1`).
            if self._client is not None:
                self._client.connection_pool.disconnect()
            raise RedisUnavailableError(
                f"redis at {self._where}: {_describe(exc, self._secrets)}") from None
        run_id = info.get("run_id", "")
        if run_id != self._run_id:
            if self._run_id is not None:
                self._labels.reset()
                self._scanner.forget()
                self._supported.clear()
            self._run_id = run_id
        version = info.get("redis_version", "")
        self._multi_section_info = _version(version) >= (7, 0)
        self._scanner.poke()
        return iter(self._families(info, results))

    # -- families

    def _families(self, info: Mapping[str, str], results: Mapping[str, Any]) -> list[Metric]:
        families: list[Metric] = [_gauge("qatoolbox_redis_up",
                                         "Whether Redis answered the last scrape.", 1.0)]
        version = GaugeMetricFamily("qatoolbox_redis_version_info",
                                    "Redis version, mode and replication role; always 1.",
                                    labels=["version", "mode", "role"])
        role = info.get("role", "")
        version.add_metric([info.get("redis_version", ""), info.get("redis_mode", ""),
                            "replica" if role == "slave" else role], 1.0)
        families.append(version)
        for name, key, help_text in INFO_GAUGES:
            value = number(info, key)
            if value is not None:
                families.append(_gauge(name, help_text, value))
        for name, key, help_text in INFO_COUNTERS:
            value = number(info, key)
            if value is not None:
                families.append(_counter(name, help_text, value))
        families.extend(self._clients(info, results))
        if role == "slave":
            families.append(_gauge("qatoolbox_redis_master_link_up",
                                   "Whether this replica's link to its master is up.",
                                   1.0 if info.get("master_link_status") == "up" else 0.0))
        stats = command_stats(info)
        families.extend(self._keyspace(info, stats, results))
        families.extend(self._commands(stats, results))
        families.extend(self._key_groups())
        families.extend(self._celery_families(results))
        return families

    def _clients(self, info: Mapping[str, str], results: Mapping[str, Any]) -> list[Metric]:
        config = {}
        for reply in results.get("config", []):
            config.update({_text(k): _text(v) for k, v in _pairs(reply).items()})
        families: list[Metric] = []
        max_clients = number(info, "maxclients")
        if max_clients is None:
            max_clients = number(config, "maxclients")
        if max_clients is not None:
            families.append(_gauge("qatoolbox_redis_max_clients",
                                   "Most client connections the server accepts.", max_clients))
        threshold = number(config, "slowlog-log-slower-than")
        if threshold is not None:
            families.append(_gauge(
                "qatoolbox_redis_slowlog_threshold_seconds",
                "Commands slower than this enter the slow log; negative when it is off.",
                threshold / 1e6))
        if "slowlog" in results:
            families.append(_gauge("qatoolbox_redis_slowlog_length",
                                   "Entries in the slow log.", float(results["slowlog"][0])))
        return families

    def _keyspace(self, info: Mapping[str, str], stats: Mapping[str, tuple[float, float]],
                  results: Mapping[str, Any]) -> list[Metric]:
        families: list[Metric] = []
        hits, misses = number(info, "keyspace_hits"), number(info, "keyspace_misses")
        if hits is not None and misses is not None:
            calls = (stats["llen"][0] if "llen" in stats else 0.0) + (
                stats["hlen"][0] if "hlen" in stats else 0.0)
            hits, misses = self._account.adjust(
                info.get("run_id", ""), hits, misses,
                number(info, "total_commands_processed") or 0.0, calls if stats else None)
            families.append(_counter(
                "qatoolbox_redis_keyspace_hits_total",
                "Key lookups that found the key, the exporter's own excluded.", max(hits, 0.0)))
            families.append(_counter(
                "qatoolbox_redis_keyspace_misses_total",
                "Key lookups that found no key, the exporter's own excluded.", max(misses, 0.0)))
        if "lookups" in results:
            self._account.record(*results["lookups"])
        keys = GaugeMetricFamily("qatoolbox_redis_db_keys", "Keys in the database.",
                                 labels=["db"])
        expiring = GaugeMetricFamily("qatoolbox_redis_db_keys_expiring",
                                     "Keys with a TTL in the database.", labels=["db"])
        for db, (count, expires) in sorted(db_labels(keyspace(info)).items()):
            keys.add_metric([db], count)
            expiring.add_metric([db], expires)
        families.extend((keys, expiring))
        return families

    def _commands(self, stats: Mapping[str, tuple[float, float]],
                  results: Mapping[str, Any]) -> list[Metric]:
        histograms = (parse_latency_histogram(results["latency"][0])
                      if "latency" in results else {})
        calls = {cmd: c for cmd, (c, _) in stats.items()}
        for cmd, (histogram_calls, _) in histograms.items():
            calls.setdefault(cmd, float(histogram_calls))
        labels = self._labels.labels(calls)
        totals: dict[str, list[float]] = {}
        for cmd, (cmd_calls, seconds) in stats.items():
            total = totals.setdefault(labels[cmd], [0.0, 0.0])
            total[0] += cmd_calls
            total[1] += seconds
        calls_family = CounterMetricFamily("qatoolbox_redis_commands_total",
                                           "Calls of each command.", labels=["cmd"])
        time_family = CounterMetricFamily(
            "qatoolbox_redis_commands_duration_seconds_total",
            "Time the server spent running each command.", labels=["cmd"])
        for label, (label_calls, seconds) in sorted(totals.items()):
            calls_family.add_metric([label], label_calls)
            time_family.add_metric([label], seconds)
        families: list[Metric] = [calls_family, time_family]
        self._histogram_commands = sorted(cmd for cmd in stats if wants_histogram(cmd))
        if "latency" in results:
            merged: dict[str, list[int]] = {}
            for cmd, (count, points) in histograms.items():
                if not wants_histogram(cmd):
                    continue
                counts = [*histogram_counts(points), count]
                previous = merged.get(labels[cmd])
                merged[labels[cmd]] = ([a + b for a, b in zip(previous, counts, strict=True)]
                                       if previous else counts)
            histogram = HistogramMetricFamily(
                "qatoolbox_redis_command_duration_seconds",
                "Time the server spent running each call of a command (LATENCY HISTOGRAM).",
                labels=["cmd"])
            bounds = [*map(floatToGoString, HISTOGRAM_BOUNDS), "+Inf"]
            for label, counts in sorted(merged.items()):
                histogram.add_metric([label], list(zip(bounds, map(float, counts), strict=True)),
                                     totals.get(label, [0.0, 0.0])[1])
            families.append(histogram)
        return families

    def _key_groups(self) -> list[Metric]:
        result = self._scanner.result()
        complete = _gauge("qatoolbox_redis_key_group_scan_complete",
                          "Whether the key group counts cover the whole keyspace (1) or only "
                          "the part scanned within the budget (0).",
                          1.0 if result and result.complete else 0.0)
        if result is None:
            return [complete]
        keys = GaugeMetricFamily("qatoolbox_redis_key_group_keys",
                                 "Keys in the database by key group: configured groups, then the "
                                 "largest key structures, the rest under other.",
                                 labels=["group"])
        for group, count in result.counts.items():
            keys.add_metric([group], count)
        duration = _gauge("qatoolbox_redis_key_group_scan_duration_seconds",
                          "Time the last key group count took.", result.duration)
        return [keys, complete, duration]

    def _celery_families(self, results: Mapping[str, Any]) -> list[Metric]:
        if "celery" not in results:
            return []
        _, _, lengths = count_lookups(results["celery"])
        queues: dict[str, float] = {}
        for (queue, _), length in zip(self._celery, lengths, strict=False):
            queues[queue] = queues.get(queue, 0.0) + length
        family = GaugeMetricFamily(
            "qatoolbox_celery_queue_length",
            "Messages waiting in the Celery queue, all priorities together.", labels=["queue"])
        for queue, total in queues.items():
            family.add_metric([queue], total)
        unacked = _gauge("qatoolbox_celery_unacked_messages",
                         "Messages delivered to Celery workers and not yet acknowledged.",
                         float(lengths[-1]))
        return [family, unacked]

    # -- runner hooks

    def failure_metrics(self) -> Iterable[Metric]:
        """`qatoolbox_redis_up 0` when Redis could not be read."""
        return [_gauge("qatoolbox_redis_up", "Whether Redis answered the last scrape.", 0.0)]

    def close(self) -> None:
        """Stop the key group thread and close both connections."""
        self._scanner.close()
        if self._client is not None:
            self._client.connection_pool.disconnect()


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)
