"""PostgreSQL collector: activity, locks, throughput, replication, statements and tables."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg import sql

from exporter.config import PostgresConfig

log = logging.getLogger("exporter.collectors.postgres")

Row = tuple[Any, ...]
Query = str | sql.Composed

APPLICATION_NAME = "qatoolbox-exporter"
# The share of the runner's budget a collection may take before its connection is cut: the
# rest leaves the runner time to take the result (and the failure path to answer) in budget.
DEADLINE_SHARE = 0.8
QUERY_TEXT_MAX = 200

# Listed so that every database has every state and mode (0 included): a series that comes
# and goes with activity makes alerts on absence and rate() misbehave.
BACKEND_STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
LOCK_MODES = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)

# pg_stat_database column -> (metric name, help)
DATABASE_COUNTERS = (
    ("xact_commit", "transactions_committed_total", "Transactions committed in the database."),
    ("xact_rollback", "transactions_rolled_back_total",
     "Transactions rolled back in the database."),
    ("blks_read", "blocks_read_total", "Disk blocks read in the database."),
    ("blks_hit", "blocks_hit_total", "Disk blocks found in the buffer cache."),
    ("tup_returned", "rows_returned_total", "Rows returned by queries (sequential scans)."),
    ("tup_fetched", "rows_fetched_total", "Rows fetched by queries (index scans)."),
    ("tup_inserted", "rows_inserted_total", "Rows inserted."),
    ("tup_updated", "rows_updated_total", "Rows updated."),
    ("tup_deleted", "rows_deleted_total", "Rows deleted."),
    ("deadlocks", "deadlocks_total", "Deadlocks detected in the database."),
    ("temp_bytes", "temp_bytes_total", "Bytes written to temporary files by queries."),
    ("conflicts", "conflicts_total", "Queries cancelled by conflicts with recovery (replicas)."),
)


# --- SQL, chosen by server version -------------------------------------------------------------

# reserved_connections (16+) is read with missing_ok, so older servers give NULL.
SETTINGS_SQL = """
SELECT current_setting('server_version'),
       extract(epoch FROM pg_postmaster_start_time()),
       pg_is_in_recovery(),
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
           + coalesce(current_setting('reserved_connections', true)::int, 0)
"""

# One row per (database, state) of client backends other than ours, with the per-group
# aggregates the activity gauges need; the caller folds states into per-database values.
ACTIVITY_SQL = """
SELECT coalesce(datname, ''), coalesce(state, ''), count(*),
       count(*) FILTER (WHERE state = 'active'
                        AND query_start < clock_timestamp() - make_interval(secs => %(slow)s)),
       max(extract(epoch FROM clock_timestamp() - query_start)) FILTER (WHERE state = 'active'),
       max(extract(epoch FROM clock_timestamp() - xact_start)),
       max(extract(epoch FROM clock_timestamp() - state_change))
           FILTER (WHERE state LIKE 'idle in transaction%%'),
       count(*) FILTER (WHERE wait_event_type = 'Lock')
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1, 2
"""

# Locks on shared objects and transaction ids carry no database: count them in the database
# of the backend holding or awaiting them.
LOCKS_SQL = """
SELECT coalesce(d.datname, a.datname), l.mode, count(*)
FROM pg_locks l
LEFT JOIN pg_database d ON d.oid = l.database
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.pid IS DISTINCT FROM pg_backend_pid() AND coalesce(d.datname, a.datname) IS NOT NULL
GROUP BY 1, 2
"""

DATABASE_SQL = """
SELECT d.datname, s.xact_commit, s.xact_rollback, s.blks_read, s.blks_hit, s.tup_returned,
       s.tup_fetched, s.tup_inserted, s.tup_updated, s.tup_deleted, s.deadlocks, s.temp_bytes,
       s.conflicts
FROM pg_database d JOIN pg_stat_database s ON s.datid = d.oid
WHERE NOT d.datistemplate
ORDER BY d.datname
"""

# pg_database_size() walks the database's directory: cached. It needs CONNECT on the
# database or pg_read_all_stats (part of pg_monitor); others are skipped rather than failing.
DATABASE_SIZE_SQL = """
SELECT datname, pg_database_size(oid)
FROM pg_database
WHERE NOT datistemplate AND datallowconn
  AND (has_database_privilege(oid, 'CONNECT') OR pg_has_role('pg_read_all_stats', 'MEMBER'))
ORDER BY datname
"""

# Before 17 the checkpointer's and backends' counters live in pg_stat_bgwriter.
CHECKPOINT_SQL_BEFORE_17 = """
SELECT checkpoints_timed, checkpoints_req, buffers_checkpoint, buffers_clean, buffers_backend
FROM pg_stat_bgwriter
"""
# 17 moved checkpoints to pg_stat_checkpointer and dropped buffers_backend in favour of
# pg_stat_io: shared relation blocks written by anything but the checkpointer and bgwriter.
CHECKPOINT_SQL_17 = """
SELECT c.num_timed, c.num_requested, c.buffers_written, b.buffers_clean,
       (SELECT coalesce(sum(writes), 0) FROM pg_stat_io
        WHERE object = 'relation' AND backend_type NOT IN ('checkpointer', 'background writer'))
FROM pg_stat_checkpointer c, pg_stat_bgwriter b
"""

# Transaction ID and MultiXact age of each database that accepts connections, as
# postgres_exporter's wraparound query: PostgreSQL stops assigning IDs near 2^31.
WRAPAROUND_SQL = """
SELECT datname, age(datfrozenxid), mxid_age(datminmxid)
FROM pg_database
WHERE datallowconn
ORDER BY datname
"""

# One row, on primaries and replicas alike (counters are 0 while archive_mode is off).
ARCHIVER_SQL = """
SELECT archived_count, failed_count,
       extract(epoch FROM last_archived_time), extract(epoch FROM last_failed_time)
FROM pg_stat_archiver
"""

REPLICA_LAG_SQL = """
SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) END
"""

# A standby replays; pg_receivewal and the like only flush, so fall back to that position.
PRIMARY_LAG_SQL = """
SELECT coalesce(application_name, ''),
       max(pg_wal_lsn_diff(pg_current_wal_lsn(), coalesce(replay_lsn, flush_lsn)))
FROM pg_stat_replication
GROUP BY 1
"""

SLOTS_SQL = """
SELECT slot_name, pg_wal_lsn_diff({position}, restart_lsn)
FROM pg_replication_slots
WHERE restart_lsn IS NOT NULL
ORDER BY slot_name
"""

STATEMENTS_EXTENSION_SQL = """
SELECT n.nspname, e.extversion
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_stat_statements'
"""

# The top N by total time, in SQL so that a database with 5000 distinct statements ships 50
# rows. Grouping merges the top-level and nested entries (1.9+) of one statement.
STATEMENTS_TOP_SQL = """
SELECT s.queryid::text, coalesce(d.datname, ''), coalesce(r.rolname, ''), s.calls, s.seconds,
       s.rows, s.query
FROM (SELECT queryid, dbid, userid, sum(calls) AS calls, sum({time}) / 1000 AS seconds,
             sum(rows) AS rows, min(left(query, 1000)) AS query
      FROM {schema}.pg_stat_statements
      WHERE queryid IS NOT NULL
      GROUP BY queryid, dbid, userid
      ORDER BY seconds DESC
      LIMIT {limit}) s
LEFT JOIN pg_database d ON d.oid = s.dbid
LEFT JOIN pg_roles r ON r.oid = s.userid
ORDER BY s.seconds DESC, s.queryid
"""

# Without query texts: reading them is what makes pg_stat_statements expensive.
STATEMENTS_TOTAL_SQL = """
SELECT count(*), coalesce(sum(calls), 0), coalesce(sum({time}), 0) / 1000,
       coalesce(sum(rows), 0)
FROM {schema}.pg_stat_statements(false)
"""

# Sizing a table exactly (pg_total_relation_size) opens and stats every file of it and its
# indexes and TOAST, under a lock: over 1 s for 10,000 tables, and stuck behind any ALTER
# TABLE. So candidates are ranked from the catalog's page counts, kept by VACUUM and ANALYZE
# (only a table never analysed, which 14+ marks with reltuples -1, has its file measured; the
# live row count breaks remaining ties), and only those, twice the N wanted, are sized exactly
# and cut to the top N. The statistics come from the functions behind pg_stat_user_tables,
# called for the candidates only.
TABLES_SQL = """
WITH est AS (
  SELECT c.oid, {heap_pages} + coalesce(t.relpages, 0) + coalesce(ix.pages, 0) AS pages
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
  LEFT JOIN (SELECT x.indrelid, sum(i.relpages) AS pages
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             GROUP BY x.indrelid) ix ON ix.indrelid = c.oid
  WHERE c.relkind IN ('r', 'm', 'p')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
), candidates AS (
  SELECT oid FROM est
  ORDER BY pages DESC, pg_stat_get_live_tuples(oid) DESC, oid
  LIMIT %(candidates)s
)
SELECT n.nspname, c.relname, pg_stat_get_numscans(c.oid),
       (SELECT coalesce(sum(pg_stat_get_numscans(x.indexrelid)), 0)
        FROM pg_index x WHERE x.indrelid = c.oid),
       pg_stat_get_live_tuples(c.oid), pg_stat_get_dead_tuples(c.oid),
       pg_total_relation_size(c.oid) AS size,
       extract(epoch FROM pg_stat_get_last_autovacuum_time(c.oid)),
       extract(epoch FROM pg_stat_get_last_autoanalyze_time(c.oid)),
       (SELECT count(*) FROM est)
FROM candidates JOIN pg_class c ON c.oid = candidates.oid
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY size DESC NULLS LAST, n.nspname, c.relname
LIMIT %(limit)s
"""
HEAP_PAGES_14 = "CASE WHEN c.reltuples < 0 THEN pg_relation_size(c.oid) / 8192 ELSE c.relpages END"
# Before 14 reltuples is 0 both when never analysed and when empty: trust relpages.
HEAP_PAGES_BEFORE_14 = "c.relpages"
TABLES_COUNT_SQL = """
SELECT count(*)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
"""


@dataclass(frozen=True)
class Queries:
    """The SQL this server version understands, where it differs between versions."""

    version: int
    checkpoints: str
    checkpoints_17: bool
    tables: str

    def slots(self, in_recovery: bool) -> str:
        """Slot retention measured from the newest WAL position this server has."""
        position = "pg_last_wal_receive_lsn()" if in_recovery else "pg_current_wal_lsn()"
        return SLOTS_SQL.format(position=position)


def queries_for(server_version: int) -> Queries:
    """The queries for a server_version_num (150010 for 15.10)."""
    heap = HEAP_PAGES_14 if server_version >= 140000 else HEAP_PAGES_BEFORE_14
    tables = TABLES_SQL.format(heap_pages=heap)
    if server_version >= 170000:
        return Queries(server_version, CHECKPOINT_SQL_17, True, tables)
    return Queries(server_version, CHECKPOINT_SQL_BEFORE_17, False, tables)


def statements_time_column(extversion: str) -> str:
    """pg_stat_statements 1.8 (PostgreSQL 13) split total_time into plan and exec time."""
    try:
        major, minor = (int(p) for p in extversion.split(".")[:2])
    except ValueError:
        return "total_exec_time"
    return "total_exec_time" if (major, minor) >= (1, 8) else "total_time"


def statements_sql(schema: str, extversion: str, limit: int) -> tuple[sql.Composed, sql.Composed]:
    """The top-N and totals queries for pg_stat_statements installed in schema."""
    time_column = sql.Identifier(statements_time_column(extversion))
    top = sql.SQL(STATEMENTS_TOP_SQL).format(
        time=time_column, schema=sql.Identifier(schema), limit=sql.Literal(limit)
    )
    total = sql.SQL(STATEMENTS_TOTAL_SQL).format(time=time_column, schema=sql.Identifier(schema))
    return top, total


# --- pure builders: rows in, metric families out -----------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def normalise_query(text: str | None) -> str:
    """One line, whitespace collapsed, cut to QUERY_TEXT_MAX characters."""
    return _WHITESPACE.sub(" ", text or "").strip()[:QUERY_TEXT_MAX]


def _num(value: Any) -> float:
    """A numeric column (int, Decimal, float or NULL) as a float, NULL as 0."""
    return 0.0 if value is None else float(value)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"qatoolbox_postgres_{name}", doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"qatoolbox_postgres_{name}", doc, labels=list(labels))


def build_up(up: bool) -> GaugeMetricFamily:
    """qatoolbox_postgres_up."""
    family = _gauge("up", "Whether the last attempt to query PostgreSQL succeeded (1) or not (0).")
    family.add_metric([], 1.0 if up else 0.0)
    return family


def build_settings(row: Row) -> list[Metric]:
    """Version, start time, recovery state and connection limits from SETTINGS_SQL's row."""
    version, started, in_recovery, max_connections, reserved = row
    info = _gauge("version_info", "PostgreSQL server version; always 1.", ["version"])
    info.add_metric([str(version).split(" ")[0]], 1.0)
    start = _gauge("start_time_seconds", "Unix time the PostgreSQL server started.")
    start.add_metric([], _num(started))
    recovery = _gauge("in_recovery", "Whether the server is a replica in recovery (1) or not (0).")
    recovery.add_metric([], 1.0 if in_recovery else 0.0)
    limit = _gauge("max_connections", "The server's max_connections setting.")
    limit.add_metric([], _num(max_connections))
    kept = _gauge("reserved_connections",
                  "Connection slots only superusers (and pg_use_reserved_connections) may use.")
    kept.add_metric([], _num(reserved))
    return [info, start, recovery, limit, kept]


def build_wraparound(rows: Iterable[Row]) -> list[Metric]:
    """Transaction ID and MultiXact age per database from WRAPAROUND_SQL rows."""
    xid = _gauge("database_xid_age",
                 "Transactions since the database's oldest unfrozen transaction ID "
                 "(age(datfrozenxid)).", ["datname"])
    mxid = _gauge("database_multixact_age",
                  "MultiXacts since the database's oldest unfrozen MultiXact ID "
                  "(mxid_age(datminmxid)).", ["datname"])
    for datname, xid_age, mxid_age in rows:
        xid.add_metric([datname], _num(xid_age))
        mxid.add_metric([datname], _num(mxid_age))
    return [xid, mxid]


def build_archiver(row: Row) -> list[Metric]:
    """WAL archiving counters and times from ARCHIVER_SQL's row (times absent until set)."""
    archived, failed, last_archived, last_failed = row
    families: list[Metric] = []
    done = _counter("wal_archived_total", "WAL files archived successfully.")
    done.add_metric([], _num(archived))
    failures = _counter("wal_archive_failed_total", "Failed attempts to archive a WAL file.")
    failures.add_metric([], _num(failed))
    families += [done, failures]
    if last_archived is not None:
        when = _gauge("wal_last_archived_timestamp_seconds",
                      "Unix time the last WAL file was archived successfully.")
        when.add_metric([], _num(last_archived))
        families.append(when)
    if last_failed is not None:
        when = _gauge("wal_last_archive_failure_timestamp_seconds",
                      "Unix time the last attempt to archive a WAL file failed.")
        when.add_metric([], _num(last_failed))
        families.append(when)
    return families


def build_activity(rows: Iterable[Row], databases: Iterable[str]) -> list[Metric]:
    """Connection and query-age gauges from ACTIVITY_SQL rows, zero-filled for databases."""
    connections: dict[tuple[str, str], float] = {}
    per_db: dict[str, list[float]] = {}  # slow, longest, oldest xact, oldest idle-in-xact, waits
    for db in databases:
        per_db.setdefault(db, [0.0] * 5)
    for datname, state, count, slow, longest, oldest, idle_xact, waits in rows:
        key = (datname, state or "unknown")
        connections[key] = connections.get(key, 0.0) + _num(count)
        agg = per_db.setdefault(datname, [0.0] * 5)
        agg[0] += _num(slow)
        agg[1] = max(agg[1], _num(longest))
        agg[2] = max(agg[2], _num(oldest))
        agg[3] = max(agg[3], _num(idle_xact))
        agg[4] += _num(waits)
    for db in per_db:
        for state in BACKEND_STATES:
            connections.setdefault((db, state), 0.0)
    conn_family = _gauge("connections", "Client connections by database and state.",
                         ["datname", "state"])
    for (db, state), value in sorted(connections.items()):
        conn_family.add_metric([db, state], value)
    families: list[Metric] = [conn_family]
    specs = (
        ("slow_queries", "Active queries running longer than the slow query threshold."),
        ("longest_query_seconds", "Age of the longest-running active query (0 when none)."),
        ("oldest_transaction_seconds", "Age of the oldest open transaction (0 when none)."),
        ("oldest_idle_in_transaction_seconds",
         "Time the longest idle-in-transaction session has been idle (0 when none)."),
        ("lock_waits", "Backends waiting for a lock."),
    )
    for i, (name, doc) in enumerate(specs):
        family = _gauge(name, doc, ["datname"])
        for db in sorted(per_db):
            family.add_metric([db], per_db[db][i])
        families.append(family)
    return families


def build_locks(rows: Iterable[Row], databases: Iterable[str]) -> GaugeMetricFamily:
    """Locks held or awaited, by database and mode, zero-filled for the standard modes."""
    counts: dict[tuple[str, str], float] = {}
    for db in databases:
        for mode in LOCK_MODES:
            counts[(db, mode)] = 0.0
    for datname, mode, count in rows:
        counts[(datname, mode)] = counts.get((datname, mode), 0.0) + _num(count)
    family = _gauge("locks", "Locks held or awaited, by database and lock mode.",
                    ["datname", "mode"])
    for (db, mode), value in sorted(counts.items()):
        family.add_metric([db, mode], value)
    return family


def build_databases(rows: Iterable[Row]) -> list[Metric]:
    """pg_stat_database counters from DATABASE_SQL rows."""
    families = [_counter(name, doc, ["datname"]) for _, name, doc in DATABASE_COUNTERS]
    for row in rows:
        for family, value in zip(families, row[1:], strict=True):
            family.add_metric([row[0]], _num(value))
    return list(families)


def build_database_sizes(rows: Iterable[Row]) -> GaugeMetricFamily:
    """Database sizes from DATABASE_SIZE_SQL rows."""
    family = _gauge("database_size_bytes", "Disk space used by the database.", ["datname"])
    for datname, size in rows:
        if size is not None:
            family.add_metric([datname], _num(size))
    return family


def build_checkpoints(row: Row) -> list[Metric]:
    """Checkpoint and buffer-write counters from the version's checkpoint query row."""
    timed, requested, by_checkpoint, by_bgwriter, by_backend = row
    timed_family = _counter("checkpoints_timed_total",
                            "Checkpoints started because checkpoint_timeout elapsed.")
    timed_family.add_metric([], _num(timed))
    requested_family = _counter("checkpoints_requested_total",
                                "Checkpoints requested (WAL volume, CHECKPOINT, shutdown).")
    requested_family.add_metric([], _num(requested))
    written = _counter("buffers_written_total",
                       "Shared buffers written, by who wrote them.", ["by"])
    written.add_metric(["checkpoint"], _num(by_checkpoint))
    written.add_metric(["bgwriter"], _num(by_bgwriter))
    written.add_metric(["backend"], _num(by_backend))
    return [timed_family, requested_family, written]


def build_replica_lag(value: Any) -> list[Metric]:
    """Replay lag of a replica (absent when it has never replayed a transaction)."""
    if value is None:
        return []
    family = _gauge("replication_lag_seconds",
                    "Time since the last transaction replayed on this replica (0 when caught up).")
    family.add_metric([], max(0.0, _num(value)))
    return [family]


def build_primary_lag(rows: Iterable[Row]) -> GaugeMetricFamily:
    """Per-replica lag in bytes on a primary."""
    family = _gauge("replica_lag_bytes", "WAL bytes a connected replica has yet to replay.",
                    ["application_name"])
    for name, lag in rows:
        if lag is not None:
            family.add_metric([name], max(0.0, _num(lag)))
    return family


def build_slots(rows: Iterable[Row]) -> GaugeMetricFamily:
    """WAL retained by each replication slot."""
    family = _gauge("replication_slot_retained_bytes",
                    "WAL bytes the replication slot keeps from being removed.", ["slot_name"])
    for name, retained in rows:
        if retained is not None:
            family.add_metric([name], max(0.0, _num(retained)))
    return family


def build_statements(top: Iterable[Row], totals: Row) -> list[Metric]:
    """Top-N statement counters, their texts, and the totals over every statement."""
    labels = ["queryid", "datname", "user"]
    calls = _counter("statement_calls_total", "Times the statement was executed.", labels)
    seconds = _counter("statement_seconds_total", "Time spent executing the statement.", labels)
    rows_family = _counter("statement_rows_total", "Rows retrieved or affected by the statement.",
                           labels)
    info = _gauge("statement_info", "Normalised text of a top statement; always 1.",
                  ["queryid", "query"])
    texts: dict[str, str] = {}
    for queryid, datname, user, n_calls, n_seconds, n_rows, query in top:
        calls.add_metric([queryid, datname, user], _num(n_calls))
        seconds.add_metric([queryid, datname, user], _num(n_seconds))
        rows_family.add_metric([queryid, datname, user], _num(n_rows))
        # One queryid can run in several databases or as several users: one text suffices.
        texts.setdefault(queryid, normalise_query(query))
    for queryid, text in texts.items():
        info.add_metric([queryid, text], 1.0)
    count, all_calls, all_seconds, all_rows = totals
    tracked = _gauge("statements_tracked", "Statements pg_stat_statements currently tracks.")
    tracked.add_metric([], _num(count))
    total_calls = _counter("statements_calls_total",
                           "Executions of all tracked statements, top N or not.")
    total_calls.add_metric([], _num(all_calls))
    total_seconds = _counter("statements_seconds_total",
                             "Execution time of all tracked statements, top N or not.")
    total_seconds.add_metric([], _num(all_seconds))
    total_rows = _counter("statements_rows_total",
                          "Rows retrieved or affected by all tracked statements, top N or not.")
    total_rows.add_metric([], _num(all_rows))
    return [calls, seconds, rows_family, info, tracked, total_calls, total_seconds, total_rows]


def build_tables(rows: Iterable[Row], count: Any) -> list[Metric]:
    """Per-table families for the top-N tables, and the number of user tables."""
    labels = ["schema", "table"]
    seq = _counter("table_seq_scans_total", "Sequential scans of the table.", labels)
    idx = _counter("table_index_scans_total", "Index scans of the table.", labels)
    live = _gauge("table_live_rows", "Estimated live rows in the table.", labels)
    dead = _gauge("table_dead_rows", "Estimated dead rows in the table.", labels)
    size = _gauge("table_size_bytes", "Disk space of the table with its indexes and TOAST.",
                  labels)
    vacuum = _gauge("table_last_autovacuum_timestamp_seconds",
                    "Unix time autovacuum last processed the table.", labels)
    analyze = _gauge("table_last_autoanalyze_timestamp_seconds",
                     "Unix time autovacuum last analyzed the table.", labels)
    for schema, table, n_seq, n_idx, n_live, n_dead, n_size, vacuumed, analyzed in rows:
        key = [schema, table]
        seq.add_metric(key, _num(n_seq))
        idx.add_metric(key, _num(n_idx))
        live.add_metric(key, _num(n_live))
        dead.add_metric(key, _num(n_dead))
        size.add_metric(key, _num(n_size))
        if vacuumed is not None:
            vacuum.add_metric(key, _num(vacuumed))
        if analyzed is not None:
            analyze.add_metric(key, _num(analyzed))
    tables = _gauge("tables", "User tables in the connected database (all, not just the top N).")
    tables.add_metric([], _num(count))
    return [seq, idx, live, dead, size, vacuum, analyze, tables]


# --- connection handling -----------------------------------------------------------------------


class PostgresError(Exception):
    """Why a collection failed, with any password already removed from the message."""


class _ConnectionLostError(Exception):
    """Raised inside a collection when the connection itself failed."""


class Watchdog:
    """Cuts a connection's socket when a collection overruns its deadline.

    A stopped server (SIGSTOP, a frozen VM) never answers and never resets the connection:
    statement_timeout is enforced by the server and TCP keepalives see a live peer, so a
    blocking query would wait forever. shutdown() on the socket makes the blocked read return
    at once with an error, on the collecting thread, which then closes the connection itself;
    the descriptor is never closed under it. One thread per collector, whatever happens.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._fd = -1
        self._deadline = math.inf
        self._fired = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float) -> None:
        """Watch fd until disarm(); shut it down if deadline (monotonic) passes first."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="postgres-watchdog",
                                                daemon=True)
                self._thread.start()
            self._fd, self._deadline, self._fired = fd, deadline, False
            self._cond.notify()

    def disarm(self) -> bool:
        """Stop watching; return whether the deadline cut the socket."""
        with self._cond:
            fired = self._fired
            self._fd, self._deadline, self._fired = -1, math.inf, False
            return fired

    def fire(self) -> None:
        """Cut the watched socket now (at shutdown)."""
        with self._cond:
            self._deadline = -math.inf
            self._cond.notify()

    def stop(self) -> None:
        """End the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._fd < 0:
                    self._cond.wait()
                    continue
                remaining = self._deadline - self._clock()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                _shutdown(self._fd)
                self._fired = True
                self._fd = -1


def _shutdown(fd: int) -> None:
    """shutdown(2) the socket behind fd without closing fd (its owner still uses it)."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected: the blocked call has its answer anyway
    finally:
        dup.close()


class _FamilyLog:
    """Logs a family's failure once (again when the error changes) and its recovery."""

    def __init__(self) -> None:
        self._errors: dict[str, str] = {}

    def failed(self, family: str, error: str) -> None:
        if self._errors.get(family) != error:
            log.warning("postgres family left out", extra={"family": family, "err": error})
            self._errors[family] = error

    def note(self, family: str, message: str) -> None:
        """An expected absence (an extension not installed): one info line."""
        if self._errors.get(family) != message:
            log.info(message, extra={"family": family})
            self._errors[family] = message

    def succeeded(self, family: str) -> None:
        if self._errors.pop(family, None) is not None:
            log.info("postgres family back", extra={"family": family})


@dataclass
class _Cached:
    fetched_at: float
    families: list[Metric]


class PostgresCollector:
    """PostgreSQL server, activity, databases, replication, statements and top tables.

    qatoolbox_postgres_up 1
    qatoolbox_postgres_version_info{version="15.10"} 1
    qatoolbox_postgres_connections{datname="qatoolbox",state="active"} 3
    qatoolbox_postgres_slow_queries{datname="qatoolbox"} 0
    qatoolbox_postgres_lock_waits{datname="qatoolbox"} 0
    qatoolbox_postgres_transactions_committed_total{datname="qatoolbox"} 123456
    qatoolbox_postgres_database_size_bytes{datname="qatoolbox"} 8.4e+07
    qatoolbox_postgres_buffers_written_total{by="checkpoint"} 5120
    qatoolbox_postgres_database_xid_age{datname="qatoolbox"} 1.2e+07
    qatoolbox_postgres_wal_archive_failed_total 0
    qatoolbox_postgres_statement_seconds_total{datname="qatoolbox",queryid="-61...",user="app"} 12.5
    qatoolbox_postgres_table_size_bytes{schema="public",table="tools_tool"} 1.6e+07
    """

    name = "postgres"

    def __init__(
        self,
        cfg: PostgresConfig,
        budget: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._budget = budget * DEADLINE_SHARE
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Row] | None = None
        self._queries = queries_for(0)
        self._watchdog = Watchdog(clock)
        self._family_log = _FamilyLog()
        self._cache: dict[str, _Cached] = {}
        self._fetchers: dict[str, Callable[[psycopg.Connection[Row]], list[Metric] | None]] = {
            "database_size": self._database_sizes,
            "statements": self._statements,
            "tables": self._tables,
        }
        self._closed = False
        self._last_start: float | None = None
        self._gap = 0.0  # between the last two scrapes: how far ahead to refresh
        self._refresh_wanted = threading.Event()
        self._refresh_idle = threading.Event()
        self._refresh_idle.set()
        self._refresher: threading.Thread | None = None

    # -- the runner's interface

    def collect(self) -> list[Metric]:
        """Query PostgreSQL; raise PostgresError when it cannot be reached or queried."""
        started = self._clock()
        if self._last_start is not None:
            self._gap = max(0.0, started - self._last_start)
        self._last_start = started
        deadline = started + self._budget
        if not self._lock.acquire(timeout=self._budget):
            raise PostgresError("another collection is still running")
        try:
            families = self._collect(deadline)
            self._schedule_refresh()  # under the lock: it reads the cache
        finally:
            self._lock.release()
        return families

    def wait_refreshed(self, timeout: float) -> bool:
        """Wait until no background refresh is pending (for tests and benchmarks)."""
        return self._refresh_idle.wait(timeout)

    def failure_metrics(self) -> list[Metric]:
        """Only up 0: the other families are absent rather than stale."""
        return [build_up(False)]

    def close(self) -> None:
        """Close the connection; cut it first if a collection is stuck on it."""
        self._closed = True
        if self._lock.acquire(timeout=1.0):
            try:
                self._drop()
            finally:
                self._lock.release()
        else:
            self._watchdog.fire()
        self._watchdog.stop()
        self._refresh_wanted.set()  # ends the refresher

    # -- internals

    def _collect(self, deadline: float) -> list[Metric]:
        if self._closed:
            raise PostgresError("collector closed")
        if self._clock() >= deadline:
            # The lock was held that long by a background refresh: don't cut a good connection.
            raise PostgresError("no time left after waiting for the cache refresh")
        conn, reused = self._connection(deadline)
        try:
            return self._attempt(conn, deadline)
        except _ConnectionLostError as exc:
            if not reused:
                raise PostgresError(self._redact(str(exc))) from None
        # A kept connection can die between scrapes (server restart, idle_session_timeout):
        # that says nothing about the server now, so one more try on a fresh connection.
        conn, _ = self._connection(deadline)
        try:
            return self._attempt(conn, deadline)
        except _ConnectionLostError as exc:
            raise PostgresError(self._redact(str(exc))) from None

    def _attempt(self, conn: psycopg.Connection[Row], deadline: float) -> list[Metric]:
        """All families over conn, cut at deadline; the connection is dropped if it failed."""
        self._watchdog.arm(conn.pgconn.socket, deadline)
        try:
            families = self._families(conn)
        except _ConnectionLostError:
            cut = self._watchdog.disarm()
            self._drop()
            if cut:
                raise PostgresError(
                    f"no answer within {self._budget:.2g}s; connection closed"
                ) from None
            raise
        if self._watchdog.disarm():
            # Cut just after the last answer: the results stand, the connection does not.
            self._drop()
        return families

    def _connection(self, deadline: float) -> tuple[psycopg.Connection[Row], bool]:
        """The open connection (and True), or a new one (and False)."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn, True
        self._drop()
        cfg = self._cfg
        params: dict[str, Any] = {
            "host": cfg.host,
            "port": cfg.port,
            "dbname": cfg.dbname,
            "user": cfg.user,
            "sslmode": cfg.sslmode,
            # Whole seconds, 2 at least (psycopg's floor), and no longer than the budget left.
            "connect_timeout": max(1, math.floor(min(cfg.connect_timeout,
                                                     deadline - self._clock()))),
            "application_name": APPLICATION_NAME,
            # jit off: compiling the per-table query would cost more than running it.
            "options": f"-c statement_timeout={max(1, round(cfg.timeout * 1000))} "
            "-c default_transaction_read_only=on -c jit=off",
        }
        if cfg.password:
            params["password"] = str(cfg.password)
        try:
            conn = psycopg.Connection.connect(autocommit=True, **params)
        except psycopg.Error as exc:
            raise PostgresError(self._redact(f"cannot connect: {exc}")) from None
        self._conn = conn
        self._queries = queries_for(conn.info.server_version)
        self._cache.clear()  # possibly another server now (failover): nothing carried over
        return conn, False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as exc:
                log.debug("closing the connection failed", extra={"err": self._redact(str(exc))})

    def _redact(self, message: str) -> str:
        password = str(self._cfg.password)
        if password:
            message = message.replace(password, "<secret>")
        return _WHITESPACE.sub(" ", message).strip()  # one log line, libpq's tabs included

    def _query(self, conn: psycopg.Connection[Row], family: str, query: Query,
               params: dict[str, Any] | None = None) -> list[Row] | None:
        """Rows of query; None when it failed but the connection is still good."""
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall()
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                raise _ConnectionLostError(str(exc)) from None
            self._family_log.failed(family, self._redact(f"{type(exc).__name__}: {exc}"))
            return None

    def _families(self, conn: psycopg.Connection[Row]) -> list[Metric]:
        settings = self._query(conn, "settings", SETTINGS_SQL)
        if not settings:
            # The liveness query itself failing means the server cannot be relied on.
            raise _ConnectionLostError("the server did not answer the settings query")
        in_recovery = bool(settings[0][2])
        families: list[Metric] = [build_up(True), *build_settings(settings[0])]

        databases: list[str] = []
        rows = self._query(conn, "database", DATABASE_SQL)
        if rows is not None:
            self._family_log.succeeded("database")
            databases = [r[0] for r in rows]
            families.extend(build_databases(rows))

        rows = self._query(conn, "activity", ACTIVITY_SQL,
                           {"slow": float(self._cfg.slow_query_threshold)})
        if rows is not None:
            self._family_log.succeeded("activity")
            families.extend(build_activity(rows, databases))

        rows = self._query(conn, "locks", LOCKS_SQL)
        if rows is not None:
            self._family_log.succeeded("locks")
            families.append(build_locks(rows, databases))

        rows = self._query(conn, "checkpoints", self._queries.checkpoints)
        if rows:
            self._family_log.succeeded("checkpoints")
            families.extend(build_checkpoints(rows[0]))

        rows = self._query(conn, "wraparound", WRAPAROUND_SQL)
        if rows is not None:
            self._family_log.succeeded("wraparound")
            families.extend(build_wraparound(rows))

        rows = self._query(conn, "archiver", ARCHIVER_SQL)
        if rows:
            self._family_log.succeeded("archiver")
            families.extend(build_archiver(rows[0]))

        families.extend(self._replication(conn, in_recovery))
        for family in self._fetchers:
            families.extend(self._cached(conn, family))
        return families

    def _replication(self, conn: psycopg.Connection[Row], in_recovery: bool) -> list[Metric]:
        families: list[Metric] = []
        if in_recovery:
            rows = self._query(conn, "replication", REPLICA_LAG_SQL)
            if rows:
                families.extend(build_replica_lag(rows[0][0]))
        else:
            rows = self._query(conn, "replication", PRIMARY_LAG_SQL)
            if rows is not None:
                families.append(build_primary_lag(rows))
        if rows is not None:
            self._family_log.succeeded("replication")
        slots = self._query(conn, "replication_slots", self._queries.slots(in_recovery))
        if slots is not None:
            self._family_log.succeeded("replication_slots")
            families.append(build_slots(slots))
        return families

    def _cached(self, conn: psycopg.Connection[Row], family: str) -> list[Metric]:
        """A family served from cache while fresh, else fetched now."""
        cached = self._cache.get(family)
        if cached is not None and self._clock() - cached.fetched_at < self._cfg.cache_interval:
            return cached.families
        return self._fetch(conn, family)

    def _fetch(self, conn: psycopg.Connection[Row], family: str) -> list[Metric]:
        """Fetch a cached family into the cache; empty when it is left out."""
        self._cache.pop(family, None)
        fetched_at = self._clock()
        families = self._fetchers[family](conn)
        if families is None:
            return []
        self._family_log.succeeded(family)
        self._cache[family] = _Cached(fetched_at, families)
        return families

    # -- refreshing the cache between scrapes

    def _due(self, ahead: float) -> list[str]:
        """Cached families that will have expired ahead seconds from now."""
        now = self._clock()
        interval = self._cfg.cache_interval
        return [name for name, c in self._cache.items() if now + ahead - c.fetched_at >= interval]

    def _schedule_refresh(self) -> None:
        """Ask for a background refresh of what would expire before the next scrape.

        Re-reading sizes, statements and tables of a large database takes hundreds of
        milliseconds; done right after a scrape, on the same connection, it is over long
        before the next one, which then finds a fresh cache instead of paying for it.
        """
        if self._closed or self._cfg.cache_interval <= 0 or self._gap <= 0:
            return
        if not self._due(ahead=1.5 * self._gap):
            return
        if self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop,
                                               name="postgres-refresh", daemon=True)
            self._refresher.start()
        self._refresh_idle.clear()
        self._refresh_wanted.set()

    def _refresh_loop(self) -> None:
        while True:
            self._refresh_wanted.wait()
            self._refresh_wanted.clear()
            if self._closed:
                return
            try:
                if self._lock.acquire(timeout=self._budget):
                    try:
                        self._refresh()
                    finally:
                        self._lock.release()
            finally:
                self._refresh_idle.set()

    def _refresh(self) -> None:
        """Refresh due families over the open connection, under the same deadline rule."""
        conn = self._conn
        if self._closed or conn is None or conn.closed or conn.broken:
            return  # the next scrape connects (and fetches) itself
        due = self._due(ahead=1.5 * self._gap)
        if not due:
            return
        self._watchdog.arm(conn.pgconn.socket, self._clock() + self._budget)
        try:
            for family in due:
                self._fetch(conn, family)
        except _ConnectionLostError as exc:
            self._watchdog.disarm()
            self._drop()
            log.debug("background refresh failed", extra={"err": self._redact(str(exc))})
            return
        if self._watchdog.disarm():
            self._drop()

    def _database_sizes(self, conn: psycopg.Connection[Row]) -> list[Metric] | None:
        rows = self._query(conn, "database_size", DATABASE_SIZE_SQL)
        return None if rows is None else [build_database_sizes(rows)]

    def _statements(self, conn: psycopg.Connection[Row]) -> list[Metric] | None:
        found = self._query(conn, "statements", STATEMENTS_EXTENSION_SQL)
        if found is None:
            return None
        if not found:
            self._family_log.note(
                "statements",
                f"pg_stat_statements is not installed in database {self._cfg.dbname}; "
                "statement metrics left out",
            )
            return None
        schema, extversion = found[0]
        top_sql, total_sql = statements_sql(schema, extversion, self._cfg.top_statements)
        top = self._query(conn, "statements", top_sql) if self._cfg.top_statements else []
        totals = self._query(conn, "statements", total_sql)
        if top is None or not totals:
            return None
        return build_statements(top, totals[0])

    def _tables(self, conn: psycopg.Connection[Row]) -> list[Metric] | None:
        limit = self._cfg.top_tables
        if not limit:
            count = self._query(conn, "tables", TABLES_COUNT_SQL)
            return None if not count else build_tables([], count[0][0])
        rows = self._query(conn, "tables", self._queries.tables,
                           {"limit": limit, "candidates": 2 * limit})
        if rows is None:
            return None
        # The count rides along on every row; no row means no table.
        return build_tables([r[:9] for r in rows], rows[0][9] if rows else 0)
