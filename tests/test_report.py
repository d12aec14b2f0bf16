"""`qatoolbox-exporter report` and `export` against a real Prometheus loaded with a known
fortnight (tests/test_report_data.py): every number of the report's JSON against Prometheus'
own answer to an independently written query (raw series where the report reads recording
rules, rate() where it uses increase(), and so on) and against the generator's arithmetic where
that is known outright; the CSV files through the csv module; the HTML in headless Chromium;
the failure modes (Prometheus unreachable, empty range, unknown metric, bad query, failed
queries, interruption) leave nothing half-written that looks complete."""

from __future__ import annotations

import base64
import contextlib
import csv
import email
import email.policy
import hashlib
import hmac
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ROOT, free_port, stop_process, wait_for
from tests.promstack import PROMETHEUS_BIN, PrometheusServer
from tests.test_report_data import (
    ALERT_EPISODES,
    CACHE1,
    CACHE2,
    DAY,
    DB1,
    DB2,
    END,
    FIRST,
    INCIDENT,
    NOT_TWIN,
    OUTAGE,
    WEEK,
    load_fortnight,
    true_error_ratio_mean,
    true_messages,
    true_requests,
)
from tests.test_web_security import bcrypt_hash, make_ca, make_cert

pytestmark = pytest.mark.integration

T = END  # the report's end
P = END - WEEK  # its start, and the previous period's end
W = f"{WEEK}s"
STEP = 1800  # the charts' step for a 7-day period
CURRENT = ["--to", "2024-03-11T00:00:00Z", "--range", "7d", "--timezone", "UTC"]
SLOW_SECONDS = 30.0


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command line as a user runs it: python -m exporter ARGS."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROMETHEUS_URL", "DINGTALK_"))}
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env, check=False)


def call(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line run in this process (no interpreter start-up per case): exit code,
    standard output and standard error, as run() gives them."""
    from exporter.cli import main

    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", newline="")
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
        code = main(list(args))
        stdout.flush()
    return subprocess.CompletedProcess(list(args), code, out.getvalue().decode(),
                                       err.getvalue())


@pytest.fixture(autouse=True)
def _no_environment_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROMETHEUS_URL", "DINGTALK_WEBHOOK_URL", "DINGTALK_SECRET"):
        monkeypatch.delenv(name, raising=False)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    server = load_fortnight(tmp_path_factory.mktemp("fortnight"))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Built:
    out: Path
    doc: dict[str, Any]
    proc: subprocess.CompletedProcess[str]
    seconds: float


@pytest.fixture(scope="module")
def built(prom: PrometheusServer, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The 7-day report of the fortnight's second week, built once for the module."""
    out = tmp_path_factory.mktemp("report") / "week-%Y-%m-%d"
    began = time.monotonic()
    proc = run("report", "--prometheus", prom.url, *CURRENT, "--out", str(out))
    seconds = time.monotonic() - began
    print(f"7-day report built in {seconds:.2f} s (process wall time)")
    directory = out.parent / "week-2024-03-11"
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((directory / "report.json").read_text())
    return Built(directory, doc, proc, seconds)


def scalar(prom: PrometheusServer, expr: str, at: float) -> float | None:
    result = prom.query(expr, at)
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def vector(prom: PrometheusServer, expr: str, at: float, by: tuple[str, ...]
           ) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(b, "") for b in by): float(r["value"][1])
            for r in prom.query(expr, at)}


# --- the independent expectations ------------------------------------------------------------

REQ = "qatoolbox_http_requests_total"
E5 = 'qatoolbox_http_requests_total{status=~"5.."}'
DUR = "qatoolbox_http_request_duration_seconds_bucket"
CPU = ('(1 - avg without (cpu) (sum without (mode) '
       '(rate(qatoolbox_host_cpu_seconds_total{mode=~"idle|iowait"}[5m]))))')
MEM = "(1 - qatoolbox_host_memory_available_bytes / qatoolbox_host_memory_total_bytes)"
FS = "(1 - qatoolbox_host_filesystem_avail_bytes / qatoolbox_host_filesystem_size_bytes)"
LOAD = ('(qatoolbox_host_load5 / on (job, instance) '
        'count without (cpu, mode) (qatoolbox_host_cpu_seconds_total{mode="idle"}))')
FINISHED = 'qatoolbox_celery_tasks_total{state=~"succeeded|failed"}'

FIGURES = {  # section.figure: a query giving the same number another way
    "http.requests": f"sum(rate({REQ}[{W}])) * {WEEK}",
    "http.rate_mean": f"sum(rate({REQ}[{W}]))",
    "http.rate_peak": f"max_over_time(sum(rate({REQ}[5m]))[{W}:5m])",
    "http.errors": f"sum(rate({E5}[{W}])) * {WEEK}",
    "http.error_ratio": f"sum(rate({E5}[{W}])) / sum(rate({REQ}[{W}]))",
    "http.error_ratio_peak": f"max_over_time((sum(rate({E5}[5m])) / sum(rate({REQ}[5m])))"
                             f"[{W}:5m])",
    "http.p95": f"histogram_quantile(0.95, sum by (le) (rate({DUR}[{W}])))",
    "http.p99": f"histogram_quantile(0.99, sum by (le) (rate({DUR}[{W}])))",
    "http.p99_peak": f"max_over_time(histogram_quantile(0.99, sum by (le) "
                     f"(rate({DUR}[5m])))[{W}:5m])",
    # Business and service series: the HA twin's copies left out (NOT_TWIN), so a report that
    # counted a database once per exporter watching it would be off by a factor of two.
    "business.active_users_7d": f'sum(qatoolbox_users_active{{window="7d",{NOT_TWIN}}})',
    "business.daily_active_peak": f"max_over_time(sum(qatoolbox_users_active"
                                  f'{{window="24h",{NOT_TWIN}}})[{W}:5m])',
    "business.messages": f"sum(rate(qatoolbox_chat_messages_total{{{NOT_TWIN}}}[{W}])) "
                         f"* {WEEK}",
    "business.rooms_active": f'sum(qatoolbox_chat_rooms{{status="active",{NOT_TWIN}}})',
    "business.users": f"sum(qatoolbox_users{{{NOT_TWIN}}})",
    "business.users_growth": f"sum(qatoolbox_users{{{NOT_TWIN}}}) - "
                             f"sum(qatoolbox_users{{{NOT_TWIN}}} offset {W})",
}


def _quantile_by(q: float, buckets: str, by: str, window: str = W) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({buckets}[{window}])))"


TABLES: dict[str, dict[str, str]] = {  # section.table: column -> query, by the table's labels
    "slo.objectives": {
        "objective": "slo:objective:ratio",
        "attainment": f"1 - sum_over_time(slo:sli_error:ratio_rate5m[{W}]) / "
                      f"count_over_time(slo:sli_error:ratio_rate5m[{W}])",
        "budget_remaining": "slo:period_error_budget_remaining:ratio",
        "burn_rate_peak": f"max_over_time(slo:current_burn_rate:ratio[{W}:5m])",
    },
    "http.routes": {
        "requests": f"sum by (route) (rate({REQ}[{W}])) * {WEEK}",
        "p95": _quantile_by(0.95, DUR, "route"),
        "p99": _quantile_by(0.99, DUR, "route"),
        "p95_peak": f"max_over_time({_quantile_by(0.95, DUR, 'route', '5m')}[{W}:5m])",
        "error_ratio": f"sum by (route) (rate({E5}[{W}])) / sum by (route) (rate({REQ}[{W}]))",
    },
    "http.db": {
        "queries_mean": f"sum by (route) (rate(qatoolbox_http_request_db_queries_sum[{W}])) / "
                        f"sum by (route) (rate(qatoolbox_http_request_db_queries_count[{W}]))",
        "queries_p95": _quantile_by(0.95, "qatoolbox_http_request_db_queries_bucket", "route"),
        "queries_p95_peak": "max_over_time("
                            + _quantile_by(0.95, "qatoolbox_http_request_db_queries_bucket",
                                           "route", "5m") + f"[{W}:5m])",
        "db_seconds_mean": f"sum by (route) (rate(qatoolbox_http_request_db_seconds_sum[{W}]))"
                           f" / sum by (route) "
                           f"(rate(qatoolbox_http_request_db_seconds_count[{W}]))",
    },
    "host.machines": {
        "cpu_peak": f"max_over_time({CPU}[{W}:5m])",
        "cpu_mean": f"avg_over_time({CPU}[{W}:5m])",
        "memory_peak": f"max_over_time({MEM}[{W}:5m])",
        "memory_mean": f"avg_over_time({MEM}[{W}:5m])",
        "load_peak": f"max_over_time({LOAD}[{W}:5m])",
    },
    "host.filesystems": {
        "usage_end": FS,
        "usage_peak": f"max_over_time({FS}[{W}:5m])",
        "avail_end": "qatoolbox_host_filesystem_avail_bytes",
        "full_in": f"qatoolbox_host_filesystem_avail_bytes / "
                   f"-(deriv(qatoolbox_host_filesystem_avail_bytes[{W}]) < 0)",
    },
    "postgres.servers": {
        "connections_peak": f"max_over_time(sum by (server) "
                            f"(qatoolbox_postgres_connections{{{NOT_TWIN}}})[{W}:5m])",
        "max_connections": f"qatoolbox_postgres_max_connections{{{NOT_TWIN}}}",
        "connections_used_peak": f"max_over_time((sum by (server) "
                                 f"(qatoolbox_postgres_connections{{{NOT_TWIN}}}) / on (server) "
                                 f"(qatoolbox_postgres_max_connections{{{NOT_TWIN}}} - "
                                 f"qatoolbox_postgres_reserved_connections{{{NOT_TWIN}}}))"
                                 f"[{W}:5m])",
        "slow_queries_peak": f"max_over_time(sum by (server) "
                             f"(qatoolbox_postgres_slow_queries{{{NOT_TWIN}}})[{W}:5m])",
        "deadlocks": f"sum by (server) (rate(qatoolbox_postgres_deadlocks_total{{{NOT_TWIN}}}"
                     f"[{W}])) * {WEEK}",
        "cache_hit_ratio": f"sum by (server) (rate(qatoolbox_postgres_blocks_hit_total"
                           f"{{{NOT_TWIN}}}[{W}])) / (sum by (server) "
                           f"(rate(qatoolbox_postgres_blocks_hit_total{{{NOT_TWIN}}}[{W}])) "
                           f"+ sum by (server) (rate(qatoolbox_postgres_blocks_read_total"
                           f"{{{NOT_TWIN}}}[{W}])))",
        "database_size": f"sum by (server) (qatoolbox_postgres_database_size_bytes"
                         f"{{{NOT_TWIN}}})",
        "database_growth": f"sum by (server) (qatoolbox_postgres_database_size_bytes"
                           f"{{{NOT_TWIN}}} - qatoolbox_postgres_database_size_bytes"
                           f"{{{NOT_TWIN}}} offset {W})",
    },
    "postgres.tables": {
        "size": f"qatoolbox_postgres_table_size_bytes{{{NOT_TWIN}}}",
        "growth": f"qatoolbox_postgres_table_size_bytes{{{NOT_TWIN}}} - "
                  f"qatoolbox_postgres_table_size_bytes{{{NOT_TWIN}}} offset {W}",
    },
    "redis.servers": {
        "hit_ratio": f"rate(qatoolbox_redis_keyspace_hits_total{{{NOT_TWIN}}}[{W}]) / "
                     f"(rate(qatoolbox_redis_keyspace_hits_total{{{NOT_TWIN}}}[{W}]) + "
                     f"rate(qatoolbox_redis_keyspace_misses_total{{{NOT_TWIN}}}[{W}]))",
        "memory_peak": f"max_over_time(qatoolbox_redis_memory_used_bytes{{{NOT_TWIN}}}"
                       f"[{W}:5m])",
        "maxmemory": f"qatoolbox_redis_memory_max_bytes{{{NOT_TWIN}}}",
        "memory_used_peak": f"max_over_time((qatoolbox_redis_memory_used_bytes{{{NOT_TWIN}}} / "
                            f"qatoolbox_redis_memory_max_bytes{{{NOT_TWIN}}})[{W}:5m])",
        "evictions": f"rate(qatoolbox_redis_evicted_keys_total{{{NOT_TWIN}}}[{W}]) * {WEEK}",
    },
    "celery.queues": {
        "peak": f"max_over_time(qatoolbox_celery_queue_length[{W}:5m])",
        "mean": f"sum_over_time(qatoolbox_celery_queue_length[{W}]) / "
                f"count_over_time(qatoolbox_celery_queue_length[{W}])",
    },
    "celery.tasks": {
        "runs": f"sum by (task) (rate({FINISHED}[{W}])) * {WEEK}",
        "failure_ratio": f'sum by (task) (rate(qatoolbox_celery_tasks_total{{state="failed"}}'
                         f"[{W}])) / sum by (task) (rate({FINISHED}[{W}]))",
        "p95": _quantile_by(0.95, "qatoolbox_celery_task_duration_seconds_bucket", "task"),
        "mean": f"sum by (task) (rate(qatoolbox_celery_task_duration_seconds_sum[{W}])) / "
                f"sum by (task) (rate(qatoolbox_celery_task_duration_seconds_count[{W}]))",
    },
}

DAILY = {  # evaluated at the end of each day
    "active_users": f'sum(qatoolbox_users_active{{window="24h",{NOT_TWIN}}})',
    "messages": f"sum(rate(qatoolbox_chat_messages_total{{{NOT_TWIN}}}[1d])) * 86400",
    "rooms_active": f'sum(qatoolbox_chat_rooms{{status="active",{NOT_TWIN}}})',
}

S = f"{STEP}s"
CHARTS = {  # section.chart: one query per line, the legend the report gives its series
    "slo.budget": [("max by (sloth_service, sloth_slo) "
                    "(max_over_time(slo:period_error_budget_remaining:ratio[1m]))",
                    "{sloth_service} {sloth_slo}")],
    "http.rate": [(f"sum(increase({REQ}[{S}])) / {STEP}", "this period")],
    "http.errors": [(f"sum(increase({E5}[{S}])) / sum(increase({REQ}[{S}]))", "5xx")],
    "http.latency": [(f"histogram_quantile(0.95, sum by (le) (increase({DUR}[{S}])))", "p95"),
                     (f"histogram_quantile(0.99, sum by (le) (increase({DUR}[{S}])))", "p99")],
    "host.cpu": [(f"max_over_time({CPU}[{S}:5m])", "{instance}")],
    "host.memory": [(f"max_over_time({MEM}[{S}:5m])", "{instance}")],
    "host.disk": [(f"max_over_time({FS}[{S}:5m])", "{instance} {mountpoint}")],
    "postgres.connections": [(f"max_over_time((sum by (server) "
                              f"(qatoolbox_postgres_connections{{{NOT_TWIN}}}) / on (server) "
                              f"(qatoolbox_postgres_max_connections{{{NOT_TWIN}}} - "
                              f"qatoolbox_postgres_reserved_connections{{{NOT_TWIN}}}))"
                              f"[{S}:5m])", "{server}")],
    "postgres.cache": [(f"increase(qatoolbox_postgres_blocks_hit_total{{{NOT_TWIN}}}[{S}]) / "
                        f"(increase(qatoolbox_postgres_blocks_hit_total{{{NOT_TWIN}}}[{S}]) + "
                        f"increase(qatoolbox_postgres_blocks_read_total{{{NOT_TWIN}}}[{S}]))",
                        "{server}")],
    "redis.memory": [(f"max_over_time(qatoolbox_redis_memory_used_bytes{{{NOT_TWIN}}}"
                      f"[{S}:5m])", "{server}")],
    "redis.hits": [(f"increase(qatoolbox_redis_keyspace_hits_total{{{NOT_TWIN}}}[{S}]) / "
                    f"(increase(qatoolbox_redis_keyspace_hits_total{{{NOT_TWIN}}}[{S}]) + "
                    f"increase(qatoolbox_redis_keyspace_misses_total{{{NOT_TWIN}}}[{S}]))",
                    "{server}")],
    "celery.queues": [(f"max_over_time(qatoolbox_celery_queue_length[{S}:5m])", "{queue}")],
}


class Checked:
    """Records which numbers of the JSON a test compared, to prove none was skipped."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def equal(self, path: str, got: float | None, want: float | None) -> None:
        assert close(got, want), f"{path}: report {got}, Prometheus {want}"
        self.paths.add(path)


def numeric_paths(doc: Any, path: str = "") -> Iterator[str]:
    if isinstance(doc, bool):
        return
    if isinstance(doc, (int, float)):
        yield path
    elif isinstance(doc, dict):
        for key, value in doc.items():
            yield from numeric_paths(value, f"{path}.{key}" if path else key)
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from numeric_paths(value, f"{path}[{index}]")


def _label_key(series: dict[str, Any], by: str) -> tuple[str, ...]:
    return tuple(series.get(name, "") for name in re.findall(r"\{(\w+)\}", by))


def test_every_number_in_the_json_is_prometheus_answer(prom: PrometheusServer,
                                                       built: Built) -> None:
    doc, checked = built.doc, Checked()
    sections = {s["key"]: s for s in doc["sections"]}
    assert {k for k, s in sections.items() if s["status"] != "ok"} == set(), \
        [(k, s["status"], s["note"]) for k, s in sections.items()]
    for number, section in enumerate(doc["sections"]):
        base = f"sections[{number}]"
        for index, fig in enumerate(section["figures"]):
            where = f"{base}.figures[{index}]"
            if section["key"] == "alerts":
                continue  # checked in test_alerts_are_the_episodes_that_fired
            expr = FIGURES[f"{section['key']}.{fig['key']}"]
            want, before = scalar(prom, expr, T), scalar(prom, expr, P)
            assert want is not None, expr
            checked.equal(f"{where}.value", fig["value"], want)
            checked.equal(f"{where}.previous", fig["previous"], before)
            assert before is not None
            checked.equal(f"{where}.change", fig["change"], want - before)
            if before:
                checked.equal(f"{where}.change_ratio", fig["change_ratio"],
                              (want - before) / abs(before))
        for index, table in enumerate(section["tables"]):
            name = f"{section['key']}.{table['key']}"
            if section["key"] == "alerts" or name == "business.days":
                continue
            columns = TABLES[name]
            assert set(columns) == {c["key"] for c in table["columns"]}, name
            by = tuple(table["by"])
            for key, expr in columns.items():
                now, then = vector(prom, expr, T, by), vector(prom, expr, P, by)
                rows = {tuple(r["labels"][b] for b in by): r for r in table["rows"]}
                assert set(rows) == set(now) or key in ("full_in",), (name, key, now, rows)
                for row_index, row in enumerate(table["rows"]):
                    labels = tuple(row["labels"][b] for b in by)
                    where = f"{base}.tables[{index}].rows[{row_index}]"
                    checked.equal(f"{where}.values.{key}", row["values"][key], now.get(labels))
                    checked.equal(f"{where}.previous.{key}", row["previous"][key],
                                  then.get(labels))
        for index, chart in enumerate(section["charts"]):
            name = f"{section['key']}.{chart['key']}"
            if name.startswith("business.daily_"):
                continue  # the day-by-day table's numbers, checked with it
            lines = CHARTS[name]
            shown = [s for s in chart["series"] if not s["previous"]]
            expected: dict[str, list[list[float]]] = {}
            for expr, legend in lines:
                for series in prom.query_range(expr, P, T, STEP):
                    label = " ".join(_label_key(series["metric"], legend)) or legend
                    expected[label] = [[float(t), float(v)] for t, v in series["values"]
                                       if math.isfinite(float(v))]
            assert {s["name"] for s in shown} == set(expected), (name, expected.keys())
            for series_index, series in enumerate(chart["series"]):
                where = f"{base}.charts[{index}].series[{series_index}]"
                if series["previous"]:
                    assert name == "http.rate"
                    want_points = [[float(t) + WEEK, float(v)] for t, v in prom.query_range(
                        lines[0][0], P - WEEK, P, STEP)[0]["values"]]
                else:
                    want_points = expected[series["name"]]
                assert len(series["points"]) == len(want_points), where
                for point_index, (got, point) in enumerate(zip(series["points"], want_points,
                                                               strict=True)):
                    checked.equal(f"{where}.points[{point_index}][0]", got[0], point[0])
                    checked.equal(f"{where}.points[{point_index}][1]", got[1], point[1])
    _check_days(prom, doc, checked)
    _check_alerts(prom, doc, checked)
    _check_coverage(prom, doc, checked)
    numbers = set(numeric_paths(doc))
    ignored = {p for p in numbers if re.search(  # settings, checked below or by other tests
        r"(thresholds\[\d+\]\.value|\.step|\.ymax|\.shown)$|^(period|previous_period|"
        r"chart_step_seconds|build_seconds)\b", p)}
    assert numbers - ignored - checked.paths == set()
    assert doc["period"] == {"start": P, "end": T, "seconds": WEEK,
                             "start_text": "2024-03-04T00:00:00+00:00",
                             "end_text": "2024-03-11T00:00:00+00:00"}
    assert doc["previous_period"]["start"] == P - WEEK and doc["chart_step_seconds"] == STEP


def _check_days(prom: PrometheusServer, doc: dict[str, Any], checked: Checked) -> None:
    number, business = next((i, s) for i, s in enumerate(doc["sections"])
                            if s["key"] == "business")
    index, table = next((i, t) for i, t in enumerate(business["tables"]) if t["key"] == "days")
    ends = [P + DAY * (d + 1) for d in range(7)]
    assert [r["labels"]["day"] for r in table["rows"]] == [
        f"2024-03-{d:02d}" for d in range(4, 11)]
    for row_index, (row, day_end) in enumerate(zip(table["rows"], ends, strict=True)):
        assert row["previous"] == {}
        for key, expr in DAILY.items():
            where = f"sections[{number}].tables[{index}].rows[{row_index}].values.{key}"
            checked.equal(where, row["values"][key], scalar(prom, expr, day_end))
        assert row["values"]["messages"] == true_messages(day_end - DAY, day_end)
    for chart_index, chart in enumerate(business["charts"]):
        key = chart["key"].removeprefix("daily_")
        (series,) = chart["series"]
        for point_index, (point, row, day_end) in enumerate(zip(series["points"], table["rows"],
                                                                ends, strict=True)):
            where = f"sections[{number}].charts[{chart_index}].series[0].points[{point_index}]"
            checked.equal(f"{where}[0]", point[0], day_end - DAY / 2)
            checked.equal(f"{where}[1]", point[1], row["values"][key])


def _check_alerts(prom: PrometheusServer, doc: dict[str, Any], checked: Checked) -> None:
    number, alerts = next((i, s) for i, s in enumerate(doc["sections"]) if s["key"] == "alerts")
    current = [e for e in ALERT_EPISODES if P < e.start <= T]
    before = [e for e in ALERT_EPISODES if P - WEEK < e.start <= P]
    figures = {f["key"]: (i, f) for i, f in enumerate(alerts["figures"])}
    for key, now, then in (
            ("episodes", len(current), len(before)),
            ("critical", sum(e.severity == "critical" for e in current),
             sum(e.severity == "critical" for e in before)),
            ("firing_seconds", sum(e.end - e.start for e in current),
             sum(e.end - e.start for e in before))):
        index, fig = figures[key]
        where = f"sections[{number}].figures[{index}]"
        checked.equal(f"{where}.value", fig["value"], now)
        checked.equal(f"{where}.previous", fig["previous"], then)
        checked.equal(f"{where}.change", fig["change"], now - then)
        if then:
            checked.equal(f"{where}.change_ratio", fig["change_ratio"], (now - then) / then)
    tables = {t["key"]: (i, t) for i, t in enumerate(alerts["tables"])}
    index, episodes = tables["episodes"]
    assert len(episodes["rows"]) == len(current)
    for row_index, (row, episode) in enumerate(zip(episodes["rows"],
                                                   sorted(current, key=lambda e: (e.start,
                                                                                  e.name)),
                                                   strict=True)):
        where = f"sections[{number}].tables[{index}].rows[{row_index}].values"
        assert row["labels"]["alertname"] == episode.name
        assert row["labels"]["severity"] == episode.severity
        assert row["labels"]["state"] == ("firing at end" if episode.end == T else "resolved")
        selector = f'ALERTS{{alertname="{episode.name}",alertstate="firing"}}'
        first = scalar(prom, f"min_over_time(timestamp({selector})[{W}:5m])", T)
        last = scalar(prom, f"max_over_time(timestamp({selector})[{W}:5m])", T)
        since = scalar(prom, f'max_over_time(ALERTS_FOR_STATE{{alertname="{episode.name}"}}'
                             f"[{W}])", T)
        assert (first, last, since) == (episode.start, episode.end, episode.active_at)
        checked.equal(f"{where}.start", row["values"]["start"], first)
        checked.equal(f"{where}.end", row["values"]["end"], last)
        checked.equal(f"{where}.seconds", row["values"]["seconds"], (last or 0) - (first or 0))
        checked.equal(f"{where}.active_since", row["values"]["active_since"], since)
    index, by_name = tables["by_name"]
    for row_index, row in enumerate(by_name["rows"]):
        name = row["labels"]["alertname"]
        where = f"sections[{number}].tables[{index}].rows[{row_index}]"
        mine = [e for e in current if e.name == name]
        theirs = [e for e in before if e.name == name]
        checked.equal(f"{where}.values.episodes", row["values"]["episodes"], len(mine))
        checked.equal(f"{where}.values.firing_seconds", row["values"]["firing_seconds"],
                      sum(e.end - e.start for e in mine))
        checked.equal(f"{where}.previous.episodes", row["previous"]["episodes"], len(theirs))
        checked.equal(f"{where}.previous.firing_seconds", row["previous"]["firing_seconds"],
                      sum(e.end - e.start for e in theirs))


def _check_coverage(prom: PrometheusServer, doc: dict[str, Any], checked: Checked) -> None:
    # The outage: no scrape succeeded from 03:05 (the first up == 0) until the 03:30 scrape.
    (gap,) = doc["coverage"]["gaps"]
    assert gap["instance"] == "app1:9786"
    checked.equal("coverage.gaps[0].start", gap["start"], OUTAGE[0] + 300)
    checked.equal("coverage.gaps[0].end", gap["end"], OUTAGE[1])
    down_minutes = scalar(prom, f"count_over_time((up == 0)[{W}:1m])", T)
    checked.equal("coverage.gaps[0].seconds", gap["seconds"], (down_minutes or 0) * 60)
    checked.equal("coverage.instances.app1:9786", doc["coverage"]["instances"]["app1:9786"],
                  1 - (down_minutes or 0) * 60 / WEEK)
    assert doc["partial"] is True and doc["problems"] == []


def test_figures_match_what_the_generator_wrote(built: Built) -> None:
    figures = {(s["key"], f["key"]): f for s in built.doc["sections"] for f in s["figures"]}
    assert figures["http", "requests"]["value"] == true_requests(P, T)
    assert figures["http", "requests"]["previous"] == true_requests(P - WEEK, P)
    assert figures["http", "errors"]["value"] == true_requests(P, T, "5xx")
    assert figures["business", "messages"]["value"] == true_messages(P, T)
    rows = {(s["key"], t["key"], tuple(r["labels"].values())): r for s in built.doc["sections"]
            for t in s["tables"] for r in t["rows"]}
    # One row per server, however many exporters watch it; db2 is at half db1's rates.
    assert {k[2] for k in rows if k[:2] == ("postgres", "servers")} == {(DB1,), (DB2,)}
    assert {k[2] for k in rows if k[:2] == ("redis", "servers")} == {(CACHE1,), (CACHE2,)}
    servers = rows["postgres", "servers", (DB1,)]
    assert (servers["values"]["deadlocks"], servers["previous"]["deadlocks"]) == (2, 1)
    assert rows["postgres", "servers", (DB2,)]["values"]["deadlocks"] == 1
    assert rows["redis", "servers", (CACHE1,)]["values"]["evictions"] == 250 * 12
    assert rows["redis", "servers", (CACHE2,)]["values"]["evictions"] == 125 * 12
    # The root file system fills linearly from 60% to 80% over the fortnight: at the week's
    # trend it is full as long after the end as the fortnight lasted.
    root = rows["host", "filesystems", ("app1:9786", "/")]
    span = END - FIRST
    assert math.isclose(root["values"]["full_in"], span, rel_tol=1e-9)
    assert math.isclose(root["previous"]["full_in"], 2 * span - (P - FIRST), rel_tol=1e-9)
    assert rows["host", "filesystems", ("app1:9786", "/var/lib/postgresql")]["values"][
        "full_in"] is None
    slo = rows["slo", "objectives", ("qatoolbox", "requests-availability")]
    assert math.isclose(slo["values"]["attainment"], 1 - true_error_ratio_mean(P, T),
                        rel_tol=1e-12)
    routes = [r["labels"]["route"] for s in built.doc["sections"] if s["key"] == "http"
              for t in s["tables"] if t["key"] == "db" for r in t["rows"]]
    assert routes[0] == "api/messages/"  # the N+1 route leads the DB table


def test_csv_files_parse_and_match_the_json(built: Built) -> None:
    tables = {f"{s['key']}-{t['key']}": t for s in built.doc["sections"] for t in s["tables"]}
    files = sorted((built.out / "csv").glob("*.csv"))
    assert {f.stem for f in files} == set(tables) | {"figures", "gaps"}
    for path in files:
        raw = path.read_bytes()
        assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b""), path
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
        header, body = rows[0], rows[1:]
        assert all(len(r) == len(header) for r in body), path
        if path.stem in tables:
            table = tables[path.stem]
            assert len(body) == len(table["rows"]), path
            for line, row in zip(body, table["rows"], strict=True):
                labels = line[:len(table["by"])]
                assert labels == [row["labels"][b] for b in table["by"]]
                for cell, column in zip(line[len(table["by"]):], table["columns"],
                                        strict=False):
                    value = row["values"][column["key"]]
                    if value is None:
                        assert cell == ""
                    elif column["unit"] == "timestamp":
                        assert cell.startswith("2024-03-")
                    else:
                        assert float(cell) == value, (path, column, cell, value)
    figures = list(csv.DictReader(io.StringIO((built.out / "csv" / "figures.csv").read_text(),
                                              newline="")))
    requests = next(r for r in figures if r["section"] == "http" and r["figure"] == "requests")
    assert int(requests["value"]) == true_requests(P, T)
    gaps = list(csv.DictReader(io.StringIO((built.out / "csv" / "gaps.csv").read_text(),
                                           newline="")))
    assert gaps == [{"instance": "app1:9786", "start": "2024-03-08T03:05:00+00:00",
                     "end": "2024-03-08T03:30:00+00:00", "seconds": "1500"}]


# --- the HTML --------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0:
        pytest.fail("chromium is not installed: ./scripts/test installs it (apt-get install "
                    "chromium)")
    pytest.skip("chromium is not installed and this is not root: run ./scripts/test as root, "
                "or apt-get install chromium")


def run_chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_html_is_self_contained_and_renders_in_chromium(built: Built, tmp_path: Path) -> None:
    html = (built.out / "report.html").read_text()
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html, re.I)
    assert "url(" not in html and "@import" not in html
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    charts = [c for s in built.doc["sections"] for c in s["charts"]]
    assert len(images) == len(charts) > 10
    assert all(src.startswith("data:image/png;base64,") for src in images)
    for src in images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("QAToolBox operations report", "2024-03-04 00:00 UTC", "Partial report",
                 "Data gaps totalling 25m", "api/messages/", "HttpErrorRatioCritical",
                 "firing at end", "tools_chatmessage", f"{true_requests(P, T):,}"):
        assert text in html, text
    # Chromium loads it offline: every image decodes (checked by a script added to a copy).
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", """<script>
addEventListener("load", () => {document.body.setAttribute("data-images", JSON.stringify(
  [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])));});
</script></body>"""))
    dom = run_chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
                       profile=tmp_path / "profile-dom")
    found = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    decoded = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(decoded) == len(images)
    assert all(complete and width == 900 and height == 260
               for complete, width, height in decoded), decoded
    shot = tmp_path / "report.png"
    result = run_chromium("--window-size=1100,2600", f"--screenshot={shot}",
                          (built.out / "report.html").as_uri(), profile=tmp_path / "profile")
    assert shot.exists(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as picture:
        assert picture.size == (1100, 2600)
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200  # text, tables and charts, not a blank or error page
    target = os.environ.get("QATOOLBOX_REPORT_SCREENSHOT")
    if target:  # refresh docs/report.png: QATOOLBOX_REPORT_SCREENSHOT=docs/report.png pytest ...
        shutil.copyfile(shot, ROOT / target)


# --- other periods and the error cases -----------------------------------------------------


def test_previous_week_alone_has_no_slo_rules(prom: PrometheusServer, tmp_path: Path) -> None:
    out = tmp_path / "previous"
    proc = call("report", "--prometheus", prom.url, "--from", "2024-02-26", "--to",
               "2024-03-04T00:00:00Z", "--timezone", "UTC", "--compare", "none",
               "--format", "json,csv", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # a pipe: no progress, and no gap this week
    doc = json.loads((out / "report.json").read_text())
    slo = next(s for s in doc["sections"] if s["key"] == "slo")
    assert slo["status"] == "no_data" and slo["note"].startswith("No SLO rules found")
    assert doc["previous_period"] is None and doc["partial"] is False
    figures = [f for s in doc["sections"] for f in s["figures"]]
    assert all(f["previous"] is None and f["change"] is None for f in figures)
    episodes = next(t for s in doc["sections"] if s["key"] == "alerts" for t in s["tables"]
                    if t["key"] == "episodes")
    assert [r["labels"]["alertname"] for r in episodes["rows"]] == ["PostgresDeadlocks"]
    assert not (out / "report.html").exists()


def test_prometheus_unreachable_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out" / "report"
    proc = call("report", "--prometheus", f"http://127.0.0.1:{port}", *CURRENT, "--out",
               str(out))
    assert proc.returncode == 1
    assert one_line(proc.stderr) == (f"qatoolbox-exporter report: cannot reach Prometheus at "
                                     f"http://127.0.0.1:{port}: Connection refused")
    assert leftovers(tmp_path) == []


def test_range_without_data_is_one_line_and_writes_nothing(prom: PrometheusServer,
                                                           tmp_path: Path) -> None:
    proc = call("report", "--prometheus", prom.url, "--to", "2023-06-01", "--timezone", "UTC",
               "--out", str(tmp_path / "r"))
    assert proc.returncode == 1
    assert one_line(proc.stderr) == (
        'qatoolbox-exporter report: no data: no up{job="qatoolbox"} samples between '
        "2023-05-25 00:00 UTC and 2023-06-01 00:00 UTC; Prometheus has nothing at all then "
        "(before its retention, or in the future?)")
    proc = call("report", "--prometheus", prom.url, *CURRENT, "--selector", 'job="nginx"',
               "--out", str(tmp_path / "r"))
    assert proc.returncode == 1
    assert one_line(proc.stderr).endswith("; jobs with data then: qatoolbox")
    proc = call("report", "--prometheus", prom.url, *CURRENT, "--selector", 'job=~"(',
               "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(
        "qatoolbox-exporter report: --selector 'job=~\"(' is not a valid label matcher list")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--range", "7x"], '--range: expected a duration like "7d" or "1h30m", got "7x"'),
    (["--format", "pdf"], "--format: expected some of html, csv, json, got 'pdf'"),
    (["--from", "yesterday"], "--from: expected"),
    (["--from", "2024-03-11", "--to", "2024-03-04"], "the period is empty"),
    (["--timezone", "Mars/Olympus"], '--timezone: unknown time zone "Mars/Olympus"'),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prometheus", "ftp://x"], "--prometheus: expected an http:// or https:// URL"),
])
def test_bad_flags_exit_2_with_one_line(argv: list[str], message: str, tmp_path: Path) -> None:
    proc = call("report", "--out", str(tmp_path / "r"), "--prometheus", "http://127.0.0.1:1",
               *argv)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith("qatoolbox-exporter report: ") and message in line, line
    assert leftovers(tmp_path) == []


def test_existing_folders_are_replaced_only_when_they_hold_a_report(
        prom: PrometheusServer, tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    proc = call("report", "--prometheus", prom.url, *CURRENT, "--format", "json",
               "--out", str(other))
    assert proc.returncode == 1
    assert "exists and is not an earlier report; refusing to replace it" in one_line(
        proc.stderr)
    assert leftovers(other) == ["cat.jpg"]
    target = tmp_path / "weekly"
    for formats in ("json,csv", "json"):
        proc = call("report", "--prometheus", prom.url, *CURRENT, "--format", formats,
                   "--out", str(target))
        assert proc.returncode == 0, proc.stderr
    assert leftovers(target) == [".qatoolbox-report", "report.json"]  # replaced, not merged
    assert leftovers(tmp_path) == ["photos", "weekly"]


# --- export ----------------------------------------------------------------------------------


def test_export_writes_one_column_per_series(prom: PrometheusServer, tmp_path: Path) -> None:
    query = 'qatoolbox_celery_queue_length or label_replace(vector(1), "odd", "a,\\"b\\"", "", "")'
    start, end = INCIDENT[0] - 1800, INCIDENT[1] + 1800
    argv = ["export", "--prometheus", prom.url, "--query", query, "--from", str(start),
            "--to", str(end), "--step", "5m", "--timezone", "UTC"]
    proc = call(*argv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.count("\n") == 2 * 12 + 1 + 1  # header and one row per step
    rows = list(csv.reader(io.StringIO(proc.stdout, newline="")))
    header, body = rows[0], rows[1:]
    names = sorted(['qatoolbox_celery_queue_length{instance="app1:9786",job="qatoolbox",'
                    'queue="celery"}',
                    'qatoolbox_celery_queue_length{instance="app1:9786",job="qatoolbox",'
                    'queue="email"}',
                    '{odd="a,\\"b\\""}'])
    assert header == ["time", "timestamp", *names]
    assert [r[1] for r in body] == [str(t) for t in range(start, end + 1, 300)]
    assert body[0][0] == "2024-03-06T13:30:00+00:00"
    got = {name: [float(r[i]) for r in body] for i, name in enumerate(header) if i >= 2}
    for series in prom.query_range("qatoolbox_celery_queue_length", start, end, 300):
        name = ("qatoolbox_celery_queue_length{instance=\"app1:9786\",job=\"qatoolbox\","
                f"queue=\"{series['metric']['queue']}\"}}")
        assert got[name] == [float(v) for _, v in series["values"]]
    assert max(got[names[0]]) > 150  # the incident's backlog
    out = tmp_path / "sub" / "queues.csv"
    proc = call(*argv, "--out", str(out))
    assert proc.returncode == 0 and proc.stdout == ""
    assert out.read_bytes().decode() == rows_text(rows)
    assert leftovers(out.parent) == ["queues.csv"]


def rows_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def test_export_splits_long_ranges_into_allowed_chunks(prom: PrometheusServer) -> None:
    proc = call("export", "--prometheus", prom.url, "--query", "up", "--from", str(P),
               "--to", str(T), "--step", "30s")  # 20,161 rows: Prometheus allows 11,000
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout, newline="")))[1:]
    assert len(rows) == WEEK // 30 + 1
    assert [int(r[1]) for r in rows] == list(range(P, T + 1, 30))
    down = [r for r in rows if r[2] == "0"]
    assert int(down[0][1]) == OUTAGE[0] + 300 and int(down[-1][1]) == OUTAGE[1] - 30


@pytest.mark.parametrize(("query", "code", "message"), [
    ("qatoolbox_nope_total", 1, "unknown metric qatoolbox_nope_total: Prometheus has no series "
                                "of that name"),
    ('rate(qatoolbox_http_requests_total{route="nowhere"}[5m])', 1,
     "no data: the query returned no series between"),
    ("sum(rate(qatoolbox_http_requests_total[5m])", 2, "--query rejected by Prometheus: "),
])
def test_export_errors_are_one_line(prom: PrometheusServer, tmp_path: Path, query: str,
                                    code: int, message: str) -> None:
    out = tmp_path / "x.csv"
    proc = call("export", "--prometheus", prom.url, "--query", query, "--from", str(P),
               "--to", str(T), "--out", str(out))
    assert proc.returncode == code
    line = one_line(proc.stderr)
    assert line.startswith("qatoolbox-exporter export: ") and message in line, line
    assert proc.stdout == "" and leftovers(tmp_path) == []


# --- a fault-injecting, header-recording proxy in front of Prometheus ----------------------


@dataclass
class Proxy:
    """Forwards to Prometheus; can fail queries that mention a string, hide metric names from
    the label API, or hold queries until released. Records every request's headers."""

    upstream: str
    fail: str = ""
    hide: str = ""
    forbid: str = ""
    hold: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    held: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self, body: bytes | None) -> None:
                proxy.headers.append(dict(self.headers.items()))
                text = urllib.parse.unquote_plus((body or b"").decode() + self.path)
                if proxy.forbid and proxy.forbid in self.path:
                    self._answer(403, b"forbidden")
                    return
                if proxy.hold and proxy.hold in text:
                    proxy.held += 1
                    proxy.release.wait(SLOW_SECONDS)
                if proxy.fail and proxy.fail in text:
                    self._answer(422, json.dumps({
                        "status": "error", "errorType": "execution",
                        "error": "query processing would load too many samples into memory "
                                 "in query execution"}).encode())
                    return
                request = urllib.request.Request(proxy.upstream + self.path, data=body,
                                                 method=self.command, headers={
                                                     "Content-Type": self.headers.get(
                                                         "Content-Type", "")})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, payload = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                if proxy.hide and "label/__name__/values" in self.path:
                    doc = json.loads(payload)
                    doc["data"] = [n for n in doc["data"] if not re.match(proxy.hide, n)]
                    payload = json.dumps(doc).encode()
                self._answer(status, payload)

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


def test_failed_queries_and_missing_rules_are_marked_not_dropped(
        prom: PrometheusServer, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    with Proxy(prom.url, fail="qatoolbox_redis", hide=r"instance:qatoolbox_host_") as proxy:
        proc = call("report", "--prometheus", proxy.url, *CURRENT, "--out", str(out))
    assert proc.returncode == 3, proc.stderr
    assert one_line(proc.stderr) == (
        "qatoolbox-exporter report: warning: partial report (1 data gap(s), 2 missing or "
        "failed figure group(s)); the report marks them")
    doc = json.loads((out / "report.json").read_text())
    sections = {s["key"]: s for s in doc["sections"]}
    assert sections["redis"]["status"] == "failed"
    assert sections["redis"]["tables"] == [] and sections["redis"]["charts"] == []
    problems = {(p["section"], p["what"]) for p in doc["problems"]}
    assert ("redis", "query failed") in problems and ("host", "missing series") in problems
    host = sections["host"]
    assert host["status"] == "partial"
    missing = next(p for p in doc["problems"] if p["section"] == "host")
    assert "instance:qatoolbox_host_cpu_utilisation:ratio" in missing["detail"]
    machines = host["tables"][0]["rows"]
    assert machines == []
    filesystems = next(t for t in host["tables"] if t["key"] == "filesystems")
    assert filesystems["rows"][0]["values"]["avail_end"] is not None  # from raw series
    assert sections["http"]["status"] == "ok" and doc["partial"] is True
    html = (out / "report.html").read_text()
    assert "Partial report." in html and "redis: query failed" in html
    assert "query processing would load too many samples" in html
    assert leftovers(tmp_path) == ["partial"]


def test_a_proxy_allowing_only_queries_still_gets_the_report(prom: PrometheusServer,
                                                             built: Built, tmp_path: Path) -> None:
    """Without the label-values API (some gateways pass /api/v1/query* only) every series is
    assumed present: the same figures, found by the queries themselves."""
    with Proxy(prom.url, forbid="/api/v1/label/") as proxy:
        proc = call("report", "--prometheus", proxy.url, *CURRENT, "--format", "json",
                    "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "r" / "report.json").read_text())

    def essence(report: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in report.items()
                if k not in ("generated_at", "prometheus", "build_seconds", "sections")}
        kept["sections"] = [{**s, "charts": [{**c, "image": ""} for c in s["charts"]]}
                            for s in report["sections"]]  # PNG file names: HTML runs only
        return kept

    assert essence(doc) == essence(built.doc)


def test_credentials_reach_prometheus_and_never_the_output(prom: PrometheusServer,
                                                           tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-3c1f9a\n")
    with Proxy(prom.url) as proxy:
        proc = call("export", "--prometheus", proxy.url, "--query", "up", "--from", str(T - 600),
                   "--to", str(T), "--bearer-token-file", str(token))
        assert proc.returncode == 0, proc.stderr
        assert {h.get("Authorization") for h in proxy.headers} == {"Bearer tok-3c1f9a"}
        proxy.headers.clear()
        config = tmp_path / "http.yml"
        password = tmp_path / "password"
        password.write_text("pw-77ab")
        config.write_text(yaml.safe_dump({"basic_auth": {"username": "reporter",
                                                         "password_file": str(password)}}))
        proc = call("report", "--prometheus", proxy.url, *CURRENT, "--format", "json",
                   "--http.config.file", str(config), "--out", str(tmp_path / "r"))
        assert proc.returncode == 0, proc.stderr
        expected = "Basic " + base64.b64encode(b"reporter:pw-77ab").decode()
        assert {h.get("Authorization") for h in proxy.headers} == {expected}
    assert "pw-77ab" not in (tmp_path / "r" / "report.json").read_text()
    config.write_text("basic_auth: {username: a}\nbearer_token: x\n")
    proc = call("export", "--prometheus", prom.url, "--query", "up", "--range", "1h",
               "--http.config.file", str(config))
    assert proc.returncode == 2
    assert "mutually exclusive" in one_line(proc.stderr)


@pytest.fixture(scope="module")
def secured_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An empty Prometheus behind TLS and basic auth (its own --web.config.file)."""
    base = tmp_path_factory.mktemp("secured")
    ca = make_ca(base, "ca")
    server = make_cert(base, "prometheus", ca)
    web = base / "web.yml"
    web.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(server[0]), "key_file": str(server[1])},
        "basic_auth_users": {"reporter": bcrypt_hash("s3cret-pw")}}))
    config = base / "prometheus.yml"
    config.write_text("global: {}\n")
    port = free_port()
    with open(base / "prometheus.log", "ab") as log:
        proc = subprocess.Popen([PROMETHEUS_BIN, f"--config.file={config}",
                                 f"--storage.tsdb.path={base / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}",
                                 f"--web.config.file={web}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc.poll() is None
        wait_for(ready, 30, "TLS Prometheus listening", interval=0.2)
        password = base / "password"
        password.write_text("s3cret-pw\n")
        yield {"url": f"https://127.0.0.1:{port}", "ca": str(ca[0]), "password": str(password),
               "base": base}
    finally:
        stop_process(proc)


def test_tls_and_basic_auth_like_prometheus_clients(secured_prometheus: dict[str, Any],
                                                    tmp_path: Path) -> None:
    s = secured_prometheus
    base = ["export", "--prometheus", s["url"], "--query", 'vector(42)', "--range", "10m",
            "--step", "5m"]
    proc = call(*base, "--tls.ca-file", s["ca"], "--basic-auth.username", "reporter",
               "--basic-auth.password-file", s["password"])
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout, newline="")))
    assert rows[0] == ["time", "timestamp", "{}"] and [r[2] for r in rows[1:]] == ["42"] * 3
    config = tmp_path / "http.yml"
    config.write_text(yaml.safe_dump({"basic_auth": {"username": "reporter",
                                                     "password_file": s["password"]},
                                      "tls_config": {"ca_file": s["ca"]}}))
    assert call(*base, "--http.config.file", str(config)).returncode == 0
    proc = call(*base, "--tls.ca-file", s["ca"])
    assert proc.returncode == 1
    assert one_line(proc.stderr) == (f"qatoolbox-exporter export: Prometheus at {s['url']} "
                                     "refused the request (HTTP 401): check the credentials")
    proc = call(*base, "--basic-auth.username", "reporter", "--basic-auth.password-file",
               s["password"])
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith(f"qatoolbox-exporter export: TLS with {s['url']} failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in line
    assert "s3cret" not in proc.stderr


# --- delivery --------------------------------------------------------------------------------


class SmtpSink:
    """A minimal SMTP server on loopback that accepts AUTH PLAIN and keeps each message."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.logins: list[tuple[str, str]] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop = False

    def __enter__(self) -> SmtpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:
                conn.settimeout(30)
                self._session(conn, reader)

    def _session(self, conn: socket.socket, reader: Any) -> None:
        def say(line: str) -> None:
            conn.sendall(line.encode() + b"\r\n")

        say("220 sink ESMTP")
        sender, recipients = "", list[str]()
        while True:
            raw = reader.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                say("250-sink")
                say("250 AUTH PLAIN")
            elif verb == "AUTH":
                _, user, password = base64.b64decode(line.split()[2]).decode().split("\0")
                self.logins.append((user, password))
                say("235 ok" if (user, password) == (self.user, self.password)
                    else "535 bad credentials")
            elif verb == "MAIL":
                sender, recipients = line.split(":", 1)[1].strip("<> "), []
                say("250 ok")
            elif verb == "RCPT":
                recipients.append(line.split(":", 1)[1].strip("<> "))
                say("250 ok")
            elif verb == "DATA":
                say("354 go on")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = reader.readline()
                    if not chunk:
                        return
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                self.messages.append((sender, recipients, data[:-5]))
                say("250 queued")
            elif verb == "QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")


class DingTalkRobot:
    """Records posts like DingTalk's robot API; answers errcode 0 or the given error."""

    def __init__(self, answer: dict[str, Any] | None = None) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        robot = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                robot.posts.append((self.path, json.loads(body)))
                payload = json.dumps(answer or {"errcode": 0, "errmsg": "ok"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self) -> DingTalkRobot:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _payload(part: Message) -> bytes:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def _html_part(message: Message) -> tuple[str, dict[str, bytes]]:
    html, images = "", {}
    for part in message.walk():
        if part.get_content_type() == "text/html":
            html = _payload(part).decode()
        elif part.get_content_type() == "image/png":
            images[str(part["Content-ID"]).strip("<>")] = _payload(part)
    return html, images


def test_mail_and_dingtalk_delivery(prom: PrometheusServer, tmp_path: Path) -> None:
    secret = "SEC0123456789abcdef"
    with SmtpSink("reports@example.org", "mail-pw-1") as smtp, DingTalkRobot() as robot:
        password = tmp_path / "smtp-password"
        password.write_text("mail-pw-1\n")
        mail = tmp_path / "mail.yml"
        mail.write_text(yaml.safe_dump({  # as in alertmanager.yml's email_configs
            "to": "lead@example.org", "from": "reports@example.org",
            "smarthost": f"127.0.0.1:{smtp.port}", "auth_username": "reports@example.org",
            "auth_password_file": str(password), "require_tls": False,
            "headers": {"X-Report": "weekly"}}))
        url = tmp_path / "ding-url"
        url.write_text(f"http://127.0.0.1:{robot.port}/robot/send?access_token=tok-d1ng\n")
        secret_file = tmp_path / "ding-secret"
        secret_file.write_text(secret)
        out = tmp_path / "delivered"
        proc = call("report", "--prometheus", prom.url, *CURRENT, "--out", str(out),
                   "--mail.config.file", str(mail), "--mail.to", "ops@example.org",
                   "--dingtalk.url-file", str(url), "--dingtalk.secret-file", str(secret_file),
                   "--link", "https://reports.example.org/2024-03-11/report.html")
        assert proc.returncode == 0, proc.stderr
        assert "tok-d1ng" not in proc.stderr and "mail-pw-1" not in proc.stderr
        assert smtp.logins == [("reports@example.org", "mail-pw-1")]
        ((sender, recipients, data),) = smtp.messages
        assert sender == "reports@example.org"
        assert recipients == ["lead@example.org", "ops@example.org"]
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert message["X-Report"] == "weekly"
        assert message["Subject"] == "QAToolBox operations report: 2024-03-04 to 2024-03-11"
        html, images = _html_part(message)
        assert "data:image" not in html
        cids = re.findall(r'src="cid:([^"]+)"', html)
        assert len(cids) == len(images) > 10 and set(cids) == set(images)
        assert all(png[:4] == b"\x89PNG" for png in images.values())
        text = next(p for p in message.walk() if p.get_content_type() == "text/plain")
        assert "Full report: https://reports.example.org/" in _payload(text).decode()
        ((path, post),) = robot.posts
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        assert query["access_token"] == ["tok-d1ng"]
        stamp = query["timestamp"][0]
        digest = hmac.new(secret.encode(), f"{stamp}\n{secret}".encode(),
                          hashlib.sha256).digest()
        assert query["sign"] == [base64.b64encode(digest).decode()]
        assert post["msgtype"] == "markdown"
        markdown = post["markdown"]["text"]
        assert f"requests: {true_requests(P, T):,} (+20.0%)" in markdown
        assert "(https://reports.example.org/2024-03-11/report.html)" in markdown
        assert "PARTIAL: data gaps of 25m" in markdown
        # Alertmanager's default require_tls: a server without STARTTLS is refused, the
        # report stays written, and the failure is one line and exit 1.
        mail.write_text(mail.read_text().replace("require_tls: false\n", ""))
        proc = call("report", "--prometheus", prom.url, *CURRENT, "--out", str(out),
                   "--format", "json", "--mail.config.file", str(mail))
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[-1] == (
            f"qatoolbox-exporter report: report written to {out}, but mailing it failed: "
            f"mail server 127.0.0.1:{smtp.port} does not offer STARTTLS and require_tls is "
            "true")
        assert (out / "report.json").exists()
    with DingTalkRobot({"errcode": 310000, "errmsg": "sign not match"}) as robot:
        url.write_text(f"http://127.0.0.1:{robot.port}/robot/send?access_token=tok-d1ng")
        proc = call("report", "--prometheus", prom.url, *CURRENT, "--out", str(out),
                   "--format", "json", "--dingtalk.url-file", str(url))
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[-1].endswith(
            "but the DingTalk post failed: DingTalk refused the message: errcode 310000: "
            "sign not match")
        assert "tok-d1ng" not in proc.stderr


# --- progress, interruption, and the exporter's own footprint ------------------------------


def test_progress_on_a_terminal_only(prom: PrometheusServer, tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "report", "--prometheus",
                                 prom.url, *CURRENT, "--format", "json", "--out",
                                 str(tmp_path / "tty")], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=slave)
        os.close(slave)
        seen = b""
        with contextlib.suppress(OSError):  # EIO once the child closed the terminal
            while chunk := os.read(master, 65536):
                seen += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(master)
    text = seen.decode()
    assert re.search(r"\r\x1b\[K\[\d+/\d+\] Requests: ", text), text[:500]
    assert f"wrote {tmp_path / 'tty'} (json) in " in text
    piped = run("report", "--prometheus", prom.url, *CURRENT, "--format", "json", "--out",
                str(tmp_path / "pipe"))
    assert piped.returncode == 0 and piped.stdout == ""
    assert "\r" not in piped.stderr and "[1/" not in piped.stderr
    assert one_line(piped.stderr).endswith("warning: partial report (1 data gap(s)); the "
                                           "report marks them")


def test_sigterm_mid_report_leaves_nothing(prom: PrometheusServer, tmp_path: Path) -> None:
    """Stopped while its queries hang (the proxy holds the latency ones): it ends at once,
    with no report and no temporary folder left behind."""
    with Proxy(prom.url, hold="histogram_quantile") as proxy:
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "report", "--prometheus",
                                 proxy.url, *CURRENT, "--out", str(tmp_path / "r")], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: proxy.held >= 2, 60, "the report's queries to hang")
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=SLOW_SECONDS / 2)  # not waiting for them
        finally:
            proxy.release.set()
            stop_process(proc)
    assert proc.returncode == 130
    assert one_line(stderr) == "qatoolbox-exporter report: interrupted; nothing written"
    assert leftovers(tmp_path) == []


def test_serving_the_exporter_never_loads_the_report() -> None:
    """The report's code and matplotlib stay out of the exporter's process: the dispatch in
    exporter/cli.py imports them only for `report` and `export`."""
    code = ("import sys\nfrom exporter import cli\nfrom exporter import server, scrape\n"
            "from exporter import cliflags\ncliflags.parse(['--config.check'])\n"
            "print(sorted(m for m in sys.modules if m.startswith(('exporter.report', "
            "'matplotlib'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    check = run("--config.check")
    assert check.returncode == 0 and "configuration ok" in check.stdout
    helped = run("report", "--help")
    assert helped.returncode == 0 and "--prometheus URL" in helped.stdout


def test_html_needs_the_report_extra_but_json_does_not(
        prom: PrometheusServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib (hidden here), HTML is refused up front with the install hint, and
    CSV and JSON still work."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    proc = call("report", "--prometheus", prom.url, *CURRENT, "--out", str(tmp_path / "h"))
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        "qatoolbox-exporter report: HTML reports need matplotlib for their charts: pip install "
        "'qatoolbox-exporter[report]' (or use --format csv,json)")
    proc = call("report", "--prometheus", prom.url, *CURRENT, "--format", "csv,json", "--out",
                str(tmp_path / "j"))
    assert proc.returncode == 0, proc.stderr
    assert leftovers(tmp_path) == ["j"]
