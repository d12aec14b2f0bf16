"""Fault matrix: PostgreSQL, Redis and the app's metrics folder fail in every way we can make
them fail. Every case checks, on its own: each scrape answers 200 within BUDGET, the `*_up`
and `qatoolbox_exporter_collector_success` values, that nothing stale is served, recovery
without a restart; and, after the recovery and before the next fault, that the exporter's
threads, open file descriptors and sessions on the server are back to the healthy baseline,
that nothing was logged at error level and that the password shows nowhere.
docs/reliability.md lists the cases."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from exporter.collectors import COLLECTORS
from exporter.collectors.app_folder import DIR_LOCK
from exporter.collectors.business_config import BusinessConfig, business_defaults
from exporter.instrument import Recorder
from tests.harness import (
    EXPORTER_ROLE,
    ROOT,
    ExporterProcess,
    PostgresServer,
    RedisServer,
    Scrape,
    documented_acl_rules,
    documented_role_sql,
    wait_for,
)
from tests.test_secrets import assert_absent

# What every exporter here is configured with (scrape.timeout), and the bound each scrape must
# answer within: the timeout plus room for a loaded machine (several suites share 2 cores).
SCRAPE_TIMEOUT = 2.0
BUDGET = SCRAPE_TIMEOUT + 1.5
# After a case (once transient ones have ended: a scrape's handler thread and socket, a
# business watchdog timer), threads may exceed the healthy baseline by this much at most (the
# scrape runner's pool starts its threads lazily), open fds not at all.
THREAD_SLACK = 2
FD_SLACK = 0
# How long the sessions must stay at or under the baseline after reaching it (twice the
# business queries' interval and the Redis key scan interval, both 1 s here).
HOLD = 2.0
PG_PASSWORD = "fault-pg-pw"
REDIS_PASSWORD = "fault-redis-pw"
SUCCESS = "qatoolbox_exporter_collector_success"
# Error-level messages of the exporter (logs.py renders an exception as one error=... field,
# so a logged exception never contains "Traceback").
ERROR_MESSAGES = ("request handler failed", "scrape failed", "failure_metrics raised")
# What threading's excepthook prints for an exception that escapes a thread (not our logger).
UNCAUGHT = ("Traceback (most recent call last)", "Exception in thread")

Key = tuple[str, tuple[tuple[str, str], ...]]

pytestmark = pytest.mark.integration


def only(*names: str) -> list[str]:
    return [f"--collector.{n}" if n in names else f"--no-collector.{n}" for n in COLLECTORS]


def series(scrape: Scrape, *prefixes: str) -> set[Key]:
    """The series of scrape whose names start with prefixes, keyed without the `server` label
    (the same on every service sample of one exporter, exporter/fleet.py)."""
    return {(name, tuple(kv for kv in labels if kv[0] != "server"))
            for name, labels in scrape.samples if name.startswith(prefixes)}


def open_fds(pid: int) -> list[str]:
    """Where each open file descriptor of pid points."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def settle(measure: Callable[[], int], good: Callable[[int], bool], what: str,
           tick: Callable[[], object], timeout: float = 15) -> None:
    """Wait until good(measure()), calling tick() (a scrape, as Prometheus would keep
    scraping) between readings; fail naming the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if good(value):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: {value} after {timeout}s")
        tick()
        time.sleep(0.2)


class Watched:
    """An exporter under faults. Every scrape is timed against BUDGET, including those inside
    wait_for. check_case() compares threads, fds and server sessions with the healthy baseline
    taken by take_baseline()."""

    def __init__(self, process: ExporterProcess, sessions: Callable[[], int] | None = None,
                 secret: str | None = None) -> None:
        self.process = process
        self.sessions = sessions
        self.secret = secret
        self.threads = self.fds = self.session_count = 0

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def scrape(self) -> Scrape:
        started = time.monotonic()
        status, _, body = self.process.get("/metrics", timeout=BUDGET + 5)
        took = time.monotonic() - started
        if took >= BUDGET:
            # pytest.fail, not assert: wait_for retries on Exception, this must end the test.
            pytest.fail(f"a scrape took {took:.2f}s (budget {BUDGET:g}s)")
        assert status == 200, body[:500]
        return Scrape(body.decode())

    def usage(self) -> tuple[int, int]:
        """(threads, open fds) of the exporter process."""
        return self.process.threads(), len(open_fds(self.pid))

    def take_baseline(self) -> None:
        """Threads and fds at rest (the least of a few readings, so that a scrape's handler
        finishing is not counted), and the sessions: the caller has waited until every
        connection the exporter keeps is open."""
        for _ in range(2):
            self.scrape()
        readings = []
        for _ in range(5):
            time.sleep(0.1)
            readings.append(self.usage())
        self.threads = min(t for t, _ in readings)
        self.fds = min(f for _, f in readings)
        self.session_count = self.sessions() if self.sessions else 0

    def assert_secret_absent(self) -> None:
        """The password is in neither /metrics, nor the landing page, nor the log."""
        if self.secret is not None:
            landing = self.process.get("/", timeout=BUDGET + 5)[2]
            assert_absent(self.secret, self.scrape().text, landing, self.process.logs())

    def assert_clean_log(self) -> None:
        lines = self.process.logs().splitlines()
        errors = [line for line in lines if "level=error" in line.split()
                  or any(m in line for m in (*ERROR_MESSAGES, *UNCAUGHT))]
        assert not errors, errors[:5]

    def check_case(self, case: str) -> None:
        """After a case's recovery, before the next fault: the exporter's sessions on the
        server back to exactly the baseline and no more for HOLD seconds of scrapes (a leak
        cannot hide behind a connection not reopened yet); then its open fds no more than at
        the baseline and its threads at most THREAD_SLACK more; the log has no error and the
        password shows nowhere."""
        if self.sessions is not None:
            settle(self.sessions, lambda n: n == self.session_count,
                   f"{case}: sessions on the server (baseline {self.session_count})", self.scrape)
            # Some connections reopen only when used (the key scanner's, a business worker's):
            # keep scraping for a while, so that one reopened late cannot mask a leaked one.
            end = time.monotonic() + HOLD
            while time.monotonic() < end:
                self.scrape()
                now = self.sessions()
                assert now <= self.session_count, f"{case}: {now} sessions on the server"
                time.sleep(0.2)
        settle(lambda: self.usage()[1], lambda n: n <= self.fds + FD_SLACK,
               f"{case}: open fds (baseline {self.fds})", self.scrape)
        settle(lambda: self.usage()[0], lambda n: n <= self.threads + THREAD_SLACK,
               f"{case}: threads (baseline {self.threads})", self.scrape)
        self.assert_clean_log()
        self.assert_secret_absent()
        assert self.process.proc is not None and self.process.proc.poll() is None


def steady(watched: Watched, healthy: Callable[[Scrape], bool], *prefixes: str) -> set[Key]:
    """The series set once the exporter is healthy and two scrapes in a row agree."""
    previous: set[Key] = set()

    def stable() -> bool:
        nonlocal previous
        scrape = watched.scrape()
        current = series(scrape, *prefixes)
        done = healthy(scrape) and current == previous
        previous = current
        return done

    wait_for(stable, 40, "a steady series set", interval=1.0)
    return previous


def wait_recovered(watched: Watched, healthy: Callable[[Scrape], bool], baseline: set[Key],
                   prefixes: tuple[str, ...], what: str) -> None:
    """Back without a restart (same pid): healthy, and every series of the baseline again."""
    pid = watched.pid

    def recovered() -> bool:
        scrape = watched.scrape()
        return healthy(scrape) and baseline <= series(scrape, *prefixes)

    try:
        wait_for(recovered, 40, f"recovery after {what}", interval=0.5)
    except AssertionError:
        scrape = watched.scrape()
        missing = sorted(baseline - series(scrape, *prefixes))
        raise AssertionError(f"no recovery after {what}: healthy {healthy(scrape)}, "
                             f"{len(missing)} series missing: {missing[:5]}") from None
    assert watched.pid == pid and watched.process.proc is not None
    assert watched.process.proc.poll() is None


def check_down(watched: Watched, down: Callable[[Scrape], None], what: str,
               scrapes: int = 2) -> None:
    """Wait until a scrape shows the fault (down() passes), then check that many more in a
    row, and that the password is nowhere while the error is fresh."""

    def shows() -> bool:
        down(watched.scrape())
        return True

    try:
        wait_for(shows, 30, f"the exporter to report {what}", interval=0.2)
    except AssertionError:
        down(watched.scrape())  # fails with what is wrong
        raise
    for _ in range(scrapes):
        down(watched.scrape())
    watched.assert_secret_absent()


@pytest.fixture
def start_exporter(workdir: Path) -> Iterator[Callable[..., ExporterProcess]]:
    """start_exporter(config, env, collectors): a real exporter, stopped at the end."""
    started: list[ExporterProcess] = []

    def start(config: dict[str, Any], env: dict[str, str], collectors: tuple[str, ...],
              cls: type[ExporterProcess] = ExporterProcess) -> ExporterProcess:
        process = cls(workdir, config={"scrape": {"timeout": f"{SCRAPE_TIMEOUT:g}s"}, **config},
                      env=env, args=[*only(*collectors), "--log.level", "debug"])
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


# --- PostgreSQL --------------------------------------------------------------------------------

PG_UP = "qatoolbox_postgres_up"
BUSINESS_CONCURRENCY = 2
PROBE = "qatoolbox_fault_probe"
# Just the columns docs/reliability.md grants on (QAToolBox's tables in the demo schema), plus
# two the role must not read, and the table the probe query reads.
DEMO_TABLES = """
CREATE TABLE auth_user (id serial PRIMARY KEY, password text NOT NULL DEFAULT 'x',
                        email text, is_active boolean NOT NULL, last_login timestamptz);
CREATE TABLE tools_useronlinestatus (id serial PRIMARY KEY, is_online boolean NOT NULL,
                                     status text NOT NULL, last_seen timestamptz NOT NULL);
CREATE TABLE tools_chatroom (id serial PRIMARY KEY, room_type text NOT NULL,
                             status text NOT NULL, last_activity timestamptz NOT NULL);
CREATE TABLE tools_chatmessage (id serial PRIMARY KEY, room_id int, message_type text NOT NULL,
                                content text, created_at timestamptz NOT NULL);
CREATE TABLE tools_timecapsule (id serial PRIMARY KEY, capsule_type text NOT NULL,
                                is_unlocked boolean NOT NULL, unlock_time timestamptz,
                                unlock_condition text NOT NULL);
INSERT INTO auth_user (is_active, last_login) VALUES (true, now()), (false, NULL);
INSERT INTO tools_chatroom (room_type, status, last_activity) VALUES ('group', 'active', now());
CREATE TABLE fault_delay (seconds float8);
INSERT INTO fault_delay VALUES (0);
"""


def prepare_postgres(pg: PostgresServer) -> None:
    """The qatoolbox database with the tables the documented grants name, and the role
    docs/reliability.md's least-privilege block creates (read from the doc)."""
    pg.execute("CREATE DATABASE qatoolbox")
    pg.execute(DEMO_TABLES, dbname="qatoolbox")
    granted = pg.create_exporter_role("qatoolbox", PG_PASSWORD)
    assert granted == sorted(documented_role_sql().tables) and len(granted) >= 5
    # A custom business query needs a grant of its own (as the document says).
    pg.execute(f"GRANT SELECT (seconds) ON fault_delay TO {EXPORTER_ROLE}", dbname="qatoolbox")
    # What the fault runs rely on: no superuser, pg_monitor, a connection limit that leaves
    # room for both collectors.
    role = pg.execute("SELECT rolsuper, rolconnlimit, pg_has_role(oid, 'pg_monitor', 'MEMBER') "
                      f"FROM pg_roles WHERE rolname = '{EXPORTER_ROLE}'")
    assert len(role) == 1 and not role[0][0] and role[0][2], role
    assert role[0][1] >= 1 + BUSINESS_CONCURRENCY, role


def postgres_config() -> dict[str, Any]:
    """QAToolBox's shipped business queries, every second with a 1 s timeout, and a probe
    query the test can slow down with pg_sleep."""
    queries: list[dict[str, Any]] = [
        {"metric": q.metric, "help": q.help, "type": q.type, "sql": q.sql,
         "labels": list(q.labels), "value": q.value, "max_rows": q.max_rows,
         "requires": list(q.requires), "watermark": q.watermark,
         "label_values": [{"label": v.label, "known": list(v.known), "limit": v.limit}
                          for v in q.label_values],
         "interval": "1s", "timeout": "1s"}
        for q in BusinessConfig().all_queries()]
    queries.append({"metric": PROBE, "help": "A query the test can slow down.",
                    "interval": "1s", "timeout": "1s",
                    "sql": "SELECT 1 AS value FROM fault_delay, pg_sleep(fault_delay.seconds)"})
    return {
        "postgres": {"timeout": "1s", "connect_timeout": "1s", "cache_interval": "1s"},
        "business": {"defaults": False, "queries": queries,
                     "concurrency": BUSINESS_CONCURRENCY},
    }


QUERIES = [q.metric for q in business_defaults()] + [PROBE]
# Everything but the collectors' own bookkeeping: what the queries serve.
BUSINESS_OWN = ("qatoolbox_postgres_", "qatoolbox_business_", "qatoolbox_exporter_")


def business_data(scrape: Scrape) -> set[Key]:
    """The series the business queries serve (only postgres and business collectors run)."""
    return {k for k in series(scrape, "qatoolbox_") if not k[0].startswith(BUSINESS_OWN)}


def query_success(scrape: Scrape) -> dict[str, float | None]:
    return {q: scrape.value("qatoolbox_business_query_success", query=q) for q in QUERIES}


def pg_healthy(scrape: Scrape) -> bool:
    """Both collectors succeed, both up, every business query succeeds."""
    return (scrape.value(PG_UP) == 1 and scrape.value("qatoolbox_business_up") == 1
            and scrape.value(SUCCESS, collector="postgres") == 1
            and scrape.value(SUCCESS, collector="business") == 1
            and all(v == 1 for v in query_success(scrape).values()))


def postgres_down(scrape: Scrape) -> None:
    """The postgres collector failed: up 0, success 0, no other qatoolbox_postgres_* series."""
    assert scrape.value(PG_UP) == 0, scrape.text[:2000]
    assert scrape.value(SUCCESS, collector="postgres") == 0
    left = {k for k in series(scrape, "qatoolbox_postgres_")
            if k[0] not in (PG_UP, "qatoolbox_postgres_connection_error")}
    assert scrape.series("qatoolbox_postgres_connection_error"), "up 0 without a reason"
    assert not left, f"stale postgres series while down: {sorted(left)[:5]}"


def business_down(scrape: Scrape) -> None:
    """The business collector cannot reach the server: business_up 0, every query failed and
    none of their series served; the collector itself answers (success 1)."""
    assert scrape.value("qatoolbox_business_up") == 0
    assert scrape.value(SUCCESS, collector="business") == 1
    assert all(v == 0 for v in query_success(scrape).values()), query_success(scrape)
    assert not business_data(scrape), sorted(business_data(scrape))[:5]


def all_down(scrape: Scrape) -> None:
    postgres_down(scrape)
    business_down(scrape)


def check_pause(watched: Watched, server: PostgresServer | RedisServer,
                down: Callable[[Scrape], None], recovered: Callable[[str], None]) -> None:
    """The pause case: the server and every child stopped (SIGSTOP), the exporter down within
    budget without piling up threads (a collector stuck past its budget is not started again),
    then recovery after SIGCONT and the per-case baseline checks."""
    server.pause()
    try:
        wait_for(lambda: all_stopped(server.pid), 2, "the server and every child stopped")
        check_down(watched, down, "SIGSTOP", scrapes=3)
        assert watched.usage()[0] <= watched.threads + THREAD_SLACK
    finally:
        server.resume()
    recovered("SIGCONT")
    watched.check_case("pause")


def all_stopped(pid: int) -> bool:
    """Whether pid and every descendant is stopped (or exited, unreaped); listed afresh each
    time, so a backend forked while the pause was under way would show as running."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    states = set()
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            states.add(proc.status())
    return states <= {psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE}


def pg_exporter(pg: PostgresServer, start: Callable[..., ExporterProcess]) -> Watched:
    """An exporter with the postgres and business collectors, as the documented role."""
    process = start(postgres_config(), pg.exporter_env("qatoolbox", PG_PASSWORD),
                    ("postgres", "business"))
    return Watched(process, pg.exporter_sessions, PG_PASSWORD)


def healthy_pg_baseline(watched: Watched, pg: PostgresServer) -> set[Key]:
    baseline = steady(watched, pg_healthy, "qatoolbox_")
    assert len(series_of(baseline, "qatoolbox_postgres_")) > 20
    assert len(business_data_of(baseline)) > 40
    # Both collectors' connections (one + business.concurrency) are open before the baseline.
    wait_for(lambda: pg.exporter_sessions() == 1 + BUSINESS_CONCURRENCY, 20,
             "the postgres collector's and every business worker's session")
    watched.take_baseline()
    return baseline


def series_of(keys: set[Key], prefix: str) -> set[Key]:
    return {k for k in keys if k[0].startswith(prefix)}


def business_data_of(keys: set[Key]) -> set[Key]:
    return {k for k in keys if not k[0].startswith(BUSINESS_OWN)}


def test_postgres_faults(postgres: PostgresServer,
                         start_exporter: Callable[..., ExporterProcess]) -> None:
    """Wrong credentials, pause, a slow query, kill, restart; each checked on its own."""
    pg = postgres
    prepare_postgres(pg)
    w = pg_exporter(pg, start_exporter)
    baseline = healthy_pg_baseline(w, pg)

    def recovered(what: str) -> None:
        wait_recovered(w, pg_healthy, baseline, ("qatoolbox_",), what)

    # Wrong credentials: the password changes and the exporter's sessions are cut.
    pg.execute(f"ALTER ROLE {EXPORTER_ROLE} PASSWORD 'changed-by-the-dba'")
    pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               f"WHERE usename = '{EXPORTER_ROLE}'")
    check_down(w, all_down, "a password change")
    warnings = [line for line in w.process.logs().splitlines()
                if "msg=\"collector failed\"" in line and "collector=postgres" in line
                and "password authentication failed" in line]
    assert len(warnings) == 1 and "level=warning" in warnings[0].split(), warnings
    pg.execute(f"ALTER ROLE {EXPORTER_ROLE} PASSWORD '{PG_PASSWORD}'")
    recovered("the password came back")
    w.check_case("wrong credentials")

    # Pause: the postmaster and every backend stopped; sockets stay open, nothing answers.
    check_pause(w, pg, all_down, recovered)

    # Slow responses: the probe query sleeps past its 1 s timeout (pg_sleep).
    pg.execute("UPDATE fault_delay SET seconds = 5", dbname="qatoolbox")

    def only_the_probe_fails(scrape: Scrape) -> None:
        assert query_success(scrape) == {q: 0 if q == PROBE else 1 for q in QUERIES}
        assert scrape.value(PROBE) is None  # absent, not stale
        # One slow query is not the database being down.
        assert scrape.value(PG_UP) == 1 and scrape.value("qatoolbox_business_up") == 1
        assert scrape.value(SUCCESS, collector="postgres") == 1
        assert scrape.value(SUCCESS, collector="business") == 1

    check_down(w, only_the_probe_fails, "the slow query failing")
    pg.execute("UPDATE fault_delay SET seconds = 0", dbname="qatoolbox")
    recovered("the query fast again")
    w.check_case("slow query")

    # Kill (SIGKILL, no shutdown), then connections are refused until it starts again.
    pg.kill()
    check_down(w, all_down, "SIGKILL and refused connections", scrapes=3)
    pg.start()
    recovered("a start after SIGKILL")
    w.check_case("kill")

    # Restart (fast shutdown and start, between two scrapes): the connection the postgres
    # collector keeps died under it; the next scrape replaces it at once, no false up 0.
    pg.restart()
    first = w.scrape()
    assert first.value(PG_UP) == 1 and first.value(SUCCESS, collector="postgres") == 1
    recovered("a restart")
    w.check_case("restart")


def test_postgres_refused_at_start(postgres: PostgresServer,
                                   start_exporter: Callable[..., ExporterProcess]) -> None:
    """Started while nothing listens: down within budget, then, once the server starts, every
    series a healthy start serves (taken from a reference exporter first), as the documented
    role, with no more threads, fds or sessions than that healthy exporter."""
    pg = postgres
    prepare_postgres(pg)
    reference = pg_exporter(pg, start_exporter)
    baseline = healthy_pg_baseline(reference, pg)
    reference.process.stop()
    wait_for(lambda: pg.exporter_sessions() == 0, 10, "the reference exporter's sessions gone")
    pg.stop()

    w = pg_exporter(pg, start_exporter)
    check_down(w, all_down, "refused connections", scrapes=3)
    assert "connection refused" in w.process.get("/")[2].decode().lower()
    pg.start()
    wait_recovered(w, pg_healthy, baseline, ("qatoolbox_",), "the server starting")
    w.threads, w.fds, w.session_count = reference.threads, reference.fds, reference.session_count
    w.check_case("refused at start")


# --- Redis -------------------------------------------------------------------------------------

REDIS_UP = "qatoolbox_redis_up"
REDIS_ERROR = "qatoolbox_redis_connection_error"
REDIS_PREFIXES = ("qatoolbox_redis_", "qatoolbox_celery_")


def redis_sessions(server: RedisServer) -> int:
    with server.client() as client:
        clients = client.client_list()
    return sum(1 for c in clients if c.get("user") == EXPORTER_ROLE)


def redis_healthy(scrape: Scrape) -> bool:
    return scrape.value(REDIS_UP) == 1 and scrape.value(SUCCESS, collector="redis") == 1


def redis_down(scrape: Scrape) -> None:
    """up 0, success 0, one reason, no other qatoolbox_redis_* or qatoolbox_celery_* series."""
    assert scrape.value(REDIS_UP) == 0, scrape.text[:2000]
    assert scrape.value(SUCCESS, collector="redis") == 0
    reasons = [k for k in series(scrape, REDIS_ERROR) if k[0] == REDIS_ERROR]
    assert len(reasons) == 1, reasons
    left = series(scrape, *REDIS_PREFIXES) - {(REDIS_UP, ()), *reasons}
    assert not left, f"stale series while down: {sorted(left)[:5]}"


def redis_server(factory: Callable[..., RedisServer]) -> RedisServer:
    """A Redis with the ACL user of docs/reliability.md (in its config, so it survives
    restarts) and DEBUG enabled."""
    rules = documented_acl_rules(REDIS_PASSWORD)
    extra = ["--enable-debug-command", "yes", "--user", EXPORTER_ROLE, *rules]
    server = factory(extra_args=extra)
    seed(server)
    return server


def redis_exporter(server: RedisServer, start: Callable[..., ExporterProcess]) -> Watched:
    env = {"REDIS_URL": server.exporter_url(REDIS_PASSWORD)}
    process = start({"redis": {"timeout": "1s", "key_scan_interval": "1s"}}, env, ("redis",))
    return Watched(process, lambda: redis_sessions(server), REDIS_PASSWORD)


def healthy_redis_baseline(watched: Watched, server: RedisServer) -> set[Key]:
    baseline = steady(watched, redis_healthy, *REDIS_PREFIXES)
    assert ("qatoolbox_celery_queue_length", (("queue", "default"),)) in baseline
    assert any(k[0] == "qatoolbox_redis_key_group_keys" for k in baseline)
    # The collector's connection and the key scanner's are open before the baseline.
    wait_for(lambda: redis_sessions(server) == 2, 20, "the collector's and the scanner's client")
    watched.take_baseline()
    return baseline


def test_redis_faults(redis_factory: Callable[..., RedisServer],
                      start_exporter: Callable[..., ExporterProcess]) -> None:
    """Wrong credentials, pause, DEBUG SLEEP, kill, restart; each checked on its own."""
    server = redis_server(redis_factory)
    w = redis_exporter(server, start_exporter)
    baseline = healthy_redis_baseline(w, server)

    def recovered(what: str) -> None:
        wait_recovered(w, redis_healthy, baseline, REDIS_PREFIXES, what)

    # Wrong credentials.
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", EXPORTER_ROLE, "resetpass", ">rotated")
        admin.execute_command("CLIENT", "KILL", "USER", EXPORTER_ROLE)
    check_down(w, redis_down, "a password change")
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", EXPORTER_ROLE, "resetpass",
                              f">{REDIS_PASSWORD}")
    recovered("the password came back")
    w.check_case("wrong credentials")

    # Pause (SIGSTOP): the socket stays open, nothing answers.
    check_pause(w, server, redis_down, recovered)

    # Slow responses: DEBUG SLEEP blocks the whole server for 4 s, beyond redis.timeout.
    def debug_sleep() -> None:
        with server.client(socket_timeout=10) as client:
            client.execute_command("DEBUG", "SLEEP", "4")

    sleeper = threading.Thread(target=debug_sleep)
    sleeper.start()
    try:
        wait_for(lambda: blocked(server), 3, "the server blocked by DEBUG SLEEP", interval=0.01)
        redis_down(w.scrape())
        w.assert_secret_absent()
    finally:
        sleeper.join(15)
    recovered("DEBUG SLEEP")
    w.check_case("DEBUG SLEEP")

    # Kill, refused connections, start on the same port.
    server.kill()
    check_down(w, redis_down, "SIGKILL and refused connections", scrapes=3)
    server.start()
    seed(server)
    recovered("a start after SIGKILL")
    w.check_case("kill")

    # Restart (SIGTERM and start, between two scrapes): the closed connection is noticed when
    # taken from the pool and reopened, so the next scrape already has up 1.
    server.restart()
    seed(server)
    first = w.scrape()
    assert first.value(REDIS_UP) == 1 and first.value(SUCCESS, collector="redis") == 1
    recovered("a restart")
    w.check_case("restart")


def test_redis_refused_at_start(redis_factory: Callable[..., RedisServer],
                                start_exporter: Callable[..., ExporterProcess]) -> None:
    """Started while nothing listens: down within budget, then every series a healthy start
    serves once Redis starts, with no more threads, fds or clients than a healthy start."""
    server = redis_server(redis_factory)
    reference = redis_exporter(server, start_exporter)
    baseline = healthy_redis_baseline(reference, server)
    reference.process.stop()
    wait_for(lambda: redis_sessions(server) == 0, 10, "the reference exporter's clients gone")
    server.stop()

    w = redis_exporter(server, start_exporter)
    check_down(w, redis_down, "refused connections", scrapes=3)
    assert "connection refused" in w.process.get("/")[2].decode().lower()
    server.start()
    seed(server)
    wait_recovered(w, redis_healthy, baseline, REDIS_PREFIXES, "the server starting")
    w.threads, w.fds, w.session_count = reference.threads, reference.fds, reference.session_count
    w.check_case("refused at start")


def seed(server: RedisServer) -> None:
    """The keys whose series the baseline has (nothing is kept across a restart)."""
    with server.client() as client:
        client.lpush("default", "m1", "m2")  # QAToolBox's default queue
        client.set("qatoolbox:cache:a", "1")


def blocked(server: RedisServer) -> bool:
    """Whether the server is busy (DEBUG SLEEP): a raw PING gets no answer in 0.2 s (a raw
    socket, because redis-py retries a timed-out command)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=0.2) as sock:
        sock.sendall(b"PING\r\n")
        try:
            sock.recv(64)
        except TimeoutError:
            return True
    return False


# --- the app's metrics folder ------------------------------------------------------------------


# Root ignores file permissions; without these two capabilities it obeys them like anyone.
NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
APP_PREFIXES = ("qatoolbox_http_", "qatoolbox_celery_")


class ExporterBoundByPermissions(ExporterProcess):
    """The exporter without the capabilities that let root read anything (tests run as root)."""

    def start(self, wait: bool = True) -> ExporterBoundByPermissions:
        argv = [*NO_DAC_OVERRIDE, sys.executable, "-m", "exporter", "--web.listen-address",
                f"127.0.0.1:{self.port}", *self.args]
        if self.config is not None:
            path = self.base / f"exporter-{self.port}.yml"
            path.write_text(yaml.safe_dump(dict(self.config)))
            path.chmod(0o644)
            argv += ["--config.file", str(path)]
        self.log_path = self.base / f"exporter-{self.port}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DB_", "REDIS_", "PROMETHEUS_MULTIPROC"))}
        env.update({"DB_HOST": "127.0.0.1", "DB_PORT": "1", "REDIS_URL": "redis://127.0.0.1:1/0"})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT)
        if wait:
            wait_for(self._healthy, 20, f"exporter on port {self.port}")
        return self


def permission_bound_exporter() -> type[ExporterProcess]:
    """An exporter class that obeys file permissions: the plain one when not root, else one
    without CAP_DAC_OVERRIDE (skip if setpriv cannot drop it)."""
    if os.geteuid() != 0:
        return ExporterProcess
    if shutil.which("setpriv") is None or subprocess.run([*NO_DAC_OVERRIDE, "true"],
                                                         check=False).returncode != 0:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE, so a folder "
                    "cannot be made unreadable to the exporter")
    return ExporterBoundByPermissions


def fill(recorder: Recorder, requests: int, route: str = "api/items/<int:id>/") -> None:
    for _ in range(requests):
        recorder.request_started()
        recorder.request_finished(route, "GET", 200, 0.01, db_queries=1, db_seconds=0.001)


def total_requests(scrape: Scrape) -> float | None:
    """The merged request count of the test's route."""
    return scrape.value("qatoolbox_http_requests_total", route="api/items/<int:id>/",
                        method="GET", status="200")


class AppFolder:
    """An exporter reading one metrics folder, with the checks every folder case shares."""

    def __init__(self, folder: Path, process: ExporterProcess) -> None:
        self.folder = folder
        self.w = Watched(process)
        self.up_key: Key = ("qatoolbox_app_multiprocess_dir_up", (("dir", str(folder)),))

    def down(self, scrape: Scrape) -> None:
        """dir_up 0 and nothing from the folder (never partial totals); the collector itself
        succeeds (a folder down is not the collector failing)."""
        assert scrape.samples.get(self.up_key) == 0
        assert scrape.value(SUCCESS, collector="app") == 1
        assert not series(scrape, *APP_PREFIXES), sorted(series(scrape, *APP_PREFIXES))[:5]

    def check_down(self, scrapes: int = 3) -> None:
        for _ in range(scrapes):
            self.down(self.w.scrape())

    def wait_total(self, total: int, what: str) -> None:
        def back() -> bool:
            scrape = self.w.scrape()
            return (total_requests(scrape) == total and scrape.samples.get(self.up_key) == 1
                    and scrape.value(SUCCESS, collector="app") == 1)

        wait_for(back, 20, what)

    def check_case(self, case: str) -> None:
        """Also: no fd of the exporter left open on anything under the folder."""
        self.w.check_case(case)
        held = [t for t in open_fds(self.w.pid) if t.startswith(str(self.folder))]
        assert not held, f"{case}: fds still open under the folder: {held}"


def start_app(start: Callable[..., ExporterProcess], folder: Path,
              cls: type[ExporterProcess] = ExporterProcess) -> tuple[AppFolder, Recorder]:
    """An exporter on folder with 12 requests in it (5 from a live worker, returned, and 7
    from an exited one), and its baseline taken."""
    folder.mkdir()
    process = start({"app": {"multiprocess_dirs": [str(folder)]}}, {}, ("app",), cls=cls)
    app = AppFolder(folder, process)
    live = Recorder(str(folder))
    fill(live, 5)
    exited = Recorder(str(folder))
    fill(exited, 7)
    exited.close()
    app.wait_total(12, "12 requests merged (5 live, 7 folded)")
    assert series(app.w.scrape(), *APP_PREFIXES)
    app.w.take_baseline()
    return app, live


def test_app_folder_unreadable(workdir: Path,
                               start_exporter: Callable[..., ExporterProcess]) -> None:
    """Mode 000, with an exporter that obeys file permissions (as root: without
    CAP_DAC_OVERRIDE, as a non-root exporter would be)."""
    app, live = start_app(start_exporter, workdir / "metrics", permission_bound_exporter())
    os.chmod(app.folder, 0o000)
    try:
        app.check_down()
    finally:
        os.chmod(app.folder, 0o755)
    app.wait_total(12, "totals back after the folder is readable again")
    app.check_case("unreadable folder")
    live.close()


def test_app_folder_faults(workdir: Path,
                           start_exporter: Callable[..., ExporterProcess]) -> None:
    """A peer holding the folder lock, a corrupt file, the folder removed. Needs neither a
    mount nor root."""
    app, live = start_app(start_exporter, workdir / "metrics")
    folder = app.folder

    # The folder's reads held up: another exporter stopped in the middle of a fold keeps the
    # folder lock. Reads wait for it at most LOCK_WAIT (1 s), then skip the folder.
    another = Recorder(str(folder))
    fill(another, 3)
    another.close()
    lock = os.open(folder / DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        app.check_down()
    finally:
        os.close(lock)
    app.wait_total(15, "15 requests (the waiting fold done) after the lock was released")
    app.check_case("folder lock held by a stuck peer")

    # A corrupt file (a crash mid-write, a foreign file): down, then back when it goes.
    corrupt = folder / "counter_999999.db"
    corrupt.write_bytes(b"\xff" * 100)
    try:
        app.check_down()
    finally:
        corrupt.unlink()
    app.wait_total(15, "15 requests after the corrupt file went")
    app.check_case("corrupt file")

    # The folder disappears (an app redeploy) and comes back empty.
    live.close()
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    app.check_down()
    folder.mkdir()
    fresh = Recorder(str(folder))
    fill(fresh, 2)
    app.wait_total(2, "a new worker's requests in the recreated folder")
    fresh.close()
    app.check_case("folder removed and recreated")


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, so that the disk can really fill up."""
    mount = workdir / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs",
                             str(mount)], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_app_folder_disk_full(small_disk: Path,
                              start_exporter: Callable[..., ExporterProcess]) -> None:
    """Disk full while exited workers wait to be folded: the fold cannot write its
    accumulator. The only folder case that needs a (tmpfs) mount."""
    app, live = start_app(start_exporter, small_disk / "metrics")
    folder = app.folder
    another = Recorder(str(folder))
    fill(another, 3)
    another.close()
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as handle:
        while True:
            handle.write(b"\0" * 65536)
    try:
        # Down with nothing from the folder: never a total that went backwards (Prometheus
        # would read that as a counter reset).
        app.check_down()
    finally:
        filler.unlink()
    app.wait_total(15, "15 requests after space came back")
    live.close()
    app.check_case("disk full")
