"""Benchmark: per-request cost of the Django middleware vs django-prometheus, and app scrapes.

    .venv/bin/pip install -e '.[bench]'        # django-prometheus, the anchor
    .venv/bin/python bench/app_overhead.py [--part all|middleware|scrape|routes] [--block 200]
        [--rounds 200] [--runs 3] [--workers 64] [--routes 20] [--scrapes 15]
        [--route-counts 50,100,500] [--route-workers 4] [--route-scrapes 30]

Part 1 runs the same trivial Django view through Django's WSGI handler, called directly (no
HTTP, no test client), with: no metrics middleware (the baseline), an empty middleware (what
any middleware layer costs), this project's middleware, and django-prometheus's pair of
middlewares; in single-process mode (values in memory) and in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR set, for both). One interpreter per mode and run (prometheus_client
picks its mode at import) holds all variants, timed in blocks interleaved round by round (in
a shuffled order each round) so machine drift hits all alike, in thread CPU time so that time
spent descheduled on a busy machine is left out. "Added" is the median over rounds of a
variant's block minus the bare view's block of the same round (paired, so a noisy stretch of
the run cancels out); each run is a fresh interpreter, and the table shows the median of the
runs' figures and their range.

Part 2 times (CPU) the exporter's app collector merging 64 workers' files, next to
prometheus_client's own MultiProcessCollector on the same folder, and after 2000 worker
restarts with and without folding. Then, for 4 live workers serving 50, 100 and 500 routes
(`--route-counts`), the cost of one scrape side by side with the same anchor: in-process CPU
time of one collection, and the real processes over HTTP with the request Prometheus sends
(its Accept header and gzip): this exporter with only the app collector on, and
prometheus_client's own HTTP server with a MultiProcessCollector on the same folder, scraped
in turn; wall time, CPU time and peak RSS (VmHWM) of each process.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scrape import PROMETHEUS_HEADERS  # noqa: E402  (the request Prometheus sends)

TICKS = os.sysconf("SC_CLK_TCK")

VARIANTS = {
    "bare view": [],
    "empty middleware (floor of any middleware)": ["__main__.Empty"],
    "exporter.instrument": ["exporter.instrument.django.PrometheusMiddleware"],
    "django-prometheus": ["django_prometheus.middleware.PrometheusBeforeMiddleware",
                          "django_prometheus.middleware.PrometheusAfterMiddleware"],
}

CHILD = textwrap.dedent("""
    import io, json, random, sys, time
    variants, block, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    shuffle = random.Random(int(sys.argv[4])).shuffle
    import django
    from django.conf import settings

    class Empty:
        def __init__(self, get_response):
            self.get_response = get_response

        def __call__(self, request):
            return self.get_response(request)

    settings.configure(
        DEBUG=False, SECRET_KEY="bench", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django_prometheus"], MIDDLEWARE=[],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True)
    django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.http import HttpResponse
    from django.urls import path

    def view(request, item_id):
        return HttpResponse(b"ok")

    urlpatterns = [path("api/items/<int:item_id>/", view)]
    handlers = {}
    for name, middleware in variants.items():
        before = [m for m in middleware if not m.endswith("AfterMiddleware")]
        after = [m for m in middleware if m.endswith("AfterMiddleware")]
        settings.MIDDLEWARE = before + ["django.middleware.common.CommonMiddleware"] + after
        handlers[name] = WSGIHandler()

    def environ():
        return {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/items/42/", "SERVER_NAME": "x",
                "SERVER_PORT": "80", "wsgi.input": io.BytesIO(b""), "wsgi.url_scheme": "http",
                "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1"}

    def start_response(status, headers, exc_info=None):
        pass

    for handler in handlers.values():  # warm up: caches, metric children, files
        for _ in range(300):
            handler(environ(), start_response)
    times = {name: [] for name in handlers}
    order = list(handlers)
    for _ in range(rounds):
        shuffle(order)  # no variant always runs right after another one
        for name in order:
            handler = handlers[name]
            envs = [environ() for _ in range(block)]
            # CPU time of this thread: time spent descheduled on a busy machine is left out.
            start = time.thread_time()
            for env in envs:
                handler(env, start_response)
            times[name].append((time.thread_time() - start) / block * 1e6)
    print(json.dumps(times))
""")


def middleware_bench(block: int, rounds: int, runs: int
                     ) -> dict[tuple[str, str], list[list[float]]]:
    """{(mode, variant): [per-request microseconds of each block, round by round] per run}.

    One interpreter per mode and run (prometheus_client picks its mode at import), all
    variants in it, blocks interleaved so that machine noise hits them alike.
    """
    results: dict[tuple[str, str], list[list[float]]] = {}
    for run in range(runs):
        for mode in ("single-process", "multiprocess"):
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("PROMETHEUS_MULTIPROC")}
            env["PYTHONPATH"] = str(ROOT)
            folder = tempfile.mkdtemp(prefix="bench-mp-") if mode == "multiprocess" else None
            if folder:
                env["PROMETHEUS_MULTIPROC_DIR"] = folder
            try:
                done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(VARIANTS),
                                       str(block), str(rounds), str(run)], env=env,
                                      capture_output=True, text=True, check=False, cwd=ROOT,
                                      timeout=1800)
            finally:
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            for name, times in json.loads(done.stdout).items():
                results.setdefault((mode, name), []).append(times)
    return results


def paired(times: list[float], base: list[float]) -> list[float]:
    """Each round's block minus the bare view's block of the same round."""
    return [t - b for t, b in zip(times, base, strict=True)]


def mid(times: list[float]) -> float:
    """The median of block times."""
    return statistics.median(times)

def drain(collector: Any) -> list[Any]:
    """One collection, every family built."""
    return list(collector.collect())


def best_of(fn: Callable[[], object], runs: int) -> float:
    """Median CPU seconds of runs calls (this thread's CPU time: machine load left out)."""
    times = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def fill(recorder: object, routes: int) -> None:
    """A realistic worker: routes x 2 methods x a few statuses, DB histograms, some tasks."""
    from exporter.instrument import Recorder

    assert isinstance(recorder, Recorder)
    for i in range(routes):
        route = f"api/resource{i}/<int:id>/"
        for method, status in (("GET", 200), ("GET", 404), ("POST", 201), ("POST", 500)):
            recorder.request_started()
            recorder.request_finished(route, method, status, 0.05 * (i % 9), db_queries=i,
                                      db_seconds=0.002)


def scrape_bench(workers: int, routes: int, runs: int) -> list[tuple[str, float, int]]:
    """[(case, median ms per scrape, files)] for the app collector and the anchor."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from exporter.collectors.app import AppCollector
    from exporter.collectors.app_config import AppConfig
    from exporter.instrument import Recorder

    rows: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-app-") as base:
        live_dir = os.path.join(base, "live")
        os.mkdir(live_dir)
        live = [Recorder(live_dir) for _ in range(workers)]
        for rec in live:
            fill(rec, routes)
        files = len([n for n in os.listdir(live_dir) if n.endswith(".db")])
        app = AppCollector(AppConfig(multiprocess_dirs=(live_dir,)))
        list(app.collect())
        rows.append((f"app collector, {workers} live workers",
                     best_of(lambda: list(app.collect()), runs) * 1000, files))
        registry = CollectorRegistry()
        anchor = MultiProcessCollector(registry, live_dir)
        rows.append((f"prometheus_client MultiProcessCollector, {workers} live workers",
                     best_of(lambda: list(anchor.collect()), runs) * 1000, files))

        restarts = 2000
        for compact in (True, False):
            churn_dir = os.path.join(base, f"churn-{compact}")
            os.mkdir(churn_dir)
            current = [Recorder(churn_dir) for _ in range(workers)]
            for i in range(restarts):
                slot = i % workers
                fill(current[slot], 3)
                current[slot].close()
                current[slot] = Recorder(churn_dir)
            for rec in current:
                fill(rec, routes)
            churn = AppCollector(AppConfig(multiprocess_dirs=(churn_dir,), compact=compact))
            list(churn.collect())  # the first scrape folds what died so far
            files = len([n for n in os.listdir(churn_dir) if n.endswith(".db")])
            label = "folding" if compact else "folding off"
            rows.append((f"app collector, {workers} live + {restarts} exited workers ({label})",
                         best_of(partial(drain, churn), max(3, runs // 3)) * 1000,
                         files))
            if not compact:
                anchor = MultiProcessCollector(None, churn_dir)
                rows.append((f"prometheus_client MultiProcessCollector, same {restarts} exited",
                             best_of(partial(drain, anchor), max(3, runs // 3)) * 1000,
                             files))
            for rec in current:
                rec.close()
        for rec in live:
            rec.close()
    return rows


def recorder_floor(requests: int) -> dict[str, float]:
    """Microseconds of one request_started + request_finished, memory and files."""
    from exporter.instrument import Recorder

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-rec-") as folder:
        for label, directory in (("memory", None), ("files", folder)):
            rec = Recorder(directory)
            start = time.thread_time()
            for _ in range(requests):
                rec.request_started()
                rec.request_finished("api/items/<int:id>/", "GET", 200, 0.01, db_queries=3,
                                     db_seconds=0.001)
            out[label] = (time.thread_time() - start) / requests * 1e6
            rec.close()
    return out


# --- routes: 4 live workers x 50 / 100 / 500 routes, side by side with the anchor ----------

ANCHOR_SERVER = textwrap.dedent("""
    import sys, time
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=registry)
    print("ready", flush=True)
    while True:
        time.sleep(3600)
""")
OTHER_COLLECTORS = ("host", "process", "postgres", "business", "redis")
RESTARTS = 8
TRAFFIC = 25


def fill_routes(recorder: object, routes: int) -> None:
    """A worker shaped as bench/compare.py's: every route GET 200 (and 404 on every tenth) with
    the DB histograms, about 57 series per route, and one Celery task."""
    from exporter.instrument import Recorder

    assert isinstance(recorder, Recorder)
    for r in range(routes):
        for status in (200, 404) if r % 10 == 0 else (200,):
            recorder.request_started()
            recorder.request_finished(f"/bench/r{r}/", "GET", status, 0.003 * (r % 7 + 1),
                                      db_queries=r % 5, db_seconds=0.001)
    recorder.task_finished("tools.tasks.bench", "succeeded", 0.2)


def traffic(recorders: Sequence[object], routes: int, rng: random.Random) -> None:
    """Between two scrapes, each worker serves TRAFFIC requests on routes drawn at random (a
    live app: a few series change at every scrape, the others not)."""
    from exporter.instrument import Recorder

    for recorder in recorders:
        assert isinstance(recorder, Recorder)
        for _ in range(TRAFFIC):
            r = rng.randrange(routes)
            recorder.request_started()
            recorder.request_finished(f"/bench/r{r}/", "GET", 200, rng.random() / 2,
                                      db_queries=rng.randrange(8), db_seconds=0.002)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _proc_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _get(url: str) -> tuple[float, bytes]:
    """One scrape with Prometheus' request: seconds and the (decompressed) body."""
    request = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        encoding = response.headers.get("Content-Encoding", "")
    elapsed = time.perf_counter() - started
    return elapsed, gzip.decompress(body) if encoding == "gzip" else body


class _Served:
    """A process serving /metrics for the folder: this exporter (app collector only) or the
    anchor (prometheus_client's HTTP server with a MultiProcessCollector)."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}/metrics"
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.first_ms = 0.0
        self.latencies: list[float] = []
        self.cpu = 0.0
        self.series = 0
        self.idle_kb = 0
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen within 30 s")
            time.sleep(0.05)
        self.idle_kb = _proc_kb(self.proc.pid, "VmRSS")

    def scrape(self, record: bool) -> None:
        cpu = _proc_cpu(self.proc.pid)
        elapsed, body = _get(self.url)
        if record:
            self.latencies.append(elapsed)
            self.cpu += _proc_cpu(self.proc.pid) - cpu
        elif not self.first_ms:
            self.first_ms = elapsed * 1000
            self.series = sum(1 for line in body.splitlines()
                              if line and not line.startswith(b"#"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def routes_bench(route_counts: Sequence[int], workers: int, scrapes: int
                 ) -> list[dict[str, Any]]:
    """Per route count: the app collector and the anchor, in process and over HTTP."""
    from prometheus_client.multiprocess import MultiProcessCollector

    from exporter.collectors.app import AppCollector
    from exporter.collectors.app_config import AppConfig
    from exporter.instrument import Recorder

    rows: list[dict[str, Any]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    env["PYTHONPATH"] = str(ROOT)
    # The folder on tmpfs, as docs/app.md has it (a fold's fsync is then free, as in use).
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for routes in route_counts:
        with tempfile.TemporaryDirectory(prefix="bench-routes-", dir=shm) as base:
            folder = os.path.join(base, "web")
            os.mkdir(folder)
            live = [Recorder(folder) for _ in range(workers)]
            served: list[_Served] = []
            try:
                for rec in live:
                    fill_routes(rec, routes)
                ours = AppCollector(AppConfig(multiprocess_dirs=(folder,)))
                anchor = MultiProcessCollector(None, folder)
                drain(ours)  # file layouts parsed, as after an exporter's first scrape
                inproc: dict[str, list[float]] = {"ours": [], "anchor": []}
                rng = random.Random(1)
                for _ in range(scrapes):  # interleaved
                    traffic(live, routes, rng)
                    inproc["ours"].append(best_of(partial(drain, ours), 1))
                    inproc["anchor"].append(best_of(partial(drain, anchor), 1))
                config = os.path.join(base, "exporter.yml")
                Path(config).write_text(json.dumps({"app": {"multiprocess_dirs": [folder]}}))
                port = _free_port()
                served.append(_Served(
                    "qatoolbox-exporter (app collector only)",
                    [sys.executable, "-m", "exporter", "--config.file", config,
                     "--web.listen-address", f"127.0.0.1:{port}",
                     *(f"--no-collector.{name}" for name in OTHER_COLLECTORS)],
                    port, env))
                port = _free_port()
                served.append(_Served(
                    "prometheus_client MultiProcessCollector (start_http_server)",
                    [sys.executable, "-c", ANCHOR_SERVER, folder, str(port)], port, env))
                for target in served:
                    target.scrape(record=False)  # the first scrape: layouts parsed
                for _ in range(2):
                    for target in served:
                        target.scrape(record=False)
                for _ in range(scrapes):
                    traffic(live, routes, rng)
                    for target in served:
                        target.scrape(record=True)
                steady = {t.name: (_proc_kb(t.proc.pid, "VmRSS"), _proc_kb(t.proc.pid, "VmHWM"))
                          for t in served}
                # Worker restarts (gunicorn's max_requests): one worker replaced before each
                # scrape; the exporter folds the dead one's files at that scrape.
                after_restart: dict[str, list[float]] = {t.name: [] for t in served}
                for i in range(RESTARTS):
                    live[i % workers].close()
                    live[i % workers] = Recorder(folder)
                    fill_routes(live[i % workers], routes)
                    for target in served:
                        after_restart[target.name].append(_get(target.url)[0])
                rows.append({
                    "routes": routes, "workers": workers,
                    "inproc_ms": {k: statistics.median(v) * 1000 for k, v in inproc.items()},
                    "served": [{
                        "name": t.name, "series": t.series, "first_ms": t.first_ms,
                        "median_ms": statistics.median(t.latencies) * 1000,
                        "cpu_ms": t.cpu / scrapes * 1000,
                        "idle_mb": t.idle_kb / 1024,
                        "rss_mb": steady[t.name][0] / 1024,
                        "peak_mb": steady[t.name][1] / 1024,
                        "restart_ms": statistics.median(after_restart[t.name]) * 1000,
                        "restart_max_ms": max(after_restart[t.name]) * 1000,
                        "restart_peak_mb": _proc_kb(t.proc.pid, "VmHWM") / 1024,
                    } for t in served],
                })
            finally:
                for target in served:
                    target.stop()
                for rec in live:
                    rec.close()
    return rows


def routes_part(route_counts: Sequence[int], workers: int, scrapes: int) -> None:
    """Print the routes tables."""
    rows = routes_bench(route_counts, workers, scrapes)
    print(f"## App collector at {workers} live workers, by routes, next to the anchor\n")
    print("Workers shaped as bench/compare.py's (every route GET 200, 404 on every tenth, DB "
          "histograms: ~57 series per route), in this process, writing to a folder on "
          f"/dev/shm (tmpfs); before each scrape each worker serves {TRAFFIC} more requests on "
          "routes drawn at random.\n")
    print(f"In process: median thread CPU ms of one collection (all families built), "
          f"{scrapes} collections each, interleaved, after a first one.\n")
    print("| routes | app collector | prometheus_client MultiProcessCollector | ratio |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        ours, anchor = row["inproc_ms"]["ours"], row["inproc_ms"]["anchor"]
        print(f"| {row['routes']} | {ours:.2f} | {anchor:.1f} | {ours / anchor:.3f} |")
    print(f"\nOver HTTP with Prometheus' request (Accept as Prometheus sends it, gzip), "
          f"{scrapes} scrapes each, the two processes in turn, after three first ones. CPU is "
          "the serving process's user + system time per scrape (10 ms ticks, averaged); RSS "
          "before the first scrape, after the last, and the peak (VmHWM) over the run.\n")
    print("| routes | process | series | first scrape ms | median ms | CPU ms | RSS idle MB "
          "| RSS after MB | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for s in row["served"]:
            print(f"| {row['routes']} | {s['name']} | {s['series']:,} | {s['first_ms']:.0f} "
                  f"| {s['median_ms']:.2f} | {s['cpu_ms']:.2f} | {s['idle_mb']:.1f} "
                  f"| {s['rss_mb']:.1f} | {s['peak_mb']:.1f} |")
    print(f"\nThen {RESTARTS} worker restarts, one before each scrape (the old worker exits, a "
          "new one serves every route once): this exporter folds the exited worker's files "
          "at that scrape; prometheus_client's reader reads them as they are, from then on.\n")
    print("| routes | process | scrape after a restart, median ms | slowest ms "
          "| peak RSS MB (whole run) |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        for s in row["served"]:
            print(f"| {row['routes']} | {s['name']} | {s['restart_ms']:.1f} "
                  f"| {s['restart_max_ms']:.1f} | {s['restart_peak_mb']:.1f} |")
    print()


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--block", type=int, default=200, help="requests per timed block")
    parser.add_argument("--rounds", type=int, default=200, help="blocks per variant and run")
    parser.add_argument("--runs", type=int, default=3,
                        help="fresh interpreters per mode (the table shows their median)")
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--routes", type=int, default=20)
    parser.add_argument("--scrapes", type=int, default=15)
    parser.add_argument("--part", choices=("all", "middleware", "scrape", "routes"),
                        default="all", help="scrape: the 64-worker cases and the routes cases; "
                        "routes: only the latter")
    parser.add_argument("--route-counts", default="50,100,500",
                        help="routes per worker of the routes cases, comma-separated")
    parser.add_argument("--route-workers", type=int, default=4)
    parser.add_argument("--route-scrapes", type=int, default=30)
    args = parser.parse_args(argv)
    for flag, value, most in (("--block", args.block, 10_000), ("--rounds", args.rounds, 10_000),
                              ("--runs", args.runs, 20)):
        if not 1 <= value <= most:
            parser.error(f"{flag} must be between 1 and {most}")
    if args.part in ("all", "middleware"):
        middleware_part(args.block, args.rounds, args.runs)
    if args.part in ("all", "scrape"):
        scrape_part(args.workers, args.routes, args.scrapes)
    if args.part in ("all", "scrape", "routes"):
        counts = [int(c) for c in args.route_counts.split(",") if c.strip()]
        routes_part(counts, args.route_workers, args.route_scrapes)
    return 0


def middleware_part(block: int, rounds: int, runs: int) -> None:
    """Print part 1's table."""
    results = middleware_bench(block, rounds, runs)
    print(f"## Middleware: trivial Django view, {runs} runs of {rounds} rounds of {block} "
          f"requests per variant, interleaved\n")
    print("CPU µs per request (thread CPU time). Per request: median block. Added: median over "
          "rounds of (variant block - bare block of the same round); the median of the "
          f"{runs} runs, [lowest, highest] run.\n")
    print("| mode | variant | per request | added | added / ours |")
    print("|---|---|---|---|---|")

    def spread(values: list[float]) -> str:
        return (f"{statistics.median(values):+.1f} [{min(values):+.1f}, {max(values):+.1f}]"
                if len(values) > 1 else f"{values[0]:+.1f}")

    for mode in ("single-process", "multiprocess"):
        bases = results[(mode, "bare view")]
        ours = statistics.median(
            mid(paired(t, b)) for t, b in zip(results[(mode, "exporter.instrument")], bases,
                                              strict=True))
        for name in VARIANTS:
            runs_times = results[(mode, name)]
            per_request = statistics.median(mid(t) for t in runs_times)
            if name == "bare view":
                print(f"| {mode} | {name} | {per_request:.1f} | | |")
                continue
            added = [mid(paired(t, b)) for t, b in zip(runs_times, bases, strict=True)]
            ratio = f"{statistics.median(added) / ours:.1f}" if ours > 0 else ""
            print(f"| {mode} | {name} | {per_request:.1f} | {spread(added)} | {ratio} |")
    floor = recorder_floor(100_000)
    print(f"\nRecorder alone (request_started + request_finished with DB histograms): "
          f"{floor['memory']:.2f} µs in memory, {floor['files']:.2f} µs with files.\n")


def scrape_part(workers: int, routes: int, scrapes: int) -> None:
    """Print part 2's table."""
    print(f"## App collector scrape cost: {workers} workers x {routes} routes\n")
    print("| case | median CPU ms per scrape | .db files |")
    print("|---|---|---|")
    for case, ms, files in scrape_bench(workers, routes, scrapes):
        print(f"| {case} | {ms:.1f} | {files} |")


if __name__ == "__main__":
    sys.exit(main())
