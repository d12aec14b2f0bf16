"""The postgres collector inside the real exporter: up/down, paused servers, secrets, 10k tables."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from exporter.collectors import COLLECTORS
from tests.harness import ExporterProcess, PostgresServer, Scrape, run_exporter, wait_for
from tests.test_postgres import exporter_sessions, paused

ONLY_POSTGRES = [f"--no-collector.{name}" for name in COLLECTORS if name != "postgres"]

ExporterFactory = Callable[..., ExporterProcess]


def postgres_series(s: Scrape) -> list[str]:
    return sorted({name for name, _ in s.series("qatoolbox_postgres_")})


def as_exporter_role(postgres: PostgresServer) -> dict[str, str]:
    """DB_* settings for the least-privilege role of docs/reliability.md, created on postgres
    with the doc's SQL."""
    postgres.create_exporter_role()
    return postgres.exporter_env()


def assert_never_refused(exporter: ExporterProcess) -> None:
    """The collector leaves a family the server refused out and logs it: none was."""
    assert "permission denied" not in exporter.logs()
    assert "family left out" not in exporter.logs()


def promtool_problems(text: str) -> str:
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                            text=True, check=False, timeout=60)
    return (result.stdout + result.stderr).strip()


def test_down_then_up_without_restarting_the_exporter(
    postgres: PostgresServer, exporter_factory: ExporterFactory,
) -> None:
    exporter = exporter_factory(env=as_exporter_role(postgres), args=ONLY_POSTGRES)
    s = exporter.scrape()
    assert s.value("qatoolbox_postgres_up") == 1
    assert s.value("qatoolbox_exporter_collector_success", collector="postgres") == 1
    assert len(postgres_series(s)) > 20
    assert promtool_problems(s.text) == ""
    # Concurrent scrapes share one collection, and so one connection.
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda _: exporter.scrape(), range(30)))
    assert all(r.value("qatoolbox_postgres_up") == 1 for r in results)
    assert exporter_sessions(postgres) == 1

    postgres.stop()
    s = exporter.scrape()
    assert s.value("qatoolbox_postgres_up") == 0
    assert s.value("qatoolbox_exporter_collector_success", collector="postgres") == 0
    # Nothing stale: up 0 and why.
    assert postgres_series(s) == ["qatoolbox_postgres_connection_error", "qatoolbox_postgres_up"]
    assert s.value("qatoolbox_postgres_connection_error", reason="connection_refused") == 1

    postgres.start()
    s = exporter.scrape()
    assert s.value("qatoolbox_postgres_up") == 1
    assert s.value("qatoolbox_postgres_connections", datname="postgres", state="active") == 0
    assert exporter_sessions(postgres) == 1
    assert_never_refused(exporter)


def test_paused_server_scrapes_stay_within_budget(
    postgres: PostgresServer, exporter_factory: ExporterFactory,
) -> None:
    budget = 1.5  # shorter than psycopg's 2 s connect floor: runs outlive the runner's budget
    exporter = exporter_factory(env=as_exporter_role(postgres),
                                args=[*ONLY_POSTGRES, "--scrape.timeout", f"{budget}s"])
    assert exporter.scrape().value("qatoolbox_postgres_up") == 1
    threads = exporter.threads()
    seen_threads = []
    errors = set()
    with paused(postgres):
        for _ in range(20):
            started = time.monotonic()
            s = exporter.scrape(timeout=budget + 5)
            assert time.monotonic() - started < budget + 1
            assert s.value("qatoolbox_postgres_up") == 0
            assert postgres_series(s) == ["qatoolbox_postgres_connection_error",
                                          "qatoolbox_postgres_up"]
            assert s.value("qatoolbox_postgres_connection_error", reason="timeout") == 1
            assert s.value("qatoolbox_exporter_collector_success", collector="postgres") == 0
            seen_threads.append(exporter.threads())
            page = exporter.get("/")[2].decode()
            errors.add(next(line for line in page.splitlines() if "postgres" in line))
            time.sleep(0.2)  # paced like a (fast) Prometheus, so that runs start over and over
    # Request threads come and go; collection threads must not pile up behind the pause.
    assert max(seen_threads) <= threads + 2, seen_threads
    joined = " ".join(errors)
    # The runner's budget ran out on a connection attempt (psycopg waits 2 s at least)...
    assert "timed out after 1.5s" in joined or "previous run still in progress" in joined
    assert "connection closed" in joined  # ...and the collector's own deadline cut the query

    wait_for(lambda: exporter.scrape().value("qatoolbox_postgres_up") == 1, 20,
             "the exporter to recover after SIGCONT")
    # Attempts abandoned during the pause are only noticed by their backends now.
    wait_for(lambda: exporter_sessions(postgres) == 1, 20, "one exporter session")
    for _ in range(3):
        assert exporter.scrape().value("qatoolbox_postgres_up") == 1
    assert exporter_sessions(postgres) == 1
    assert exporter.threads() <= threads + 2
    assert_never_refused(exporter)


def test_password_never_shown(
    postgres: PostgresServer, exporter_factory: ExporterFactory,
) -> None:
    right, wrong = "Rt-pass-7f3kq9", "Wr-pass-2m8xz4"
    postgres.create_exporter_role(password=right)
    args = [*ONLY_POSTGRES, "--log.level", "debug"]
    rejected = exporter_factory(env=postgres.exporter_env(password=wrong), args=args)
    accepted = exporter_factory(env=postgres.exporter_env(password=right), args=args)
    assert rejected.scrape().value("qatoolbox_postgres_up") == 0
    assert accepted.scrape().value("qatoolbox_postgres_up") == 1
    assert "password authentication failed" in rejected.logs()
    postgres.stop()  # and with the server gone
    outputs = []
    for exporter in (rejected, accepted):
        for _ in range(2):
            s = exporter.scrape()
            assert s.value("qatoolbox_postgres_up") == 0
            outputs.append(s.text)
        outputs.append(exporter.get("/")[2].decode())
        outputs.append(exporter.logs())
    checked = run_exporter(["--config.check"], env=postgres.exporter_env(password=right))
    outputs.append(checked.stdout + checked.stderr)
    for text in outputs:
        assert right not in text and wrong not in text
    assert "cannot connect" in outputs[-2]  # the logs say why, without the password


def test_ten_thousand_tables_stay_bounded(
    postgres: PostgresServer, exporter_factory: ExporterFactory,
) -> None:
    postgres.execute("""
        DO $$ BEGIN
          FOR b IN 0..9 LOOP
            FOR i IN b * 1000 + 1 .. b * 1000 + 1000 LOOP
              EXECUTE format('CREATE TABLE t%s (id int)', i);
            END LOOP;
            COMMIT;  -- keeps the lock table from overflowing
          END LOOP;
        END $$""")
    postgres.execute("INSERT INTO t77 SELECT generate_series(1, 10000)")
    exporter = exporter_factory(env=as_exporter_role(postgres), args=ONLY_POSTGRES)
    for _ in range(2):  # the first fills the caches, the second serves from them
        s = exporter.scrape()
        assert s.value("qatoolbox_exporter_collector_success", collector="postgres") == 1
        assert s.value("qatoolbox_postgres_tables") == 10000
        series = s.series("qatoolbox_postgres_")
        assert len(series) < 2000
        assert len(s.series("qatoolbox_postgres_table_size_bytes")) == 50
        assert len(s.series("qatoolbox_postgres_table_seq_scans_total")) == 50
        assert (s.value("qatoolbox_postgres_table_size_bytes", schema="public", table="t77")
                or 0) > 8192
    assert promtool_problems(s.text) == ""
    assert_never_refused(exporter)
