"""What Redis answers, read: INFO's sections, commandstats, keyspace, LATENCY HISTOGRAM, the
lookups of the exporter itself, and the metric families built from them (pure, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from exporter.families import counter, gauge
from exporter.resp import ServerError

# Sections read on every scrape. INFO takes several sections only from Redis 7.0 on;
# older servers get "all", which holds the same lines and a few more.
INFO_SECTIONS = ("server", "clients", "memory", "persistence", "stats", "replication",
                 "keyspace", "commandstats")
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
_BOUND_LABELS = (*map(floatToGoString, HISTOGRAM_BOUNDS), "+Inf")
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


def pairs(value: Any) -> dict[Any, Any]:
    """A RESP2 flat [k1, v1, k2, v2] list or a RESP3 map as a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (list, tuple)):
        return dict(zip(value[::2], value[1::2], strict=False))
    return {}


def as_text(value: Any) -> str:
    """A reply's bytes as text (undecodable bytes replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_latency_histogram(reply: Any) -> dict[str, tuple[int, dict[float, int]]]:
    """LATENCY HISTOGRAM's reply as {command: (calls, {bucket upper bound in us: cumulative})}."""
    result: dict[str, tuple[int, dict[float, int]]] = {}
    for name, body in pairs(reply).items():
        fields = {as_text(k): v for k, v in pairs(body).items()}
        points = {float(k): int(v) for k, v in pairs(fields.get("histogram_usec")).items()}
        result[as_text(name)] = (int(fields.get("calls", 0)), points)
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
            if isinstance(reply, ServerError) and reply.text.startswith("WRONGTYPE"):
                hits += 1
    return hits, misses, lengths



def version(text: str) -> tuple[int, ...]:
    """"7.0.15" as (7, 0, 15); the leading numeric parts only."""
    parts = []
    for piece in text.split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)



# --- families -----------------------------------------------------------------------------------

UP_HELP = "Whether Redis answered the last scrape."


def server_families(info: Mapping[str, str]) -> list[Metric]:
    """qatoolbox_redis_up 1, the version and INFO's plain gauges and counters."""
    families: list[Metric] = [gauge("qatoolbox_redis_up", UP_HELP, value=1.0)]
    version_info = gauge("qatoolbox_redis_version_info",
                         "Redis version, mode and replication role; always 1.",
                         ["version", "mode", "role"])
    role = info.get("role", "")
    version_info.add_metric([info.get("redis_version", ""), info.get("redis_mode", ""),
                             "replica" if role == "slave" else role], 1.0)
    families.append(version_info)
    for name, key, help_text in INFO_GAUGES:
        value = number(info, key)
        if value is not None:
            families.append(gauge(name, help_text, value=value))
    for name, key, help_text in INFO_COUNTERS:
        value = number(info, key)
        if value is not None:
            families.append(counter(name, help_text, value=value))
    return families


def client_families(info: Mapping[str, str], config: Mapping[str, str],
                    slowlog_length: int | None) -> list[Metric]:
    """maxclients (INFO, else CONFIG GET), the slow log threshold (CONFIG GET) and length."""
    families: list[Metric] = []
    max_clients = number(info, "maxclients")
    if max_clients is None:
        max_clients = number(config, "maxclients")
    if max_clients is not None:
        families.append(gauge("qatoolbox_redis_max_clients",
                              "Most client connections the server accepts.", value=max_clients))
    threshold = number(config, "slowlog-log-slower-than")
    if threshold is not None:
        families.append(gauge(
            "qatoolbox_redis_slowlog_threshold_seconds",
            "Commands slower than this enter the slow log; negative when it is off.",
            value=threshold / 1e6))
    if slowlog_length is not None:
        families.append(gauge("qatoolbox_redis_slowlog_length", "Entries in the slow log.",
                              value=float(slowlog_length)))
    return families


def replication_families(info: Mapping[str, str]) -> list[Metric]:
    """qatoolbox_redis_master_link_up on a replica; nothing on a master."""
    if info.get("role") != "slave":
        return []
    return [gauge("qatoolbox_redis_master_link_up",
                  "Whether this replica's link to its master is up.",
                  value=1.0 if info.get("master_link_status") == "up" else 0.0)]


def keyspace_families(info: Mapping[str, str],
                      hits_misses: tuple[float, float] | None) -> list[Metric]:
    """Hits and misses (the exporter's own already taken out), keys by database."""
    families: list[Metric] = []
    if hits_misses is not None:
        hits, misses = hits_misses
        families.append(counter(
            "qatoolbox_redis_keyspace_hits_total",
            "Key lookups that found the key, the exporter's own excluded.", value=max(hits, 0.0)))
        families.append(counter(
            "qatoolbox_redis_keyspace_misses_total",
            "Key lookups that found no key, the exporter's own excluded.",
            value=max(misses, 0.0)))
    keys = gauge("qatoolbox_redis_db_keys", "Keys in the database.", ["db"])
    expiring = gauge("qatoolbox_redis_db_keys_expiring", "Keys with a TTL in the database.",
                     ["db"])
    for db, (count, expires) in sorted(db_labels(keyspace(info)).items()):
        keys.add_metric([db], count)
        expiring.add_metric([db], expires)
    families.extend((keys, expiring))
    return families


def command_families(stats: Mapping[str, tuple[float, float]], labels: Mapping[str, str],
                     histograms: Mapping[str, tuple[int, dict[float, int]]] | None
                     ) -> list[Metric]:
    """Calls and time by command label; the latency histogram when LATENCY HISTOGRAM ran."""
    totals: dict[str, list[float]] = {}
    for cmd, (cmd_calls, seconds) in stats.items():
        total = totals.setdefault(labels[cmd], [0.0, 0.0])
        total[0] += cmd_calls
        total[1] += seconds
    calls_family = counter("qatoolbox_redis_commands_total", "Calls of each command.", ["cmd"])
    time_family = counter("qatoolbox_redis_commands_duration_seconds_total",
                          "Time the server spent running each command.", ["cmd"])
    for label, (label_calls, seconds) in sorted(totals.items()):
        calls_family.add_metric([label], label_calls)
        time_family.add_metric([label], seconds)
    families: list[Metric] = [calls_family, time_family]
    if histograms is None:
        return families
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
    bucket, append = histogram.name + "_bucket", histogram.samples.append
    for label, counts in sorted(merged.items()):
        # What histogram.add_metric([label], buckets, sum) adds, without building a label list
        # per bucket (that was a third of this collector's time with 20 commands).
        for le, count in zip(_BOUND_LABELS, counts, strict=True):
            append(Sample(bucket, {"cmd": label, "le": le}, float(count)))
        append(Sample(histogram.name + "_count", {"cmd": label}, float(counts[-1])))
        append(Sample(histogram.name + "_sum", {"cmd": label}, totals.get(label, [0.0, 0.0])[1]))
    families.append(histogram)
    return families


def celery_families(celery: Sequence[tuple[str, str]], replies: Sequence[Any]) -> list[Metric]:
    """Queue lengths (priority lists summed) and unacknowledged messages, from the replies to
    LLEN of each (queue, list key) of celery, then HLEN of kombu's unacked hash."""
    _, _, lengths = count_lookups(replies)
    queues: dict[str, float] = {}
    for (queue, _), length in zip(celery, lengths, strict=False):
        queues[queue] = queues.get(queue, 0.0) + length
    family = gauge("qatoolbox_celery_queue_length",
                   "Messages waiting in the Celery queue, all priorities together.", ["queue"])
    for queue, total in queues.items():
        family.add_metric([queue], total)
    unacked = gauge("qatoolbox_celery_unacked_messages",
                    "Messages delivered to Celery workers and not yet acknowledged.",
                    value=float(lengths[-1]))
    return [family, unacked]
