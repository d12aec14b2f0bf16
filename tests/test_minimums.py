"""The exporter at the oldest dependency versions pyproject.toml allows.

scripts/test installs exactly those minimums in .venv-min (tests/minimums.py); here the exporter
runs from that interpreter against a real PostgreSQL and Redis and answers Prometheus' own
request with every collector succeeding and output promtool accepts. Also: the application side
(exporter.instrument, what a Django app imports) loads none of the exporter's other
dependencies."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import ROOT, ExporterProcess, PostgresServer, RedisServer, wait_for
from tests.minimums import PINS_FILE, minimum_pins
from tests.test_http_robustness import PROMETHEUS_ACCEPT

pytestmark = pytest.mark.integration

MINIMUMS = ROOT / ".venv-min"


def installed_pins() -> list[str]:
    marker = MINIMUMS / PINS_FILE
    return marker.read_text().split() if marker.exists() else []


def scrape_as_prometheus(exporter: ExporterProcess) -> str:
    request = urllib.request.Request(f"{exporter.url}/metrics", headers={
        "Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body: bytes = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body.decode()


def test_minimum_versions_are_what_pyproject_says() -> None:
    pins = minimum_pins()
    assert {p.split("==")[0].split("[")[0] for p in pins} >= {
        "prometheus-client", "psycopg", "pyyaml", "bcrypt"}
    if not installed_pins():
        pytest.skip("no .venv-min: scripts/test installs it (python -m tests.minimums install)")
    assert installed_pins() == pins, "re-run scripts/test: .venv-min is out of date"
    freeze = subprocess.run([str(MINIMUMS / "bin" / "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.lower()
    for pin in pins:
        name, version = pin.split("==")
        assert f"{name.split('[')[0].replace('_', '-')}=={version}" in freeze.replace("_", "-")


def test_exporter_runs_at_the_minimums(
    pg_factory: Callable[..., PostgresServer],
    redis_factory: Callable[..., RedisServer],
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    if not installed_pins():
        pytest.skip("no .venv-min: scripts/test installs it (python -m tests.minimums install)")
    postgres, redis = pg_factory(), redis_factory()
    exporter = exporter_factory(
        env={"DB_HOST": postgres.host, "DB_PORT": str(postgres.port), "DB_NAME": "postgres",
             "DB_USER": "postgres", "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"},
        args=["--no-collector.business", "--no-collector.app"],
        python=str(MINIMUMS / "bin" / "python"))
    version = subprocess.run(
        [exporter.python, "-c", "import prometheus_client, psycopg, yaml; "
         "from importlib.metadata import version; print(version('prometheus-client'))"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert f"prometheus-client=={version}" in installed_pins()

    def all_up() -> bool:
        found = exporter.scrape()
        return found.value("qatoolbox_postgres_up", server=server) == 1

    server = next(labels["server"] for name, labels in exporter.scrape().series()
                  if name == "qatoolbox_postgres_up")
    wait_for(all_up, 30, "PostgreSQL up at the minimums")
    text = scrape_as_prometheus(exporter)
    assert text.endswith("# EOF\n"), text[-200:]  # OpenMetrics, as Prometheus asked
    samples = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    failed = [series for series, value in samples
              if series.startswith("qatoolbox_exporter_collector_success") and float(value) != 1]
    assert failed == [], failed
    for name in ("qatoolbox_postgres_up", "qatoolbox_redis_up"):
        values = [float(value) for series, value in samples if series.startswith(name + "{")]
        assert values == [1.0], (name, values)
    plain = exporter.get("/metrics")[2].decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=plain, capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_application_side_imports_prometheus_client_only() -> None:
    # (exporter.instrument.celery and .django import Celery and Django, whose own imports are
    # the application's business; PyYAML comes with kombu, for one.)
    code = ("import sys; import exporter.instrument, exporter.instrument.wsgi, "
            "exporter.instrument.asgi, exporter.instrument.gunicorn; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=Path(ROOT), env=env).stdout.split()
    assert "prometheus_client" in out
    assert not {"psycopg", "redis", "yaml", "psutil", "bcrypt"} & set(out), out
