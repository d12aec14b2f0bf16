"""Benchmark: per-request cost of the Django middleware vs django-prometheus, and app scrapes.

    .venv/bin/pip install -e '.[bench]'        # django-prometheus, the anchor
    .venv/bin/python bench/app_overhead.py [--part all|middleware|scrape] [--block 200]
        [--rounds 200] [--runs 3] [--workers 64] [--routes 20] [--scrapes 15]

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
restarts with and without folding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

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
    from exporter.config import AppConfig
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
    parser.add_argument("--part", choices=("all", "middleware", "scrape"), default="all")
    args = parser.parse_args(argv)
    for flag, value, most in (("--block", args.block, 10_000), ("--rounds", args.rounds, 10_000),
                              ("--runs", args.runs, 20)):
        if not 1 <= value <= most:
            parser.error(f"{flag} must be between 1 and {most}")
    if args.part != "scrape":
        middleware_part(args.block, args.rounds, args.runs)
    if args.part != "middleware":
        scrape_part(args.workers, args.routes, args.scrapes)
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
