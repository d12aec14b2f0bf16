"""Soak: hours of scrapes in minutes; RSS, open files, threads and latency over time.

    .venv/bin/python bench/soak.py                      # 10 + 10 minutes, 20 scrapes/s
    .venv/bin/python bench/soak.py --minutes 2 --out docs/bench-soak.md

Starts on loopback a throwaway PostgreSQL (the demo application's schema, seeded, and the
least-privilege role of docs/reliability.md), a Redis with keys and a Celery queue, an app
worker process writing metrics files, and the exporter with every collector on. Then:
  phase 1: --minutes at --rate scrapes per second, everything alive;
  phase 2: --minutes more, PostgreSQL paused (SIGSTOP of every backend) 20 s out of 40 s.
Every --sample seconds it records the exporter's RSS, open files and threads, the scrape
latency (median, p99, max) and failures in the window, postgres_up and the exporter's
PostgreSQL connections. A failed scrape is anything but a 200 with a parsable body.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scrape import PROMETHEUS_HEADERS  # noqa: E402
from tests.harness import (  # noqa: E402
    PostgresServer,
    RedisServer,
    free_port,
    tempdir,
    wait_for,
)

DEMO = ROOT / "examples" / "qatoolbox_demo"
_POSTGRES_UP = re.compile(rb"^qatoolbox_postgres_up(?:\{[^}]*\})? (\S+)$", re.MULTILINE)
# Phase 2 pauses PostgreSQL for PAUSE seconds out of every 2 * PAUSE; not a divisor of the
# default sample period, so samples land on both halves of the cycle.
PAUSE = 20.0
ROLE_PASSWORD = "soak-exporter-pw"

APP_WORKER = """
import os, random, sys, time
from exporter.instrument import Recorder
directory, restart_every = sys.argv[1], float(sys.argv[2])
routes = [f"api/r{i}/<int:id>/" for i in range(20)]
recorder, started = Recorder(directory), time.monotonic()
while True:
    for _ in range(20):
        route = random.choice(routes)
        recorder.request_started()
        recorder.request_finished(route, random.choice(["GET", "POST"]),
                                  random.choice([200, 200, 200, 404, 500]),
                                  random.random() * 0.3, db_queries=random.randint(0, 9),
                                  db_seconds=0.001)
    time.sleep(0.05)
    if time.monotonic() - started > restart_every:
        # A worker restart: the old files are folded by the exporter, a new writer starts.
        recorder.close()
        recorder, started = Recorder(directory), time.monotonic()
"""


@dataclass
class Window:
    """Scrape results since the last sample."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    # Ticks skipped because 64 scrapes were already in flight (the client, or the exporter,
    # could not keep up with the rate): counted, never queued, so latency means latency.
    skipped: int = 0
    postgres_up: list[float] = field(default_factory=list)


@dataclass
class Sample:
    """One row of the report."""

    at: float
    phase: str
    rss_mb: float
    fds: int
    threads: int
    scrapes: int
    skipped: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    pg_up: float
    pg_conns: int | None


class Scraper:
    """Scrapes at a fixed rate from a thread pool; results go into the current window."""

    def __init__(self, port: int, rate: float) -> None:
        self.port = port
        self.interval = 1.0 / rate
        self.window = Window()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="scrape")
        self.in_flight = threading.BoundedSemaphore(64)
        self.total = 0
        self.total_failures = 0
        self.total_skipped = 0

    def _one(self) -> None:
        try:
            self._scrape()
        finally:
            self.in_flight.release()

    def _scrape(self) -> None:
        started = time.monotonic()
        ok, up = False, None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            # As Prometheus asks (OpenMetrics first, gzip): every scrape also pays for
            # compression.
            conn.request("GET", "/metrics", headers=PROMETHEUS_HEADERS)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            if response.getheader("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if response.status == 200:
                # A regex, not a full parse: the client must not steal the exporter's CPU.
                found = _POSTGRES_UP.search(body)
                up = float(found.group(1)) if found else None
                ok = body.endswith(b"\n") and b"qatoolbox_exporter_build_info" in body
        except (OSError, http.client.HTTPException, ValueError, EOFError):
            ok = False
        took = time.monotonic() - started
        with self.lock:
            self.total += 1
            self.window.latencies.append(took)
            if not ok:
                self.window.failures += 1
                self.total_failures += 1
            if up is not None:
                self.window.postgres_up.append(up)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            if self.in_flight.acquire(blocking=False):
                self.pool.submit(self._one)
            else:
                with self.lock:
                    self.window.skipped += 1
                    self.total_skipped += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)

    def take(self) -> Window:
        with self.lock:
            window, self.window = self.window, Window()
        return window


def proc_status(pid: int) -> tuple[float, int, int]:
    """(RSS in MB, open files, threads) of pid."""
    rss, threads = 0.0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


def exporter_connections(pg: PostgresServer, paused: bool) -> int | None:
    if paused:
        return None
    rows = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'qatoolbox_exporter'")
    return int(rows[0][0])


def setup_postgres(base: Path) -> PostgresServer:
    pg = PostgresServer(base).start()
    pg.execute("CREATE DATABASE qatoolbox")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env.update(pg.env("qatoolbox"))
    for args in (["migrate", "--verbosity", "0"],
                 ["seed_demo", "--users", "2000", "--rooms", "300", "--messages", "20000",
                  "--capsules", "500"]):
        subprocess.run([sys.executable, "manage.py", *args], cwd=DEMO, env=env, check=True,
                       capture_output=True, timeout=300)
    # The least-privilege role of docs/reliability.md, read from the doc.
    pg.create_exporter_role("qatoolbox", ROLE_PASSWORD)
    return pg


def setup_redis(base: Path) -> RedisServer:
    redis = RedisServer(base).start()
    client = redis.client()
    pipe = client.pipeline(transaction=False)
    for i in range(20000):
        pipe.set(f"qatoolbox:cache:item:{i}", "x" * 50)
        if i % 4 == 0:
            pipe.set(f"celery-task-meta-{i}", "{}")
    for i in range(200):
        pipe.lpush("celery", f"message-{i}")
    pipe.execute()
    return redis


def report(samples: Sequence[Sample], args: argparse.Namespace, totals: tuple[int, int, int],
           phase_latencies: dict[str, list[float]]) -> str:
    lines = [
        f"Soak run: {args.minutes:g} + {args.minutes:g} minutes at {args.rate:g} scrapes/s, "
        f"every collector on (host, process, postgres, business, redis, app), "
        f"{os.cpu_count()} CPUs, sampled every {args.sample:g} s.",
        "",
        "| t (min) | phase | RSS (MB) | open files | threads | scrapes | skipped | failed | "
        "p50 (ms) | p99 (ms) | max (ms) | postgres_up | PG connections |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in samples:
        conns = "paused" if s.pg_conns is None else str(s.pg_conns)
        lines.append(f"| {s.at / 60:.1f} | {s.phase} | {s.rss_mb:.1f} | {s.fds} | {s.threads} | "
                     f"{s.scrapes} | {s.skipped} | {s.failures} | {s.p50_ms:.1f} | "
                     f"{s.p99_ms:.1f} | "
                     f"{s.max_ms:.0f} | {s.pg_up:.2f} | {conns} |")
    warm = [s for s in samples if s.at >= args.warmup * 60] or list(samples)
    phase1 = [s for s in warm if s.phase == "alive"]
    growth1 = (phase1[-1].rss_mb - phase1[0].rss_mb) if phase1 else float("nan")
    growth = warm[-1].rss_mb - warm[0].rss_mb
    lines += [
        "",
        f"Scrapes: {totals[0]} ({totals[0] / (2 * args.minutes * 60):.1f}/s achieved), "
        f"failed: {totals[1]}, ticks skipped with 64 scrapes in flight: {totals[2]}.",
        f"RSS after {args.warmup:g} min warm-up: {warm[0].rss_mb:.1f} MB -> "
        f"{warm[-1].rss_mb:.1f} MB at the end ({growth:+.1f} MB; phase 1 alone {growth1:+.1f} MB; "
        f"min {min(s.rss_mb for s in warm):.1f}, max {max(s.rss_mb for s in warm):.1f}).",
        f"Open files: {min(s.fds for s in warm)}..{max(s.fds for s in warm)}; "
        f"threads: {min(s.threads for s in warm)}..{max(s.threads for s in warm)}.",
    ]
    for phase, values in phase_latencies.items():
        if values:
            ordered = sorted(values)
            lines.append(f"Latency, {phase}: median {statistics.median(ordered) * 1000:.1f} ms, "
                         f"p99 {ordered[int(len(ordered) * 0.99) - 1] * 1000:.1f} ms, "
                         f"max {ordered[-1] * 1000:.0f} ms over {len(ordered)} scrapes.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=20.0, help="scrapes per second")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=1.0, help="minutes before RSS counts")
    parser.add_argument("--out", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, a kill) still runs the cleanup below: no orphaned servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempdir() as base:
        print("soak: starting PostgreSQL (demo schema, seeded), Redis, an app worker",
              file=sys.stderr)
        pg = setup_postgres(base)
        redis = setup_redis(base)
        app_dir = base / "app-metrics"
        app_dir.mkdir()
        worker = subprocess.Popen([sys.executable, "-c", APP_WORKER, str(app_dir), "20"],
                                  cwd=ROOT)
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DB_", "REDIS_", "PROMETHEUS_MULTIPROC"))}
        env.update(pg.env("qatoolbox", "qatoolbox_exporter", ROLE_PASSWORD))
        env["REDIS_URL"] = redis.create_exporter_user()  # the ACL user of docs/reliability.md
        config = base / "exporter.yml"
        config.write_text(f"app:\n  multiprocess_dirs: ['{app_dir}']\n"
                          "redis:\n  key_scan_interval: 10s\n")
        log = open(base / "exporter.log", "wb")  # noqa: SIM115 (closed below)
        exporter = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}",
             "--config.file", str(config), "--web.max-requests", "100",
             *[f"--collector.{n}" for n in ("host", "process", "postgres", "business", "redis",
                                            "app")]],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        scraper = Scraper(port, args.rate)
        samples: list[Sample] = []
        phase_latencies: dict[str, list[float]] = {"alive": [], "PostgreSQL paused half the time":
                                                   []}
        try:
            wait_for(lambda: _status(port) == 200, 30, "exporter")
            runner = threading.Thread(target=scraper.run, daemon=True)
            started = time.monotonic()
            runner.start()
            phase_seconds = args.minutes * 60
            paused = False
            next_sample = started + args.sample
            while True:
                now = time.monotonic()
                elapsed = now - started
                if elapsed >= 2 * phase_seconds:
                    break
                phase = "alive" if elapsed < phase_seconds else "PostgreSQL paused half the time"
                if phase != "alive":
                    want_paused = int((elapsed - phase_seconds) // PAUSE) % 2 == 0
                    if want_paused and not paused:
                        pg.pause()
                        paused = True
                    elif not want_paused and paused:
                        pg.resume()
                        paused = False
                if now >= next_sample:
                    next_sample += args.sample
                    window = scraper.take()
                    phase_latencies[phase].extend(window.latencies)
                    rss, fds, threads = proc_status(exporter.pid)
                    lat = sorted(window.latencies) or [0.0]
                    samples.append(Sample(
                        at=elapsed, phase=phase if phase == "alive" else "PG paused 50%",
                        rss_mb=rss, fds=fds, threads=threads, scrapes=len(window.latencies),
                        skipped=window.skipped, failures=window.failures,
                        p50_ms=statistics.median(lat) * 1000,
                        p99_ms=lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
                        max_ms=lat[-1] * 1000,
                        pg_up=(statistics.fmean(window.postgres_up)
                               if window.postgres_up else float("nan")),
                        pg_conns=exporter_connections(pg, paused)))
                    s = samples[-1]
                    print(f"soak: t={s.at / 60:5.1f}m {s.phase:13} rss={s.rss_mb:6.1f}MB "
                          f"fds={s.fds} threads={s.threads} scrapes={s.scrapes} "
                          f"skipped={s.skipped} "
                          f"failed={s.failures} p50={s.p50_ms:.1f}ms p99={s.p99_ms:.1f}ms "
                          f"pg_up={s.pg_up:.2f} pg_conns={s.pg_conns}", file=sys.stderr,
                          flush=True)
                time.sleep(0.2)
            if paused:
                pg.resume()
            scraper.stop.set()
            runner.join(10)
            scraper.pool.shutdown(wait=True, cancel_futures=True)
            if exporter.poll() is not None:
                print(f"soak: the exporter exited with {exporter.returncode}", file=sys.stderr)
            text = report(samples, args,
                          (scraper.total, scraper.total_failures, scraper.total_skipped),
                          phase_latencies)
            print(text)
            if args.out:
                Path(args.out).write_text(text)
            return 0 if scraper.total_failures == 0 and exporter.poll() is None else 1
        finally:
            scraper.stop.set()
            pg.resume()
            exporter.terminate()
            exporter.wait(15)
            log.close()
            worker.terminate()
            worker.wait(10)
            redis.kill()
            pg.kill()


def _status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
