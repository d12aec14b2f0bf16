"""The demo wired end to end: gunicorn + Celery on PostgreSQL and Redis, loadgen, the exporter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import (
    ROOT,
    ExporterProcess,
    PostgresServer,
    RedisServer,
    Scrape,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.integration

DEMO = ROOT / "examples" / "qatoolbox_demo"
LOADGEN = ROOT / "examples" / "loadgen" / "loadgen.py"
OTHER_COLLECTORS = {"host": False, "process": False, "postgres": False, "business": False,
                    "redis": False}


def demo_env(postgres: PostgresServer, redis: RedisServer, metrics: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROMETHEUS_MULTIPROC", "DB_", "REDIS_", "DJANGO_",
                                "QATOOLBOX_DEMO_"))}
    env.update(postgres.env(dbname="qatoolbox"))
    env.update({"REDIS_URL": redis.url, "PROMETHEUS_MULTIPROC_DIR": str(metrics),
                "DJANGO_SETTINGS_MODULE": "demo.settings", "PYTHONPATH": str(ROOT)})
    return env


def manage(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=DEMO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_demo_under_gunicorn_and_celery_with_loadgen(
        postgres: PostgresServer, redis_server: RedisServer, workdir: Path,
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    postgres.execute("CREATE DATABASE qatoolbox")
    web, tasks = workdir / "web", workdir / "celery"
    tasks.mkdir()
    env = demo_env(postgres, redis_server, web)
    manage(env, "migrate", "--verbosity", "0")
    manage(env, "seed_demo", "--users", "20", "--rooms", "10", "--messages", "30",
           "--capsules", "5")
    # Two active rooms: one not updated for two days (to expire), one updated an hour ago.
    postgres.execute(
        "UPDATE tools_chatroom SET status = 'inactive';"
        "UPDATE tools_chatroom SET status = 'active', updated_at = now() - interval '2 days' "
        "WHERE id = (SELECT min(id) FROM tools_chatroom);"
        "UPDATE tools_chatroom SET status = 'active', updated_at = now() - interval '1 hour' "
        "WHERE id = (SELECT max(id) FROM tools_chatroom);", dbname="qatoolbox")

    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(workdir / "demo-gunicorn.log", "ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                 "demo.wsgi:application"], cwd=DEMO, stdout=log, stderr=subprocess.STDOUT,
                env={**env, "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_WORKERS": "2"},
                start_new_session=True))
        with open(workdir / "demo-celery.log", "ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "demo.celery", "worker", "--pool=solo",
                 "--without-heartbeat", "--without-gossip", "--without-mingle",
                 "--loglevel=WARNING"], cwd=DEMO, stdout=log, stderr=subprocess.STDOUT,
                env={**env, "PROMETHEUS_MULTIPROC_DIR": str(tasks)}, start_new_session=True))
        exporter = exporter_factory(
            config={"app": {"multiprocess_dirs": [str(web), str(tasks)]},
                    "collectors": OTHER_COLLECTORS})

        import urllib.request

        def up() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return bool(r.status == 200)

        wait_for(up, 30, "demo gunicorn")
        # The site root, path("", home) as in QAToolBox: route "/", not "<unmatched>".
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200
        load = subprocess.run(
            [sys.executable, str(LOADGEN), "--url", f"http://127.0.0.1:{port}", "--rate", "40",
             "--duration", "3", "--seed", "7", "--weights",
             "fast=55,write=15,slow=5,client_error=20,server_error=5"],
            capture_output=True, text=True, timeout=60, check=False)
        assert load.returncode == 0, load.stderr
        summary = json.loads(load.stdout)
        statuses = {int(k): v for k, v in summary["statuses"].items()}
        sent = sum(statuses.values())
        assert sent > 60 and summary["connection_errors"] == 0

        def requests(scrape: Scrape) -> dict[str, float]:
            by_status: dict[str, float] = {}
            for (name, labels), value in scrape.samples.items():
                if name == "qatoolbox_http_requests_total":
                    status = dict(labels)["status"]
                    by_status[status] = by_status.get(status, 0) + value
            return by_status

        # loadgen's room discovery is one more GET /rooms/ (200), and GET / one more.
        want = {str(k): float(v + (2 if k == 200 else 0)) for k, v in statuses.items()}
        wait_for(lambda: requests(exporter.scrape()) == want, 20, f"request totals {want}")
        scrape = exporter.scrape()
        routes = {dict(lbl).get("route") for (n, lbl) in scrape.samples
                  if n == "qatoolbox_http_requests_total"}
        assert {"/", "rooms/", "rooms/<str:room_id>/messages/", "fail/", "<unmatched>"} <= routes
        assert scrape.value("qatoolbox_http_requests_total", route="/", method="GET",
                            status="200") == 1
        assert scrape.value("qatoolbox_http_request_exceptions_total", route="fail/",
                            method="GET") == statuses.get(500, 0)
        assert scrape.value("qatoolbox_http_requests_in_flight") == 0
        db = scrape.value("qatoolbox_http_request_db_queries_count", route="rooms/")
        assert db is not None and db > 0

        from celery import Celery  # type: ignore[import-untyped]

        # The load wrote to the active rooms (updated_at now): age the first one again.
        postgres.execute("UPDATE tools_chatroom SET updated_at = now() - interval '2 days' "
                         "WHERE id = (SELECT min(id) FROM tools_chatroom)", dbname="qatoolbox")
        # Routed as the demo routes the tools app's tasks (QAToolBox's task_routes).
        Celery("client", broker=redis_server.url).send_task(
            "tools.cleanup_expired_chat_rooms", queue="tools")
        wait_for(lambda: exporter.scrape().value(
            "qatoolbox_celery_tasks_total", task="tools.cleanup_expired_chat_rooms",
            state="succeeded") == 1, 60, f"cleanup task run (log {workdir}/demo-celery.log)")
        rows = postgres.execute("SELECT status, count(*) FROM tools_chatroom "
                                "WHERE status IN ('active', 'expired') GROUP BY status "
                                "ORDER BY 1", dbname="qatoolbox")
        assert rows == [("active", 1), ("expired", 1)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
