"""Live alerting: exporter -> Prometheus (the repository's rules) -> Alertmanager -> a webhook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import ExporterProcess, PostgresServer, RedisServer, wait_for
from tests.promstack import (
    AlertmanagerServer,
    PrometheusServer,
    WebhookReceiver,
    alertmanager_test_config,
    prometheus_test_config,
    running,
)

pytestmark = pytest.mark.integration

RUNBOOK = "https://github.com/qatoolbox/qatoolbox-exporter/blob/main/docs/runbooks.md#postgresdown"


def test_postgres_down_pages_oncall_and_resolves(
    postgres: PostgresServer, redis_server: RedisServer, workdir: Path,
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    exporter = exporter_factory(env={**postgres.env(), "REDIS_URL": redis_server.url})
    instance = f"127.0.0.1:{exporter.port}"
    with WebhookReceiver() as hook:
        # The repository's configs, copied: short intervals and `for`s, webhooks pointed here.
        am = AlertmanagerServer(workdir, alertmanager_test_config(workdir, hook.url)).start()
        prometheus = PrometheusServer(workdir, prometheus_test_config(
            workdir, [instance], alertmanager=am.address, scrape_interval="1s",
            evaluation_interval="1s", for_="2s", rule_interval="1s"))
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

                postgres.stop()
                note, alert = hook.wait_for_alert("PostgresDown", "firing", timeout=60)
                assert note.path == "/oncall" and note.receiver == "oncall", note.payload
                assert alert["labels"]["severity"] == "critical"
                assert alert["labels"]["instance"] == instance
                assert alert["labels"]["job"] == "qatoolbox"
                assert alert["annotations"]["runbook_url"] == RUNBOOK
                assert instance in alert["annotations"]["description"]
                assert "qatoolbox_postgres_up = 0" in alert["annotations"]["description"]
                # Routed by severity alone: nothing critical went to the team or the digest.
                assert not [n for n in hook.received()
                            if n.path != "/oncall" and n.alerts("PostgresDown")]

                postgres.start()
                note, alert = hook.wait_for_alert("PostgresDown", "resolved", timeout=60)
                assert note.path == "/oncall"
                assert alert["labels"]["instance"] == instance
                assert alert["annotations"]["runbook_url"] == RUNBOOK
