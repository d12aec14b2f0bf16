"""Fleet sizing: series and scrape cost of a host-scope and a service-scope exporter, and what
one Prometheus shard pays per target (docs/scaling.md).

    .venv/bin/python bench/fleet_sizing.py                 # about 3 minutes
    .venv/bin/python bench/fleet_sizing.py --targets 100 --seconds 120 --markdown

1. Throwaway PostgreSQL (pg_stat_statements, the demo app's schema and data) and Redis; a
   host-scope exporter serving application traffic on `--routes` routes, and a service-scope
   exporter connected as docs/reliability.md's least-privilege role and ACL user.
2. Each exporter is scraped `--scrapes` times in turn: series, body size, latency, CPU seconds
   per scrape, resident memory.
3. A Prometheus (Debian's) scrapes `--targets` static copies of the host exporter's body at a
   1 s interval for `--seconds`: head series, resident memory above an idle Prometheus, CPU.
   Copies cost Prometheus what real hosts cost it (the same series, samples and labels), not
   the exporters' own work, which step 2 measures.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scrape import cpu_seconds, peak_rss_bytes  # noqa: E402
from tests.fleetstack import fleet_prometheus_config, started  # noqa: E402
from tests.harness import (  # noqa: E402
    ExporterProcess,
    PostgresServer,
    RedisServer,
    Scrape,
    tempdir,
    wait_for,
)
from tests.promstack import PrometheusServer, record_app_traffic  # noqa: E402
from tests.stack import prepare_demo_database  # noqa: E402


def rss_bytes(pid: int) -> int:
    """VmRSS: resident memory now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_exporter(name: str, exporter: ExporterProcess, scrapes: int) -> dict[str, Any]:
    """Series, bytes, latency, CPU per scrape and memory of one exporter."""
    assert exporter.proc is not None
    pid = exporter.proc.pid
    for _ in range(3):
        exporter.scrape()
    latencies = []
    cpu0 = cpu_seconds(pid)
    for _ in range(scrapes):
        started_at = time.perf_counter()
        status, _, body = exporter.get("/metrics", headers={"Accept": "text/plain"})
        latencies.append(time.perf_counter() - started_at)
        assert status == 200
    cpu = (cpu_seconds(pid) - cpu0) / scrapes
    scrape = Scrape(body.decode())
    return {"name": name, "series": len(scrape.samples), "bytes": len(body),
            "p50_ms": statistics.median(latencies) * 1000,
            "p95_ms": sorted(latencies)[int(0.95 * len(latencies)) - 1] * 1000,
            "cpu_ms": cpu * 1000, "rss_mib": rss_bytes(pid) / 2**20,
            "peak_rss_mib": peak_rss_bytes(pid) / 2**20}


class StaticTargets:
    """count loopback HTTP servers answering with one fixed exposition."""

    def __init__(self, body: bytes, count: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(count)]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.server_address[1]}" for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def measure_prometheus(base: Path, body: bytes, targets: int, seconds: float) -> dict[str, Any]:
    """What Prometheus pays for targets copies of one exposition, above an idle Prometheus."""
    static = StaticTargets(body, targets)
    try:
        with contextlib.ExitStack() as stack:
            idle_config = fleet_prometheus_config(base, [], name="idle", for_=None)
            idle = started(stack, PrometheusServer(base / "idle", idle_config))
            config = fleet_prometheus_config(base, [(static.addresses, {"cluster": "bench"})],
                                             name="loaded", for_=None)
            loaded = started(stack, PrometheusServer(base / "loaded", config))
            loaded.wait_targets_up("qatoolbox", timeout=60)
            assert idle.proc is not None and loaded.proc is not None
            time.sleep(5)
            cpu0 = cpu_seconds(loaded.proc.pid)
            time.sleep(seconds)
            cpu = (cpu_seconds(loaded.proc.pid) - cpu0) / seconds
            wait_for(lambda: loaded.value("prometheus_tsdb_head_series") is not None, 30,
                     "head series")
            series = loaded.value("prometheus_tsdb_head_series") or 0.0
            idle_series = idle.value("prometheus_tsdb_head_series") or 0.0
            extra = rss_bytes(loaded.proc.pid) - rss_bytes(idle.proc.pid)
            per_series = extra / max(1.0, series - idle_series)
            return {"targets": targets, "series": int(series - idle_series),
                    "rss_extra_mib": extra / 2**20, "bytes_per_series": per_series,
                    "cpu_cores": cpu, "cpu_per_target_ms_s": cpu / targets * 1000}
    finally:
        static.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument("--routes", type=int, default=40,
                        help="distinct routes in the host's application traffic")
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.targets <= 500 or not 1 <= args.scrapes <= 5000:
        parser.error("--targets 1..500, --scrapes 1..5000")
    with tempdir() as base, contextlib.ExitStack() as stack:
        pg = started(stack, PostgresServer(base, settings={
            "shared_preload_libraries": "pg_stat_statements"}))
        redis = started(stack, RedisServer(base))
        prepare_demo_database(pg, redis, base)
        pg.create_exporter_role("qatoolbox")
        env = {**pg.exporter_env("qatoolbox"), "REDIS_URL": redis.create_exporter_user()}
        folder = base / "app"
        folder.mkdir()
        requests = [(f"api/r{r}/", method, status, 0.05 * (1 + r % 7), r % 9, 0.01)
                    for r in range(args.routes) for method, status in
                    (("GET", 200), ("GET", 404), ("POST", 200), ("POST", 500))]
        tasks = [(f"tools.tasks.t{t}", state, 0.2) for t in range(8)
                 for state in ("succeeded", "failed", "retried")]
        record_app_traffic(folder, requests, tasks)
        host = ExporterProcess(base, args=["--collectors.scope", "host"],
                               config={"app": {"multiprocess_dirs": [str(folder)]}})
        stack.callback(host.stop)
        host.start()
        service = ExporterProcess(base, env=env, args=["--collectors.scope", "service"])
        stack.callback(service.stop)
        service.start()
        wait_for(lambda: service.scrape().value("qatoolbox_postgres_up") == 1, 30, "postgres")
        rows = [measure_exporter("host scope", host, args.scrapes),
                measure_exporter("service scope", service, args.scrapes)]
        body = host.get("/metrics", headers={"Accept": "text/plain"})[2]
        prom = measure_prometheus(base, body, args.targets, args.seconds)
    if args.markdown:
        print("| exporter | series | body KiB | scrape p50 ms | p95 ms | CPU ms/scrape "
              "| RSS MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['series']} | {r['bytes'] / 1024:.1f} | {r['p50_ms']:.1f} "
                  f"| {r['p95_ms']:.1f} | {r['cpu_ms']:.1f} | {r['rss_mib']:.1f} "
                  f"| {r['peak_rss_mib']:.1f} |")
        print()
        print("| Prometheus: targets | head series | RSS above idle MiB | bytes/series "
              "| CPU cores at 1 s scrapes | CPU ms/s per target |")
        print("|---|---|---|---|---|---|")
        print(f"| {prom['targets']} | {prom['series']} | {prom['rss_extra_mib']:.0f} "
              f"| {prom['bytes_per_series']:.0f} | {prom['cpu_cores']:.3f} "
              f"| {prom['cpu_per_target_ms_s']:.2f} |")
    else:
        for r in rows:
            print(r)
        print(prom)
    return 0


if __name__ == "__main__":
    sys.exit(main())
