"""The postgres collector's families: rows in, metric families out, no server needed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.families import counter, gauge

Row = tuple[Any, ...]

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

# (metric name, pg_stat_database column, help): the order of every metric table
DATABASE_COUNTERS = (
    ("qatoolbox_postgres_transactions_committed_total", "xact_commit",
     "Transactions committed in the database."),
    ("qatoolbox_postgres_transactions_rolled_back_total", "xact_rollback",
     "Transactions rolled back in the database."),
    ("qatoolbox_postgres_blocks_read_total", "blks_read", "Disk blocks read in the database."),
    ("qatoolbox_postgres_blocks_hit_total", "blks_hit", "Disk blocks found in the buffer cache."),
    ("qatoolbox_postgres_rows_returned_total", "tup_returned",
     "Rows returned by queries (sequential scans)."),
    ("qatoolbox_postgres_rows_fetched_total", "tup_fetched",
     "Rows fetched by queries (index scans)."),
    ("qatoolbox_postgres_rows_inserted_total", "tup_inserted", "Rows inserted."),
    ("qatoolbox_postgres_rows_updated_total", "tup_updated", "Rows updated."),
    ("qatoolbox_postgres_rows_deleted_total", "tup_deleted", "Rows deleted."),
    ("qatoolbox_postgres_deadlocks_total", "deadlocks", "Deadlocks detected in the database."),
    ("qatoolbox_postgres_temp_bytes_total", "temp_bytes",
     "Bytes written to temporary files by queries."),
    ("qatoolbox_postgres_conflicts_total", "conflicts",
     "Queries cancelled by conflicts with recovery (replicas)."),
)


_WHITESPACE = re.compile(r"\s+")


def normalise_query(text: str | None) -> str:
    """One line, whitespace collapsed, cut to QUERY_TEXT_MAX characters."""
    return _WHITESPACE.sub(" ", text or "").strip()[:QUERY_TEXT_MAX]


def _num(value: Any) -> float:
    """A numeric column (int, Decimal, float or NULL) as a float, NULL as 0."""
    return 0.0 if value is None else float(value)


def build_up(up: bool) -> GaugeMetricFamily:
    """qatoolbox_postgres_up."""
    family = gauge("qatoolbox_postgres_up",
                   "Whether the last attempt to query PostgreSQL succeeded (1) or not (0).")
    family.add_metric([], 1.0 if up else 0.0)
    return family


def build_settings(row: Row) -> list[Metric]:
    """Version, start time, recovery state and connection limits from SETTINGS_SQL's row."""
    version, started, in_recovery, max_connections, reserved = row
    info = gauge("qatoolbox_postgres_version_info",
                 "PostgreSQL server version; always 1.", ["version"])
    info.add_metric([str(version).split(" ")[0]], 1.0)
    start = gauge("qatoolbox_postgres_start_time_seconds",
                  "Unix time the PostgreSQL server started.")
    start.add_metric([], _num(started))
    recovery = gauge("qatoolbox_postgres_in_recovery",
                     "Whether the server is a replica in recovery (1) or not (0).")
    recovery.add_metric([], 1.0 if in_recovery else 0.0)
    limit = gauge("qatoolbox_postgres_max_connections", "The server's max_connections setting.")
    limit.add_metric([], _num(max_connections))
    kept = gauge("qatoolbox_postgres_reserved_connections",
                  "Connection slots only superusers (and pg_use_reserved_connections) may use.")
    kept.add_metric([], _num(reserved))
    return [info, start, recovery, limit, kept]


def build_wraparound(rows: Iterable[Row]) -> list[Metric]:
    """Transaction ID and MultiXact age per database from WRAPAROUND_SQL rows."""
    xid = gauge("qatoolbox_postgres_database_xid_age",
                 "Transactions since the database's oldest unfrozen transaction ID "
                 "(age(datfrozenxid)).", ["datname"])
    mxid = gauge("qatoolbox_postgres_database_multixact_age",
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
    done = counter("qatoolbox_postgres_wal_archived_total", "WAL files archived successfully.")
    done.add_metric([], _num(archived))
    failures = counter("qatoolbox_postgres_wal_archive_failed_total",
                       "Failed attempts to archive a WAL file.")
    failures.add_metric([], _num(failed))
    families += [done, failures]
    if last_archived is not None:
        when = gauge("qatoolbox_postgres_wal_last_archived_timestamp_seconds",
                      "Unix time the last WAL file was archived successfully.")
        when.add_metric([], _num(last_archived))
        families.append(when)
    if last_failed is not None:
        when = gauge("qatoolbox_postgres_wal_last_archive_failure_timestamp_seconds",
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
    conn_family = gauge("qatoolbox_postgres_connections",
                        "Client connections by database and state.",
                         ["datname", "state"])
    for (db, state), value in sorted(connections.items()):
        conn_family.add_metric([db, state], value)
    families: list[Metric] = [conn_family]
    specs = (
        ("qatoolbox_postgres_slow_queries",
         "Active queries running longer than the slow query threshold."),
        ("qatoolbox_postgres_longest_query_seconds",
         "Age of the longest-running active query (0 when none)."),
        ("qatoolbox_postgres_oldest_transaction_seconds",
         "Age of the oldest open transaction (0 when none)."),
        ("qatoolbox_postgres_oldest_idle_in_transaction_seconds",
         "Time the longest idle-in-transaction session has been idle (0 when none)."),
        ("qatoolbox_postgres_lock_waits", "Backends waiting for a lock."),
    )
    for i, (name, doc) in enumerate(specs):
        family = gauge(name, doc, ["datname"])
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
    family = gauge("qatoolbox_postgres_locks", "Locks held or awaited, by database and lock mode.",
                    ["datname", "mode"])
    for (db, mode), value in sorted(counts.items()):
        family.add_metric([db, mode], value)
    return family


def build_databases(rows: Iterable[Row]) -> list[Metric]:
    """pg_stat_database counters from DATABASE_SQL rows."""
    families = [counter(name, doc, ["datname"]) for name, _, doc in DATABASE_COUNTERS]
    for row in rows:
        for family, value in zip(families, row[1:], strict=True):
            family.add_metric([row[0]], _num(value))
    return list(families)


def build_database_sizes(rows: Iterable[Row]) -> GaugeMetricFamily:
    """Database sizes from DATABASE_SIZE_SQL rows."""
    family = gauge("qatoolbox_postgres_database_size_bytes",
                   "Disk space used by the database.", ["datname"])
    for datname, size in rows:
        if size is not None:
            family.add_metric([datname], _num(size))
    return family


def build_checkpoints(row: Row) -> list[Metric]:
    """Checkpoint and buffer-write counters from the version's checkpoint query row."""
    timed, requested, by_checkpoint, by_bgwriter, by_backend = row
    timed_family = counter("qatoolbox_postgres_checkpoints_timed_total",
                            "Checkpoints started because checkpoint_timeout elapsed.")
    timed_family.add_metric([], _num(timed))
    requested_family = counter("qatoolbox_postgres_checkpoints_requested_total",
                                "Checkpoints requested (WAL volume, CHECKPOINT, shutdown).")
    requested_family.add_metric([], _num(requested))
    written = counter("qatoolbox_postgres_buffers_written_total",
                       "Shared buffers written, by who wrote them.", ["by"])
    written.add_metric(["checkpoint"], _num(by_checkpoint))
    written.add_metric(["bgwriter"], _num(by_bgwriter))
    written.add_metric(["backend"], _num(by_backend))
    return [timed_family, requested_family, written]


def build_replica_lag(value: Any) -> list[Metric]:
    """Replay lag of a replica (absent when it has never replayed a transaction)."""
    if value is None:
        return []
    family = gauge("qatoolbox_postgres_replication_lag_seconds",
                    "Time since the last transaction replayed on this replica (0 when caught up).")
    family.add_metric([], max(0.0, _num(value)))
    return [family]


def build_primary_lag(rows: Iterable[Row]) -> GaugeMetricFamily:
    """Per-replica lag in bytes on a primary."""
    family = gauge("qatoolbox_postgres_replica_lag_bytes",
                   "WAL bytes a connected replica has yet to replay.",
                    ["application_name"])
    for name, lag in rows:
        if lag is not None:
            family.add_metric([name], max(0.0, _num(lag)))
    return family


def build_slots(rows: Iterable[Row]) -> GaugeMetricFamily:
    """WAL retained by each replication slot."""
    family = gauge("qatoolbox_postgres_replication_slot_retained_bytes",
                    "WAL bytes the replication slot keeps from being removed.", ["slot_name"])
    for name, retained in rows:
        if retained is not None:
            family.add_metric([name], max(0.0, _num(retained)))
    return family


def build_statements(top: Iterable[Row], totals: Row) -> list[Metric]:
    """Top-N statement counters, their texts, and the totals over every statement."""
    labels = ["queryid", "datname", "user"]
    calls = counter("qatoolbox_postgres_statement_calls_total",
                    "Times the statement was executed.", labels)
    seconds = counter("qatoolbox_postgres_statement_seconds_total",
                      "Time spent executing the statement.", labels)
    rows_family = counter("qatoolbox_postgres_statement_rows_total",
                          "Rows retrieved or affected by the statement.",
                           labels)
    info = gauge("qatoolbox_postgres_statement_info",
                 "Normalised text of a top statement; always 1.",
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
    tracked = gauge("qatoolbox_postgres_statements_tracked",
                    "Statements pg_stat_statements currently tracks.")
    tracked.add_metric([], _num(count))
    total_calls = counter("qatoolbox_postgres_statements_calls_total",
                           "Executions of all tracked statements, top N or not.")
    total_calls.add_metric([], _num(all_calls))
    total_seconds = counter("qatoolbox_postgres_statements_seconds_total",
                             "Execution time of all tracked statements, top N or not.")
    total_seconds.add_metric([], _num(all_seconds))
    total_rows = counter("qatoolbox_postgres_statements_rows_total",
                          "Rows retrieved or affected by all tracked statements, top N or not.")
    total_rows.add_metric([], _num(all_rows))
    return [calls, seconds, rows_family, info, tracked, total_calls, total_seconds, total_rows]


def build_tables(rows: Iterable[Row], count: Any) -> list[Metric]:
    """Per-table families for the top-N tables, and the number of user tables."""
    labels = ["schema", "table"]
    seq = counter("qatoolbox_postgres_table_seq_scans_total",
                  "Sequential scans of the table.", labels)
    idx = counter("qatoolbox_postgres_table_index_scans_total", "Index scans of the table.", labels)
    live = gauge("qatoolbox_postgres_table_live_rows", "Estimated live rows in the table.", labels)
    dead = gauge("qatoolbox_postgres_table_dead_rows", "Estimated dead rows in the table.", labels)
    size = gauge("qatoolbox_postgres_table_size_bytes",
                 "Disk space of the table with its indexes and TOAST.",
                  labels)
    vacuum = gauge("qatoolbox_postgres_table_last_autovacuum_timestamp_seconds",
                    "Unix time autovacuum last processed the table.", labels)
    analyze = gauge("qatoolbox_postgres_table_last_autoanalyze_timestamp_seconds",
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
    tables = gauge("qatoolbox_postgres_tables",
                   "User tables in the connected database (all, not just the top N).")
    tables.add_metric([], _num(count))
    return [seq, idx, live, dead, size, vacuum, analyze, tables]


def build_connection_error(reason: str | None) -> list[Metric]:
    """qatoolbox_postgres_connection_error for the current reason (none while up)."""
    if reason is None:
        return []
    family = gauge("qatoolbox_postgres_connection_error",
                   "Why the last attempt to reach PostgreSQL failed, while up is 0; always 1.",
                   ["reason"])
    family.add_metric([reason], 1.0)
    return [family]
