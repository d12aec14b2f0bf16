"""The monitoring stack without Docker: exporter, Prometheus, Alertmanager and the demo app.

Used by scripts/stack (run it by hand) and by tests/test_dashboards_live.py, so what the
tests prove is what a person starts. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import (
    ROOT,
    ExporterProcess,
    PostgresServer,
    RedisServer,
    free_port,
    stop_process,
    wait_for,
)
from tests.promstack import (
    AlertmanagerServer,
    PrometheusServer,
    alertmanager_test_config,
    prometheus_test_config,
)

DEMO_DIR = ROOT / "examples" / "qatoolbox_demo"
LOADGEN = ROOT / "examples" / "loadgen" / "loadgen.py"
LOADGEN_MAX_DURATION = 3600.0
PROMETHEUS_BIN = "prometheus"


def _http(url: str, data: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ServerProcess:
    """A child process in its own session, logging to a file, stopped as a group."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTI")}
        full_env.update(env or {})
        with open(log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                         env=full_env, cwd=cwd or ROOT, start_new_session=True)

    def check(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                               f"{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        stop_process(self.proc, timeout=timeout, group=True)


# --- the demo application --------------------------------------------------------------------


def demo_env(pg: PostgresServer, redis: RedisServer, dbname: str = "qatoolbox",
             legacy_capsules: bool = False) -> dict[str, str]:
    """The environment QAToolBox (and so the demo and the exporter) reads; legacy_capsules
    turns on the demo's time capsule module (QAToolBox before its tools migration 0070)."""
    return {**pg.env(dbname), "REDIS_URL": redis.url,
            "QATOOLBOX_DEMO_LEGACY_CAPSULES": "1" if legacy_capsules else "0"}


def prepare_demo_database(pg: PostgresServer, redis: RedisServer, base: Path,
                          seed_args: Sequence[str] = ("--users", "300", "--rooms", "60",
                                                      "--messages", "2000",
                                                      "--capsules", "150"),
                          legacy_capsules: bool = False) -> None:
    """Create the qatoolbox database, pg_stat_statements, the demo's tables and data (and its
    sessions and cache keys in Redis)."""
    pg.execute("CREATE DATABASE qatoolbox")
    pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname="qatoolbox")
    env = {**os.environ, **demo_env(pg, redis, legacy_capsules=legacy_capsules),
           "DJANGO_SETTINGS_MODULE": "demo.settings", "PYTHONPATH": str(DEMO_DIR)}
    for argv in (["migrate", "--noinput"], ["seed_demo", *seed_args]):
        result = subprocess.run([sys.executable, "manage.py", *argv], cwd=DEMO_DIR, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {argv[0]} failed: {result.stderr[-2000:]}")
    (base / "demo-prepared").touch()


@dataclass
class DemoApp:
    """The demo app under gunicorn and a Celery worker, both recording metrics for the app
    collector in their own folders."""

    base: Path
    env: Mapping[str, str]
    workers: int = 2
    port: int = field(default_factory=free_port)
    web: ServerProcess | None = None
    worker: ServerProcess | None = None

    @property
    def metrics_dirs(self) -> list[Path]:
        return [self.base / "metrics" / "web", self.base / "metrics" / "celery"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoApp:
        """Start gunicorn and the Celery worker; wait until the web app answers."""
        web_dir, celery_dir = self.metrics_dirs
        for path in self.metrics_dirs:
            path.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "PYTHONPATH": os.pathsep.join([str(DEMO_DIR), str(ROOT)]),
               "DJANGO_SETTINGS_MODULE": "demo.settings"}
        self.web = ServerProcess(
            "gunicorn",
            [sys.executable, "-m", "gunicorn", "--config", str(DEMO_DIR / "gunicorn.conf.py"),
             "--workers", str(self.workers), "--bind", f"127.0.0.1:{self.port}",
             "--graceful-timeout", "5", "demo.wsgi:application"],
            self.base / "gunicorn.log", env={**env, "PROMETHEUS_MULTIPROC_DIR": str(web_dir)},
            cwd=DEMO_DIR)
        self.worker = ServerProcess(
            "celery",
            [sys.executable, "-m", "celery", "--app", "demo", "worker", "--beat",
             "--schedule", str(self.base / "celerybeat-schedule"), "--concurrency", "2",
             "--loglevel", "WARNING", "--without-heartbeat", "--without-gossip",
             "--without-mingle"],
            self.base / "celery.log", env={**env, "PROMETHEUS_MULTIPROC_DIR": str(celery_dir)},
            cwd=DEMO_DIR)
        wait_for(self._ready, 60, f"demo app on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.web is not None
        self.web.check()
        return _http(f"{self.url}/healthz", timeout=2)[0] == 200

    def worker_alive(self) -> bool:
        """Whether the Celery worker still runs."""
        return self.worker is not None and self.worker.proc.poll() is None

    def send_task(self, name: str, count: int = 1) -> None:
        """Queue a task by name on the demo's broker, routed as the demo routes it (the tools
        app's tasks to "tools", the others to "default"); the worker may run it or not."""
        from celery import Celery  # type: ignore[import-untyped]

        client = Celery("stack-client", broker=self.env["REDIS_URL"])
        queue = "tools" if name.startswith("tools.") else "default"
        try:
            for _ in range(count):
                client.send_task(name, queue=queue)
        finally:
            client.close()

    def stop(self) -> None:
        for process in (self.web, self.worker):
            if process is not None:
                process.stop()


# --- the whole stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    """Exporter + Prometheus (+ Alertmanager) (+ throwaway PostgreSQL, Redis and demo app).

    With demo, the exporter connects as the least-privilege PostgreSQL role and Redis ACL user
    of docs/reliability.md (made from the doc's SQL and ACL line), as an operator would run
    it; the demo app keeps the owner and default users."""

    base: Path
    demo: bool = False
    # The demo's time capsule module: off as at QAToolBox's HEAD, on for an older deployment.
    legacy_capsules: bool = False
    alertmanager: bool = True
    scrape_interval: str | None = None
    exporter_config: Mapping[str, Any] = field(default_factory=dict)
    exporter_env: Mapping[str, str] = field(default_factory=dict)
    extra_rule_files: Sequence[Path] = ()
    postgres_settings: Mapping[str, str] = field(default_factory=dict)
    redis_args: Sequence[str] = ()
    exporter_port: int | None = None
    prometheus_port: int | None = None
    alertmanager_port: int | None = None
    postgres: PostgresServer | None = None
    redis: RedisServer | None = None
    app: DemoApp | None = None
    loadgen: ServerProcess | None = None
    exporter: ExporterProcess | None = None
    prometheus: PrometheusServer | None = None
    alertmanager_server: AlertmanagerServer | None = None
    warnings: list[str] = field(default_factory=list)

    def start(self) -> Stack:
        """Start everything in dependency order; stop what started if a step fails."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        env = dict(self.exporter_env)
        config: dict[str, Any] = {k: v for k, v in self.exporter_config.items()}
        if self.demo:
            self.postgres = PostgresServer(self.base, settings={
                "shared_preload_libraries": "pg_stat_statements",
                **self.postgres_settings}).start()
            self.redis = RedisServer(self.base, extra_args=self.redis_args).start()
            prepare_demo_database(self.postgres, self.redis, self.base,
                                  legacy_capsules=self.legacy_capsules)
            self.postgres.create_exporter_role("qatoolbox")
            env.update({**self.postgres.exporter_env("qatoolbox"),
                        "REDIS_URL": self.redis.create_exporter_user()})
            self.app = DemoApp(self.base, demo_env(self.postgres, self.redis,
                                                   legacy_capsules=self.legacy_capsules)).start()
            app_section = dict(config.get("app", {}))
            app_section["multiprocess_dirs"] = [str(p) for p in self.app.metrics_dirs]
            config["app"] = app_section
        kwargs: dict[str, Any] = {"config": config, "env": env}
        if self.exporter_port:
            kwargs["port"] = self.exporter_port
        self.exporter = ExporterProcess(self.base, **kwargs).start()
        if self.alertmanager:
            config_file = ROOT / "alertmanager" / "alertmanager.yml"
            if config_file.exists():
                am_kwargs: dict[str, Any] = {}
                if self.alertmanager_port:
                    am_kwargs["port"] = self.alertmanager_port
                try:
                    # The repository's routes, inhibitions and templates, but receivers with no
                    # integrations: the committed receivers are placeholders (docs/alerting.md),
                    # and a local stack must not send anything off this machine.
                    local_config = alertmanager_test_config(self.base, None)
                    self.alertmanager_server = AlertmanagerServer(self.base, local_config,
                                                                  **am_kwargs).start()
                except (RuntimeError, AssertionError) as exc:
                    self.warnings.append(f"Alertmanager did not start: {exc}")
            else:
                self.warnings.append("alertmanager/alertmanager.yml missing: no Alertmanager")
        am = self.alertmanager_server
        # The repository's prometheus/ (config and rules) with only the addresses changed.
        repo = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
        interval = self.scrape_interval or repo["global"]["scrape_interval"]
        config_file = prometheus_test_config(
            self.base, [f"127.0.0.1:{self.exporter.port}"],
            alertmanager=am.address if am else None, scrape_interval=interval,
            evaluation_interval=self.scrape_interval or repo["global"]["evaluation_interval"])
        for extra in self.extra_rule_files:
            shutil.copy(extra, config_file.parent / "rules" / extra.name)
        prom_kwargs: dict[str, Any] = {}
        if self.prometheus_port:
            prom_kwargs["port"] = self.prometheus_port
        self.prometheus = PrometheusServer(self.base, config_file, **prom_kwargs).start()

    def start_load(self, rate: float, duration: float) -> None:
        """Start examples/loadgen against the demo app (at most an hour per run)."""
        assert self.app is not None, "load needs the demo app (demo=True)"
        self.loadgen = ServerProcess(
            "loadgen",
            [sys.executable, str(LOADGEN), "--url", self.app.url, "--rate", str(rate),
             "--duration", str(min(duration, LOADGEN_MAX_DURATION)), "--seed", "1"],
            self.base / "loadgen.log")

    def urls(self) -> dict[str, str]:
        """What a person opens, by name."""
        urls: dict[str, str] = {}
        if self.exporter:
            urls["exporter"] = self.exporter.url
        if self.prometheus:
            urls["prometheus"] = self.prometheus.url
        if self.alertmanager_server:
            urls["alertmanager"] = self.alertmanager_server.url
        if self.app:
            urls["demo app"] = self.app.url
        return urls

    def stop(self) -> None:
        """Stop everything that was started, last first."""
        for part in (self.loadgen, self.prometheus, self.alertmanager_server, self.exporter,
                     self.app):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        for server in (self.redis, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    """Start the stack and stop it on the way out, whatever happens."""
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port (so a fixed port cannot hit another server)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections in TIME_WAIT do not count, only a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/stack: run the stack until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="scripts/stack",
        description="Run the exporter, Prometheus and Alertmanager from local binaries with "
                    "the repository's configs (loopback only); Ctrl-C stops everything.")
    parser.add_argument("--demo", action="store_true",
                        help="also start throwaway PostgreSQL and Redis, the demo app under "
                             "gunicorn with a Celery worker, and a load generator")
    parser.add_argument("--legacy-capsules", action="store_true",
                        help="with --demo: the time capsule module QAToolBox dropped in its tools "
                             "migration 0070 (an older deployment's schema)")
    parser.add_argument("--no-alertmanager", action="store_true", help="skip Alertmanager")
    parser.add_argument("--ha", action="store_true",
                        help="highly available alerting (deploy/ha/): two Prometheus replicas "
                             "on --prometheus-port and the next port, three clustered "
                             "Alertmanagers on --alertmanager-port and the next two")
    parser.add_argument("--exporter-port", type=int, default=9786)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    parser.add_argument("--load-rate", type=float, default=10.0,
                        help="demo requests per second (default 10)")
    parser.add_argument("--duration", type=float, default=0,
                        help="stop by itself after this many seconds (default: run until Ctrl-C)")
    parser.add_argument("--clean", action="store_true",
                        help="on exit, delete the logs too (by default they are kept, and their "
                             "folder printed)")
    args = parser.parse_args(argv)
    for binary in (PROMETHEUS_BIN, "redis-server"):
        if (args.demo or binary == PROMETHEUS_BIN) and shutil.which(binary) is None:
            print(f"scripts/stack: {binary} not found (run ./scripts/test once as root "
                  f"to install the Debian packages)", file=sys.stderr)
            return 1
    base = Path(tempfile.mkdtemp(prefix="qatb-stack-"))
    os.chmod(base, 0o755)
    env = {k: v for k, v in os.environ.items() if k.startswith(("DB_", "REDIS_"))}
    if args.ha:
        return _run_ha(args, base, env)
    stack = Stack(base, demo=args.demo, legacy_capsules=args.legacy_capsules,
                  alertmanager=not args.no_alertmanager,
                  exporter_env=env, exporter_port=args.exporter_port,
                  prometheus_port=args.prometheus_port,
                  alertmanager_port=args.alertmanager_port)
    busy = [p for p in (args.exporter_port, args.prometheus_port, args.alertmanager_port)
            if not port_free(p)]
    if busy:
        print(f"scripts/stack: port {', '.join(map(str, busy))} already in use on 127.0.0.1 "
              f"(choose others with --exporter-port, --prometheus-port, --alertmanager-port)",
              file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        return 1
    stop = threading.Event()
    # Set both explicitly: a shell may start us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stack.start()
        for warning in stack.warnings:
            print(f"warning: {warning}")
        print("qatoolbox stack is up (Ctrl-C stops everything):")
        for name, url in stack.urls().items():
            print(f"  {name:<13} {url}")
        print(f"  logs          {base}")
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if stack.app is not None and (stack.loadgen is None
                                          or stack.loadgen.proc.poll() is not None):
                # examples/loadgen runs for an hour at most: start the next run.
                stack.start_load(args.load_rate, args.duration or LOADGEN_MAX_DURATION)
            stop.wait(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        print("stopping...")
        stack.stop()
        leave(base, args.clean)
    return 0


def leave(base: Path, clean: bool) -> None:
    """On exit: the logs stay (the moment an operator wants to read them), the data goes;
    with --clean everything goes."""
    if clean:
        shutil.rmtree(base, ignore_errors=True)
        return
    kept = 0
    for entry in base.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.name.endswith(".log"):
            kept += 1
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if kept:
        print(f"logs kept in {base} (--clean deletes them on exit)", flush=True)
    else:
        base.rmdir()


def _run_ha(args: argparse.Namespace, base: Path, env: Mapping[str, str]) -> int:
    """scripts/stack --ha: the exporter, two Prometheus replicas and three clustered
    Alertmanagers (tests/fleetstack.py's HAStack, which tests/test_ha.py proves)."""
    from tests.fleetstack import HAStack

    prometheus_ports = [args.prometheus_port, args.prometheus_port + 1]
    alertmanager_ports = [args.alertmanager_port + i for i in range(3)]
    busy = [p for p in (args.exporter_port, *prometheus_ports, *alertmanager_ports)
            if not port_free(p)]
    if busy:
        print(f"scripts/stack: port {', '.join(map(str, busy))} already in use on 127.0.0.1",
              file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with contextlib.ExitStack() as running_parts:
            exporter = ExporterProcess(base, env=env, port=args.exporter_port)
            running_parts.callback(exporter.stop)
            exporter.start()
            ha = HAStack(base, [([f"127.0.0.1:{args.exporter_port}"],
                                 {"env": "local", "cluster": "local"})],
                         for_=None, scrape_interval="15s",
                         alertmanager_ports=alertmanager_ports,
                         prometheus_ports=prometheus_ports).start(running_parts)
            print("qatoolbox HA stack is up (Ctrl-C stops everything):")
            print(f"  {'exporter':<13} {exporter.url}")
            for replica in ha.replicas:
                print(f"  {'prometheus ' + replica.replica:<13} {replica.url}")
            for index, peer in enumerate(ha.alertmanagers, 1):
                print(f"  {f'alertmanager{index}':<13} {peer.url}")
            print(f"  logs          {base}", flush=True)
            deadline = time.monotonic() + args.duration if args.duration else None
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                stop.wait(1)
            print("stopping...", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        leave(base, args.clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
