"""The postgres collector's SQL, chosen by server version."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

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
