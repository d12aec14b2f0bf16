"""Highly available alerting from Debian's binaries: two Prometheus replicas with
deploy/ha/prometheus.yml's replica label (dropped from alerts) and three clustered
Alertmanagers with the repository's alertmanager.yml, notifying a webhook.

One sequence, since each step builds on the state the previous one left:
1. An exporter that cannot reach PostgreSQL or Redis: both replicas fire PostgresDown and
   RedisDown, and every notification group reaches the webhook exactly once.
2. One Alertmanager peer killed (SIGKILL), then an exporter stopped: its ExporterDown still
   arrives exactly once per group.
3. One Prometheus replica killed, then the second exporter stopped: its ExporterDown still
   arrives, exactly once per group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.fleetstack import HA_DIR, HAStack, exporters, kill
from tests.harness import ROOT, ExporterProcess, free_port, tempdir, wait_for
from tests.promstack import Notification, WebhookReceiver
from tests.stack import port_free

pytestmark = [pytest.mark.integration, pytest.mark.topology]

# How long to keep watching for a duplicate after a notification arrived: several
# group_intervals (1 s in the test config), Prometheus resends (1 s) and peer timeouts.
QUIET_SECONDS = 6.0


def firing_groups(notes: list[Notification]) -> Counter[tuple[str, str]]:
    """How many firing notifications each (receiver, group) got."""
    return Counter((n.path, str(n.payload.get("groupKey"))) for n in notes
                   if n.payload.get("status") == "firing")


def duplicates(notes: list[Notification]) -> dict[Any, int]:
    """Notifications sent more than once with the same content: the same receiver, group and
    alerts in the same states. A group whose alerts change is notified again, rightly; the
    same news twice is what an unclustered or half-clustered Alertmanager sends."""
    content = Counter(
        (n.path, str(n.payload.get("groupKey")), n.payload.get("status"),
         frozenset((tuple(sorted(a["labels"].items())), a["status"])
                   for a in n.payload.get("alerts", [])))
        for n in notes)
    return {k[:3]: c for k, c in content.items() if c > 1}


def groups_of(notes: list[Notification], alertname: str) -> set[tuple[str, str]]:
    return {(n.path, str(n.payload.get("groupKey"))) for n in notes
            if n.alerts(alertname, "firing")}


def assert_once_each(webhook: WebhookReceiver, alertname: str, timeout: float) -> int:
    """Wait for alertname's notifications, watch QUIET_SECONDS more, and check that every
    group got one firing notification and no more; return how many groups got it."""
    webhook.wait_for_alert(alertname, "firing", timeout)
    time.sleep(QUIET_SECONDS)
    notes = webhook.received()
    counts = firing_groups(notes)
    groups = groups_of(notes, alertname)
    assert groups, alertname
    # The alert's own groups hold it alone: one notification each, and nothing anywhere twice.
    assert {g: counts[g] for g in groups} == dict.fromkeys(groups, 1), counts
    assert not duplicates(notes), f"notifications sent more than once: {duplicates(notes)}"
    return len(groups)


def test_ha_config_matches_the_single_prometheus() -> None:
    single = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    ha = yaml.safe_load((HA_DIR / "prometheus.yml").read_text())
    assert ha["global"]["external_labels"]["replica"] == "${PROMETHEUS_REPLICA}"
    assert {k: v for k, v in ha["global"].items() if k != "external_labels"} == {
        k: v for k, v in single["global"].items() if k != "external_labels"}
    assert ha["alerting"]["alert_relabel_configs"] == [{"action": "labeldrop",
                                                        "regex": "replica"}]
    assert len(ha["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]) == 3
    jobs = {j["job_name"]: j for j in ha["scrape_configs"]}
    (exporter_job,) = [j for j in single["scrape_configs"] if j["job_name"] == "qatoolbox"]
    sd = exporter_job["file_sd_configs"][0]
    ha_sd = jobs["qatoolbox"]["file_sd_configs"][0]
    assert ha_sd["files"] == [f"../../prometheus/{f}" for f in sd["files"]]
    assert {k: v for k, v in jobs["qatoolbox"].items() if k != "file_sd_configs"} == {
        k: v for k, v in exporter_job.items() if k != "file_sd_configs"}
    assert ha["rule_files"] == [f"../../prometheus/{f}" for f in single["rule_files"]]
    for peer_flag in ("--cluster.listen-address", "--cluster.peer"):
        assert peer_flag in (HA_DIR / "prometheus-alertmanager.default").read_text()


@pytest.fixture
def ha() -> Iterator[tuple[HAStack, list[ExporterProcess], WebhookReceiver]]:
    with tempdir() as base, WebhookReceiver() as webhook, contextlib.ExitStack() as stack:
        # A: the service scope against closed ports (PostgresDown, RedisDown); B: a host
        # scope exporter with only the app collector, so that what other processes do on
        # this machine (CPU, gunicorn coming and going) raises no alert of its own here.
        procs = stack.enter_context(exporters(base, [
            {"args": ["--collectors.scope", "service", "--no-collector.business"]},
            {"args": ["--collectors.scope", "host", "--no-collector.host",
                      "--no-collector.process"]}]))
        addresses = [f"127.0.0.1:{p.port}" for p in procs]
        ha = HAStack(base, [(addresses, {"env": "test", "cluster": "ha"})],
                     webhook_url=webhook.url).start(stack)
        yield ha, procs, webhook


def _firing(replica: Any, alertname: str) -> list[dict[str, Any]]:
    return [a for a in replica.alerts()
            if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


def test_two_replicas_three_alertmanagers_one_notification_per_group(
        ha: tuple[HAStack, list[ExporterProcess], WebhookReceiver]) -> None:
    stack, (service, host), webhook = ha
    a, b = stack.replicas

    # 1. Both replicas fire the same alert; the replica label is theirs, not the alert's.
    wait_for(lambda: _firing(a, "PostgresDown") and _firing(b, "PostgresDown"), 60,
             "PostgresDown firing on both replicas", interval=0.5)
    labels = [_firing(r, "PostgresDown")[0]["labels"] for r in (a, b)]
    assert labels[0] == labels[1] and "replica" not in labels[0], labels
    # The replica label exists where it should: on what each replica exposes to a global view.
    for replica, name in ((a, "a"), (b, "b")):
        with urllib.request.urlopen(f"{replica.url}/federate?match[]=up", timeout=10) as resp:
            assert f'replica="{name}"' in resp.read().decode()
    for peer in stack.alertmanagers:  # every peer holds the one alert both replicas sent
        got = [x for x in peer.alerts() if x["labels"]["alertname"] == "PostgresDown"]
        assert len(got) == 1 and "replica" not in got[0]["labels"], got
    first = assert_once_each(webhook, "PostgresDown", 60)
    assert groups_of(webhook.received(), "RedisDown")
    # Critical alerts page and chat: two receivers, one notification each.
    assert first == 2

    # 2. An Alertmanager peer dies; a new alert still goes out exactly once per group.
    kill(stack.alertmanagers[0])
    service.stop()
    assert assert_once_each(webhook, "ExporterDown", 60) == 2

    # 3. A Prometheus replica dies; the other still brings the next alert, once.
    kill(a)
    before = len(webhook.received())
    host.stop()
    wait_for(lambda: any(n.alerts("ExporterDown", "firing")
                         and any(x["labels"].get("instance") == f"127.0.0.1:{host.port}"
                                 for x in n.alerts("ExporterDown", "firing"))
                         for n in webhook.received()[before:]), 60,
             "ExporterDown of the second exporter with one replica left", interval=0.5)
    time.sleep(QUIET_SECONDS)
    notes = webhook.received()
    assert len(groups_of(notes, "ExporterDown")) == 4
    assert set(firing_groups(notes)[g] for g in groups_of(notes, "ExporterDown")) == {1}
    assert not duplicates(notes), duplicates(notes)


def _free_run(count: int) -> int:
    """A port p with p .. p+count-1 all free on 127.0.0.1."""
    for _ in range(50):
        first = free_port()
        if first + count < 65536 and all(port_free(first + i) for i in range(count)):
            return first
    raise AssertionError("no run of free ports")


def test_scripts_stack_ha_starts_the_pair_and_the_cluster_and_stops_them() -> None:
    exporter, prometheus, alertmanager = free_port(), _free_run(2), _free_run(3)
    ports = [exporter, prometheus, prometheus + 1, *(alertmanager + i for i in range(3))]
    env = {**os.environ, "DB_HOST": "127.0.0.1", "DB_PORT": "1",
           "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "stack"), "--ha", "--clean", "--exporter-port", str(exporter),
         "--prometheus-port", str(prometheus), "--alertmanager-port", str(alertmanager)],
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
        for port in ports:
            assert f"http://127.0.0.1:{port}" in output, output
        for port in ports[3:]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/status",
                                        timeout=10) as response:
                assert len(json.loads(response.read())["cluster"]["peers"]) == 3
        for port in ports[1:3]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready",
                                        timeout=10) as response:
                assert response.status == 200
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
