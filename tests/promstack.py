"""Real Prometheus and Alertmanager processes for tests, and a webhook receiver for their alerts."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.harness import ROOT, free_port, stop_process, wait_for

PROMETHEUS_DIR = ROOT / "prometheus"
ALERTMANAGER_DIR = ROOT / "alertmanager"
PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER_BIN = (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
                    or "/usr/bin/prometheus-alertmanager")


def _http(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    """One JSON request; returns the decoded body (HTTP errors raise)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class _Daemon:
    """A child server process with a log file, stopped by SIGTERM."""

    name = "daemon"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    def _spawn(self, argv: Sequence[str]) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.logs()[-3000:]}")
        return True

    def logs(self) -> str:
        """What the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it lingers."""
        if self.proc is not None:
            stop_process(self.proc, timeout=15)


# --- Prometheus ------------------------------------------------------------------------------

def shorten_rules(groups_doc: Mapping[str, Any], for_: str | None = None,
                  interval: str | None = None) -> dict[str, Any]:
    """A copy of a rule file whose `for` durations (those set) become for_ and whose group
    intervals become interval; None leaves them as they are.

    Rules on `absent(...)` keep their own `for`: right after start nothing has been scraped
    yet, and a shortened `for` turns that into a real notification (ExporterTargetMissing
    fired and resolved twice on a loaded machine in tests/test_ha.py)."""
    doc = copy.deepcopy(dict(groups_doc))
    for group in doc.get("groups", []):
        if interval is not None and "interval" in group:
            group["interval"] = interval
        for rule in group.get("rules", []):
            if (for_ is not None and "for" in rule
                    and not str(rule.get("expr", "")).lstrip().startswith("absent(")):
                rule["for"] = for_
    return doc


def prometheus_test_config(
    base: Path,
    targets: Sequence[str],
    *,
    alertmanager: str | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    for_: str | None = None,
    rule_interval: str | None = "",
    job: str = "qatoolbox",
) -> Path:
    """Copy the repository's prometheus/ to base/prometheus with the given targets for job,
    short intervals, an optional Alertmanager address (also scraped, as job alertmanager)
    and (optionally) shortened `for`s. Rule groups with an interval of their own run at
    rule_interval: by default the evaluation interval, so that a test sees them evaluated
    at its pace; None keeps them. Everything else (rules, scrape job settings) stays as the
    repository has it."""
    if rule_interval == "":
        rule_interval = evaluation_interval
    dest = base / "prometheus"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(PROMETHEUS_DIR, dest)
    config = yaml.safe_load((dest / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = evaluation_interval
    config["global"]["scrape_timeout"] = scrape_interval
    if alertmanager is None:
        config.pop("alerting", None)
    else:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    for scrape in config["scrape_configs"]:
        if scrape["job_name"] == "prometheus":
            scrape["static_configs"] = [{"targets": ["127.0.0.1:1"]}]  # rewritten at start
        if scrape["job_name"] == "alertmanager" and alertmanager is not None:
            scrape["static_configs"] = [{"targets": [alertmanager]}]
    if alertmanager is None:
        config["scrape_configs"] = [s for s in config["scrape_configs"]
                                    if s["job_name"] != "alertmanager"]
    for old in (dest / "targets").glob("*.yml"):
        old.unlink()
    (dest / "targets" / "test.yml").write_text(
        yaml.safe_dump([{"targets": list(targets), "labels": {"env": "test", "cluster": "test"}}]))
    assert any(s["job_name"] == job for s in config["scrape_configs"]), job
    (dest / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    for rule_file in (dest / "rules").glob("*.yml"):
        doc = yaml.safe_load(rule_file.read_text())
        rule_file.write_text(yaml.safe_dump(shorten_rules(doc, for_, rule_interval),
                                            sort_keys=False))
    return dest / "prometheus.yml"


@dataclass
class PrometheusServer(_Daemon):
    """Debian's Prometheus on a free loopback port with a given config file."""

    base: Path
    config_file: Path
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    name: str = "prometheus"

    def start(self, timeout: float = 30) -> PrometheusServer:
        """Start and wait until /-/ready answers."""
        config = yaml.safe_load(self.config_file.read_text())
        for scrape in config.get("scrape_configs", []):
            if scrape["job_name"] == "prometheus":
                scrape["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        data = self.base / f"prometheus-data-{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base / f"prometheus-{self.port}.log"
        self._spawn([PROMETHEUS_BIN, f"--config.file={self.config_file}",
                     f"--storage.tsdb.path={data}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--web.enable-lifecycle", "--log.level=warn", *self.extra_args])
        wait_for(lambda: self._alive() and _get_ok(f"{self.url}/-/ready"), timeout,
                 f"Prometheus on port {self.port}", interval=0.2)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raising on an error status."""
        query = urllib.parse.urlencode(params)
        try:
            body = _http("GET", f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: {exc.code} {exc.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, time_: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result vector (or matrix/scalar as Prometheus returns it)."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        return list(self.api("query", **params)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query."""
        return list(self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                             step=f"{step}")["result"])

    def value(self, expr: str) -> float | None:
        """The value of a single-sample instant query, or None when it is empty."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        """Active targets."""
        return list(self.api("targets")["activeTargets"])

    def wait_targets_up(self, job: str, timeout: float = 30) -> None:
        """Wait until every target of job has been scraped successfully."""
        def ready() -> bool:
            active = [t for t in self.targets() if t["labels"].get("job") == job]
            return bool(active) and all(t["health"] == "up" for t in active)
        wait_for(ready, timeout, f"targets of job {job} up", interval=0.2)

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts."""
        return list(self.api("alerts")["alerts"])

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with their health."""
        return list(self.api("rules")["groups"])


# --- Alertmanager ----------------------------------------------------------------------------

def alertmanager_test_config(
    base: Path,
    webhook_url: str | None,
    *,
    group_wait: str = "1s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
) -> Path:
    """Copy the repository's alertmanager/ to base/alertmanager for a test: every receiver
    keeps only webhooks, all pointed at webhook_url + "/<receiver name>" (no email, nothing
    leaves the machine; None drops the webhooks too), with short grouping timers. Routes,
    inhibitions and templates stay as the repository has them."""
    dest = base / "alertmanager"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ALERTMANAGER_DIR, dest)
    config = yaml.safe_load((dest / "alertmanager.yml").read_text())
    for key in [k for k in config.get("global", {}) if k.startswith("smtp_")]:
        del config["global"][key]

    def shorten(route: dict[str, Any]) -> None:
        for key, value in (("group_wait", group_wait), ("group_interval", group_interval),
                           ("repeat_interval", repeat_interval)):
            if key in route or route is config["route"]:
                route[key] = value
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    for receiver in config["receivers"]:
        name = receiver["name"]
        hooks = receiver.get("webhook_configs", [])
        for key in [k for k in receiver if k != "name"]:
            del receiver[key]
        if webhook_url is not None:
            receiver["webhook_configs"] = [
                {"url": f"{webhook_url}/{name}", "send_resolved": bool(h.get("send_resolved"))}
                for h in (hooks or [{"send_resolved": True}])
            ]
    (dest / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest / "alertmanager.yml"


@dataclass
class AlertmanagerServer(_Daemon):
    """Debian's Alertmanager on a free loopback port, clustering off."""

    base: Path
    config_file: Path
    port: int = field(default_factory=free_port)
    name: str = "alertmanager"

    def start(self, timeout: float = 30) -> AlertmanagerServer:
        """Start and wait until /-/ready answers."""
        data = self.base / f"alertmanager-data-{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base / f"alertmanager-{self.port}.log"
        self._spawn([ALERTMANAGER_BIN, f"--config.file={self.config_file}",
                     f"--storage.path={data}", f"--web.listen-address=127.0.0.1:{self.port}",
                     "--cluster.listen-address=", "--log.level=warn"])
        wait_for(lambda: self._alive() and _get_ok(f"{self.url}/-/ready"), timeout,
                 f"Alertmanager on port {self.port}", interval=0.2)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """POST alerts ({labels, annotations, ...}) as Prometheus would."""
        _http("POST", f"{self.url}/api/v2/alerts", list(alerts))

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts (including inhibited and silenced ones) with their status."""
        params = {"active": "true", "silenced": "true", "inhibited": "true",
                  "unprocessed": "true", **filters}
        return list(_http("GET", f"{self.url}/api/v2/alerts?{urllib.parse.urlencode(params)}"))


# --- Webhook receiver ------------------------------------------------------------------------

@dataclass
class Notification:
    """One webhook POST from Alertmanager."""

    path: str
    payload: dict[str, Any]

    @property
    def receiver(self) -> str:
        return str(self.payload.get("receiver", ""))

    def alerts(self, alertname: str | None = None,
               status: str | None = None) -> list[dict[str, Any]]:
        """The notification's alerts, optionally by name and status."""
        return [a for a in self.payload.get("alerts", [])
                if (alertname is None or a["labels"].get("alertname") == alertname)
                and (status is None or a["status"] == status)]


class WebhookReceiver:
    """A tiny HTTP server on a free loopback port that records every JSON POST."""

    def __init__(self) -> None:
        self.port = free_port()
        self.notifications: list[Notification] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with contextlib.suppress(ValueError), receiver._lock:
                    receiver.notifications.append(Notification(self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[Notification]:
        """A snapshot of the notifications so far."""
        with self._lock:
            return list(self.notifications)

    def wait_for_alert(self, alertname: str, status: str, timeout: float,
                       where: Callable[[dict[str, Any]], bool] = lambda a: True,
                       path: str | None = None) -> tuple[Notification, dict[str, Any]]:
        """The first notification holding alertname in status (firing/resolved), to the
        receiver path (/<receiver>) when given."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for note in self.received():
                if path is not None and note.path != path:
                    continue
                for alert in note.alerts(alertname, status):
                    if where(alert):
                        return note, alert
            time.sleep(0.2)
        seen = [(n.path, [(a["labels"].get("alertname"), a["status"]) for a in n.alerts()])
                for n in self.received()]
        raise AssertionError(f"no {status} {alertname} notification within {timeout}s; "
                             f"received: {seen}")


@contextlib.contextmanager
def running(*daemons: _Daemon) -> Iterator[None]:
    """Stop the given started daemons on exit, last first."""
    try:
        yield
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w)$")


def seconds(duration: str) -> float:
    """'5m' -> 300.0 (single-unit Prometheus durations)."""
    match = _DURATION.match(duration)
    assert match, duration
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return int(match.group(1)) * unit


# --- application traffic ---------------------------------------------------------------------

_APP_TRAFFIC = """
import json, sys
from exporter import instrument
requests, tasks = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rec = instrument.recorder()
assert rec.multiprocess
for route, method, status, seconds, queries, db_seconds in requests:
    rec.request_started()
    rec.request_finished(route, method, status, seconds, db_queries=queries,
                         db_seconds=db_seconds)
for task, state, seconds in tasks:
    rec.task_finished(task, state, seconds)
instrument.shutdown()
"""

DEFAULT_REQUESTS: list[tuple[str, str, int, float, int, float]] = [
    # route, method, status, seconds, DB queries, DB seconds
    ("api/rooms/", "GET", 200, 0.1, 3, 0.01),
    ("api/rooms/", "GET", 500, 2.5, 60, 1.2),
    ("login/", "POST", 200, 0.3, 5, 0.05),
]
DEFAULT_TASKS: list[tuple[str, str, float]] = [
    ("tools.tasks.cleanup_expired_rooms", "succeeded", 0.5),
    ("tools.tasks.cleanup_expired_rooms", "failed", 0.7),
    ("tools.tasks.cleanup_expired_rooms", "retried", 0.1),
]


def record_app_traffic(
    metrics_dir: Path,
    requests: Sequence[tuple[str, str, int, float, int, float]] = tuple(DEFAULT_REQUESTS),
    tasks: Sequence[tuple[str, str, float]] = tuple(DEFAULT_TASKS),
) -> None:
    """Record requests and Celery task runs the way an instrumented worker process does
    (exporter.instrument with PROMETHEUS_MULTIPROC_DIR), in a child process that then exits;
    an exporter with app.multiprocess_dirs = [metrics_dir] serves them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    result = subprocess.run(
        [sys.executable, "-c", _APP_TRAFFIC, json.dumps(list(requests)), json.dumps(list(tasks))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
