"""exporter.instrument: recorder files, Django/WSGI/ASGI middleware, import isolation, forks."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from exporter import instrument
from exporter.instrument import Recorder, _State
from exporter.instrument.asgi import PrometheusASGIMiddleware
from exporter.instrument.merge import Merger
from exporter.instrument.safefiles import read_entries
from exporter.instrument.store import writer_alive
from exporter.instrument.wsgi import PrometheusWSGIMiddleware
from tests.harness import ROOT, parse_metrics

ROUTE = "api/chat/rooms/<str:room_id>/"


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Run code in a fresh interpreter at the repository root; return stdout."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def samples(rec: Recorder) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(_Fixed(rec))
    return parse_metrics(generate_latest(registry).decode())


class _Fixed:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def collect(self) -> Any:
        return self.rec.collect()


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def fresh() -> Iterator[Recorder]:
    """A fresh in-memory recorder installed as this process's recorder."""
    saved = _State.current
    rec = _State.current = Recorder(None)
    yield rec
    _State.current = saved


def test_import_needs_prometheus_client_only() -> None:
    out = run_python("""
        import importlib.abc, json, sys
        BLOCKED = ("psutil", "psycopg", "redis", "yaml", "exporter.config",
                   "exporter.collectors")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED) and name.split(".")[0] != "prometheus_client":
                    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                        raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import exporter.instrument, exporter.instrument.wsgi, exporter.instrument.asgi
        import exporter.instrument.gunicorn, exporter.instrument.django
        import exporter.instrument.celery
        print(json.dumps(sorted(m for m in sys.modules
                                if any(m == b or m.startswith(b + ".") for b in BLOCKED))))
    """, {"DJANGO_SETTINGS_MODULE": "tests.django_app.settings"})
    assert json.loads(out) == []


def test_files_read_the_same_by_prometheus_client_and_by_the_merger(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path))
    for seconds in (0.004, 0.06, 0.3, 2.2, 6.0, 50.0):
        rec.request_started()
        rec.request_finished(ROUTE, "GET", 200, seconds, db_queries=60, db_seconds=0.02)
    rec.request_started()
    rec.request_exception(ROUTE, "POST")
    rec.task_finished("chat.cleanup", "succeeded", 0.3)
    names = sorted(os.listdir(tmp_path))
    assert [n.split("_")[0] for n in names if n.endswith(".db")] == \
        ["counter", "gauge", "histogram"]
    assert writer_alive(str(tmp_path), rec.store.ident)

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(tmp_path))
    theirs = parse_metrics(generate_latest(registry).decode())
    merger = Merger()
    for name in names:
        if name.endswith(".db"):
            merger.add(name[:-3].rpartition("_")[0], read_entries(str(tmp_path / name)))
    mine_registry = CollectorRegistry()
    mine_registry.register(_Families(merger.families()))
    mine = parse_metrics(generate_latest(mine_registry).decode())
    assert mine == theirs
    labels = {"route": ROUTE, "method": "GET"}
    assert value(mine, "qatoolbox_http_request_duration_seconds_count", **labels) == 6
    assert value(mine, "qatoolbox_http_request_duration_seconds_bucket", le="2.0", **labels) == 3
    assert value(mine, "qatoolbox_http_request_duration_seconds_bucket", le="30.0",
                 **labels) == 5
    assert value(mine, "qatoolbox_http_request_db_queries_bucket", route=ROUTE, le="50.0") == 0
    assert value(mine, "qatoolbox_http_request_db_queries_bucket", route=ROUTE, le="75.0") == 6
    assert value(mine, "qatoolbox_http_requests_total", status="200", **labels) == 6
    assert value(mine, "qatoolbox_http_request_exceptions_total", route=ROUTE,
                 method="POST") == 1
    assert value(mine, "qatoolbox_http_requests_in_flight") == 1
    assert value(mine, "qatoolbox_celery_tasks_total", task="chat.cleanup",
                 state="succeeded") == 1
    rec.close()
    assert not writer_alive(str(tmp_path), rec.store.ident)


class _Families:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return self.families


def test_file_grows_past_its_first_size(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path))
    for i in range(400):
        rec.request_started()
        rec.request_finished(f"route/{i}/", "GET", 200, 0.01)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("histogram_"))
    assert path.stat().st_size > 1 << 15
    entries = dict(read_entries(str(path)))
    assert len(entries) == 400 * (len(instrument.DURATION_BUCKETS) + 1)
    assert sum(v for k, v in entries.items() if '"le"' in k) == 400


def test_series_are_capped(fresh: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instrument, "MAX_SERIES", 3)
    for i in range(6):
        fresh.request_started()
        fresh.request_finished(f"leaky/{i}", "GET", 200 + i, 0.01)
    found = samples(fresh)
    routes = {dict(lbl)["route"] for (n, lbl) in found
              if n == "qatoolbox_http_requests_total"}
    assert routes == {"leaky/0", "leaky/1", "leaky/2", "<other>"}
    total = sum(v for (n, _), v in found.items() if n == "qatoolbox_http_requests_total")
    assert total == 6
    assert value(found, "qatoolbox_http_requests_total", route="<other>", method="GET",
                 status="other") == 3


def test_task_series_are_capped(fresh: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instrument, "MAX_SERIES", 2)
    for i in range(5):
        fresh.task_finished(f"tasks.leaky_{i}", "succeeded", 0.5)
    found = samples(fresh)
    tasks = {dict(lbl)["task"] for (n, lbl) in found if n == "qatoolbox_celery_tasks_total"}
    assert tasks == {"tasks.leaky_0", "tasks.leaky_1", "<other>"}
    assert value(found, "qatoolbox_celery_tasks_total", task="<other>",
                 state="succeeded") == 3
    assert value(found, "qatoolbox_celery_task_duration_seconds_count", task="<other>") == 3


def test_method_normalized() -> None:
    assert instrument.normalize_method("PATCH") == "PATCH"
    assert instrument.normalize_method("PROPFIND") == "other"


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path.startswith("/items/") or path == "/":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"item"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"missing"]


def _route(environ: Any) -> str | None:
    path = environ.get("PATH_INFO") or environ.get("path", "")
    if path == "/":
        return ""  # a router's template for the site root, as Django's path("", view) has it
    return "/items/{id}" if path.startswith("/items/") else ("/boom" if path == "/boom" else None)


def test_wsgi_middleware(fresh: Recorder) -> None:
    app = PrometheusWSGIMiddleware(_wsgi_app, _route, skip_paths=("/healthz",))

    def call(path: str, method: str = "GET") -> int:
        seen: list[str] = []
        body = app({"PATH_INFO": path, "REQUEST_METHOD": method},
                   lambda status, headers, exc=None: seen.append(status))
        b"".join(body)
        close = getattr(body, "close", None)
        if close:
            close()
        return int(seen[0][:3])

    assert call("/items/1") == 200
    assert call("/items/2", "PROPFIND") == 200
    assert call("/nope") == 404
    assert call("/healthz") == 404
    assert call("/") == 200
    with pytest.raises(RuntimeError):
        call("/boom")
    found = samples(fresh)
    # The root's empty template is "/", never merged with the requests no route matched.
    assert value(found, "qatoolbox_http_requests_total", route="/", method="GET",
                 status="200") == 1
    assert value(found, "qatoolbox_http_requests_total", route="/items/{id}", method="GET",
                 status="200") == 1
    assert value(found, "qatoolbox_http_requests_total", route="/items/{id}", method="other",
                 status="200") == 1
    assert value(found, "qatoolbox_http_requests_total", route="<unmatched>", method="GET",
                 status="404") == 1
    assert value(found, "qatoolbox_http_requests_total", route="/boom", method="GET",
                 status="500") == 1
    assert value(found, "qatoolbox_http_request_exceptions_total", route="/boom",
                 method="GET") == 1
    assert value(found, "qatoolbox_http_requests_in_flight") == 0
    total = sum(v for (n, _), v in found.items() if n == "qatoolbox_http_requests_total")
    assert total == 5  # /healthz skipped


def test_asgi_middleware(fresh: Recorder) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        status = 200 if scope["path"].startswith("/items/") or scope["path"] == "/" else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    wrapped = PrometheusASGIMiddleware(app, _route)

    async def call(path: str) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            pass

        await wrapped({"type": "http", "path": path, "method": "POST"}, receive, send)

    async def main() -> None:
        await call("/items/7")
        await call("/elsewhere")
        await call("/")
        with pytest.raises(RuntimeError):
            await call("/boom")
        await wrapped({"type": "lifespan"}, receive_nothing, send_nothing)

    async def receive_nothing() -> dict[str, Any]:
        return {}

    async def send_nothing(message: Any) -> None:
        pass

    asyncio.run(main())
    found = samples(fresh)
    assert value(found, "qatoolbox_http_requests_total", route="/items/{id}", method="POST",
                 status="200") == 1
    assert value(found, "qatoolbox_http_requests_total", route="<unmatched>", method="POST",
                 status="404") == 1
    assert value(found, "qatoolbox_http_requests_total", route="/", method="POST",
                 status="200") == 1
    assert value(found, "qatoolbox_http_requests_total", route="/boom", method="POST",
                 status="500") == 1
    assert value(found, "qatoolbox_http_request_exceptions_total", route="/boom",
                 method="POST") == 1
    assert value(found, "qatoolbox_http_requests_in_flight") == 0


def test_django_middleware_in_process() -> None:
    out = run_python("""
        import json, django
        django.setup()
        from django.test import Client
        from prometheus_client import CollectorRegistry, generate_latest
        from exporter import instrument
        c = Client(raise_request_exception=False)
        codes = [c.get("/fast/").status_code, c.get("/api/items/5/").status_code,
                 c.get("/api/items/1000/").status_code,
                 c.post("/api/chat/rooms/abc/").status_code,
                 c.get("/queries/?n=60").status_code, c.get("/queries/?n=3").status_code,
                 c.get("/no/such/path").status_code, c.get("/boom/").status_code,
                 c.generic("PROPFIND", "/fast/").status_code, c.get("/healthz").status_code]
        reg = CollectorRegistry()
        reg.register(instrument.collector())
        print(json.dumps({"codes": codes, "text": generate_latest(reg).decode()}))
    """, {"DJANGO_SETTINGS_MODULE": "tests.django_app.settings"})
    result = json.loads(out)
    assert result["codes"] == [200, 200, 404, 200, 200, 200, 404, 500, 200, 200]
    found = parse_metrics(result["text"])

    def requests(route: str, method: str, status: str) -> float | None:
        return value(found, "qatoolbox_http_requests_total", route=route, method=method,
                     status=status)

    assert requests("fast/", "GET", "200") == 1
    assert requests("fast/", "other", "200") == 1
    assert requests("api/items/<int:item_id>/", "GET", "200") == 1
    assert requests("api/items/<int:item_id>/", "GET", "404") == 1
    assert requests("api/chat/rooms/<str:room_id>/", "POST", "200") == 1
    assert requests("<unmatched>", "GET", "404") == 1
    assert requests("boom/", "GET", "500") == 1
    total = sum(v for (n, _), v in found.items() if n == "qatoolbox_http_requests_total")
    assert total == 9  # /healthz is skipped
    assert value(found, "qatoolbox_http_request_exceptions_total", route="boom/",
                 method="GET") == 1
    assert value(found, "qatoolbox_http_requests_in_flight") == 0
    q = {"route": "queries/"}
    assert value(found, "qatoolbox_http_request_db_queries_count", **q) == 2
    assert value(found, "qatoolbox_http_request_db_queries_sum", **q) == 63
    assert value(found, "qatoolbox_http_request_db_queries_bucket", le="50.0", **q) == 1
    assert value(found, "qatoolbox_http_request_db_queries_bucket", le="75.0", **q) == 2
    db_sum = value(found, "qatoolbox_http_request_db_seconds_sum", **q)
    assert db_sum is not None and 0 < db_sum < 10
    assert value(found, "qatoolbox_http_request_db_queries_sum", route="fast/") == 0
    routes = {dict(lbl).get("route", "") for (_, lbl) in found}
    assert not any("abc" in r or "1000" in r for r in routes)


def test_django_middleware_counts_only_each_requests_own_queries() -> None:
    """The per-thread query counter stays on the connection: queries the thread runs between
    requests, and a view's own execute_wrapper around ours, change nothing of the counts."""
    out = run_python("""
        import json, threading, django
        django.setup()
        from django.db import connection
        from django.test import Client
        from prometheus_client import CollectorRegistry, generate_latest
        from exporter import instrument
        c = Client(raise_request_exception=False)
        c.get("/queries/?n=2")
        with connection.cursor() as cursor:
            for _ in range(5):
                cursor.execute("SELECT 1")  # outside any request
        seen = []
        with connection.execute_wrapper(lambda ex, sql, p, many, ctx: seen.append(sql)
                                        or ex(sql, p, many, ctx)):
            c.get("/queries/?n=3")
        c.get("/fast/")
        other = threading.Thread(target=lambda: Client().get("/queries/?n=4"))
        other.start()
        other.join()
        reg = CollectorRegistry()
        reg.register(instrument.collector())
        wrappers = len(connection.execute_wrappers)
        print(json.dumps({"text": generate_latest(reg).decode(), "seen": len(seen),
                          "wrappers": wrappers}))
    """, {"DJANGO_SETTINGS_MODULE": "tests.django_app.settings"})
    result = json.loads(out)
    found = parse_metrics(result["text"])
    q = {"route": "queries/"}
    assert value(found, "qatoolbox_http_request_db_queries_count", **q) == 3
    assert value(found, "qatoolbox_http_request_db_queries_sum", **q) == 2 + 3 + 4
    assert value(found, "qatoolbox_http_request_db_queries_sum", route="fast/") == 0
    assert result["seen"] == 3  # the view's wrapper still saw its queries
    assert result["wrappers"] == 1  # ours, once for the thread; the view's one is gone


def test_django_site_root_is_labelled_slash() -> None:
    """QAToolBox routes its home page as path("", home_view): the empty template is "/" in the
    middleware's series and in route_of(), and never "<unmatched>" (which stays the 404s')."""
    out = run_python("""
        import json, django
        django.setup()
        from django.test import Client, RequestFactory
        from prometheus_client import CollectorRegistry, generate_latest
        from exporter import instrument
        from exporter.instrument.django import route_of
        c = Client(raise_request_exception=False)
        home, missing = c.get("/"), c.get("/no/such/path")
        unresolved = RequestFactory().get("/no/such/path")  # resolver_match None
        reg = CollectorRegistry()
        reg.register(instrument.collector())
        print(json.dumps({"codes": [home.status_code, missing.status_code],
                          "route_of": [route_of(home), route_of(unresolved)],
                          "text": generate_latest(reg).decode()}))
    """, {"DJANGO_SETTINGS_MODULE": "tests.django_app.settings"})
    result = json.loads(out)
    assert result["codes"] == [200, 404]
    assert result["route_of"] == ["/", "<unmatched>"]
    found = parse_metrics(result["text"])
    assert value(found, "qatoolbox_http_requests_total", route="/", method="GET",
                 status="200") == 1
    assert value(found, "qatoolbox_http_requests_total", route="<unmatched>", method="GET",
                 status="200") is None
    assert value(found, "qatoolbox_http_requests_total", route="<unmatched>", method="GET",
                 status="404") == 1


def test_fork_gives_the_child_its_own_files(tmp_path: Path) -> None:
    out = run_python("""
        import json, os
        from exporter import instrument
        rec = instrument.recorder()
        rec.request_started()
        rec.request_finished("parent/", "GET", 200, 0.01)
        pid = os.fork()
        if pid == 0:
            child = instrument.recorder()
            child.request_started()
            child.request_finished("child/", "GET", 200, 0.01)
            os._exit(0 if child is not rec else 3)
        _, status = os.waitpid(pid, 0)
        rec.request_started()
        rec.request_finished("parent/", "GET", 200, 0.01)
        print(json.dumps({"status": status, "parent": rec.store.ident, "child_pid": pid}))
    """, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    result = json.loads(out)
    assert result["status"] == 0
    counters = {p.name: dict(read_entries(str(p))) for p in tmp_path.glob("counter_*.db")}
    assert len(counters) == 2
    parent = counters[f"counter_{result['parent']}.db"]
    child = next(v for k, v in counters.items() if k.startswith(f"counter_{result['child_pid']}-"))
    assert [v for k, v in parent.items() if "parent/" in k] == [2.0]
    assert not any("child/" in k for k in parent)
    assert [v for k, v in child.items() if "child/" in k] == [1.0]
    assert not any("parent/" in k for k in child)


def test_buckets_are_dense_around_the_thresholds() -> None:
    bounds = instrument.DURATION_BUCKETS
    assert bounds[-1] == math.inf and 10.0 in bounds and 2.0 in bounds and 5.0 in bounds
    assert len([b for b in bounds if 0.05 <= b <= 5.0]) >= 14
    assert 50.0 in instrument.DB_QUERY_BUCKETS and 1.0 in instrument.DB_SECONDS_BUCKETS


def test_gunicorn_setup_empties_all_but_live_writers(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.instrument.gunicorn import mark_worker_dead, setup_multiproc_dir

    folder = tmp_path / "metrics"
    # setenv first so that the variable the hook sets is undone after the test.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "unset-me")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        setup_multiproc_dir()
    assert setup_multiproc_dir(str(folder)) == str(folder)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
    live, gone = Recorder(str(folder)), Recorder(str(folder))
    for rec in (live, gone):
        rec.request_started()
        rec.request_finished("r/", "GET", 200, 0.1)
    gone.close()
    (folder / "counter_777.db").write_bytes(b"\0" * 16)
    (folder / "counter_folded.db").write_bytes(b"\0" * 16)
    setup_multiproc_dir(str(folder))
    left = sorted(p.name for p in folder.iterdir())
    assert left and all(live.store.ident in name for name in left), left

    # child_exit: a dead worker's in-flight gauge goes, its counters stay for the exporter.
    other = Recorder(str(folder))
    other.request_started()
    other.close()
    pid = os.getpid()
    mark_worker_dead(pid, str(folder))
    names = {p.name for p in folder.iterdir()}
    assert f"gauge_livesum_{other.store.ident}.db" not in names
    assert f"counter_{other.store.ident}.db" in names
    assert f"gauge_livesum_{live.store.ident}.db" in names  # same pid, but alive
    live.close()


def test_gunicorn_setup_is_not_held_by_a_fifo_lock(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's master checks writers' locks too: a FIFO or symlink at a lock's name (left
    by code in a worker) must neither block gunicorn's start nor be followed."""
    import threading

    from exporter.instrument.gunicorn import setup_multiproc_dir

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    fifo_ident, link_ident = "4242-0123456789abcdef", "4243-0123456789abcdef"
    (tmp_path / f"counter_{fifo_ident}.db").write_bytes(b"\0" * 16)
    os.mkfifo(tmp_path / f"{fifo_ident}.lock")
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_bytes(b"keep")
    (tmp_path / f"counter_{link_ident}.db").write_bytes(b"\0" * 16)
    (tmp_path / f"{link_ident}.lock").symlink_to(victim)
    assert not writer_alive(str(tmp_path), link_ident)
    done = threading.Event()

    def setup() -> None:
        setup_multiproc_dir(str(tmp_path))
        done.set()

    thread = threading.Thread(target=setup, daemon=True)
    thread.start()
    try:
        assert done.wait(10), "setup_multiproc_dir blocked on a FIFO named like a lock"
    finally:
        if not done.is_set():
            # Give the blocked open() its writer, so the thread ends.
            os.close(os.open(tmp_path / f"{fifo_ident}.lock", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
    assert not (tmp_path / f"counter_{fifo_ident}.db").exists()
    assert victim.read_bytes() == b"keep"


def test_gunicorn_setup_creates_the_folder_0770_and_keeps_an_existing_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/app.md: the folder is the app's user's and a group's, nobody else's (0770), whatever
    the umask; a folder the operator made keeps the mode they chose."""
    from exporter.instrument.gunicorn import setup_multiproc_dir

    # setup_multiproc_dir exports the folder; keep that out of later tests' environment.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    old_umask = os.umask(0o022)
    try:
        created = tmp_path / "runtime" / "metrics"
        setup_multiproc_dir(str(created))
        assert created.stat().st_mode & 0o7777 == 0o770
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o750)
        setup_multiproc_dir(str(existing))
        assert existing.stat().st_mode & 0o7777 == 0o750
    finally:
        os.umask(old_umask)
