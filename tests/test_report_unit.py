"""The report's parts that need no Prometheus: flag parsing, PromQL name extraction, number
formatting, HTML and CSV escaping of hostile label values, the atomic output, DingTalk's
signature, hostile API answers (from a loopback server), and the deployment examples."""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from exporter.report import fmt, promapi
from exporter.report import queries as q
from exporter.report.charts import _ticks
from exporter.report.dataset import (
    ColumnInfo,
    FigureResult,
    Report,
    Row,
    SectionResult,
    TableResult,
)
from exporter.report.deliver import (
    DeliveryConfigError,
    load_mail_config,
    mail_message,
    sign_url,
)
from exporter.report.export_command import query_metric_names
from exporter.report.flags import report_parser
from exporter.report.output import MARKER, OutputError, publish_dir, publish_file
from exporter.report.render_csv import table_csv
from exporter.report.render_html import render
from exporter.report.times import nice_step, parse_span, parse_time
from tests.harness import ROOT
from tests.test_report_data import inline_recording_rules

UTC = timezone.utc


@pytest.mark.parametrize(("text", "seconds"), [
    ("7d", 604800), ("1w", 604800), ("1d12h", 129600), ("90m", 5400), ("30s", 30),
])
def test_spans(text: str, seconds: int) -> None:
    assert parse_span(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1d", "1.5d", "500ms", "0s"])
def test_bad_spans(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_span(text)


def test_times() -> None:
    now = 1710158400.0  # 2024-03-11 12:00 UTC
    assert parse_time("now", UTC, now) == 1710158400
    assert parse_time("midnight", UTC, now) == 1710115200
    shanghai = ZoneInfo("Asia/Shanghai")
    assert parse_time("midnight", shanghai, now) == 1710115200 - 8 * 3600  # 20:00 there
    assert parse_time("2024-03-11", shanghai) == 1710115200 - 8 * 3600
    assert parse_time("2024-03-11T00:00:00Z", shanghai) == 1710115200
    assert parse_time("2024-03-11T08:00:00+08:00", UTC) == 1710115200
    assert parse_time("1710115200", UTC) == 1710115200
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time("last monday", UTC)


def test_chart_steps_stay_readable() -> None:
    assert nice_step(7 * 86400) == 1800
    assert nice_step(86400) == 300
    assert nice_step(30 * 86400) == 10800
    assert 365 * 86400 / nice_step(365 * 86400) <= 336


def test_ticks_stay_on_local_midnight_across_daylight_saving() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2024, 3, 28, tzinfo=berlin).timestamp()  # DST starts on the 31st
    end = datetime(2024, 4, 4, tzinfo=berlin).timestamp()
    positions, labels = _ticks(start, end, berlin)
    assert [datetime.fromtimestamp(p, berlin).hour for p in positions] == [0] * 8
    assert labels[0] == "Thu 03-28" and labels[-1] == "Thu 04-04"


@pytest.mark.parametrize(("expr", "names"), [
    ("up", ["up"]),
    ('rate(qatoolbox_http_requests_total{route="a b",status=~"5.."}[5m] offset 1w)',
     ["qatoolbox_http_requests_total"]),
    ("sum by (route, le) (rate(x_bucket[5m])) / on (job) group_left y and z unless w",
     ["x_bucket", "y", "z", "w"]),
    ('label_replace(vector(1), "a", "b", "", "") > bool 1e3', []),
    ("instance:qatoolbox_http_requests:rate5m[1h:1m]",
     ["instance:qatoolbox_http_requests:rate5m"]),
])
def test_metric_names_in_a_query(expr: str, names: list[str]) -> None:
    assert query_metric_names(expr) == names


def test_report_queries_name_only_documented_or_recorded_series(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every series the report reads is a recording rule of prometheus/rules/recording.yml,
    a metric the exporter's docs name (docs/report.md itself left out), or one of Sloth's
    slo:* series."""
    from tests import grafana_queries

    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for doc in (ROOT / "docs").glob("*.md"):
        if doc.name != "report.md":
            shutil.copy(doc, tmp_path / "docs" / doc.name)
    monkeypatch.setattr(grafana_queries, "ROOT", tmp_path)
    rules = yaml.safe_load((ROOT / "prometheus/rules/recording.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"]}
    documented = grafana_queries.documented_metric_names()
    sloth = {"slo:objective:ratio", "slo:sli_error:ratio_rate5m",
             "slo:period_error_budget_remaining:ratio", "slo:current_burn_rate:ratio"}
    exprs = [f.expr for s in q.SECTIONS for f in s.figures]
    exprs += [c.expr for s in q.SECTIONS for t in s.tables for c in t.columns]
    exprs += [line.expr for s in q.SECTIONS for c in s.charts for line in c.lines]
    exprs += [c.expr for s in q.SECTIONS if s.daily for c in s.daily.columns]
    used = set().union(*(q.names(e) for e in exprs))
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    unknown = sorted(n for n in base if n not in recorded | sloth
                     and n not in documented and f"{n}_total" not in documented)
    assert not unknown
    assert {n for n in used if ":" in n and not n.startswith("slo:")} <= recorded


def test_inlined_recording_rules_read_only_raw_series() -> None:
    doc = yaml.safe_load((ROOT / "prometheus/rules/recording.yml").read_text())
    inlined = inline_recording_rules(doc)
    assert "instance:qatoolbox_http_requests_5xx:ratio_rate5m" in inlined
    for record, expr in inlined.items():
        assert not [n for n in q.names(expr) if ":" in n], (record, expr)


@pytest.mark.parametrize(("number", "unit", "text"), [
    (0.0048138, q.RATIO, "0.48%"), (0.99662, q.RATIO, "99.66%"), (1.0, q.RATIO, "100%"),
    (0.97530, q.SECONDS, "975 ms"), (0.99984, q.SECONDS, "1 s"), (3.236, q.SECONDS, "3.24 s"),
    (1213200, q.SECONDS, "14d 1h"), (21474836480, q.BYTES, "20.0 GiB"), (512, q.BYTES, "512 B"),
    (1431918.0, q.COUNT, "1,431,918"), (8.228, q.COUNT, "8.23"), (2.3676, q.RATE, "2.37/s"),
    (None, q.COUNT, "-"),
])
def test_values_in_their_units(number: float | None, unit: str, text: str) -> None:
    assert fmt.value(number, unit) == text


def test_changes_and_their_direction() -> None:
    assert fmt.change(120, 100, q.COUNT) == "+20.0%"
    assert fmt.change(0.0048, 0.0025, q.RATIO) == "+0.23 pp"
    assert fmt.change(5, 0, q.COUNT) == "new"
    assert fmt.change(100.01, 100, q.COUNT) == "±0%"
    assert fmt.change(1, None, q.COUNT) == ""
    assert fmt.verdict(2, 1, "lower", q.COUNT) == "bad"
    assert fmt.verdict(2, 1, "higher", q.COUNT) == "good"
    assert fmt.verdict(2, 1, "", q.COUNT) == "neutral"
    assert fmt.verdict(100.01, 100, "lower", q.COUNT) == "neutral"  # shown as ±0%


HOSTILE = '<script>alert("x")</script>,"a\r\nb'


def hostile_report() -> Report:
    report = Report("T <b>", "http://p", 'job="<x>"', "UTC", 1709510400, 1710115200, None, None,
                    1800, 1710115200)
    section = SectionResult("http", "Requests", "ok")
    section.figures.append(FigureResult("requests", "requests", q.COUNT, "", "q", 10.0))
    table = TableResult("routes", "Slowest routes", ["route"],
                        [ColumnInfo("p95", "p95", q.SECONDS, "lower", "q")])
    table.rows.append(Row({"route": HOSTILE}, {"p95": 0.5}))
    section.tables.append(table)
    report.sections.append(section)
    return report


def test_html_escapes_label_values() -> None:
    html = render(hostile_report(), {}, UTC)
    assert "<script>" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_csv_quotes_label_values_and_defuses_formulas() -> None:
    report = hostile_report()
    table = report.sections[0].tables[0]
    table.rows.append(Row({"route": '=HYPERLINK("http://x","y")'}, {"p95": -1.5}))
    data = table_csv(table, UTC)
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert rows == [["route", "p95 (seconds)"], [HOSTILE, "0.5"],
                    ['\'=HYPERLINK("http://x","y")', "-1.5"]]


def test_dingtalk_signature() -> None:
    secret = "SECtest"
    url = sign_url("https://oapi.dingtalk.com/robot/send?access_token=t", secret, 1700000000000)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    digest = hmac.new(b"SECtest", b"1700000000000\nSECtest", hashlib.sha256).digest()
    assert query == {"access_token": ["t"], "timestamp": ["1700000000000"],
                     "sign": [base64.b64encode(digest).decode()]}


def test_mail_settings_like_alertmanager(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("pw\n")
    path = tmp_path / "mail.yml"
    path.write_text(yaml.safe_dump({"to": "a@x, b@x", "from": "r@x", "smarthost": "mx:587",
                                    "auth_username": "r", "auth_password_file": str(password)}))
    settings = load_mail_config(str(path), ["c@x"])
    assert settings.to == ["a@x", "b@x", "c@x"] and (settings.host, settings.port) == ("mx", 587)
    assert settings.password == "pw" and settings.require_tls is True
    assert "pw" not in repr(settings)
    for bad, message in (({"to": "a@x", "from": "r@x", "smarthost": "mx"}, "host:port"),
                         ({"to": "a@x", "smarthost": "mx:25"}, "from: required"),
                         ({"from": "r@x", "smarthost": "mx:25"}, "no recipient"),
                         ({"to": "a@x", "from": "r@x", "smarthost": "mx:25", "html": "x"},
                          "unknown key html"),
                         ({"to": "a@x\nBcc: e@x", "from": "r@x", "smarthost": "mx:25"},
                          "line breaks")):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(DeliveryConfigError, match=message):
            load_mail_config(str(path), [])


def test_mail_moves_images_into_related_parts(tmp_path: Path) -> None:
    path = tmp_path / "mail.yml"
    path.write_text("to: a@x\nfrom: r@x\nsmarthost: mx:25\n")
    png = b"\x89PNG\r\n\x1a\nfake"
    html = f'<p>x</p><img src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    message = mail_message(load_mail_config(str(path), []), "s", html, "text")
    parts = {p.get_content_type(): p for p in message.walk()}
    assert set(parts) >= {"multipart/alternative", "multipart/related", "text/plain",
                          "text/html", "image/png"}
    body = parts["text/html"].get_content()
    cid = re.search(r'src="cid:([^"]+)"', body)
    assert cid and parts["image/png"]["Content-ID"] == f"<{cid.group(1)}>"
    assert parts["image/png"].get_content() == png


def test_http_config_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0k\n")
    path = tmp_path / "http.yml"
    path.write_text(yaml.safe_dump({"authorization": {"type": "Bearer",
                                                      "credentials_file": str(token)},
                                    "tls_config": {"insecure_skip_verify": True}}))
    settings = promapi.load_http_config(str(path))
    assert settings.bearer_token == "t0k" and settings.insecure_skip_verify
    assert "t0k" not in repr(settings)
    for doc, message in (({"proxy_url": "http://x"}, "unknown key proxy_url"),
                         ({"tls_config": {"server_name": "x"}}, "tls_config.server_name"),
                         ({"basic_auth": {"username": "u", "password_file": "/nonexistent"}},
                          "cannot read /nonexistent"),
                         ({"authorization": {"type": "Digest"}}, "only Bearer")):
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(promapi.SettingsError, match=message):
            promapi.load_http_config(str(path))
    path.write_text("basic_auth: [")
    with pytest.raises(promapi.SettingsError, match="not valid YAML"):
        promapi.load_http_config(str(path))


def test_credentials_in_the_url_become_basic_auth_and_stay_out_of_messages() -> None:
    client = promapi.Client("http://user:p%40ss@127.0.0.1:9/prom/")
    assert client.display == "http://127.0.0.1:9/prom"
    assert client._headers["Authorization"] == "Basic " + base64.b64encode(
        b"user:p@ss").decode()


# --- hostile answers from a loopback "Prometheus" -------------------------------------------


@pytest.fixture
def fake_api() -> Iterator[dict[str, Any]]:
    """A server answering every request with the (status, body) in state["answer"]."""
    state: dict[str, Any] = {"answer": (200, b"{}")}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = state["answer"]
            self.send_response(status)
            if status in (301, 302):
                self.send_header("Location", "http://other.example/api/v1/query")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer()

        def do_GET(self) -> None:
            self._answer()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        state["client"] = promapi.Client(f"http://127.0.0.1:{server.server_address[1]}",
                                         timeout=5)
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "body", "kind", "message"), [
    (200, b"<html>", "protocol", "did not answer with JSON"),
    (200, b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":1},'
          b'"value":[1,"2"]}]}}', "protocol", "malformed series labels"),
    (200, b'{"status":"success","data":{"resultType":"vector","result":[{"metric":{},'
          b'"value":[1,"x"]}]}}', "protocol", "bad sample value"),
    (200, b'{"status":"success","data":{"resultType":"matrix","result":[]}}', "protocol",
     "expected a vector"),
    (400, b'{"status":"error","errorType":"bad_data","error":"parse error:\\nunexpected"}',
     "bad_query", "parse error: unexpected"),
    (503, b'{"status":"error","errorType":"timeout","error":"query timed out"}', "timeout",
     "Prometheus gave up on the query: query timed out"),
    (302, b"", "http", "redirecting to http://other.example/api/v1/query"),
    (500, b"oops", "http", "answered HTTP 500"),
])
def test_hostile_answers_become_one_line_errors(fake_api: dict[str, Any], status: int,
                                                body: bytes, kind: str, message: str) -> None:
    fake_api["answer"] = (status, body)
    with pytest.raises(promapi.PromError) as info:
        fake_api["client"].instant("up", 0)
    assert info.value.kind == kind and message in str(info.value)
    assert "\n" not in str(info.value)


def test_oversized_answers_are_refused(fake_api: dict[str, Any],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(promapi, "MAX_BODY", 1000)
    fake_api["answer"] = (200, json.dumps({"status": "success", "data": {
        "resultType": "vector", "result": [{"metric": {"x": "y" * 2000}, "value": [1, "1"]}]}}
    ).encode())
    with pytest.raises(promapi.PromError, match="exceeds"):
        fake_api["client"].instant("up", 0)


# --- output --------------------------------------------------------------------------------


def test_publish_replaces_only_reports_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "r"
    publish_dir(target, {"report.json": b"1", "csv/a.csv": b"a"})
    assert sorted(p.name for p in target.rglob("*")) == sorted([MARKER, "report.json", "csv",
                                                                "a.csv"])
    publish_dir(target, {"report.json": b"2"})
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "report.json"]
    with pytest.raises(OutputError, match="cannot write"):
        publish_dir(target, {"a": b"file", "a/b": b"under a file"})
    assert (target / "report.json").read_text() == "2"  # the earlier report survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no staging folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not an earlier report"):
        publish_dir(tmp_path / "mine", {"report.json": b"x"})
    publish_file(tmp_path / "x.csv", b"a,b\r\n")
    with pytest.raises(OutputError, match="is a directory"):
        publish_file(tmp_path / "mine", b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r", "x.csv"]


# --- the deployment examples -----------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (ROOT / "deploy/systemd" / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_units_run_a_valid_report_weekly() -> None:
    service, timer = _unit("qatoolbox-report.service"), _unit("qatoolbox-report.timer")
    (command,) = service["ExecStart"]
    argv = command.replace("%%", "%").split()
    assert argv[0].endswith("/qatoolbox-exporter") and argv[1] == "report"
    args = report_parser().parse_args(argv[2:])
    assert (args.range, args.end, args.out) == ("7d", "midnight",
                                                "/var/lib/qatoolbox-report/%Y-%m-%d")
    assert args.out.startswith("/var/lib/" + service["StateDirectory"][0] + "/")
    assert service["Type"] == ["oneshot"] and service["NoNewPrivileges"] == ["yes"]
    assert timer["OnCalendar"][0].startswith("Mon ") and timer["Persistent"] == ["true"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                             str(ROOT / "deploy/systemd/qatoolbox-report.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match and float(match.group(1)) < 3.0, result.stdout[-500:]
    calendar = subprocess.run(["systemd-analyze", "calendar", timer["OnCalendar"][0]],
                              capture_output=True, text=True, timeout=60, check=False)
    assert calendar.returncode == 0, calendar.stderr


def test_kubernetes_cronjob_runs_a_valid_report_weekly() -> None:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/report-cronjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert spec["schedule"] == "0 8 * * 1" and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "report"
    args = report_parser().parse_args(container["args"][1:])
    assert args.mail_config.startswith(container["volumeMounts"][1]["mountPath"] + "/")
    assert args.out.startswith("/reports/")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["MPLCONFIGDIR"]["value"].startswith("/tmp/")
    assert {"DINGTALK_WEBHOOK_URL", "DINGTALK_SECRET"} <= set(env)
    assert pod["securityContext"]["runAsNonRoot"] is True
