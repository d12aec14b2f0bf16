"""Real gunicorn (3 workers) and a real Celery worker recording, the real exporter merging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.harness import (
    ROOT,
    ExporterProcess,
    RedisServer,
    Scrape,
    free_port,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.integration

OTHER_COLLECTORS = {"host": False, "process": False, "postgres": False, "business": False,
                    "redis": False}


class Gunicorn:
    """gunicorn serving tests/django_app with the instrument hooks, on a free port."""

    def __init__(self, base: Path, metrics_dir: Path, workers: int = 3) -> None:
        self.port = free_port()
        self.log_path = base / f"gunicorn-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
        env.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                    "QATB_TEST_DB": str(base / "test.sqlite3"),
                    "DJANGO_SETTINGS_MODULE": "tests.django_app.settings"})
        argv = [sys.executable, "-m", "gunicorn", "-c", "tests/django_app/gunicorn_conf.py",
                "--workers", str(workers), "--bind", f"127.0.0.1:{self.port}",
                "--graceful-timeout", "5", "tests.django_app.wsgi:application"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.workers = workers
        wait_for(self._ready, 30, f"gunicorn on port {self.port}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {self.log_path.read_text()[-2000:]}")
        return self.get("/healthz")[0] == 200 and len(self.worker_pids()) == self.workers

    def worker_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children()
                if c.status() != psutil.STATUS_ZOMBIE]

    def get(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        stop_process(self.proc, timeout=15, group=True)


@pytest.fixture
def gunicorn(workdir: Path) -> Iterator[Gunicorn]:
    metrics = workdir / "web"
    server = Gunicorn(workdir, metrics)
    yield server
    server.stop()


# (path, method, route label, expected status)
MIX = [
    ("/fast/", "GET", "fast/", 200),
    ("/api/items/7/", "GET", "api/items/<int:item_id>/", 200),
    ("/api/items/1234/", "GET", "api/items/<int:item_id>/", 404),
    ("/api/chat/rooms/r-42/", "POST", "api/chat/rooms/<str:room_id>/", 200),
    ("/api/chat/rooms/r-43/", "DELETE", "api/chat/rooms/<str:room_id>/", 200),
    ("/no/such/page", "GET", "<unmatched>", 404),
    ("/boom/", "GET", "boom/", 500),
    ("/queries/?n=60", "GET", "queries/", 200),
    ("/queries/?n=2", "GET", "queries/", 200),
]


def drive(server: Gunicorn, rounds: int, expected: Counter[tuple[str, str, str]]) -> None:
    """Send rounds x MIX concurrently; add what was answered to expected."""
    jobs = [item for _ in range(rounds) for item in MIX]

    def one(item: tuple[str, str, str, int]) -> tuple[tuple[str, str, str], int]:
        path, method, route, status = item
        got, _ = server.get(path, method)
        return (route, method, str(got)), status

    with ThreadPoolExecutor(6) as pool:
        for key, want in pool.map(one, jobs):
            assert int(key[2]) == want, key
            expected[key] += 1


def http_counts(scrape: Scrape) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    for (name, labels), value in scrape.samples.items():
        if name == "qatoolbox_http_requests_total":
            lbl = dict(labels)
            counts[(lbl["route"], lbl["method"], lbl["status"])] = int(value)
    return counts


def histogram_counts(scrape: Scrape, name: str) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for (sample, labels), value in scrape.samples.items():
        if sample == f"{name}_count":
            counts[tuple(v for _, v in labels)] = int(value)
    return counts


def test_gunicorn_workers_merged_exactly_and_survive_restarts(
        gunicorn: Gunicorn, workdir: Path,
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    metrics = workdir / "web"
    own = workdir / "exporter-own-multiproc"
    own.mkdir()
    exporter = exporter_factory(
        config={"app": {"multiprocess_dirs": [str(metrics)]}, "collectors": OTHER_COLLECTORS},
        env={"PROMETHEUS_MULTIPROC_DIR": str(own)})
    expected: Counter[tuple[str, str, str]] = Counter()
    drive(gunicorn, 6, expected)
    first = exporter.scrape()
    assert http_counts(first) == expected
    by_route_method: Counter[tuple[str, ...]] = Counter()
    for (route, method, _), n in expected.items():
        by_route_method[(method, route)] += n
    assert histogram_counts(first, "qatoolbox_http_request_duration_seconds") == by_route_method
    assert first.value("qatoolbox_http_requests_in_flight") == 0
    assert first.value("qatoolbox_http_request_exceptions_total", route="boom/",
                       method="GET") == 6
    assert first.value("qatoolbox_app_workers", dir=str(metrics)) == 3
    # The 60-query view lands above 50 in the queries histogram (6 times, the 2-query one not).
    q = {"route": "queries/"}
    assert first.value("qatoolbox_http_request_db_queries_count", **q) == 12
    assert first.value("qatoolbox_http_request_db_queries_bucket", le="50.0", **q) == 6
    assert first.value("qatoolbox_http_request_db_queries_bucket", le="75.0", **q) == 12
    assert first.value("qatoolbox_http_request_db_queries_sum", **q) == 6 * 62
    # The exporter ignored PROMETHEUS_MULTIPROC_DIR in its own environment.
    assert list(own.iterdir()) == []
    assert "PROMETHEUS_MULTIPROC_DIR is set" in exporter.logs()
    check = subprocess.run(["promtool", "check", "metrics"], input=first.text,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        check.stdout + check.stderr

    # In flight while a slow request runs, back to 0 after.
    slow = threading.Thread(target=gunicorn.get, args=("/slow/?s=3",))
    slow.start()
    wait_for(lambda: exporter.scrape().value("qatoolbox_http_requests_in_flight") == 1, 20,
             "one request in flight")
    slow.join()
    expected[("slow/", "GET", "200")] += 1

    # Kill a worker outright, then make gunicorn replace all workers (HUP): totals go on.
    previous = http_counts(first)
    os.kill(gunicorn.worker_pids()[0], signal.SIGKILL)
    wait_for(lambda: len(gunicorn.worker_pids()) == 3, 30, "a replacement worker")
    drive(gunicorn, 2, expected)
    old = set(gunicorn.worker_pids())
    os.kill(gunicorn.proc.pid, signal.SIGHUP)
    wait_for(lambda: not old & set(gunicorn.worker_pids())
             and len(gunicorn.worker_pids()) == 3, 30, "workers replaced after HUP")
    for _ in range(3):
        drive(gunicorn, 1, expected)
        now = http_counts(exporter.scrape())
        assert all(now[k] >= v for k, v in previous.items()), "a counter went backwards"
        previous = now
    wait_for(lambda: http_counts(exporter.scrape()) == expected, 20, "exact totals")
    last = exporter.scrape()
    assert histogram_counts(last, "qatoolbox_http_request_duration_seconds") == Counter(
        {(m, r): n for (m, r), n in _by_method_route(expected).items()})
    assert last.value("qatoolbox_http_requests_in_flight") == 0
    folded = last.value("qatoolbox_app_workers_folded_total", dir=str(metrics))
    # Workers that died having served requests (one that served none has no files).
    assert folded is not None and folded >= 1
    assert last.value("qatoolbox_app_workers", dir=str(metrics)) == 3
    # Live workers' files plus the two accumulators: nothing is left of the dead ones.
    live = {str(pid) for pid in gunicorn.worker_pids()}
    for path in metrics.iterdir():
        if path.suffix == ".db" and "_folded" not in path.name:
            assert path.stem.rpartition("_")[2].split("-")[0] in live, path.name


def _by_method_route(expected: Counter[tuple[str, str, str]]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for (route, method, _), n in expected.items():
        out[(method, route)] += n
    return out


def test_celery_tasks_counted_by_state(
        redis_server: RedisServer, workdir: Path,
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    metrics = workdir / "celery"
    metrics.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    env.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics), "REDIS_URL": redis_server.url})
    log_path = workdir / "celery.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.django_app.celery_app", "worker",
             "--pool=solo", "--without-heartbeat", "--without-gossip", "--without-mingle",
             "--loglevel=WARNING"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        exporter = exporter_factory(
            config={"app": {"multiprocess_dirs": [str(metrics)]},
                    "collectors": OTHER_COLLECTORS})
        from celery import Celery  # type: ignore[import-untyped]

        client = Celery("qatb_client", broker=redis_server.url)
        for i in range(3):
            client.send_task("tests.succeed", args=[i])
        for _ in range(2):
            client.send_task("tests.fail")
        client.send_task("tests.flaky")
        want = {("tests.succeed", "succeeded"): 3, ("tests.fail", "failed"): 2,
                ("tests.flaky", "retried"): 1, ("tests.flaky", "succeeded"): 1}

        def tasks(scrape: Scrape) -> dict[tuple[str, str], float]:
            return {(dict(lbl)["task"], dict(lbl)["state"]): v
                    for (n, lbl), v in scrape.samples.items()
                    if n == "qatoolbox_celery_tasks_total"}

        wait_for(lambda: tasks(exporter.scrape()) == want, 60,
                 f"task counts {want}; worker log: {log_path}")
        scrape = exporter.scrape()
        assert scrape.value("qatoolbox_celery_task_duration_seconds_count",
                            task="tests.flaky") == 2
        assert scrape.value("qatoolbox_celery_task_duration_seconds_count",
                            task="tests.succeed") == 3
        assert scrape.value("qatoolbox_app_workers", dir=str(metrics)) == 1
        # Worker shutdown: its files are released and folded, the counts stay.
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        wait_for(lambda: exporter.scrape().value("qatoolbox_app_workers",
                                                 dir=str(metrics)) == 0, 20, "worker gone")
        after = exporter.scrape()
        assert tasks(after) == want
        assert after.value("qatoolbox_app_workers_folded_total", dir=str(metrics)) == 1
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
