"""PostgreSQL collector: activity, locks, throughput, replication, statements and tables."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client.core import Metric
from psycopg import sql

from exporter import pgconn
from exporter.collectors.postgres_config import PostgresConfig
from exporter.collectors.postgres_families import (
    build_activity,
    build_archiver,
    build_checkpoints,
    build_connection_error,
    build_database_sizes,
    build_databases,
    build_locks,
    build_primary_lag,
    build_replica_lag,
    build_settings,
    build_slots,
    build_statements,
    build_tables,
    build_up,
    build_wraparound,
)
from exporter.collectors.postgres_sql import (
    ACTIVITY_SQL,
    ARCHIVER_SQL,
    DATABASE_SIZE_SQL,
    DATABASE_SQL,
    LOCKS_SQL,
    PRIMARY_LAG_SQL,
    REPLICA_LAG_SQL,
    SETTINGS_SQL,
    STATEMENTS_EXTENSION_SQL,
    TABLES_COUNT_SQL,
    WRAPAROUND_SQL,
    queries_for,
    statements_sql,
)
from exporter.logs import OnChange

log = logging.getLogger("exporter.collectors.postgres")

Row = tuple[Any, ...]
Query = str | sql.Composed

APPLICATION_NAME = "qatoolbox-exporter"
# The share of the runner's budget a collection may take before its connection is cut: the
# rest leaves the runner time to take the result (and the failure path to answer) in budget.
DEADLINE_SHARE = 0.8

class PostgresError(Exception):
    """Why a collection failed, with any password already removed from the message, and
    which of pgconn.REASONS it is."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


class _ConnectionLostError(Exception):
    """Raised inside a collection when the connection itself failed."""


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
        self._watchdog = pgconn.Watchdog(clock)
        # A family's failure (or an expected absence) is logged once, again when it changes.
        self._family_log = OnChange(repeat_interval=math.inf, clock=clock)
        # Why the last collection failed (pgconn.REASONS); None after a success.
        self._reason: str | None = None
        self._collecting = False
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
            self._reason = "timeout"
            raise PostgresError("another collection is still running", "timeout")
        self._collecting = True
        try:
            families = self._collect(deadline)
            self._reason = None
            self._schedule_refresh()  # under the lock: it reads the cache
        except PostgresError as exc:
            self._reason = exc.reason
            raise
        finally:
            self._collecting = False
            self._lock.release()
        return families

    def wait_refreshed(self, timeout: float) -> bool:
        """Wait until no background refresh is pending (for tests and benchmarks)."""
        return self._refresh_idle.wait(timeout)

    def failure_metrics(self) -> list[Metric]:
        """Only up 0 and why: the other families are absent rather than stale."""
        # Still collecting: the runner gave up on a collection the server is not answering.
        reason = "timeout" if self._collecting else (self._reason or "other")
        return [build_up(False), *build_connection_error(reason)]

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
            raise PostgresError("collector closed", "other")
        if self._clock() >= deadline:
            # The lock was held that long by a background refresh: don't cut a good connection.
            raise PostgresError("no time left after waiting for the cache refresh", "timeout")
        conn, reused = self._connection(deadline)
        try:
            return self._attempt(conn, deadline)
        except _ConnectionLostError as exc:
            if not reused:
                raise self._lost(exc) from None
        # A kept connection can die between scrapes (server restart, idle_session_timeout):
        # that says nothing about the server now, so one more try on a fresh connection.
        conn, _ = self._connection(deadline)
        try:
            return self._attempt(conn, deadline)
        except _ConnectionLostError as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: _ConnectionLostError) -> PostgresError:
        text = pgconn.redact(str(exc), self._cfg)
        return PostgresError(text, pgconn.reason(text))

    def _attempt(self, conn: psycopg.Connection[Row], deadline: float) -> list[Metric]:
        """All families over conn, cut at deadline; the connection is dropped if it failed."""
        watched = self._watchdog.arm(conn.pgconn.socket, deadline)
        try:
            families = self._families(conn)
        except _ConnectionLostError:
            cut = self._watchdog.disarm(watched)
            self._drop()
            if cut:
                raise PostgresError(
                    f"no answer within {self._budget:.2g}s; connection closed", "timeout"
                ) from None
            raise
        if self._watchdog.disarm(watched):
            # Cut just after the last answer: the results stand, the connection does not.
            self._drop()
        return families

    def _connection(self, deadline: float) -> tuple[psycopg.Connection[Row], bool]:
        """The open connection (and True), or a new one (and False)."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn, True
        self._drop()
        # jit off: compiling the per-table query would cost more than running it.
        options = (f"-c statement_timeout={max(1, round(self._cfg.timeout * 1000))} "
                   "-c default_transaction_read_only=on -c jit=off")
        params = pgconn.connect_params(self._cfg, APPLICATION_NAME, options,
                                       budget_left=deadline - self._clock())
        try:
            conn = pgconn.connect(params, autocommit=True)
        except psycopg.Error as exc:
            raise PostgresError(f"cannot connect: {pgconn.describe_error(exc, self._cfg)}",
                                pgconn.reason(exc)) from None
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
                log.debug("closing the connection failed",
                      extra={"err": pgconn.redact(str(exc), self._cfg)})

    def _back(self, family: str) -> None:
        if self._family_log.clear(family):
            log.info("postgres family back", extra={"family": family})

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
            error = pgconn.redact(f"{type(exc).__name__}: {exc}", self._cfg)
            if self._family_log.changed(family, error):
                log.warning("postgres family left out", extra={"family": family, "err": error})
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
            self._back("database")
            databases = [r[0] for r in rows]
            families.extend(build_databases(rows))

        rows = self._query(conn, "activity", ACTIVITY_SQL,
                           {"slow": float(self._cfg.slow_query_threshold)})
        if rows is not None:
            self._back("activity")
            families.extend(build_activity(rows, databases))

        rows = self._query(conn, "locks", LOCKS_SQL)
        if rows is not None:
            self._back("locks")
            families.append(build_locks(rows, databases))

        rows = self._query(conn, "checkpoints", self._queries.checkpoints)
        if rows:
            self._back("checkpoints")
            families.extend(build_checkpoints(rows[0]))

        rows = self._query(conn, "wraparound", WRAPAROUND_SQL)
        if rows is not None:
            self._back("wraparound")
            families.extend(build_wraparound(rows))

        rows = self._query(conn, "archiver", ARCHIVER_SQL)
        if rows:
            self._back("archiver")
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
            self._back("replication")
        slots = self._query(conn, "replication_slots", self._queries.slots(in_recovery))
        if slots is not None:
            self._back("replication_slots")
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
        self._back(family)
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
        watched = self._watchdog.arm(conn.pgconn.socket, self._clock() + self._budget)
        try:
            for family in due:
                self._fetch(conn, family)
        except _ConnectionLostError as exc:
            self._watchdog.disarm(watched)
            self._drop()
            log.debug("background refresh failed",
                      extra={"err": pgconn.redact(str(exc), self._cfg)})
            return
        if self._watchdog.disarm(watched):
            self._drop()

    def _database_sizes(self, conn: psycopg.Connection[Row]) -> list[Metric] | None:
        rows = self._query(conn, "database_size", DATABASE_SIZE_SQL)
        return None if rows is None else [build_database_sizes(rows)]

    def _statements(self, conn: psycopg.Connection[Row]) -> list[Metric] | None:
        found = self._query(conn, "statements", STATEMENTS_EXTENSION_SQL)
        if found is None:
            return None
        if not found:
            absent = (f"pg_stat_statements is not installed in database {self._cfg.dbname}; "
                      "statement metrics left out")
            if self._family_log.changed("statements", absent):
                log.info(absent, extra={"family": "statements"})
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
