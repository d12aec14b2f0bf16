"""Every dashboard query against a real Prometheus scraping the real exporter under traffic.

One stack for the module (tests/stack.py, the code scripts/stack runs): throwaway PostgreSQL
with pg_stat_statements and the demo app's schema and data, Redis, the demo app under gunicorn
with a Celery worker, the exporter with every collector, and Prometheus with the repository's
config and rules scraping every second. After some mixed traffic, each panel query, with the
variables set to All and $__rate_interval set to a short window, goes to Prometheus: all must
parse, and at least 95% must return data (a sample that is not NaN).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.grafana_queries import (
    PROMETHEUS_SERIES,
    Query,
    expand,
    iter_panels,
    iter_queries,
    load_dashboards,
    metric_names,
)
from tests.harness import ROOT, free_port, tempdir, wait_for
from tests.stack import Stack, port_free

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL = "1s"
# What Grafana makes of $__rate_interval at a 1 s scrape interval is 4 s at least; a little
# more keeps single slow scrapes from emptying a window.
RATE_WINDOW = "15s"
TRAFFIC_SECONDS = 22.0

# Queries allowed to return nothing here, each with its reason (by "dashboard / panel / ref").
NO_DATA_EXPECTED = {
    "postgres.json / Replication lag / A":
        "replay lag exists only on a replica; the test server is a primary",
    "postgres.json / Replication lag / B":
        "per-replica lag needs a streaming replica; the test server has none",
    "redis.json / Replication and persistence / B":
        "master_link_up exists only on a Redis replica",
    "http.json / Request rate, baseline and last week / B":
        "the traffic baseline needs two weeks of history; the test has seconds",
    "http.json / Request rate, baseline and last week / C":
        "last week's traffic needs a week of history",
    "http.json / Traffic z-score / A": "the z-score needs the baseline (two weeks of history)",
    # The demo runs as QAToolBox does today: time capsules are gone (its tools migration
    # 0070); "Time capsules here" says so on the business dashboard.
    "overview.json / Overdue time capsules / A": "no time capsule table at QAToolBox's HEAD",
    "business.json / Time capsules / A": "no time capsule table at QAToolBox's HEAD",
    "business.json / Overdue time capsules / A": "no time capsule table at QAToolBox's HEAD",
}
# Metric names the exporter only exposes in situations the test does not create.
ABSENT_METRICS = {
    "qatoolbox_postgres_replication_lag_seconds": "only on a replica",
    "qatoolbox_postgres_replica_lag_bytes": "only on a primary with replicas",
    "qatoolbox_redis_master_link_up": "only on a Redis replica",
    "instance:qatoolbox_http_requests:rate5m_prediction": "needs two weeks of history",
    "instance:qatoolbox_http_requests:rate5m_zscore": "needs two weeks of history",
    "qatoolbox_time_capsules": "only where tools_timecapsule exists (before QAToolBox's 0070)",
    "qatoolbox_time_capsules_overdue": "only where tools_timecapsule exists",
}
# Shares that may leave [0, 1] by definition, by "dashboard / panel / ref".
SIGNED_SHARES = {
    "slo.json / Error budget remaining / A":
        "1 - the period's burn rate: negative once the budget is overspent (the load "
        "generator's 5xx and slow requests overspend it in seconds)",
}
MIN_DATA_SHARE = 0.95

ALWAYS_FIRING = """
groups:
  - name: dashboard-live-test
    rules:
      - alert: DashboardLiveTestAlert
        expr: vector(1)
        labels:
          severity: info
        annotations:
          summary: Always firing, so the firing-alert panels have an alert to show.
"""


def _postgres_activity(stack: Stack, stop: threading.Event) -> Iterator[None]:
    """Sessions that make the activity panels show something: a long query, a session idle in
    a transaction, a replication slot, a sort spilling to a temporary file."""
    assert stack.postgres is not None
    pg = stack.postgres
    pg.execute("SELECT pg_create_physical_replication_slot('dashboards_test', true)")
    idle = pg.connect("qatoolbox")
    idle.autocommit = False
    idle.execute("SELECT count(*) FROM tools_chatroom")  # idle in transaction from now on

    def long_query() -> None:
        with contextlib.suppress(Exception), pg.connect("qatoolbox") as conn:
            conn.execute("SELECT pg_sleep(60)")

    sleeper = threading.Thread(target=long_query, daemon=True)
    sleeper.start()
    with pg.connect("qatoolbox") as conn:
        conn.execute("SET work_mem = '64kB'")
        conn.execute("SELECT count(*) FROM (SELECT g FROM generate_series(1, 200000) g "
                     "ORDER BY g DESC) s")
        # Dead rows for the table-health panel, which autovacuum then cleans.
        conn.execute("UPDATE tools_chatroom SET last_activity = last_activity")
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            idle.close()
        with contextlib.suppress(Exception):
            pg.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                       "WHERE query LIKE 'SELECT pg_sleep(60)%'")


def _redis_keys(stack: Stack) -> None:
    """QAToolBox-shaped cache keys and a key with a TTL."""
    assert stack.redis is not None
    client = stack.redis.client()
    for i in range(50):
        client.set(f"qatoolbox:1:user:{i}", "x")
        client.set(f"qatoolbox:1:chat_room:{i}:members", "x")
    client.set("session:abc", "x", ex=3600)
    client.set("unrelated", "x")


def _keep_busy(stack: Stack, stop: threading.Event) -> None:
    """Until stop: cache lookups (half hit, half miss) and Celery tasks every second, so that
    rate windows ending at any moment of the test hold some."""
    assert stack.redis is not None and stack.app is not None
    client = stack.redis.client()
    while not stop.is_set():
        with contextlib.suppress(Exception):
            for i in range(20):
                client.get(f"qatoolbox:1:user:{i * 5}")
            stack.app.send_task("tools.unlock_due_capsules")
        stop.wait(1)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with tempdir() as base:
        rules = base / "always-firing.yml"
        rules.write_text(ALWAYS_FIRING)
        exporter_config: dict[str, Any] = {
            "collectors": {"postgres": True, "redis": True, "business": True, "app": True},
            # Refresh the cached families within the test's short life.
            "postgres": {"cache_interval": "2s"},
            "redis": {"key_scan_interval": "2s"},
        }
        stack = Stack(
            base, demo=True, alertmanager=False, scrape_interval=SCRAPE_INTERVAL,
            exporter_config=exporter_config, extra_rule_files=[rules],
            postgres_settings={"autovacuum_naptime": "1", "autovacuum_vacuum_threshold": "1",
                               "autovacuum_vacuum_scale_factor": "0",
                               "autovacuum_analyze_threshold": "1",
                               "autovacuum_analyze_scale_factor": "0"},
            redis_args=["--maxmemory", "256mb", "--maxmemory-policy", "noeviction"])
        stack.start()
        stop = threading.Event()
        activity = _postgres_activity(stack, stop)
        try:
            next(activity)
            _redis_keys(stack)
            assert stack.app is not None and stack.prometheus is not None
            app = stack.app
            busy = threading.Thread(target=_keep_busy, args=(stack, stop), daemon=True)
            busy.start()
            with contextlib.suppress(Exception):
                app.send_task("tools.cleanup_expired_chat_rooms", 2)
            # examples/loadgen: fast, writing, slow, 4xx and 5xx requests; it keeps going while
            # the tests query, so rate windows ending at any moment hold traffic.
            stack.start_load(rate=15, duration=300)
            time.sleep(TRAFFIC_SECONDS)
            prometheus = stack.prometheus
            wait_for(lambda: prometheus.query("up{job='qatoolbox'} == 1"), 10, "scrapes")
            yield stack
        finally:
            with contextlib.suppress(StopIteration):
                next(activity)
            stack.stop()


def _has_data(result: list[Any]) -> bool:
    if result and not isinstance(result[0], dict):  # a scalar: [time, "value"]
        return not math.isnan(float(result[1]))
    return any(not math.isnan(float(series["value"][1])) for series in result)


def _panel_queries() -> list[Query]:
    return list(iter_queries(load_dashboards(), with_annotations=True))


def test_every_query_parses_and_95_percent_return_data(stack: Stack) -> None:
    assert stack.prometheus is not None
    queries = _panel_queries()
    unparsable: list[str] = []
    empty: list[str] = []
    # Traffic, cache lookups and tasks keep going in the background while this runs.
    for query in queries:
        expr = expand(query.expr, RATE_WINDOW)
        try:
            result = stack.prometheus.query(expr)
        except AssertionError as exc:  # promstack's answer to an error status (a parse error)
            unparsable.append(f"{query.where}: {exc}")
            continue
        if not _has_data(result) and query.where not in NO_DATA_EXPECTED:
            empty.append(query.where)
    assert not unparsable, "\n".join(unparsable)
    share = 1 - len(empty) / len(queries)
    assert stack.exporter is not None
    warnings = [line for line in stack.exporter.logs().splitlines() if "level=info" not in line]
    assert share >= MIN_DATA_SHARE and not empty, (
        f"{len(empty)} of {len(queries)} queries returned no data ({share:.1%} did); "
        f"unexpected: {empty}; exporter log: {warnings[-10:]}")


def test_legends_name_labels_the_results_have(stack: Stack) -> None:
    # A legend "{{group}}" over a query whose aggregation dropped `group` shows the braces.
    assert stack.prometheus is not None
    wrong = []
    for name, dash in load_dashboards().items():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                if not labels:
                    continue
                result = stack.prometheus.query(expand(target["expr"], RATE_WINDOW))
                present = {k for series in result if isinstance(series, dict)
                           for k in series["metric"]}
                if result and labels - present:
                    wrong.append(f"{name} / {panel['title']} / {target['refId']}: "
                                 f"{sorted(labels - present)} not in {sorted(present)}")
    assert not wrong, "\n".join(wrong)


def target_unit(panel: dict[str, Any], ref: str) -> str:
    """The unit Grafana shows a target's values in: a table column's override, or the
    panel's default."""
    unit = str(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""))
    column = f"Value #{ref}"
    for step in panel.get("transformations", []):
        column = step.get("options", {}).get("renameByName", {}).get(column, column)
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        if override["matcher"] == {"id": "byName", "options": column}:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    unit = str(prop["value"])
    return unit


def test_shares_are_between_0_and_1(stack: Stack) -> None:
    # Panels in percentunit show shares: a value outside [0, 1] means a wrong formula
    # (a ratio upside down, a rate of a gauge, a per-CPU sum).
    assert stack.prometheus is not None
    wrong = []
    for name, dash in load_dashboards().items():
        for panel in iter_panels(dash):
            for target in panel.get("targets", []):
                if target_unit(panel, target["refId"]) != "percentunit":
                    continue
                if f"{name} / {panel['title']} / {target['refId']}" in SIGNED_SHARES:
                    continue
                for series in stack.prometheus.query(expand(target["expr"], RATE_WINDOW)):
                    value = float(series["value"][1])
                    # Counter rates over a short window wobble a little past 1.
                    if not math.isnan(value) and not -0.001 <= value <= 1.05:
                        wrong.append(f"{name} / {panel['title']} / {target['refId']}: "
                                     f"{value} {series['metric']}")
    assert not wrong, "\n".join(wrong)


def test_error_ratios_see_errors(stack: Stack) -> None:
    # The ratio panels fall back to 0 when no request failed; make sure that is not hiding a
    # status label the regex never matches (the load generator does cause 4xx and 5xx).
    assert stack.prometheus is not None
    for status in ("5..", "4..", "2.."):
        expr = f'sum(rate(qatoolbox_http_requests_total{{status=~"{status}"}}[5m])) > 0'
        assert stack.prometheus.query(expr), f"no {status} responses recorded"


def test_exceptions_are_still_needed(stack: Stack) -> None:
    # An exception that now returns data should be removed from the list.
    assert stack.prometheus is not None
    by_where = {q.where: q for q in _panel_queries()}
    for where in NO_DATA_EXPECTED:
        assert where in by_where, f"exception for a query that no longer exists: {where}"
        result = stack.prometheus.query(expand(by_where[where].expr, RATE_WINDOW))
        assert not _has_data(result), f"{where} returns data now: drop its exception"


def test_variable_queries_have_values(stack: Stack) -> None:
    assert stack.prometheus is not None
    for name, dash in load_dashboards().items():
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            # label_values(<selector>, <label>): the selector must select series with it.
            inner = var["definition"][len("label_values("):-1]
            selector, label = inner.rsplit(",", 1)
            result = stack.prometheus.query(expand(selector, RATE_WINDOW))
            values = {series["metric"].get(label.strip()) for series in result} - {None}
            assert values, f"{name}: variable {var['name']} would have no values"


def test_every_metric_used_is_exposed(stack: Stack) -> None:
    assert stack.prometheus is not None
    exposed = set(stack.prometheus.api("label/__name__/values"))
    used = {name for q in _panel_queries() for name in metric_names(q.expr)}
    missing = sorted(used - exposed - PROMETHEUS_SERIES - set(ABSENT_METRICS))
    assert not missing, f"dashboards use metrics the exporter did not expose: {missing}"


def test_scripts_stack_prints_urls_and_stops_everything_on_ctrl_c() -> None:
    # The command a person runs, without the demo: exporter, Prometheus, Alertmanager.
    ports = [free_port(), free_port(), free_port()]
    # Never the machine's shared PostgreSQL or Redis: point the exporter at closed ports.
    env = {**os.environ, "DB_HOST": "127.0.0.1", "DB_PORT": "1",
           "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "stack"), "--clean", "--exporter-port", str(ports[0]),
         "--prometheus-port", str(ports[1]), "--alertmanager-port", str(ports[2])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.strip().startswith("logs"):
                break
        output = "".join(lines)
        for name, port in zip(("exporter", "prometheus"), ports[:2], strict=True):
            assert f"{name}" in output and f"http://127.0.0.1:{port}" in output, output
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/healthz",
                                    timeout=10) as response:  # closed: no ResourceWarning
            assert response.status == 200
        query = urllib.parse.urlencode({"query": 'up{job="qatoolbox"} == 1'})

        def scraped() -> bool:
            url = f"http://127.0.0.1:{ports[1]}/api/v1/query?{query}"
            with urllib.request.urlopen(url, timeout=5) as response:
                return bool(json.loads(response.read())["data"]["result"])

        wait_for(scraped, 30, "Prometheus scraping the exporter")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    for port in ports:
        assert port_free(port), f"port {port} still in use after Ctrl-C"
