"""Fault matrix: PostgreSQL, Redis and the app's metrics folder fail in every way we can make
them fail; each case checks the scrape budget, up/success values, stale series, recovery
without a restart, and thread and connection counts. docs/reliability.md lists the cases."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.collectors import COLLECTORS
from exporter.instrument import Recorder
from tests.harness import (
    ROOT,
    ExporterProcess,
    PostgresServer,
    RedisServer,
    Scrape,
    wait_for,
)

SCRAPE_TIMEOUT = 2.0
# The bound a scrape must answer within: its budget plus generous room for a loaded machine
# (several test suites share 2 cores). A hang would take far longer.
BUDGET = SCRAPE_TIMEOUT + 6.0
PG_PASSWORD = "fault-pg-pw"
REDIS_PASSWORD = "fault-redis-pw"
REDIS_RULES = ["resetkeys", "resetchannels", "-@all", "+info", "+slowlog|len",
               "+latency|histogram", "+config|get", "+scan", "+llen", "+hlen", "%R~*"]

pytestmark = pytest.mark.integration


def only(*names: str) -> list[str]:
    return [f"--collector.{n}" if n in names else f"--no-collector.{n}" for n in COLLECTORS]


def signal_tree(pid: int, sig: int) -> None:
    """Signal a server and its children. PostgreSQL backends call setsid(), so signalling the
    postmaster's process group (PostgresServer.pause) leaves open connections answering."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
    for target in ([pid, *children] if sig == signal.SIGSTOP else [*children, pid]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def timed_scrape(process: ExporterProcess) -> Scrape:
    """A scrape that must answer 200 within BUDGET."""
    started = time.monotonic()
    scrape = process.scrape(timeout=BUDGET + 5)
    took = time.monotonic() - started
    assert took < BUDGET, f"scrape took {took:.1f}s (budget {SCRAPE_TIMEOUT}s)"
    return scrape


def series(scrape: Scrape, *prefixes: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {key for key in scrape.samples if key[0].startswith(prefixes)}


def assert_down(process: ExporterProcess, up_name: str, prefixes: tuple[str, ...],
                scrapes: int = 2) -> None:
    """Down: within budget, up 0, and nothing else from this dependency (no stale series)."""
    for _ in range(scrapes):
        scrape = timed_scrape(process)
        assert scrape.value(up_name) == 0, scrape.text[:2000]
        left = series(scrape, *prefixes) - {(up_name, ())}
        assert not left, f"stale series while down: {sorted(left)[:5]}"


def wait_down(process: ExporterProcess, up_name: str, what: str) -> None:
    wait_for(lambda: timed_scrape(process).value(up_name) == 0, 30, f"{up_name} 0 after {what}")


def wait_recovered(process: ExporterProcess, up_name: str, baseline: set[Any],
                   prefixes: tuple[str, ...], what: str) -> None:
    """Back without a restart: up 1 and every series of the baseline again."""
    pid = process.proc.pid if process.proc else None

    def recovered() -> bool:
        scrape = timed_scrape(process)
        return scrape.value(up_name) == 1 and baseline <= series(scrape, *prefixes)

    wait_for(recovered, 40, f"recovery after {what}", interval=0.5)
    assert process.proc is not None and process.proc.pid == pid and process.proc.poll() is None


def assert_nothing_grew(process: ExporterProcess, threads: int,
                        connections_now: Callable[[], int], connections: int,
                        password: str) -> None:
    """After the faults: no thread or server-connection growth, no traceback, no password."""
    for _ in range(5):
        timed_scrape(process)
    assert process.threads() <= threads + 2
    wait_for(lambda: connections_now() <= connections, 20,
             f"at most {connections} exporter connections")
    assert "Traceback" not in process.logs()
    assert password not in process.logs()


def steady(process: ExporterProcess, prefixes: tuple[str, ...], up_name: str) -> set[Any]:
    """The series set once two scrapes in a row agree (caches filled)."""
    previous: set[Any] = set()

    def stable() -> bool:
        nonlocal previous
        scrape = timed_scrape(process)
        current = series(scrape, *prefixes)
        done = scrape.value(up_name) == 1 and current == previous
        previous = current
        return done

    wait_for(stable, 40, "a steady series set", interval=1.0)
    return previous


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


def pg_connections(pg: PostgresServer) -> int:
    rows = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'qatoolbox_exporter'")
    return int(rows[0][0])


def terminate_exporter_backends(pg: PostgresServer) -> None:
    pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE usename = 'qatoolbox_exporter'")


def test_postgres_faults(postgres: PostgresServer,
                         start_exporter: Callable[..., ExporterProcess]) -> None:
    pg = postgres
    pg.execute(f"CREATE ROLE qatoolbox_exporter LOGIN PASSWORD '{PG_PASSWORD}' IN ROLE pg_monitor")
    pg.execute("CREATE DATABASE qatoolbox")
    pg.execute("CREATE TABLE fault_delay (seconds float8); INSERT INTO fault_delay VALUES (0); "
               "GRANT SELECT ON fault_delay TO qatoolbox_exporter", dbname="qatoolbox")
    config = {
        "postgres": {"timeout": "1s", "connect_timeout": "1s", "cache_interval": "1s"},
        "business": {"defaults": False, "queries": [{
            "metric": "qatoolbox_fault_probe", "help": "A query the test can slow down.",
            "interval": "1s", "timeout": "1s",
            "sql": "SELECT 1 AS value FROM fault_delay, pg_sleep(fault_delay.seconds)"}]},
    }
    env = pg.env(dbname="qatoolbox", user="qatoolbox_exporter", password=PG_PASSWORD)
    process = start_exporter(config, env, ("postgres", "business"))
    up, prefixes = "qatoolbox_postgres_up", ("qatoolbox_postgres_",)
    baseline = steady(process, prefixes, up)
    assert len(baseline) > 20
    threads, connections = process.threads(), pg_connections(pg)

    # Wrong credentials: the password changes and the exporter's sessions are cut.
    pg.execute("ALTER ROLE qatoolbox_exporter PASSWORD 'changed-by-the-dba'")
    terminate_exporter_backends(pg)
    wait_down(process, up, "a password change")
    assert_down(process, up, prefixes)
    assert "password authentication failed" in process.logs()
    pg.execute(f"ALTER ROLE qatoolbox_exporter PASSWORD '{PG_PASSWORD}'")
    wait_recovered(process, up, baseline, prefixes, "the password came back")

    # Pause: every backend and the postmaster stop; sockets stay open, nothing answers.
    signal_tree(pg.pid, signal.SIGSTOP)
    try:
        wait_down(process, up, "SIGSTOP")
        assert_down(process, up, prefixes, scrapes=4)
        # A collector stuck past its budget is not started again: no thread pile-up.
        assert process.threads() <= threads + 2
    finally:
        signal_tree(pg.pid, signal.SIGCONT)
    wait_recovered(process, up, baseline, prefixes, "SIGCONT")

    # Slow responses: the business query sleeps past its 1 s timeout (pg_sleep).
    probe = ("qatoolbox_business_query_success", (("query", "qatoolbox_fault_probe"),))
    pg.execute("UPDATE fault_delay SET seconds = 5", dbname="qatoolbox")
    wait_for(lambda: timed_scrape(process).samples.get(probe) == 0, 30, "the slow query failing")
    slow = timed_scrape(process)
    assert slow.value("qatoolbox_fault_probe") is None  # absent, not stale
    assert slow.value(up) == 1  # one slow query is not the database being down
    pg.execute("UPDATE fault_delay SET seconds = 0", dbname="qatoolbox")
    wait_for(lambda: timed_scrape(process).value("qatoolbox_fault_probe") == 1, 30,
             "the query fast again")

    # Kill (SIGKILL, no shutdown), then connections are refused until it starts again.
    pg.kill()
    wait_down(process, up, "SIGKILL")
    assert_down(process, up, prefixes, scrapes=3)
    # The business collector notices on its next background run; its metric goes away.
    wait_for(lambda: timed_scrape(process).value("qatoolbox_business_up") == 0, 20,
             "business_up 0")
    assert timed_scrape(process).value("qatoolbox_fault_probe") is None
    pg.start()
    wait_recovered(process, up, baseline, prefixes, "a start after SIGKILL")

    # Restart (fast shutdown and start): the exporter's connection dies under it.
    pg.restart()
    wait_recovered(process, up, baseline, prefixes, "a restart")

    # Nothing grew: threads, and the exporter's sessions on the server.
    assert_nothing_grew(process, threads, lambda: pg_connections(pg), connections, PG_PASSWORD)


def test_postgres_refused_at_start(pg_factory: Callable[..., PostgresServer],
                                   start_exporter: Callable[..., ExporterProcess]) -> None:
    from tests.harness import free_port

    port = free_port()
    env = {"DB_HOST": "127.0.0.1", "DB_PORT": str(port), "DB_NAME": "postgres",
           "DB_USER": "postgres", "DB_PASSWORD": ""}
    process = start_exporter({"postgres": {"timeout": "1s", "connect_timeout": "1s"}}, env,
                             ("postgres",))
    up, prefixes = "qatoolbox_postgres_up", ("qatoolbox_postgres_",)
    assert_down(process, up, prefixes, scrapes=3)
    scrape = timed_scrape(process)
    # The collector answered (up 0) rather than failing the scrape.
    assert scrape.value("qatoolbox_exporter_collector_success", collector="postgres") == 0
    pg_factory(port=port)
    wait_recovered(process, up, set(), prefixes, "the server starting")


# --- Redis -------------------------------------------------------------------------------------


def redis_connections(server: RedisServer) -> int:
    with server.client() as client:
        clients = client.client_list()
    return sum(1 for c in clients if c.get("user") == "qatoolbox_exporter")


def test_redis_faults(redis_factory: Callable[..., RedisServer],
                      start_exporter: Callable[..., ExporterProcess]) -> None:
    server = redis_factory(extra_args=["--enable-debug-command", "yes",
                                       "--user", "qatoolbox_exporter", "on",
                                       f">{REDIS_PASSWORD}", *REDIS_RULES])
    admin = server.client()
    seed(server)
    env = {"REDIS_URL": f"redis://qatoolbox_exporter:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"}
    process = start_exporter({"redis": {"timeout": "1s", "key_scan_interval": "1s"}}, env,
                             ("redis",))
    up, prefixes = "qatoolbox_redis_up", ("qatoolbox_redis_", "qatoolbox_celery_")
    baseline = steady(process, prefixes, up)
    assert ("qatoolbox_celery_queue_length", (("queue", "celery"),)) in baseline
    threads, connections = process.threads(), redis_connections(server)

    # Wrong credentials.
    admin.execute_command("ACL", "SETUSER", "qatoolbox_exporter", "resetpass", ">rotated")
    admin.execute_command("CLIENT", "KILL", "USER", "qatoolbox_exporter")
    wait_down(process, up, "a password change")
    assert_down(process, up, prefixes)
    admin.execute_command("ACL", "SETUSER", "qatoolbox_exporter", "resetpass",
                          f">{REDIS_PASSWORD}")
    wait_recovered(process, up, baseline, prefixes, "the password came back")

    # Pause (SIGSTOP): the socket stays open, nothing answers.
    server.pause()
    try:
        wait_down(process, up, "SIGSTOP")
        assert_down(process, up, prefixes, scrapes=4)
        assert process.threads() <= threads + 2
    finally:
        server.resume()
    wait_recovered(process, up, baseline, prefixes, "SIGCONT")

    # Slow responses: DEBUG SLEEP blocks the whole server for 4 s.
    def debug_sleep() -> None:
        with server.client(socket_timeout=10) as client:
            client.execute_command("DEBUG", "SLEEP", "4")

    sleeper = threading.Thread(target=debug_sleep)
    sleeper.start()
    wait_for(lambda: blocked(server), 3, "the server blocked by DEBUG SLEEP", interval=0.01)
    try:
        assert_down(process, up, prefixes, scrapes=1)
    finally:
        sleeper.join(15)
    wait_recovered(process, up, baseline, prefixes, "DEBUG SLEEP")

    # Kill, refused connections, start on the same port.
    server.kill()
    wait_down(process, up, "SIGKILL")
    assert_down(process, up, prefixes, scrapes=3)
    server.start()
    seed(server)
    wait_recovered(process, up, baseline, prefixes, "a start after SIGKILL")

    # Restart (SIGTERM and start).
    server.restart()
    seed(server)
    wait_recovered(process, up, baseline, prefixes, "a restart")

    assert_nothing_grew(process, threads, lambda: redis_connections(server), connections,
                        REDIS_PASSWORD)
    admin.close()


def seed(server: RedisServer) -> None:
    """The keys whose series the baseline has (nothing is kept across a restart)."""
    with server.client() as client:
        client.lpush("celery", "m1", "m2")
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


def fill(recorder: Recorder, requests: int, route: str = "api/items/<int:id>/") -> None:
    for _ in range(requests):
        recorder.request_started()
        recorder.request_finished(route, "GET", 200, 0.01, db_queries=1, db_seconds=0.001)


def total_requests(scrape: Scrape, directory: str) -> float | None:
    """The merged request count of the test's route (one folder, so directory is implied)."""
    del directory
    return scrape.value("qatoolbox_http_requests_total", route="api/items/<int:id>/",
                        method="GET", status="200")


def test_app_folder_faults(small_disk: Path,
                           start_exporter: Callable[..., ExporterProcess]) -> None:
    if os.geteuid() != 0 or subprocess.run([*NO_DAC_OVERRIDE, "true"],
                                           check=False).returncode != 0:
        pytest.skip("needs root and setpriv to make an unreadable folder unreadable")
    folder = small_disk / "metrics"
    folder.mkdir()
    process = start_exporter({"app": {"multiprocess_dirs": [str(folder)]}}, {}, ("app",),
                             cls=ExporterBoundByPermissions)
    up_key = ("qatoolbox_app_multiprocess_dir_up", (("dir", str(folder)),))
    prefixes = ("qatoolbox_http_", "qatoolbox_celery_")

    def app_up() -> float | None:
        return timed_scrape(process).samples.get(up_key)

    live = Recorder(str(folder))
    fill(live, 5)
    exited = Recorder(str(folder))
    fill(exited, 7)
    exited.close()
    wait_for(lambda: total_requests(timed_scrape(process), str(folder)) == 12, 20,
             "12 requests merged (5 live, 7 folded)")
    assert app_up() == 1
    baseline = series(timed_scrape(process), *prefixes)
    threads = process.threads()

    # Unreadable folder (permissions): up 0 and no app series at all, never partial totals.
    os.chmod(folder, 0o000)
    try:
        for _ in range(3):
            scrape = timed_scrape(process)
            assert scrape.samples.get(up_key) == 0
            assert not series(scrape, *prefixes)
    finally:
        os.chmod(folder, 0o755)
    wait_for(lambda: total_requests(timed_scrape(process), str(folder)) == 12, 20,
             "totals back after the folder is readable again")

    # Disk full while exited workers wait to be folded: the fold cannot write its accumulator.
    another = Recorder(str(folder))
    fill(another, 3)
    another.close()
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as handle:
        while True:
            handle.write(b"\0" * 65536)
    try:
        for _ in range(3):
            # The folder is reported down with nothing from it: never a total that went
            # backwards (Prometheus would read that as a counter reset).
            scrape = timed_scrape(process)
            assert scrape.samples.get(up_key) == 0
            assert not series(scrape, *prefixes)
    finally:
        filler.unlink()
    wait_for(lambda: total_requests(timed_scrape(process), str(folder)) == 15, 20,
             "15 requests after space came back")
    assert app_up() == 1

    # A corrupt file (a crash mid-write, a foreign file): up 0, then recovery when it goes.
    corrupt = folder / "counter_999999.db"
    corrupt.write_bytes(b"\xff" * 100)
    try:
        scrape = timed_scrape(process)
        assert scrape.samples.get(up_key) == 0
        assert not series(scrape, *prefixes)
    finally:
        corrupt.unlink()
    wait_for(lambda: total_requests(timed_scrape(process), str(folder)) == 15, 20,
             "15 requests after the corrupt file went")

    # The folder disappears (an app redeploy) and comes back empty.
    live.close()
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    scrape = timed_scrape(process)
    assert scrape.samples.get(up_key) == 0 and not series(scrape, *prefixes)
    folder.mkdir()
    fresh = Recorder(str(folder))
    fill(fresh, 2)
    wait_for(lambda: total_requests(timed_scrape(process), str(folder)) == 2, 20,
             "a new worker's requests in the recreated folder")
    fresh.close()
    assert baseline  # the series existed before the faults
    assert process.threads() <= threads + 2
    assert "Traceback" not in process.logs()
