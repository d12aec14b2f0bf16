"""Secrets: no password reaches /metrics, the landing page, logs or config errors, ever."""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.collectors import COLLECTORS
from tests.harness import (
    ExporterProcess,
    PostgresServer,
    RedisServer,
    documented_acl_rules,
    free_port,
    run_exporter,
    wait_for,
)
from tests.test_business_demo import manage

# Characters that DSN and URL builders must quote: a leak in any quoted form is caught too.
DB_SECRET = "Pg-s3cret w'ith=odd\\chars@x"
REDIS_SECRET = "Rd-s3cret/with:odd@chars%"


def forms(secret: str) -> list[str]:
    """The secret as it could show up: raw, URL-quoted, libpq-quoted, repr-escaped."""
    return sorted({secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret),
                   urllib.parse.quote_plus(secret), secret.replace("\\", "\\\\"),
                   secret.replace("'", "\\'"), repr(secret)[1:-1],
                   secret.split(" ", maxsplit=1)[0], secret.split("/", maxsplit=1)[0]})


def assert_absent(secret: str, *texts: str | bytes) -> None:
    for text in texts:
        body = text.decode(errors="replace") if isinstance(text, bytes) else text
        for form in forms(secret):
            assert form not in body, f"secret form {form!r} leaked: ...{body[:300]}..."


def only(*names: str) -> list[str]:
    return [f"--collector.{n}" if n in names else f"--no-collector.{n}" for n in COLLECTORS]


def everything_shown(process: ExporterProcess) -> list[str | bytes]:
    """/metrics, the landing page and the log so far."""
    scrape = process.scrape()
    landing = process.get("/")[2]
    return [scrape.text, landing, process.logs()]


def _scrapes(process: ExporterProcess, n: int = 3) -> None:
    for _ in range(n):
        process.scrape()


@pytest.fixture
def restricted_pg(postgres: PostgresServer) -> PostgresServer:
    """The exporter's own role, with a password, as docs/reliability.md sets it up."""
    postgres.execute("CREATE ROLE qatoolbox_exporter LOGIN PASSWORD 'the-right-one' "
                     "IN ROLE pg_monitor")
    postgres.execute("CREATE DATABASE qatoolbox")
    return postgres


@pytest.mark.integration
def test_postgres_wrong_password_and_server_down(
        restricted_pg: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
        workdir: Path) -> None:
    env = restricted_pg.env(dbname="qatoolbox", user="qatoolbox_exporter", password=DB_SECRET)
    process = exporter_factory(env=env, args=[*only("postgres", "business"), "--log.level",
                                              "debug"])
    scrape = process.scrape()
    assert scrape.value("qatoolbox_postgres_up") == 0
    assert scrape.value("qatoolbox_exporter_collector_success", collector="postgres") == 0
    _scrapes(process)
    # The failure is logged (the server's own words), the password is not.
    assert 'password authentication failed for user \\"qatoolbox_exporter\\"' in process.logs()
    assert_absent(DB_SECRET, *everything_shown(process))
    # Now the server goes away entirely.
    restricted_pg.stop()
    _scrapes(process)
    assert process.scrape().value("qatoolbox_postgres_up") == 0
    assert_absent(DB_SECRET, *everything_shown(process))


@pytest.mark.integration
def test_postgres_password_file_right_then_wrong(
        restricted_pg: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
        workdir: Path) -> None:
    secret_file = workdir / "db-password"
    secret_file.write_text("the-right-one\n")
    env = restricted_pg.env(dbname="qatoolbox", user="qatoolbox_exporter")
    env.pop("DB_PASSWORD")
    env["DB_PASSWORD_FILE"] = str(secret_file)
    process = exporter_factory(env=env, args=[*only("postgres"), "--log.level", "debug"])
    # As the restricted role (pg_monitor, no superuser) the collector works.
    wait_for(lambda: process.scrape().value("qatoolbox_postgres_up") == 1, 20,
             "postgres up as qatoolbox_exporter")
    # The password is changed under the exporter's feet: it fails, and says nothing more.
    restricted_pg.execute("ALTER ROLE qatoolbox_exporter PASSWORD 'rotated-elsewhere'")
    restricted_pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename = 'qatoolbox_exporter'")
    wait_for(lambda: process.scrape().value("qatoolbox_postgres_up") == 0, 20,
             "postgres down after the password change")
    assert_absent("the-right-one", *everything_shown(process))
    assert_absent("rotated-elsewhere", *everything_shown(process))


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@pytest.mark.integration
def test_postgres_secret_hidden_while_paused_and_killed(
        restricted_pg: PostgresServer, exporter_factory: Callable[..., ExporterProcess]) -> None:
    """The right (odd) password, then the server paused (queries time out) and killed (the
    connection drops, then refused): the password is never shown, at debug level."""
    restricted_pg.execute(f"ALTER ROLE qatoolbox_exporter PASSWORD {_sql_literal(DB_SECRET)}")
    env = restricted_pg.env(dbname="qatoolbox", user="qatoolbox_exporter", password=DB_SECRET)
    config = {"scrape": {"timeout": "2s"}, "postgres": {"timeout": "1s", "connect_timeout": "1s"},
              "business": {"defaults": False, "queries": [
                  {"metric": "qatoolbox_secret_probe", "help": "A probe.",
                   "sql": "SELECT 1 AS value", "interval": "1s", "timeout": "1s"}]}}
    process = exporter_factory(env=env, config=config,
                               args=[*only("postgres", "business"), "--log.level", "debug"])
    wait_for(lambda: process.scrape().value("qatoolbox_secret_probe") == 1, 30,
             "postgres and business up with the odd password")
    assert_absent(DB_SECRET, *everything_shown(process))
    restricted_pg.pause()
    try:
        wait_for(lambda: process.scrape().value("qatoolbox_postgres_up") == 0, 30,
                 "postgres down while paused")
        _scrapes(process, 2)
        assert_absent(DB_SECRET, *everything_shown(process))
    finally:
        restricted_pg.resume()
    wait_for(lambda: process.scrape().value("qatoolbox_postgres_up") == 1, 30, "back after SIGCONT")
    restricted_pg.kill()
    wait_for(lambda: process.scrape().value("qatoolbox_business_up") == 0, 30,
             "business down after SIGKILL")
    assert process.scrape().value("qatoolbox_postgres_up") == 0
    assert_absent(DB_SECRET, *everything_shown(process))


@pytest.mark.integration
def test_redis_wrong_password_acl_user_and_down(
        redis_factory: Callable[..., RedisServer],
        exporter_factory: Callable[..., ExporterProcess], workdir: Path) -> None:
    # DEBUG and MODULE allowed by the server, so that only the ACL can refuse them below.
    server = redis_factory(extra_args=["--enable-debug-command", "yes",
                                       "--enable-module-command", "yes"])
    # Set at run time: the harness waits for an unauthenticated PING at start.
    with server.client() as first:
        first.config_set("requirepass", "right-default-pw")
    with server.client(password="right-default-pw") as admin:
        admin.execute_command("ACL", "SETUSER", "qatoolbox_exporter",
                              *documented_acl_rules("acl-user-pw"))
    quoted = urllib.parse.quote(REDIS_SECRET, safe="")
    for url in (f"redis://:{quoted}@127.0.0.1:{server.port}/0",
                f"redis://qatoolbox_exporter:{quoted}@127.0.0.1:{server.port}/0"):
        process = exporter_factory(env={"REDIS_URL": url},
                                   args=[*only("redis"), "--log.level", "debug"])
        _scrapes(process)
        assert process.scrape().value("qatoolbox_redis_up") == 0
        assert_absent(REDIS_SECRET, *everything_shown(process))
        process.stop()
    # The right password from a file, as the documented ACL user; then the server dies.
    secret_file = workdir / "redis-password"
    secret_file.write_text("acl-user-pw\n")
    with server.client(password="right-default-pw") as admin:
        # A queue kombu has declared, as every Celery deployment has: the exporter reads it.
        admin.sadd("_kombu.binding.default", "default\x06\x16\x06\x16default")
        # From here on, the exporter's commands and refusals only.
        admin.config_resetstat()
        admin.acl_log_reset()
    process = exporter_factory(
        env={"REDIS_URL": f"redis://qatoolbox_exporter@127.0.0.1:{server.port}/0",
             "REDIS_PASSWORD_FILE": str(secret_file)},
        args=[*only("redis"), "--log.level", "debug"])
    wait_for(lambda: process.scrape().value("qatoolbox_redis_up") == 1, 20,
             "redis up as the documented ACL user")
    assert_acl_is_what_the_exporter_uses(server, process)
    assert_absent("acl-user-pw", *everything_shown(process))
    server.kill()
    _scrapes(process)
    assert process.scrape().value("qatoolbox_redis_up") == 0
    assert_absent("acl-user-pw", *everything_shown(process))
    assert_absent("right-default-pw", *everything_shown(process))


def _answers_ping(port: int) -> bool:
    """A raw PING answered within 0.2 s (redis-py would retry a timed-out command)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(b"PING\r\n")
        try:
            return bool(sock.recv(64))
        except TimeoutError:
            return False


@pytest.mark.integration
def test_redis_secret_hidden_while_paused_blocked_and_restarted(
        redis_factory: Callable[..., RedisServer],
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    """The documented ACL user with the right (odd) password; the server paused (SIGSTOP),
    blocked (DEBUG SLEEP beyond redis.timeout) and restarted: never shown, at debug level."""
    server = redis_factory(extra_args=["--enable-debug-command", "yes"])

    def acl_user() -> None:
        with server.client() as admin:
            admin.execute_command("ACL", "SETUSER", "qatoolbox_exporter",
                                  *documented_acl_rules(REDIS_SECRET))

    acl_user()
    quoted = urllib.parse.quote(REDIS_SECRET, safe="")
    process = exporter_factory(
        env={"REDIS_URL": f"redis://qatoolbox_exporter:{quoted}@127.0.0.1:{server.port}/0"},
        config={"scrape": {"timeout": "2s"}, "redis": {"timeout": "1s"}},
        args=[*only("redis"), "--log.level", "debug"])

    def up(value: int, what: str) -> None:
        wait_for(lambda: process.scrape().value("qatoolbox_redis_up") == value, 30, what)
        assert_absent(REDIS_SECRET, *everything_shown(process))

    up(1, "redis up as the ACL user with the odd password")
    server.pause()
    try:
        up(0, "redis down while paused")
    finally:
        server.resume()
    up(1, "back after SIGCONT")

    def debug_sleep() -> None:
        with server.client(socket_timeout=10) as client:
            client.execute_command("DEBUG", "SLEEP", "3")

    sleeper = threading.Thread(target=debug_sleep)
    sleeper.start()
    try:
        wait_for(lambda: not _answers_ping(server.port), 3, "the server blocked", interval=0.01)
        assert process.scrape().value("qatoolbox_redis_up") == 0
        assert_absent(REDIS_SECRET, *everything_shown(process))
    finally:
        sleeper.join(15)
    up(1, "back after DEBUG SLEEP")
    server.restart()
    acl_user()  # users are not kept on disk
    up(1, "back after a restart")


# Commands the documented ACL user must never run: writes, key values, server and ACL admin,
# scripting, replication, other clients. Each must get NOPERM (the command never ran).
DANGEROUS_REDIS_COMMANDS: list[tuple[str, ...]] = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "REWRITE"),
    ("CONFIG", "GET", "requirepass"),
    ("CONFIG", "RESETSTAT"), ("KEYS", "*"), ("EVAL", "return 1", "0"),
    ("EVALSHA", "0" * 40, "0"), ("SCRIPT", "LOAD", "return 1"), ("FUNCTION", "FLUSH"),
    ("FCALL", "f", "0"), ("DEL", "celery"), ("UNLINK", "celery"), ("SET", "k", "v"),
    ("GET", "k"), ("HGETALL", "unacked"), ("LRANGE", "celery", "0", "-1"), ("DUMP", "celery"),
    ("RENAME", "celery", "x"), ("EXPIRE", "celery", "1"), ("RANDOMKEY",), ("SORT", "celery"),
    ("SHUTDOWN", "NOSAVE"), ("DEBUG", "SLEEP", "0"),
    ("MIGRATE", "127.0.0.1", "1", "celery", "0", "100"), ("REPLICAOF", "127.0.0.1", "1"),
    ("SLAVEOF", "127.0.0.1", "1"), ("FAILOVER",), ("MODULE", "LOAD", "/nonexistent.so"),
    ("ACL", "LIST"), ("ACL", "GETUSER", "default"), ("ACL", "SETUSER", "x", "on"),
    ("ACL", "LOG"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "USER", "default"),
    ("MONITOR",), ("SAVE",), ("BGSAVE",), ("BGREWRITEAOF",), ("SWAPDB", "0", "1"),
    ("SELECT", "1"), ("PUBLISH", "c", "m"), ("SLOWLOG", "GET"), ("SLOWLOG", "RESET"),
    ("LATENCY", "RESET"), ("MEMORY", "USAGE", "celery"), ("OBJECT", "ENCODING", "celery"),
]


# The docs: without these the collector probes once, logs once and leaves their families out.
OPTIONAL_REDIS_COMMANDS = {"config|get", "latency|histogram"}


def assert_acl_is_what_the_exporter_uses(server: RedisServer, process: ExporterProcess) -> None:
    """The documented ACL grants exactly the commands the running exporter used (read from the
    server's command statistics, reset before it started), none of them was refused, and every
    dangerous command gets NOPERM."""
    import redis

    granted = {w[1:].lower() for w in documented_acl_rules("x") if w.startswith("+")}
    assert "@" not in "".join(granted), granted  # single commands, never a whole category

    def used() -> dict[str, dict[str, int]]:
        with server.client(password="right-default-pw") as admin:
            stats = admin.info("commandstats")
        # AUTH and HELLO (the handshake, also the test's own clients') need no grant; CONFIG
        # RESETSTAT and ACL LOG RESET are the test's.
        return {name.removeprefix("cmdstat_"): value for name, value in stats.items()
                if name not in ("cmdstat_auth", "cmdstat_hello", "cmdstat_config|resetstat",
                                "cmdstat_acl|log")}

    # The key-group count (SCAN, then SSCAN of kombu's binding sets) runs in the background,
    # after the first scrapes.
    wait_for(lambda: {"scan", "sscan"} <= set(used()), 20, "the exporter's first key-group count")
    for _ in range(2):
        process.scrape()
    stats = used()
    # Optional commands the docs leave out are probed and refused, never run.
    probed = {name for name, counts in stats.items() if name in OPTIONAL_REDIS_COMMANDS
              and name not in granted and counts.get("calls", 0) == 0}
    assert set(stats) - probed == granted, \
        f"granted but unused: {granted - set(stats)}, used but not granted: {set(stats) - granted}"
    for name in granted:
        counts = stats[name]
        assert counts.get("rejected_calls", 0) == 0 and counts.get("failed_calls", 0) == 0, \
            (name, counts)
    with server.client(password="right-default-pw") as admin:
        denied = [entry for entry in admin.acl_log()
                  if entry.get("username") == "qatoolbox_exporter"
                  and entry.get("object") not in probed]
    assert denied == [], denied
    refusals = [line for line in process.logs().splitlines()
                if any(word in line for word in ("NOPERM", "refused", "no permissions"))]
    assert all("optional Redis command refused" in line
               and any(f"'{name}'" in line for name in probed) for line in refusals), refusals
    with server.client(username="qatoolbox_exporter", password="acl-user-pw") as limited:
        for command in DANGEROUS_REDIS_COMMANDS:
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.execute_command(*command)
    with server.client(password="right-default-pw") as admin:
        assert admin.ping()  # still up: SHUTDOWN and DEBUG were refused


@pytest.mark.integration
def test_documented_redis_acl_user_cannot_read_server_passwords(
        redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    with server.client() as first:
        first.config_set("requirepass", "right-default-pw")
    with server.client(password="right-default-pw") as admin:
        admin.config_set("masterauth", "replication-pw")
        admin.execute_command("ACL", "SETUSER", "qatoolbox_exporter",
                              *documented_acl_rules("acl-user-pw"))
    import redis

    with server.client(username="qatoolbox_exporter", password="acl-user-pw") as limited:
        # CONFIG GET would show them (Redis 7 cannot allow it for some parameters only):
        # the documented user has no CONFIG GET at all.
        for parameter in ("requirepass", "masterauth", "*"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.config_get(parameter)


@pytest.fixture
def demo_db(postgres: PostgresServer) -> PostgresServer:
    """A qatoolbox database migrated by the demo application (QAToolBox's real tables)."""
    postgres.execute("CREATE DATABASE qatoolbox")
    manage(postgres, "migrate", "--verbosity", "0")
    return postgres


@pytest.mark.integration
def test_documented_postgres_grants_are_enough_and_no_more(
        demo_db: PostgresServer, exporter_factory: Callable[..., ExporterProcess]) -> None:
    import psycopg

    # The exact block of docs/reliability.md, on the database it names (the demo's).
    assert demo_db.create_exporter_role("qatoolbox", "grant-test-pw")
    env = demo_db.env(dbname="qatoolbox", user="qatoolbox_exporter", password="grant-test-pw")
    process = exporter_factory(env=env, args=[*only("postgres", "business"),
                                              "--log.level", "debug"])

    def all_queries_succeed() -> bool:
        scrape = process.scrape()
        results = [v for (name, _), v in scrape.samples.items()
                   if name == "qatoolbox_business_query_success"]
        return (scrape.value("qatoolbox_postgres_up") == 1
                and scrape.value("qatoolbox_business_up") == 1
                # The 9 defaults that apply to QAToolBox at HEAD (no time capsule table).
                and len(results) >= 9 and all(v == 1 for v in results))

    wait_for(all_queries_succeed, 30, "every business query succeeding as qatoolbox_exporter")
    assert "permission denied" not in process.logs()
    dsn = demo_db.dsn("qatoolbox", "qatoolbox_exporter", "grant-test-pw")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for forbidden in ("SELECT password FROM auth_user",
                          "SELECT email FROM auth_user",
                          "SELECT * FROM tools_chatmessage"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
    # Writes, in READ WRITE transactions: the role's default_transaction_read_only is out of
    # the way, so only the grants can refuse them.
    with psycopg.connect(dsn) as conn:
        conn.read_only = False  # every transaction starts with BEGIN READ WRITE
        for forbidden in ("INSERT INTO tools_chatroom (id) VALUES (1)",
                          "UPDATE auth_user SET is_active = false",
                          "DELETE FROM tools_chatmessage",
                          "TRUNCATE tools_useronlinestatus",
                          "SELECT nextval(pg_get_serial_sequence('auth_user', 'id'))",
                          "CREATE TABLE sneaky (id int)",
                          "CREATE SCHEMA sneaky"):
            assert conn.execute("SHOW transaction_read_only").fetchone() == ("off",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
            conn.rollback()
    # And by the catalog: no write privilege on any table, sequence, the schema or the database.
    writable = demo_db.execute("""
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND (
          (c.relkind IN ('r', 'p', 'v', 'm', 'f') AND has_table_privilege(
              'qatoolbox_exporter', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER'))
          OR (c.relkind = 'S' AND has_sequence_privilege('qatoolbox_exporter', c.oid,
                                                         'USAGE, UPDATE')))
        UNION ALL SELECT 'schema public' WHERE has_schema_privilege('qatoolbox_exporter',
                                                                   'public', 'CREATE')
        UNION ALL SELECT 'database' WHERE has_database_privilege('qatoolbox_exporter',
                                                                 'qatoolbox', 'CREATE')
        """, dbname="qatoolbox")
    assert writable == []
    assert len(demo_db.execute("SELECT 1 FROM pg_class WHERE relname = 'auth_user'",
                               dbname="qatoolbox")) == 1  # the query above saw the app's tables
    assert_absent("grant-test-pw", *everything_shown(process))


# Writes the load-time check (config.sql_problem) refuses, or cannot see (a function call).
# Each also takes a ticket from a sequence, which no rollback gives back: if a write ever ran,
# the sequence shows it even though the collector rolls every transaction back.
HIDDEN_WRITES = {
    "deletes_in_a_cte": "WITH d AS (DELETE FROM items RETURNING nextval('ticket') AS n) "
                        "SELECT count(*) AS value FROM d",
    "updates_in_a_cte": "WITH u AS (UPDATE items SET kind = 'changed' "
                        "RETURNING nextval('ticket') AS n) SELECT count(*) AS value FROM u",
    "inserts_in_a_cte": "WITH i AS (INSERT INTO items SELECT id + 100, kind FROM items "
                        "RETURNING nextval('ticket') AS n) SELECT count(*) AS value FROM i",
    "deletes_in_a_function": "SELECT purge_items() AS value",
}
HIDDEN_WRITES_SETUP = """
CREATE TABLE items (id int PRIMARY KEY, kind text NOT NULL);
INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c');
CREATE SEQUENCE ticket;
CREATE FUNCTION purge_items() RETURNS bigint LANGUAGE plpgsql VOLATILE AS
  $$ BEGIN DELETE FROM items; RETURN nextval('ticket'); END $$;
"""


@pytest.mark.integration
def test_business_queries_run_read_only_whatever_the_sql(
        postgres: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """At run time, not at load time: a data-modifying CTE and a writing function, run by the
    business collector as a superuser (every privilege, no default_transaction_read_only of
    its own; business.allow_superuser set), fail and change nothing: PostgreSQL refuses the
    CTEs as a cursor's body and the function's write in the read-only transaction."""
    from exporter.collectors.business import BusinessCollector
    from exporter.collectors.business_config import BusinessConfig, BusinessQuery
    from exporter.collectors.business_sql import sql_problem
    from exporter.collectors.postgres_config import PostgresConfig
    from exporter.config import Duration, Secret

    postgres.execute("CREATE DATABASE readonly_check")
    postgres.execute(HIDDEN_WRITES_SETUP, dbname="readonly_check")

    def state() -> list[Any]:
        return [postgres.execute("SELECT id, kind FROM items ORDER BY id",
                                 dbname="readonly_check"),
                postgres.execute("SELECT last_value, is_called FROM ticket",
                                 dbname="readonly_check")]

    before = state()
    # The collector never re-checks the SQL: building the queries directly skips the load-time
    # check, which would refuse the CTEs (and cannot see into a function).
    assert all(sql_problem(sql) for name, sql in HIDDEN_WRITES.items() if "cte" in name)
    assert sql_problem(HIDDEN_WRITES["deletes_in_a_function"]) is None
    queries = tuple(BusinessQuery(metric=f"qatoolbox_{name}", help="A hidden write.", sql=sql,
                                  interval=Duration(60), timeout=Duration(5))
                    for name, sql in HIDDEN_WRITES.items())
    env = postgres.env()
    pg = PostgresConfig(host=env["DB_HOST"], port=int(env["DB_PORT"]), dbname="readonly_check",
                        user=env["DB_USER"], password=Secret(env["DB_PASSWORD"]))
    collector = BusinessCollector(BusinessConfig(defaults=False, queries=queries, concurrency=1,
                                                 allow_superuser=True), pg)
    success: dict[str, float] = {}

    def errors() -> dict[str, str]:
        return {r.__dict__["query"]: r.__dict__["err"] for r in caplog.records
                if r.getMessage() == "business query failed"}

    def all_ran() -> bool:
        success.update({sample.labels["query"]: sample.value for family in collector.collect()
                        if family.name == "qatoolbox_business_query_success"
                        for sample in family.samples})
        return all(success.get(q.metric) == 1 or q.metric in errors() for q in queries)

    try:
        with caplog.at_level("WARNING", logger="exporter.business"):
            wait_for(all_ran, 30, "every query run once")
    finally:
        collector.close(timeout=10)
    for query in queries:
        assert success[query.metric] == 0, f"{query.metric} succeeded"
        if "cte" in query.metric:  # a cursor's body takes no data-modifying WITH at all
            assert errors()[query.metric] == ("FeatureNotSupported: DECLARE CURSOR must not "
                                              "contain data-modifying statements in WITH")
        else:
            assert "ReadOnlySqlTransaction" in errors()[query.metric], errors()
            assert "read-only transaction" in errors()[query.metric], errors()
    assert state() == before


@pytest.mark.parametrize(("config", "env"), [
    ({"postgres": {"password": DB_SECRET, "port": "not-a-port"}}, {}),
    ({"postgres": {"password": DB_SECRET, "timeout": "soon"}}, {}),
    ({"redis": {"url": f"redis://:{DB_SECRET}@127.0.0.1:1/0", "timeout": "x"}}, {}),
    ({"redis": {"url": f"http://:{DB_SECRET}@127.0.0.1:6379/0"}}, {}),
    ({"redis": {"url": f"redis://:{urllib.parse.quote(DB_SECRET, safe='')}@h:1/0", "bogus": 1}},
     {}),
    ({"web": {"listen_address": "nowhere"}}, {"DB_PASSWORD": DB_SECRET,
                                               "REDIS_URL": f"redis://:{DB_SECRET}@h:1/0"}),
    ({"postgres": {"password_file": "/nonexistent/pw"}}, {"DB_PASSWORD": DB_SECRET}),
    (None, {"DB_PASSWORD": DB_SECRET, "DB_PORT": "x"}),
    (None, {"DB_PASSWORD_FILE": "/nonexistent/pw", "REDIS_URL": f"redis://:{DB_SECRET}@h:x/0",
            "REDIS_PASSWORD_FILE": "/nonexistent/redis-pw"}),
])
def test_bad_config_never_echoes_a_secret(workdir: Path, config: dict[str, object] | None,
                                          env: dict[str, str]) -> None:
    import yaml

    args = ["--config.check"]
    if config is not None:
        path = workdir / "config.yml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config.file", str(path)]
    result = run_exporter(args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid configuration" in result.stderr
    assert_absent(DB_SECRET, result.stdout, result.stderr)


WEB_SECRET = "Web-s3cret plain/password"
KEY_SECRET = "SecretKeyMaterial0123456789abcdefSecretKeyMaterial"
# Web config files with a secret in the wrong place: a plain password where its bcrypt hash
# belongs (as text or as a number), an inline key that does not load.
BAD_WEB_CONFIGS = [
    (f"basic_auth_users: {{alice: '{WEB_SECRET}'}}\n", WEB_SECRET),
    ("basic_auth_users: {alice: 73948261}\n", "73948261"),
    ("basic_auth_users: {alice: [73948261]}\n", "73948261"),
    ("tls_server_config: {cert: x, key: \"-----BEGIN PRIVATE KEY-----\\n"
     f"{KEY_SECRET}\\n-----END PRIVATE KEY-----\\n\"}}\n", KEY_SECRET),
    (f"tls_server_config: {{cert: x, key: '{KEY_SECRET}', client_auth_type: Nope}}\n",
     KEY_SECRET),
]


@pytest.mark.integration
def test_web_config_errors_never_echo_a_secret(
        workdir: Path, exporter_factory: Callable[..., ExporterProcess]) -> None:
    """At start-up (exit 2) and on reload (one error line, previous settings kept), at debug
    level: the rejected value is in no error, log line, /metrics or landing page."""
    import base64

    import bcrypt

    path = workdir / "web.yml"
    for text, secret in BAD_WEB_CONFIGS:
        path.write_text(text)
        result = run_exporter(["--config.check", "--web.config.file", str(path)])
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"web config file {path}: " in result.stderr
        assert_absent(secret, result.stdout, result.stderr)
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"basic_auth_users: {{alice: '{hashed}'}}\n")
    process = exporter_factory(args=[*only("host"), "--web.config.file", str(path),
                                     "--log.level", "debug"])
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    for number, (text, secret) in enumerate(BAD_WEB_CONFIGS, start=1):
        path.write_text(text)

        def rejected(count: int = number) -> bool:
            # A request makes the exporter look at the file (at most once a second).
            assert process.get("/metrics", headers=good)[0] == 200
            return process.logs().count("web config file invalid") == count

        wait_for(rejected, 10, "the broken file rejected on reload")
        metrics, landing = (process.get(p, headers=good)[2] for p in ("/metrics", "/"))
        assert_absent(secret, metrics, landing, process.logs())


def test_config_check_summary_hides_secrets(workdir: Path) -> None:
    secret_file = workdir / "redis-pw"
    secret_file.write_text(REDIS_SECRET)
    first_word = DB_SECRET.split(" ", maxsplit=1)[0]
    result = run_exporter(["--config.check"], env={
        "DB_PASSWORD": DB_SECRET, "REDIS_URL": f"redis://user:{first_word}@h:1/0",
        "DB_HOST": "127.0.0.1", "DB_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr
    assert "password set" in result.stdout
    assert_absent(DB_SECRET, result.stdout, result.stderr)
    result = run_exporter(["--config.check"], env={
        "REDIS_URL": "redis://127.0.0.1:1/0", "REDIS_PASSWORD_FILE": str(secret_file)})
    assert result.returncode == 0, result.stderr
    assert_absent(REDIS_SECRET, result.stdout, result.stderr)
