"""PostgreSQL collector: SQL selection, row-to-metric builders, the collector on real servers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from exporter import pgconn
from exporter.collectors.postgres import PostgresCollector, PostgresError
from exporter.collectors.postgres_config import PostgresConfig
from exporter.collectors.postgres_families import (
    BACKEND_STATES,
    LOCK_MODES,
    build_activity,
    build_archiver,
    build_checkpoints,
    build_locks,
    build_replica_lag,
    build_settings,
    build_statements,
    build_tables,
    build_wraparound,
    normalise_query,
)
from exporter.collectors.postgres_sql import queries_for, statements_sql, statements_time_column
from exporter.config import ConfigError, Duration, Secret, load_config
from exporter.pgconn import Watchdog
from tests.harness import (
    EXPORTER_PASSWORD,
    EXPORTER_ROLE,
    PostgresServer,
    Scrape,
    _as_postgres_user,
    _chown_postgres,
    _pg_bindir,
    free_port,
    wait_for,
)

# --- helpers -----------------------------------------------------------------------------------


def render(families: list[Metric]) -> Scrape:
    """Exposition text of families, parsed (as the exporter would serve them)."""

    class _Fixed:
        def collect(self) -> list[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return Scrape(generate_latest(registry).decode())


def config_for(pg: PostgresServer, **kwargs: Any) -> PostgresConfig:
    params: dict[str, Any] = {"host": "127.0.0.1", "port": pg.port, "dbname": "postgres"}
    params.update(kwargs)
    return PostgresConfig(**params)


def exporter_config(pg: PostgresServer, dbname: str = "postgres", **kwargs: Any
                    ) -> PostgresConfig:
    """config_for the least-privilege role of docs/reliability.md, created on pg (with the
    doc's SQL, read from the doc) for dbname."""
    pg.create_exporter_role(dbname)
    return config_for(pg, dbname=dbname, user=EXPORTER_ROLE,
                      password=Secret(EXPORTER_PASSWORD), **kwargs)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def collector(cfg: PostgresConfig, refusals_expected: bool = False,
              **kwargs: Any) -> Iterator[PostgresCollector]:
    """A collector, closed at the end. Unless refusals_expected, a family the server refused
    (permission denied: the role lacks a privilege the collector needs) fails the test, since
    the collector itself only leaves the family out and logs a warning."""
    c = PostgresCollector(cfg, **kwargs)
    warnings = _Warnings()
    logger = logging.getLogger("exporter.collectors.postgres")
    logger.addHandler(warnings)
    try:
        yield c
    finally:
        logger.removeHandler(warnings)
        c.close()
    refused = [f"{r.__dict__.get('family')}: {r.__dict__.get('err')}" for r in warnings.records
               if "permission denied" in str(r.__dict__.get("err", ""))]
    assert refusals_expected or not refused, f"{cfg.user} was refused: {refused}"


def scrape(c: PostgresCollector) -> Scrape:
    return render(list(c.collect()))


@contextlib.contextmanager
def paused(pg: PostgresServer) -> Iterator[None]:
    """The postmaster and every backend stopped (the harness's pause) for the block."""
    pg.pause()
    try:
        yield
    finally:
        pg.resume()


def exporter_sessions(pg: PostgresServer) -> int:
    rows = pg.execute("SELECT count(*) FROM pg_stat_activity "
                      "WHERE application_name = 'qatoolbox-exporter'")
    return int(rows[0][0])


# --- SQL selection and pure builders ------------------------------------------------------------


def test_checkpoint_queries_follow_the_server_version() -> None:
    for version in (120000, 130012, 150010, 160004):
        q = queries_for(version)
        assert "pg_stat_bgwriter" in q.checkpoints
        assert "pg_stat_checkpointer" not in q.checkpoints
        assert "buffers_backend" in q.checkpoints
    for version in (170000, 170002, 180001):
        q = queries_for(version)
        assert "pg_stat_checkpointer" in q.checkpoints
        assert "num_timed" in q.checkpoints and "pg_stat_io" in q.checkpoints
        # Both columns were removed from pg_stat_bgwriter in 17.
        assert "buffers_backend" not in q.checkpoints
        assert "checkpoints_timed" not in q.checkpoints


def test_table_ranking_measures_never_analysed_tables_from_14() -> None:
    assert "reltuples < 0" in queries_for(140000).tables
    assert "reltuples < 0" in queries_for(170000).tables
    assert "reltuples < 0" not in queries_for(130010).tables
    for version in (120000, 150000):
        tables = queries_for(version).tables
        assert "%(limit)s" in tables and "%(candidates)s" in tables
        assert "%%" not in tables and "{" not in tables


def test_slot_position_depends_on_recovery() -> None:
    q = queries_for(150000)
    assert "pg_current_wal_lsn()" in q.slots(in_recovery=False)
    assert "pg_last_wal_receive_lsn()" in q.slots(in_recovery=True)


@pytest.mark.parametrize(
    ("extversion", "column"),
    [("1.6", "total_time"), ("1.7", "total_time"), ("1.8", "total_exec_time"),
     ("1.10", "total_exec_time"), ("1.11", "total_exec_time"), ("2.0", "total_exec_time"),
     ("weird", "total_exec_time")],
)
def test_statement_time_column_by_extension_version(extversion: str, column: str) -> None:
    assert statements_time_column(extversion) == column


def test_statements_sql_quotes_the_schema_and_bounds_the_rows() -> None:
    top, total = statements_sql('odd "schema"', "1.10", 7)
    text = top.as_string(None)
    assert '"odd ""schema""".pg_stat_statements' in text
    assert "LIMIT 7" in text and '"total_exec_time"' in text
    assert "pg_stat_statements(false)" in total.as_string(None)


def test_normalise_query() -> None:
    assert normalise_query("SELECT  a,\n\tb\nFROM t  ") == "SELECT a, b FROM t"
    assert len(normalise_query("x" * 500)) == 200
    assert normalise_query(None) == ""


def test_activity_folds_states_and_zero_fills_databases() -> None:
    rows = [
        ("app", "active", 3, 1, Decimal("7.5"), Decimal("9.0"), None, 1),
        ("app", "idle in transaction", 2, 0, None, Decimal("30.0"), Decimal("25.0"), 0),
        ("app", "", 1, 0, None, None, None, 0),  # a backend we may not see the state of
    ]
    s = render(build_activity(rows, ["app", "other"]))
    assert s.value("qatoolbox_postgres_connections", datname="app", state="active") == 3
    assert s.value("qatoolbox_postgres_connections", datname="app",
                   state="idle in transaction") == 2
    assert s.value("qatoolbox_postgres_connections", datname="app", state="unknown") == 1
    assert s.value("qatoolbox_postgres_connections", datname="app", state="idle") == 0
    for state in BACKEND_STATES:
        assert s.value("qatoolbox_postgres_connections", datname="other", state=state) == 0
    assert s.value("qatoolbox_postgres_slow_queries", datname="app") == 1
    assert s.value("qatoolbox_postgres_longest_query_seconds", datname="app") == 7.5
    assert s.value("qatoolbox_postgres_oldest_transaction_seconds", datname="app") == 30
    assert s.value("qatoolbox_postgres_oldest_idle_in_transaction_seconds", datname="app") == 25
    assert s.value("qatoolbox_postgres_lock_waits", datname="app") == 1
    assert s.value("qatoolbox_postgres_lock_waits", datname="other") == 0


def test_locks_zero_filled_and_unknown_modes_kept() -> None:
    s = render([build_locks([("app", "ShareLock", 2), ("app", "SIReadLock", 1)], ["app"])])
    assert s.value("qatoolbox_postgres_locks", datname="app", mode="ShareLock") == 2
    assert s.value("qatoolbox_postgres_locks", datname="app", mode="SIReadLock") == 1
    for mode in LOCK_MODES:
        assert s.value("qatoolbox_postgres_locks", datname="app", mode=mode) is not None


def test_checkpoints_and_replica_lag() -> None:
    s = render(build_checkpoints((5, 2, 100, 20, Decimal(3))))
    assert s.value("qatoolbox_postgres_checkpoints_timed_total") == 5
    assert s.value("qatoolbox_postgres_checkpoints_requested_total") == 2
    assert s.value("qatoolbox_postgres_buffers_written_total", by="checkpoint") == 100
    assert s.value("qatoolbox_postgres_buffers_written_total", by="bgwriter") == 20
    assert s.value("qatoolbox_postgres_buffers_written_total", by="backend") == 3
    assert build_replica_lag(None) == []
    lag = render(build_replica_lag(Decimal("1.5")))
    assert lag.value("qatoolbox_postgres_replication_lag_seconds") == 1.5


def test_settings_wraparound_and_archiver() -> None:
    s = render(build_settings(("15.10 (Debian 15.10-1)", Decimal("1700000000.5"), False, 100, 3)))
    assert s.value("qatoolbox_postgres_version_info", version="15.10") == 1
    assert s.value("qatoolbox_postgres_max_connections") == 100
    assert s.value("qatoolbox_postgres_reserved_connections") == 3
    s = render(build_wraparound([("postgres", 1234, 1), ("qatoolbox", 210_000_000, 0)]))
    assert s.value("qatoolbox_postgres_database_xid_age", datname="qatoolbox") == 210_000_000
    assert s.value("qatoolbox_postgres_database_xid_age", datname="postgres") == 1234
    assert s.value("qatoolbox_postgres_database_multixact_age", datname="postgres") == 1
    # Never archived, never failed: counters at 0 and no timestamps (not a 1970 one).
    s = render(build_archiver((0, 0, None, None)))
    assert s.value("qatoolbox_postgres_wal_archived_total") == 0
    assert s.value("qatoolbox_postgres_wal_archive_failed_total") == 0
    assert not s.series("qatoolbox_postgres_wal_last_archived_timestamp_seconds")
    assert not s.series("qatoolbox_postgres_wal_last_archive_failure_timestamp_seconds")
    s = render(build_archiver((12, 3, Decimal("1700000100.25"), Decimal("1700000200"))))
    assert s.value("qatoolbox_postgres_wal_archived_total") == 12
    assert s.value("qatoolbox_postgres_wal_archive_failed_total") == 3
    assert s.value("qatoolbox_postgres_wal_last_archived_timestamp_seconds") == 1700000100.25
    assert s.value("qatoolbox_postgres_wal_last_archive_failure_timestamp_seconds") == 1700000200


def test_statements_one_text_per_queryid() -> None:
    top = [("42", "app", "alice", 10, Decimal("2.5"), 100, "SELECT\n  1"),
           ("42", "app", "bob", 1, Decimal("0.5"), 1, "SELECT\n  1"),
           ("7", "app", "alice", 3, Decimal("0.1"), 3, "SELECT 2")]
    s = render(build_statements(top, (50, 1000, Decimal("9.0"), 2000)))
    assert s.value("qatoolbox_postgres_statement_calls_total", queryid="42", datname="app",
                   user="bob") == 1
    assert s.value("qatoolbox_postgres_statement_info", queryid="42", query="SELECT 1") == 1
    assert len(s.series("qatoolbox_postgres_statement_info")) == 2
    assert s.value("qatoolbox_postgres_statements_tracked") == 50
    assert s.value("qatoolbox_postgres_statements_seconds_total") == 9


def test_tables_skip_missing_timestamps() -> None:
    rows = [("public", "a", 1, 2, 3, 4, 8192, None, Decimal("1700000000.5"))]
    s = render(build_tables(rows, 12))
    assert s.value("qatoolbox_postgres_table_size_bytes", schema="public", table="a") == 8192
    assert s.value("qatoolbox_postgres_table_last_autovacuum_timestamp_seconds",
                   schema="public", table="a") is None
    assert s.value("qatoolbox_postgres_table_last_autoanalyze_timestamp_seconds",
                   schema="public", table="a") == 1700000000.5
    assert s.value("qatoolbox_postgres_tables") == 12


def test_failure_metrics_are_only_up_zero_and_the_reason() -> None:
    c = PostgresCollector(PostgresConfig(host="127.0.0.1", port=free_port()))
    with pytest.raises(PostgresError, match="cannot connect"):
        c.collect()
    s = render(c.failure_metrics())
    assert s.series() == [("qatoolbox_postgres_up", {}),
                          ("qatoolbox_postgres_connection_error", {"reason": "connection_refused"})]
    assert s.value("qatoolbox_postgres_up") == 0
    assert s.value("qatoolbox_postgres_connection_error", reason="connection_refused") == 1


# --- configuration ------------------------------------------------------------------------------


def test_config_defaults_and_environment() -> None:
    env = {"DB_HOST": "db", "DB_PORT": "6543", "DB_NAME": "qa", "DB_USER": "u",
           "DB_PASSWORD": "pw"}
    pg = load_config(None, env, {"postgres": True}).postgres
    assert (pg.host, pg.port, pg.dbname, pg.user, pg.password) == ("db", 6543, "qa", "u", "pw")
    durations = (pg.slow_query_threshold, pg.cache_interval, pg.timeout)
    assert tuple(float(d) for d in durations) == (5.0, 60.0, 2.0)
    assert pg.top_tables == 50 and pg.top_statements == 50


@pytest.mark.parametrize(
    ("section", "key"),
    [({"top_tables": -1}, "postgres.top_tables"),
     ({"top_statements": 5000}, "postgres.top_statements"),
     ({"cache_interval": "2d"}, "postgres.cache_interval"),
     ({"slow_query_threshold": "0s"}, "postgres.slow_query_threshold"),
     ({"timeout": "0s"}, "postgres.timeout"),
     ({"connect_timeout": "500ms"}, "postgres.connect_timeout"),
     ({"sslmode": "sometimes"}, "postgres.sslmode"),
     ({"port": 70000}, "postgres.port"),
     ({"top_tables": "many"}, "postgres.top_tables")],
)
def test_config_rejects_out_of_range(workdir: Any, section: dict[str, Any], key: str) -> None:
    import yaml

    path = workdir / "c.yml"
    path.write_text(yaml.safe_dump({"postgres": section}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {}, {"postgres": True})
    assert any(p.startswith(key + ":") for p in info.value.problems), info.value.problems


# --- the watchdog --------------------------------------------------------------------------------


def test_watchdog_cuts_a_blocked_read_and_reports_it() -> None:
    left, right = socket.socketpair()
    watchdog = Watchdog()
    try:
        watchdog.arm(left.fileno(), time.monotonic() + 0.2)
        started = time.monotonic()
        assert left.recv(10) == b""  # blocked until the watchdog shut the socket down
        assert time.monotonic() - started < 5
        assert watchdog.disarm() is True
        assert left.fileno() >= 0  # shut down, not closed: the owner closes it
    finally:
        left.close()
        right.close()
    left, right = socket.socketpair()
    try:
        # Disarmed in time: nothing is cut.
        watchdog.arm(left.fileno(), time.monotonic() + 0.2)
        assert watchdog.disarm() is False
        time.sleep(0.3)
        left.setblocking(False)
        with pytest.raises(BlockingIOError):
            left.recv(10)  # still open (would block, not EOF)
    finally:
        watchdog.stop()
        left.close()
        right.close()


# --- the collector on real servers ---------------------------------------------------------------


def test_values_match_pg_stat_database_after_a_workload(
    pg_factory: Callable[..., PostgresServer],
) -> None:
    pg = pg_factory(settings={"autovacuum": "off"})
    pg.execute("CREATE DATABASE work")
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, v int)", dbname="work")
    with collector(exporter_config(pg, cache_interval=0)) as c:
        before = scrape(c)
        with pg.connect("work") as conn:
            for i in range(40):
                conn.execute("INSERT INTO items VALUES (%s, 0)", (i,))
            conn.execute("UPDATE items SET v = 1 WHERE id < 10")
            conn.execute("DELETE FROM items WHERE id >= 30")
            for i in range(5):
                with contextlib.suppress(psycopg.errors.UniqueViolation):
                    conn.execute("INSERT INTO items VALUES (%s, 0)", (i,))  # rolled back
        columns = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")
        query = (f"SELECT {', '.join(columns)} FROM pg_stat_database WHERE datname = 'work'")

        # The workload's backend reports its counters as it exits: wait until they settle.
        def settled() -> bool:
            return bool(pg.execute(query)[0][1] >= 5 and pg.execute(query)[0][3] == 10)

        wait_for(settled, 15, "the workload's statistics")
        direct = dict(zip(columns, pg.execute(query)[0], strict=True))
        after = scrape(c)
    names = {"xact_commit": "transactions_committed", "xact_rollback": "transactions_rolled_back",
             "tup_inserted": "rows_inserted", "tup_updated": "rows_updated",
             "tup_deleted": "rows_deleted"}
    for column, name in names.items():
        value = after.value(f"qatoolbox_postgres_{name}_total", datname="work")
        assert value == direct[column], (name, value, direct[column])
    delta = {name: (after.value(f"qatoolbox_postgres_{name}_total", datname="work") or 0)
             - (before.value(f"qatoolbox_postgres_{name}_total", datname="work") or 0)
             for name in names.values()}
    assert delta["transactions_committed"] >= 42
    assert delta["transactions_rolled_back"] == 5
    assert delta["rows_inserted"] == 45  # rolled-back inserts count too
    assert delta["rows_updated"] == 10
    assert delta["rows_deleted"] == 10
    assert after.value("qatoolbox_postgres_up") == 1
    assert after.value("qatoolbox_postgres_in_recovery") == 0
    assert after.value("qatoolbox_postgres_max_connections") == 100
    version = pg.execute("SHOW server_version")[0][0].split(" ")[0]
    assert after.value("qatoolbox_postgres_version_info", version=version) == 1
    size = pg.execute("SELECT pg_database_size('work')")[0][0]
    assert after.value("qatoolbox_postgres_database_size_bytes", datname="work") == size
    assert after.value("qatoolbox_postgres_checkpoints_timed_total") is not None


def test_slow_query_lock_wait_and_idle_in_transaction(postgres: PostgresServer) -> None:
    pg = postgres
    for db in ("slowdb", "lockdb"):
        pg.execute(f"CREATE DATABASE {db}")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0)",
               dbname="lockdb")
    sleeper = pg.connect("slowdb")
    holder = pg.connect("lockdb")
    waiter = pg.connect("lockdb")
    threads: list[threading.Thread] = []
    try:
        sleep_thread = threading.Thread(target=sleeper.execute, args=("SELECT pg_sleep(8)",))
        sleep_thread.start()
        threads.append(sleep_thread)
        started = time.monotonic()
        holder.execute("BEGIN")
        holder.execute("UPDATE t SET v = 1 WHERE id = 1")  # now idle in transaction
        wait_thread = threading.Thread(target=waiter.execute,
                                       args=("UPDATE t SET v = 2 WHERE id = 1",))
        wait_thread.start()
        threads.append(wait_thread)
        with collector(exporter_config(pg)) as c:
            wait_for(lambda: scrape(c).value("qatoolbox_postgres_lock_waits",
                                             datname="lockdb") == 1, 10, "the lock wait")
            time.sleep(max(0.0, 5.5 - (time.monotonic() - started)))
            s = scrape(c)
            # Only the pg_sleep has been running for more than 5 s.
            assert s.value("qatoolbox_postgres_slow_queries", datname="slowdb") == 1
            assert (s.value("qatoolbox_postgres_longest_query_seconds", datname="slowdb")
                    or 0) >= 5
            assert s.value("qatoolbox_postgres_connections", datname="slowdb",
                           state="active") == 1
            assert s.value("qatoolbox_postgres_lock_waits", datname="lockdb") == 1
            assert s.value("qatoolbox_postgres_lock_waits", datname="slowdb") == 0
            assert s.value("qatoolbox_postgres_connections", datname="lockdb",
                           state="idle in transaction") == 1
            idle = s.value("qatoolbox_postgres_oldest_idle_in_transaction_seconds",
                           datname="lockdb")
            assert idle is not None and 1 < idle < 60
            assert (s.value("qatoolbox_postgres_oldest_transaction_seconds", datname="lockdb")
                    or 0) >= idle
            # The waiter awaits the holder's transaction id in ShareLock mode.
            assert (s.value("qatoolbox_postgres_locks", datname="lockdb", mode="ShareLock")
                    or 0) >= 1
            # The collector's own backend is left out of the activity.
            assert s.value("qatoolbox_postgres_connections", datname="postgres",
                           state="active") == 0
            holder.execute("ROLLBACK")
            wait_thread.join(10)
            s = scrape(c)
            assert s.value("qatoolbox_postgres_lock_waits", datname="lockdb") == 0
            assert s.value("qatoolbox_postgres_oldest_idle_in_transaction_seconds",
                           datname="lockdb") == 0
    finally:
        with contextlib.suppress(psycopg.Error):
            holder.execute("ROLLBACK")
        for t in threads:
            t.join(15)
        for conn in (sleeper, holder, waiter):
            conn.close()


def test_pg_stat_statements_top_n_and_totals(pg_factory: Callable[..., PostgresServer]) -> None:
    pg = pg_factory(settings={"shared_preload_libraries": "pg_stat_statements"})
    pg.execute("CREATE DATABASE app")
    pg.execute("CREATE EXTENSION pg_stat_statements", dbname="app")
    with pg.connect("app") as conn:
        conn.execute("SELECT pg_sleep(0.3)::text")
        conn.execute("SELECT 1 FROM pg_sleep(0.2)")
        conn.execute("SELECT count(*) FROM pg_sleep(0.1)")
        for i in range(30):
            conn.execute(f"SELECT {i} + 1 AS n{i % 10}")  # ten cheap statements
    top_query = """
        SELECT queryid::text, (SELECT datname FROM pg_database WHERE oid = dbid),
               sum(calls), sum(total_exec_time) / 1000
        FROM pg_stat_statements WHERE queryid IS NOT NULL
        GROUP BY queryid, dbid, userid ORDER BY 4 DESC LIMIT 3"""
    totals_query = "SELECT count(*), sum(calls) FROM pg_stat_statements"
    with collector(exporter_config(pg, "app", top_statements=3)) as c:
        before = pg.execute(totals_query, dbname="app")[0]
        s = scrape(c)
        after = pg.execute(totals_query, dbname="app")[0]
        expected = pg.execute(top_query, dbname="app")
    calls = s.series("qatoolbox_postgres_statement_calls_total")
    assert len(calls) == 3
    got = {labels["queryid"] for _, labels in calls}
    assert got == {row[0] for row in expected}
    for queryid, datname, n_calls, seconds in expected:
        # pg_stat_statements covers the cluster: CREATE DATABASE app ran in postgres.
        labels = {"queryid": queryid, "datname": datname, "user": "postgres"}
        assert s.value("qatoolbox_postgres_statement_calls_total", **labels) == n_calls
        assert s.value("qatoolbox_postgres_statement_seconds_total",
                       **labels) == pytest.approx(float(seconds))
    texts = {labels["query"] for _, labels in s.series("qatoolbox_postgres_statement_info")}
    assert "SELECT pg_sleep($1)::text" in texts
    tracked = s.value("qatoolbox_postgres_statements_tracked") or 0
    assert before[0] <= tracked <= after[0]
    total_calls = s.value("qatoolbox_postgres_statements_calls_total") or 0
    assert before[1] <= total_calls <= after[1]
    assert total_calls >= 33
    top_seconds = sum(float(row[3]) for row in expected)
    assert (s.value("qatoolbox_postgres_statements_seconds_total") or 0) >= top_seconds


def test_non_superuser_with_pg_monitor(pg_factory: Callable[..., PostgresServer],
                                       caplog: pytest.LogCaptureFixture) -> None:
    pg = pg_factory(settings={"shared_preload_libraries": "pg_stat_statements"})
    pg.execute("CREATE EXTENSION pg_stat_statements")
    pg.execute("CREATE TABLE visible (id int)")
    pg.execute("SELECT pg_create_physical_replication_slot('standby1', true)")
    with pg.connect() as other:  # another user's activity must be visible too
        other.execute("BEGIN")
        other.execute("SELECT 1")
        # The role of docs/reliability.md, from the doc: pg_monitor and nothing of the tables.
        cfg = exporter_config(pg)
        with caplog.at_level(logging.INFO, "exporter.collectors.postgres"), collector(cfg) as c:
            s = scrape(c)
        other.execute("ROLLBACK")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert s.value("qatoolbox_postgres_up") == 1
    assert s.value("qatoolbox_postgres_connections", datname="postgres",
                   state="idle in transaction") == 1
    for family in ("database_size_bytes", "statement_calls_total", "table_size_bytes",
                   "checkpoints_timed_total", "locks", "replication_slot_retained_bytes"):
        assert s.series(f"qatoolbox_postgres_{family}"), family
    assert s.value("qatoolbox_postgres_tables") == 1
    assert (s.value("qatoolbox_postgres_replication_slot_retained_bytes",
                    slot_name="standby1") or 0) > 0
    # The superuser's statements are visible with their text to a pg_monitor member.
    texts = {lbl["query"] for _, lbl in s.series("qatoolbox_postgres_statement_info")}
    assert "CREATE TABLE visible (id int)" in texts


def test_a_family_that_fails_is_left_out_and_logged_once(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture,
) -> None:
    pg = postgres
    # The documented role, refused one view (pg_monitor grants nothing on it beyond PUBLIC's).
    cfg = exporter_config(pg, cache_interval=0)
    pg.execute("REVOKE SELECT ON pg_catalog.pg_stat_bgwriter FROM PUBLIC")
    with caplog.at_level(logging.INFO, "exporter.collectors.postgres"), \
            collector(cfg, refusals_expected=True) as c:
        first, second = scrape(c), scrape(c)
        pg.execute("GRANT SELECT ON pg_catalog.pg_stat_bgwriter TO PUBLIC")
        third = scrape(c)
    for s in (first, second):
        assert s.value("qatoolbox_postgres_up") == 1
        assert s.value("qatoolbox_postgres_checkpoints_timed_total") is None
        assert s.series("qatoolbox_postgres_transactions_committed_total")
        assert s.series("qatoolbox_postgres_connections")
        # Not installed: absent.
        assert not s.series("qatoolbox_postgres_statement")
    assert third.value("qatoolbox_postgres_checkpoints_timed_total") is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [getattr(r, "family", None) for r in warnings] == ["checkpoints"]
    assert "permission denied" in getattr(warnings[0], "err", "")
    notes = [r for r in caplog.records if "pg_stat_statements is not installed" in r.getMessage()]
    assert len(notes) == 1
    assert any(r.getMessage() == "postgres family back" for r in caplog.records)


def test_statement_timeout_leaves_one_family_out(postgres: PostgresServer) -> None:
    pg = postgres
    pg.execute("CREATE TABLE busy (id int)")
    cfg = exporter_config(pg, timeout=1.0, cache_interval=0)
    with pg.connect() as locker, collector(cfg) as c:
        # An ALTER TABLE in progress: sizing the table has to wait for its lock.
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        s = scrape(c)
        assert s.value("qatoolbox_postgres_up") == 1
        assert not s.series("qatoolbox_postgres_table_")
        assert s.series("qatoolbox_postgres_transactions_committed_total")
        locker.execute("ROLLBACK")
        # The same connection, still good (retried: a loaded machine may be slow).
        wait_for(lambda: scrape(c).value("qatoolbox_postgres_table_size_bytes",
                                         schema="public", table="busy") == 0, 20, "the table")
        assert exporter_sessions(pg) == 1
    wait_for(lambda: exporter_sessions(pg) == 0, 10, "the session to end")


def test_expensive_families_are_cached(postgres: PostgresServer) -> None:
    pg = postgres
    now = [1000.0]

    def count_tables(s: Scrape) -> float | None:
        return s.value("qatoolbox_postgres_tables")

    with collector(exporter_config(pg, cache_interval=60), clock=lambda: now[0]) as c:
        first = scrape(c)
        pg.execute("CREATE TABLE newer (id int); INSERT INTO newer VALUES (1)")
        wait_for(lambda: pg.execute("SELECT tup_inserted FROM pg_stat_database "
                                    "WHERE datname = 'postgres'")[0][0] > 0, 15, "statistics")
        now[0] += 10
        cached = scrape(c)  # 10 s apart: the next one comes long before expiry
        assert c.wait_refreshed(10)
        assert count_tables(cached) == 0
        now[0] += 20
        before_expiry = scrape(c)
        # 20 s apart now: the cache (30 s old, 60 s interval) would expire before the next
        # scrape (30 s old + 1.5 x 20 s), so it is refreshed in the background right away.
        assert c.wait_refreshed(10)
        pg.execute("CREATE TABLE newest (id int)")
        now[0] += 1
        refreshed = scrape(c)
        now[0] += 61
        expired = scrape(c)  # 61 s after the refresh: fetched during the scrape
    assert count_tables(first) == 0
    assert count_tables(before_expiry) == 0
    assert cached.value("qatoolbox_postgres_database_size_bytes", datname="postgres") == \
        first.value("qatoolbox_postgres_database_size_bytes", datname="postgres")
    # Cheap families are read every time.
    assert (cached.value("qatoolbox_postgres_rows_inserted_total", datname="postgres") or 0) > \
        (first.value("qatoolbox_postgres_rows_inserted_total", datname="postgres") or 0)
    assert count_tables(refreshed) == 1  # refreshed before "newest" existed, served from cache
    assert count_tables(expired) == 2


def test_top_tables_bounded_by_total_size(postgres: PostgresServer) -> None:
    pg = postgres
    pg.execute("CREATE TABLE big (id int, pad text); "
               "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g; "
               "CREATE TABLE mid (id int PRIMARY KEY); "
               "INSERT INTO mid SELECT generate_series(1, 2000); "
               "CREATE TABLE tiny (id int); CREATE SCHEMA other; CREATE TABLE other.t (id int)")
    pg.execute("DO $$ BEGIN FOR i IN 1..20 LOOP "
               "EXECUTE format('CREATE TABLE empty%s (id int PRIMARY KEY)', i); END LOOP; END $$")
    # Never analysed: the ranking falls back on live rows, once the statistics are in.
    wait_for(lambda: pg.execute("SELECT n_live_tup FROM pg_stat_user_tables "
                                "WHERE relname = 'mid'")[0][0] == 2000, 15, "statistics")
    with collector(exporter_config(pg, top_tables=2)) as c:
        s = scrape(c)
    sizes = s.series("qatoolbox_postgres_table_size_bytes")
    assert sorted(lbl["table"] for _, lbl in sizes) == ["big", "mid"]
    assert s.value("qatoolbox_postgres_tables") == 24
    expected = pg.execute("SELECT pg_total_relation_size('mid')")[0][0]
    assert s.value("qatoolbox_postgres_table_size_bytes", schema="public", table="mid") == expected
    pg.execute("ANALYZE")
    with collector(exporter_config(pg, top_tables=1)) as c:
        s = scrape(c)
    assert [lbl["table"] for _, lbl in s.series("qatoolbox_postgres_table_size_bytes")] == ["big"]
    assert s.value("qatoolbox_postgres_table_live_rows", schema="public", table="big") == 5000


def test_server_restart_and_stop(postgres: PostgresServer) -> None:
    pg = postgres
    with collector(exporter_config(pg)) as c:
        assert scrape(c).value("qatoolbox_postgres_up") == 1
        pg.restart()
        # The kept connection died with the old server: one retry on a fresh one, still up.
        assert scrape(c).value("qatoolbox_postgres_up") == 1
        assert exporter_sessions(pg) == 1
        pg.stop()
        with pytest.raises(PostgresError, match="cannot connect"):
            c.collect()
        pg.start()
        assert scrape(c).value("qatoolbox_postgres_up") == 1


def test_paused_server_cut_at_the_deadline_then_recovered(postgres: PostgresServer) -> None:
    pg = postgres
    budget = 2.5
    with collector(exporter_config(pg), budget=budget) as c:
        scrape(c)
        threads = threading.active_count()
        with paused(pg):
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(PostgresError):
                    c.collect()
                assert time.monotonic() - started < budget + 1
                assert threading.active_count() == threads
        wait_for(lambda: scrape(c).value("qatoolbox_postgres_up") == 1, 15, "recovery")
        # The backend of the connection cut during the pause exits once it runs again.
        wait_for(lambda: exporter_sessions(pg) == 1, 15, "a single exporter session")
        assert threading.active_count() == threads


def test_replication_on_primary_and_replica(pg_factory: Callable[..., PostgresServer],
                                            workdir: Path) -> None:
    primary = pg_factory()
    with open(primary.datadir / "pg_hba.conf", "a") as hba:
        hba.write("host replication postgres 127.0.0.1/32 trust\n")
    primary.execute("SELECT pg_reload_conf()")
    primary.execute("SELECT pg_create_physical_replication_slot('standby_slot')")
    on_primary_cfg = exporter_config(primary)  # the role reaches the standby by replication
    datadir, sockdir = workdir / "standby", workdir / "standby-sock"
    for path in (datadir, sockdir):
        path.mkdir(mode=0o700)
        _chown_postgres(path)
    subprocess.run(
        [str(_pg_bindir() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
         "-U", "postgres", "-D", str(datadir), "-R", "-X", "stream", "-c", "fast",
         "-S", "standby_slot"],
        check=True, capture_output=True, timeout=60, **_as_postgres_user())
    port = free_port()
    with open(workdir / "standby.log", "ab") as log:
        standby = subprocess.Popen(
            [str(_pg_bindir() / "postgres"), "-D", str(datadir), "-p", str(port),
             "-k", str(sockdir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "cluster_name=standby1"],
            stdout=log, stderr=log, start_new_session=True, **_as_postgres_user())
    try:
        def streaming() -> bool:
            rows = primary.execute("SELECT application_name FROM pg_stat_replication "
                                   "WHERE replay_lsn IS NOT NULL")
            return rows == [("standby1",)]

        wait_for(streaming, 30, "the standby to stream")
        primary.execute("CREATE TABLE replicated (id int); INSERT INTO replicated VALUES (1)")
        replica_cfg = PostgresConfig(host="127.0.0.1", port=port, dbname="postgres",
                                     user=EXPORTER_ROLE, password=Secret(EXPORTER_PASSWORD),
                                     cache_interval=Duration(0))
        with collector(on_primary_cfg) as on_primary, collector(replica_cfg) as on_replica:
            wait_for(lambda: scrape(on_replica).value("qatoolbox_postgres_tables") == 1, 30,
                     "the replica to replay")
            p, r = scrape(on_primary), scrape(on_replica)
        assert p.value("qatoolbox_postgres_in_recovery") == 0
        lag_bytes = p.value("qatoolbox_postgres_replica_lag_bytes", application_name="standby1")
        assert lag_bytes is not None and lag_bytes >= 0
        assert p.value("qatoolbox_postgres_replication_lag_seconds") is None
        retained = p.value("qatoolbox_postgres_replication_slot_retained_bytes",
                           slot_name="standby_slot")
        assert retained is not None and retained >= 0
        assert r.value("qatoolbox_postgres_up") == 1
        assert r.value("qatoolbox_postgres_in_recovery") == 1
        lag = r.value("qatoolbox_postgres_replication_lag_seconds")
        assert lag is not None and 0 <= lag < 600
        assert not r.series("qatoolbox_postgres_replica_lag_bytes")
        assert r.series("qatoolbox_postgres_transactions_committed_total")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(standby.pid)
            for proc in [tree, *tree.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        standby.wait(10)


def test_sql_of_other_versions_against_their_catalog_shapes(postgres: PostgresServer) -> None:
    """The 17 checkpoint SQL and the pre-1.8 pg_stat_statements SQL cannot meet their real
    catalogs here (PostgreSQL 15): run them against views of the documented shapes."""
    pg = postgres
    pg.execute("""
        CREATE SCHEMA pg17;
        CREATE VIEW pg17.pg_stat_checkpointer AS
            SELECT 3::bigint AS num_timed, 4::bigint AS num_requested,
                   0::bigint AS restartpoints_timed, 0::bigint AS restartpoints_req,
                   0::bigint AS restartpoints_done, 0::float8 AS write_time,
                   0::float8 AS sync_time, 50::bigint AS buffers_written, now() AS stats_reset;
        CREATE VIEW pg17.pg_stat_bgwriter AS
            SELECT 7::bigint AS buffers_clean, 0::bigint AS maxwritten_clean,
                   0::bigint AS buffers_alloc, now() AS stats_reset;
        CREATE VIEW pg17.pg_stat_io AS
            SELECT * FROM (VALUES ('client backend', 'relation', 'normal', 10::bigint),
                                  ('autovacuum worker', 'relation', 'vacuum', 2::bigint),
                                  ('checkpointer', 'relation', 'normal', 99::bigint),
                                  ('background writer', 'relation', 'normal', 7::bigint),
                                  ('client backend', 'temp relation', 'normal', 5::bigint))
                AS v(backend_type, object, context, writes);
        CREATE SCHEMA pgss17;
        CREATE FUNCTION pgss17.pg_stat_statements(showtext boolean, OUT userid oid,
                OUT dbid oid, OUT queryid bigint, OUT query text, OUT calls bigint,
                OUT total_time float8, OUT rows bigint)
            RETURNS SETOF record LANGUAGE sql AS $$
                SELECT 10::oid, d.oid, 42::bigint,
                       CASE WHEN showtext THEN 'SELECT $1' END, 3::bigint, 1500::float8,
                       3::bigint
                FROM pg_database d WHERE d.datname = 'postgres' $$;
        CREATE VIEW pgss17.pg_stat_statements AS SELECT * FROM pgss17.pg_stat_statements(true);
        CREATE TABLE sized (id int PRIMARY KEY);
    """)
    with pg.connect() as conn:
        conn.execute("SET search_path = pg17, pg_catalog")
        row = conn.execute(queries_for(170004).checkpoints).fetchone()
        conn.execute("RESET search_path")
        top_sql, total_sql = statements_sql("pgss17", "1.7", 5)
        top, totals = conn.execute(top_sql).fetchall(), conn.execute(total_sql).fetchone()
        tables_13 = conn.execute(queries_for(130000).tables,
                                 {"limit": 5, "candidates": 10}).fetchall()
    assert row is not None and totals is not None
    s = render(build_checkpoints(row))
    assert s.value("qatoolbox_postgres_checkpoints_timed_total") == 3
    assert s.value("qatoolbox_postgres_checkpoints_requested_total") == 4
    assert s.value("qatoolbox_postgres_buffers_written_total", by="checkpoint") == 50
    assert s.value("qatoolbox_postgres_buffers_written_total", by="bgwriter") == 7
    assert s.value("qatoolbox_postgres_buffers_written_total", by="backend") == 12
    s = render(build_statements(top, totals))
    labels = {"queryid": "42", "datname": "postgres", "user": "postgres"}
    assert s.value("qatoolbox_postgres_statement_calls_total", **labels) == 3
    assert s.value("qatoolbox_postgres_statement_seconds_total", **labels) == 1.5
    assert s.value("qatoolbox_postgres_statement_info", queryid="42", query="SELECT $1") == 1
    assert s.value("qatoolbox_postgres_statements_seconds_total") == 1.5
    assert [r[1] for r in tables_13] == ["sized"]


def test_xid_age_and_wal_archiving_from_a_real_server(
    pg_factory: Callable[..., PostgresServer], workdir: Path,
) -> None:
    """XID age per database and pg_stat_archiver as the documented role sees them: archiving
    fails with a failing archive_command, then succeeds once the command is fixed."""
    # Archiving succeeds once this file exists (a command-line archive_command cannot be
    # changed by ALTER SYSTEM, so the command itself checks for the fix).
    fixed = workdir / "archive-fixed"
    pg = pg_factory(settings={"archive_mode": "on", "archive_command": f"test -e {fixed}",
                              "superuser_reserved_connections": "4"})
    pg.execute("CREATE DATABASE work")
    with collector(exporter_config(pg, cache_interval=0)) as c:
        first = scrape(c)
        # Consume transaction IDs: each autocommit txid_current() takes one.
        with pg.connect("work") as conn:
            for _ in range(25):
                conn.execute("SELECT txid_current()")
        direct = dict(pg.execute("SELECT datname, age(datfrozenxid) FROM pg_database "
                                 "WHERE datallowconn"))
        after = scrape(c)
        assert {lbl["datname"] for _, lbl in after.series("qatoolbox_postgres_database_xid_age")
                } == set(direct) == {"postgres", "template1", "work"}
        for datname, age in direct.items():
            got = after.value("qatoolbox_postgres_database_xid_age", datname=datname)
            # Our own scrape's read-only transaction takes no ID; the superuser's reads may.
            assert got is not None and age <= got <= age + 5, (datname, got, age)
        before = first.value("qatoolbox_postgres_database_xid_age", datname="work") or 0
        assert (after.value("qatoolbox_postgres_database_xid_age", datname="work") or 0) \
            >= before + 25
        assert after.value("qatoolbox_postgres_reserved_connections") == 4
        assert after.value("qatoolbox_postgres_wal_archive_failed_total") == 0

        started = time.time()
        pg.execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 1000) g")
        pg.execute("SELECT pg_switch_wal()")

        def failed() -> Scrape | None:
            s = scrape(c)
            return s if (s.value("qatoolbox_postgres_wal_archive_failed_total") or 0) > 0 else None

        wait_for(failed, 30, "a failed WAL archive attempt")
        s = failed()
        assert s is not None
        failure = s.value("qatoolbox_postgres_wal_last_archive_failure_timestamp_seconds")
        assert failure is not None and started - 1 <= failure <= time.time() + 1
        assert not s.series("qatoolbox_postgres_wal_last_archived_timestamp_seconds")
        assert s.value("qatoolbox_postgres_wal_archived_total") == 0

        fixed.touch()
        pg.execute("SELECT pg_reload_conf()")  # wakes the archiver from its retry pause

        def archived() -> Scrape | None:
            s = scrape(c)
            return s if (s.value("qatoolbox_postgres_wal_archived_total") or 0) > 0 else None

        wait_for(archived, 90, "the WAL file archived")
        s = archived()
        assert s is not None
        done = s.value("qatoolbox_postgres_wal_last_archived_timestamp_seconds")
        assert done is not None and done >= failure


# --- why PostgreSQL cannot be reached ------------------------------------------------------------


def failure_reason(c: PostgresCollector) -> dict[str, float | None]:
    """collect() fails; the failure families say up 0 and {reason: 1}."""
    with pytest.raises(PostgresError):
        c.collect()
    s = render(c.failure_metrics())
    assert s.value("qatoolbox_postgres_up") == 0
    return {lbl["reason"]: v for _, lbl in s.series("qatoolbox_postgres_connection_error")
            for v in [s.value("qatoolbox_postgres_connection_error", **lbl)]}


def test_connection_error_reason_for_each_way_of_failing(postgres: PostgresServer) -> None:
    """Wrong password, missing database, a frozen server (SIGSTOP) and a stopped one each
    give their own reason, one at a time, and none while up."""
    pg = postgres
    good = exporter_config(pg)
    with collector(dataclasses.replace(good, password=Secret("wrong-password"))) as c:
        assert failure_reason(c) == {"authentication_failed": 1}
    with collector(dataclasses.replace(good, dbname="no_such_database")) as c:
        assert failure_reason(c) == {"database_missing": 1}
    with collector(good, budget=2.5) as c:
        s = scrape(c)
        assert s.value("qatoolbox_postgres_up") == 1
        assert s.series("qatoolbox_postgres_connection_error") == []
        backends = [int(r[0]) for r in pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'qatoolbox-exporter'")]
        pg.pause()
        for pid in backends:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert failure_reason(c) == {"timeout": 1}  # the kept connection cut
            assert failure_reason(c) == {"timeout": 1}  # a new one never answered
        finally:
            for pid in backends:
                os.kill(pid, signal.SIGCONT)
            pg.resume()
        wait_for(lambda: scrape(c).value("qatoolbox_postgres_up") == 1, 15, "recovery")
        pg.stop()
        try:
            assert failure_reason(c) == {"connection_refused": 1}
        finally:
            pg.start()


def test_a_failed_connection_leaves_no_socket_open() -> None:
    """A connection attempt to a server that never answers (accepted, then silence: a paused
    one) fails on connect_timeout and leaves no socket behind, even with the cyclic garbage
    collector off: psycopg keeps the failed attempt in a reference cycle that holds its
    socket, which an outage would otherwise pile up until a full collection."""
    import gc

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshakes; nobody reads
    port = silent.getsockname()[1]
    params = {"host": "127.0.0.1", "port": port, "dbname": "x", "user": "x",
              "connect_timeout": 1, "sslmode": "disable"}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError):
                pgconn.connect(params)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        if was_enabled:
            gc.enable()
        silent.close()
