"""Live alerting: exporter -> Prometheus (the repository's rules) -> Alertmanager -> a webhook."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.instrument import Recorder
from tests.harness import ExporterProcess, PostgresServer, RedisServer, wait_for
from tests.promstack import (
    AlertmanagerServer,
    PrometheusServer,
    WebhookReceiver,
    alertmanager_test_config,
    prometheus_test_config,
    record_app_traffic,
    running,
)

pytestmark = pytest.mark.integration

RUNBOOK = "https://github.com/qatoolbox/qatoolbox-exporter/blob/main/docs/runbooks.md#postgresdown"


def test_postgres_down_pages_oncall_and_resolves(
    postgres: PostgresServer, redis_server: RedisServer, workdir: Path,
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    metrics_dir = workdir / "app-metrics"
    metrics_dir.mkdir()
    record_app_traffic(metrics_dir)
    # A live worker, as a running gunicorn has: without one while web processes run (and
    # this machine may run gunicorn for other tests), AppInstrumentationDown would fire.
    worker = Recorder(str(metrics_dir))
    try:
        run_the_chain(postgres, redis_server, workdir, exporter_factory, metrics_dir)
    finally:
        worker.close()


def run_the_chain(postgres: PostgresServer, redis_server: RedisServer, workdir: Path,
                  exporter_factory: Callable[..., ExporterProcess], metrics_dir: Path) -> None:
    """The chain with a live worker recording into metrics_dir."""
    # As an operator runs it: the least-privilege role and ACL user of docs/reliability.md.
    postgres.create_exporter_role()
    exporter = exporter_factory(config={"app": {"multiprocess_dirs": [str(metrics_dir)]}},
                                env={**postgres.exporter_env(),
                                     "REDIS_URL": redis_server.create_exporter_user()})
    instance = f"127.0.0.1:{exporter.port}"
    with WebhookReceiver() as hook:
        # The repository's configs, copied: short intervals and `for`s, webhooks pointed here.
        am = AlertmanagerServer(workdir, alertmanager_test_config(workdir, hook.url)).start()
        prometheus = PrometheusServer(workdir, prometheus_test_config(
            workdir, [instance], alertmanager=am.address, scrape_interval="1s",
            evaluation_interval="1s", for_="2s", rule_interval="1s"),
            # Alerts evaluated before the first Alertmanager discovery are resent after this
            # delay (1 minute by default): the Watchdog fires from the first evaluation.
            extra_args=["--rules.alert.resend-delay=1s"])
        with running(am):
            prometheus.start()
            with running(prometheus):
                prometheus.wait_targets_up("qatoolbox")
                wait_for(lambda: prometheus.value(
                    f'qatoolbox_postgres_up{{instance="{instance}"}}') == 1, 30,
                    "Prometheus to see PostgreSQL up")

                # Every rule of the repository evaluates against real data without error
                # (a many-to-many match or a bad label set would show here).
                def evaluated() -> bool:
                    rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
                    return bool(rules) and all(r.get("lastEvaluation", "").startswith("2")
                                               and not r["lastEvaluation"].startswith("0001")
                                               for r in rules)
                wait_for(evaluated, 30, "every rule evaluated once")
                broken = [(r["name"], r.get("lastError")) for g in prometheus.rule_groups()
                          for r in g["rules"] if r["health"] != "ok"]
                assert not broken, broken
                assert not [n for n in hook.received() if n.alerts("PostgresDown")]

                # More traffic once Prometheus has the first counts: rates need an increase.
                record_app_traffic(metrics_dir)
                check_recording_rules_on_real_data(prometheus, instance)
                check_new_metrics_have_real_values(prometheus, postgres, instance)

                # The Watchdog reaches the dead man's switch receiver, and only it.
                note, alert = hook.wait_for_alert("Watchdog", "firing", timeout=60)
                assert note.path == "/deadmansswitch" and note.receiver == "deadmansswitch"
                assert alert["labels"]["severity"] == "none"
                assert not [n for n in hook.received()
                            if n.path != "/deadmansswitch" and n.alerts("Watchdog")]
                # Alertmanager is scraped, so its own alerts have data to work on.
                wait_for(lambda: prometheus.value('up{job="alertmanager"}') == 1, 30,
                         "Prometheus scraping Alertmanager")
                assert prometheus.query("alertmanager_notifications_total")

                postgres.stop()
                note, alert = hook.wait_for_alert("PostgresDown", "firing", timeout=60,
                                                  path="/oncall")
                assert note.path == "/oncall" and note.receiver == "oncall", note.payload
                assert alert["labels"]["severity"] == "critical"
                # About the server, not the exporter (docs/scaling.md): one alert however many
                # exporters read it.
                server = f"{socket.gethostname()}:{postgres.port}"
                assert alert["labels"]["server"] == server and "instance" not in alert["labels"]
                assert alert["labels"]["cluster"] == "test"
                assert alert["annotations"]["runbook_url"] == RUNBOOK
                assert server in alert["annotations"]["description"]
                assert "qatoolbox_postgres_up = 0" in alert["annotations"]["description"]
                # Routed by severity alone: paged, and shown in the team's DingTalk group
                # (chat); nothing critical went to the team's mail or the digest.
                wait_for(lambda: any(n.path == "/chat" and n.alerts("PostgresDown")
                                     for n in hook.received()), 30, "the chat receiver")
                assert not [n for n in hook.received()
                            if n.path not in ("/oncall", "/chat") and n.alerts("PostgresDown")]

                postgres.start()
                note, alert = hook.wait_for_alert("PostgresDown", "resolved", timeout=60,
                                                  path="/oncall")
                assert note.path == "/oncall"
                assert alert["labels"]["server"] == server
                assert alert["annotations"]["runbook_url"] == RUNBOOK

                # The app's metrics folder disappears (a redeploy that forgot it): every HTTP
                # and Celery alert and the SLOs go blind, and that pages.
                assert not [n for n in hook.received() if n.alerts("AppInstrumentationDown")]
                shutil.rmtree(metrics_dir)
                note, alert = hook.wait_for_alert("AppInstrumentationDown", "firing", timeout=60,
                                                  path="/oncall")
                assert note.path == "/oncall"
                assert alert["labels"]["instance"] == instance
                assert alert["labels"]["dir"] == str(metrics_dir)
                assert "missing or unreadable" in alert["annotations"]["description"]
                # Criticals also reach the team's DingTalk group (continue: true).
                wait_for(lambda: any(n.path == "/chat" and n.alerts("AppInstrumentationDown")
                                     for n in hook.received()), 30, "the chat receiver")
    assert "permission denied" not in exporter.logs()
    assert "command refused" not in exporter.logs()


def check_recording_rules_on_real_data(prometheus: PrometheusServer, instance: str) -> None:
    """The recording rules join the exporter's real label sets (route, status, task, state,
    le...) and give the values the traffic implies. Each check waits: a rule reads the
    output of other rules and of scrapes that may be one evaluation behind."""
    sel = f'{{instance="{instance}"}}'

    def eventually(expr: str, low: float, high: float = float("inf")) -> None:
        seen: list[float | None] = []

        def ok() -> bool:
            seen.append(prometheus.value(expr))
            value = seen[-1]
            return value is not None and low < value < high
        try:
            wait_for(ok, 30, expr)
        except AssertionError:
            raise AssertionError(f"{expr}: wanted ({low}, {high}), last {seen[-3:]}") from None

    eventually(f"instance:qatoolbox_http_requests:rate5m{sel}", 0)
    # One request in three fails; one finished task run in two (retries do not count).
    eventually(f"instance:qatoolbox_http_requests_5xx:ratio_rate5m{sel}", 0.2, 0.5)
    task = f'{{instance="{instance}",task="tools.tasks.cleanup_expired_rooms"}}'
    eventually(f"instance_task:qatoolbox_celery_tasks_failed:ratio_rate5m{task}", 0.3, 0.7)
    route = f'{{instance="{instance}",route="api/rooms/"}}'
    # A 60-query request puts the route's p95 above HttpTooManyDbQueries' line, and so on.
    eventually(f"instance_route:qatoolbox_http_request_db_queries:p95_rate5m{route}", 50)
    eventually(f"instance_route:qatoolbox_http_request_db_seconds:p95_rate5m{route}", 1)
    eventually(f"instance_route:qatoolbox_http_request_duration_seconds:p95_rate5m{route}", 2)

    # Everything else that has data on an idle host with a fresh database and cache.
    for name in (
        "instance:qatoolbox_host_cpu_utilisation:ratio", "instance:qatoolbox_host_cpus:count",
        "instance:qatoolbox_host_load5_per_cpu:ratio",
        "instance:qatoolbox_host_memory_utilisation:ratio",
        "instance:qatoolbox_postgres_connections_used:ratio",
        "instance:qatoolbox_celery_queue_length:sum",
        "instance:qatoolbox_http_request_duration_seconds:p99_rate5m",
    ):
        eventually(f"{name}{sel}", -1e-9)
    for name in ("instance_mountpoint:qatoolbox_host_filesystem_usage:ratio",
                 "instance_datname:qatoolbox_postgres_transactions:rate5m",
                 "instance_route:qatoolbox_http_requests_5xx:ratio_rate5m"):
        wait_for(lambda n=name: bool(prometheus.query(f"{n}{sel}")), 30, name)
        for sample in prometheus.query(f"{name}{sel}"):
            assert sample["metric"]["job"] == "qatoolbox", sample


def check_new_metrics_have_real_values(prometheus: PrometheusServer, postgres: PostgresServer,
                                       instance: str) -> None:
    """The clock, OOM, conntrack, XID age and WAL archiving families reach Prometheus with the
    values the kernel and the server have."""
    sel = f'{{instance="{instance}"}}'

    def value(expr: str) -> float:
        wait_for(lambda: prometheus.value(expr) is not None, 30, expr)
        got = prometheus.value(expr)
        assert got is not None
        return got

    vmstat = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    if "oom_kill" in vmstat:
        # OOM kills are rare: the count is the kernel's, at most a kill or two behind.
        got = value(f"qatoolbox_host_vmstat_oom_kill_total{sel}")
        assert float(vmstat["oom_kill"]) - 2 <= got <= float(vmstat["oom_kill"]) + 2
    # adjtimex works here (it is a read): the clock families are there, sync status 0 or 1.
    assert value(f"qatoolbox_host_timex_sync_status{sel}") in (0.0, 1.0)
    assert abs(value(f"qatoolbox_host_timex_offset_seconds{sel}")) < 10
    assert 0 <= value(f"qatoolbox_host_timex_maxerror_seconds{sel}") <= 16
    limit = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    if limit.exists():
        assert value(f"qatoolbox_host_nf_conntrack_entries_limit{sel}") == float(
            limit.read_text())
    direct = dict(postgres.execute("SELECT datname, age(datfrozenxid) FROM pg_database "
                                   "WHERE datallowconn"))
    got = value(f'qatoolbox_postgres_database_xid_age{{instance="{instance}",datname="postgres"}}')
    assert 0 < got <= direct["postgres"]  # scraped before this reading: younger or equal
    assert value(f"qatoolbox_postgres_wal_archive_failed_total{sel}") == 0
    assert value(f"qatoolbox_postgres_reserved_connections{sel}") == 3
