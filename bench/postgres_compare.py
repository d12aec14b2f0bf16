"""PostgreSQL scrape benchmark: this exporter's postgres collector vs postgres_exporter.

Starts a throwaway PostgreSQL (pg_stat_statements preloaded and installed), then for each
table count (100 and 10,000 by default) starts, side by side on loopback:
  - qatoolbox-exporter with only the postgres collector, default settings (60 s cache);
  - the same with postgres.cache_interval 0s (every scrape reads everything: the worst case);
  - Debian's prometheus-postgres-exporter with default flags (DATA_SOURCE_NAME only);
  - the same with the example queries.yaml Debian ships (per-table and per-statement
    series, the usual way to get them from postgres_exporter), unless --no-example-queries;
and scrapes them in turn, run by run, a round starting every --interval seconds (as a
Prometheus scraping them all would; a round that takes longer starts the next at once),
reporting latency (median, p95), series, CPU and peak RSS.

Example:
    .venv/bin/python bench/postgres_compare.py --scrapes 50 --markdown
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scrape import Target, measure, report, scrape  # noqa: E402
from exporter.collectors import COLLECTORS  # noqa: E402
from tests.harness import (  # noqa: E402
    EXPORTER_PASSWORD,
    EXPORTER_ROLE,
    PostgresServer,
    free_port,
    tempdir,
)

POSTGRES_EXPORTER = "/usr/bin/prometheus-postgres-exporter"
EXAMPLE_QUERIES = "/usr/share/doc/prometheus-postgres-exporter/examples/queries.yaml"


def create_tables(pg: PostgresServer, upto: int, have: int, *, prefix: str = "t",
                  dbname: str = "postgres", commit_every: int = 1000) -> None:
    """Create tables <prefix><have+1> .. <prefix><upto>, committing every commit_every (the
    lock table is finite), with 1,000 rows in the last so that sizes differ and the top N
    means something."""
    if upto <= have:
        return
    pg.execute(f"""
        DO $$ BEGIN
          FOR i IN {have + 1}..{upto} LOOP
            EXECUTE format('CREATE TABLE {prefix}%s (id int PRIMARY KEY, v text)', i);
            IF i % {commit_every} = 0 THEN COMMIT; END IF;
          END LOOP;
        END $$""", dbname=dbname)
    pg.execute(f"INSERT INTO {prefix}{upto} SELECT g, 'x' FROM generate_series(1, 1000) g",
               dbname=dbname)


def _wait_metrics(url: str, proc: subprocess.Popen[bytes], needle: bytes) -> None:
    """Scrape until a line of the body starts with needle and its value is 1."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if any(line.startswith(needle) and line.rsplit(b" ", 1)[-1] in (b"1", b"1.0")
                   for line in scrape(url)[1].splitlines()):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not serve {needle!r} within 30 s")


def start_contenders(pg: PostgresServer, workdir: Path, example_queries: bool
                     ) -> tuple[list[subprocess.Popen[bytes]], list[Target]]:
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    devnull = subprocess.DEVNULL

    def ours(name: str, extra: Sequence[str]) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
        env.update(pg.exporter_env())  # docs/reliability.md's least-privilege role
        others = [f"--no-collector.{n}" for n in COLLECTORS if n != "postgres"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}",
             *others, *extra], cwd=ROOT, env=env, stdout=devnull, stderr=devnull)
        procs.append(proc)
        target = Target(name, f"http://127.0.0.1:{port}/metrics", proc.pid)
        _wait_metrics(target.url, proc, b"qatoolbox_postgres_up")
        targets.append(target)

    def theirs(name: str, extra: Sequence[str]) -> None:
        port = free_port()
        env = dict(os.environ, DATA_SOURCE_NAME=(
            f"postgresql://{EXPORTER_ROLE}:{EXPORTER_PASSWORD}@127.0.0.1:{pg.port}/postgres"
            "?sslmode=disable"))
        proc = subprocess.Popen([POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
                                 *extra], env=env, stdout=devnull, stderr=devnull)
        procs.append(proc)
        target = Target(name, f"http://127.0.0.1:{port}/metrics", proc.pid)
        _wait_metrics(target.url, proc, b"pg_up")
        targets.append(target)

    ours("qatoolbox", [])
    no_cache = workdir / "no-cache.yml"
    no_cache.write_text("postgres:\n  cache_interval: 0s\n")
    ours("qatoolbox-nocache", ["--config.file", str(no_cache)])
    theirs("postgres_exporter", [])
    if example_queries:
        theirs("postgres_exporter+queries", [f"--extend.query-path={EXAMPLE_QUERIES}"])
    return procs, targets


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison for each table count and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes per target and size")
    parser.add_argument("--tables", default="100,10000", help="comma-separated table counts")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between the starts of two rounds (default 1)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--no-example-queries", action="store_true",
                        help="skip postgres_exporter with Debian's example queries.yaml")
    args = parser.parse_args(argv)
    if not 1 <= args.scrapes <= 10_000:
        parser.error("--scrapes must be between 1 and 10000")
    try:
        sizes = sorted(int(n) for n in args.tables.split(","))
    except ValueError:
        parser.error("--tables: expected numbers like 100,10000")
    if not shutil.which(POSTGRES_EXPORTER):
        parser.error(f"{POSTGRES_EXPORTER} not found (apt-get install "
                     "prometheus-postgres-exporter)")
    example = not args.no_example_queries and Path(EXAMPLE_QUERIES).exists()

    with tempdir() as workdir:
        pg = PostgresServer(workdir, settings={
            "shared_preload_libraries": "pg_stat_statements",
            "max_locks_per_transaction": "256",
        }).start()
        try:
            pg.execute("CREATE EXTENSION pg_stat_statements")
            pg.create_exporter_role("postgres")
            have = 0
            for size in sizes:
                create_tables(pg, size, have)
                have = size
                pg.execute("ANALYZE")
                procs, targets = start_contenders(pg, workdir, example)
                try:
                    measure(targets, args.scrapes, warmup=3, interval=args.interval)
                    print(f"\n## {size} tables, {args.scrapes} scrapes each, "
                          f"a round every {args.interval:g} s\n")
                    print(report(targets, args.scrapes, args.markdown))  # reads RSS: live pids
                    sys.stdout.flush()
                finally:
                    for proc in procs:
                        proc.terminate()
                        proc.wait(10)
        finally:
            pg.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
