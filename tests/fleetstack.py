"""Fleet topologies for tests and scripts/stack: several exporters of one cluster against one
PostgreSQL and Redis, Prometheus replicas and an Alertmanager cluster, sharded scrapers writing
to VictoriaMetrics. Every process listens on 127.0.0.1 and is stopped by whoever started it."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import ROOT, ExporterProcess, free_port, wait_for
from tests.promstack import (
    ALERTMANAGER_BIN,
    PROMETHEUS_BIN,
    AlertmanagerServer,
    PrometheusServer,
    _Daemon,
    _get_ok,
    alertmanager_test_config,
    prometheus_test_config,
)

HA_DIR = ROOT / "deploy" / "ha"
VICTORIA_METRICS_BIN = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"


def target_groups(groups: Sequence[tuple[Sequence[str], Mapping[str, str]]]) -> list[Any]:
    """file_sd target groups from (addresses, labels) pairs."""
    return [{"targets": list(addresses), "labels": dict(labels)} for addresses, labels in groups]


def fleet_prometheus_config(
    base: Path,
    groups: Sequence[tuple[Sequence[str], Mapping[str, str]]],
    *,
    alertmanagers: Sequence[str] = (),
    for_: str | None = "2s",
    external_labels: Mapping[str, str] | None = None,
    alert_relabel_configs: Sequence[Mapping[str, Any]] | None = None,
    name: str = "prometheus",
    scrape_interval: str = "1s",
) -> Path:
    """The repository's prometheus/ for a test (prometheus_test_config), with the given
    target groups of job qatoolbox instead of one, every Alertmanager of a cluster, and the HA
    settings (external labels, alert relabelling) when given."""
    config_file = prometheus_test_config(base / name, ["127.0.0.1:1"],
                                         alertmanager=alertmanagers[0] if alertmanagers else None,
                                         for_=for_, scrape_interval=scrape_interval,
                                         evaluation_interval=scrape_interval)
    (config_file.parent / "targets" / "test.yml").write_text(yaml.safe_dump(target_groups(groups)))
    config = yaml.safe_load(config_file.read_text())
    if alertmanagers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [
            {"targets": list(alertmanagers)}]}]}
        if alert_relabel_configs is not None:
            config["alerting"]["alert_relabel_configs"] = list(alert_relabel_configs)
        for scrape in config["scrape_configs"]:
            if scrape["job_name"] == "alertmanager":
                scrape["static_configs"] = [{"targets": list(alertmanagers)}]
    if external_labels is not None:
        config["global"]["external_labels"] = dict(external_labels)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_file


@dataclass
class ClusteredAlertmanager(AlertmanagerServer):
    """Debian's Alertmanager as one peer of a gossip cluster (--cluster.* flags)."""

    cluster_port: int = field(default_factory=free_port)
    peers: Sequence[int] = ()
    name: str = "alertmanager-peer"

    def start(self, timeout: float = 30) -> ClusteredAlertmanager:
        """Start with the cluster listener on loopback and the other peers' addresses."""
        data = self.base / f"alertmanager-data-{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base / f"alertmanager-{self.port}.log"
        peers = [f"--cluster.peer=127.0.0.1:{p}" for p in self.peers if p != self.cluster_port]
        self._spawn([ALERTMANAGER_BIN, f"--config.file={self.config_file}",
                     f"--storage.path={data}", f"--web.listen-address=127.0.0.1:{self.port}",
                     f"--cluster.listen-address=127.0.0.1:{self.cluster_port}",
                     f"--cluster.advertise-address=127.0.0.1:{self.cluster_port}",
                     # Loopback peers settle at once; the defaults suit real networks.
                     "--cluster.settle-timeout=2s", "--cluster.gossip-interval=100ms",
                     "--cluster.pushpull-interval=2s", "--cluster.peer-timeout=1s",
                     *peers, "--log.level=warn"])
        wait_for(lambda: self._alive() and _get_ok(f"{self.url}/-/ready"), timeout,
                 f"Alertmanager peer on port {self.port}", interval=0.2)
        return self

    def members(self) -> int:
        """Cluster members this peer sees (its /api/v2/status)."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/api/v2/status", timeout=5) as response:
            status = json.loads(response.read())
        return len(status["cluster"]["peers"])


def alertmanager_cluster(base: Path, config_file: Path, size: int = 3
                         ) -> list[ClusteredAlertmanager]:
    """size Alertmanager peers (not started) that all know each other."""
    ports = [free_port() for _ in range(size)]
    return [ClusteredAlertmanager(base, config_file, cluster_port=p, peers=ports)
            for p in ports]


@dataclass
class VictoriaMetrics(_Daemon):
    """Debian's single-node VictoriaMetrics on a free loopback port: a remote_write target
    and a Prometheus-compatible query API, deduplicating samples within dedup_interval."""

    base: Path
    port: int = field(default_factory=free_port)
    dedup_interval: str = "1s"
    relabel_config: Path | None = None
    name: str = "victoria-metrics"

    def start(self, timeout: float = 30) -> VictoriaMetrics:
        """Start and wait until /health answers."""
        data = self.base / f"vm-data-{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base / f"vm-{self.port}.log"
        self._spawn([VICTORIA_METRICS_BIN, f"-storageDataPath={data}",
                     f"-httpListenAddr=127.0.0.1:{self.port}",
                     f"-dedup.minScrapeInterval={self.dedup_interval}",
                     "-retentionPeriod=1d", "-loggerLevel=ERROR",
                     # Answer right after the write, not 30 s later (the default cache lag).
                     "-search.latencyOffset=0s", "-search.cacheTimestampOffset=0s",
                     *([f"-relabelConfig={self.relabel_config}"] if self.relabel_config
                       else [])])
        wait_for(lambda: self._alive() and _get_ok(f"{self.url}/health"), timeout,
                 f"VictoriaMetrics on port {self.port}", interval=0.2)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def kill(daemon: _Daemon) -> None:
    """SIGKILL a started daemon, as a crash would end it, and reap it."""
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(10)


def started(stack: contextlib.ExitStack, daemon: Any) -> Any:
    """daemon.start(), stopped when stack closes (even if the start fails half-way)."""
    stack.callback(daemon.stop)
    return daemon.start()


@contextlib.contextmanager
def exporters(base: Path, specs: Sequence[Mapping[str, Any]]) -> Iterator[list[ExporterProcess]]:
    """Start exporters from ExporterProcess keyword arguments; stop them all on the way out."""
    with contextlib.ExitStack() as stack:
        procs = []
        for spec in specs:
            proc = ExporterProcess(base, **spec)
            stack.callback(proc.stop)
            procs.append(proc.start())
        yield procs


# --- high availability: two Prometheus replicas, three clustered Alertmanagers ----------------

def ha_settings() -> dict[str, Any]:
    """deploy/ha/prometheus.yml's external labels and alert relabelling."""
    config = yaml.safe_load((HA_DIR / "prometheus.yml").read_text())
    return {"external_labels": config["global"]["external_labels"],
            "alert_relabel_configs": config["alerting"]["alert_relabel_configs"]}


@dataclass
class ReplicaPrometheus(PrometheusServer):
    """A Prometheus replica as deploy/ha/prometheus.default runs it: PROMETHEUS_REPLICA in its
    environment, expanded into the external labels by --enable-feature=expand-external-labels."""

    replica: str = "a"
    name: str = "prometheus-replica"

    def start(self, timeout: float = 30) -> ReplicaPrometheus:
        old = os.environ.get("PROMETHEUS_REPLICA")
        os.environ["PROMETHEUS_REPLICA"] = self.replica  # the child inherits it at spawn
        try:
            self.extra_args = [*self.extra_args, "--enable-feature=expand-external-labels"]
            super().start(timeout)
        finally:
            if old is None:
                del os.environ["PROMETHEUS_REPLICA"]
            else:
                os.environ["PROMETHEUS_REPLICA"] = old
        return self


@dataclass
class HAStack:
    """Alerting made highly available from Debian's binaries: 3 clustered Alertmanagers with
    the repository's alertmanager.yml (receivers pointed at webhook_url, or none), 2 Prometheus
    replicas with the repository's rules and deploy/ha/prometheus.yml's settings, scraping the
    given target groups."""

    base: Path
    groups: Sequence[tuple[Sequence[str], Mapping[str, str]]]
    webhook_url: str | None = None
    for_: str | None = "2s"
    scrape_interval: str = "1s"
    alertmanager_ports: Sequence[int] = ()
    prometheus_ports: Sequence[int] = ()
    alertmanagers: list[ClusteredAlertmanager] = field(default_factory=list)
    replicas: list[ReplicaPrometheus] = field(default_factory=list)

    def start(self, stack: contextlib.ExitStack) -> HAStack:
        """Start the Alertmanager peers, wait until each sees all three, then the replicas;
        everything started is stopped when stack closes."""
        am_config = alertmanager_test_config(self.base, self.webhook_url)
        peers = alertmanager_cluster(self.base, am_config)
        for peer, port in zip(peers, self.alertmanager_ports, strict=False):
            peer.port = port
        for peer in peers:
            self.alertmanagers.append(started(stack, peer))
        wait_for(lambda: all(p.members() == len(peers) for p in self.alertmanagers), 30,
                 "every Alertmanager peer sees the others", interval=0.2)
        addresses = [p.address for p in self.alertmanagers]
        ha = ha_settings()
        for index, replica in enumerate("ab"):
            config = fleet_prometheus_config(
                self.base, self.groups, alertmanagers=addresses, for_=self.for_,
                external_labels=ha["external_labels"],
                alert_relabel_configs=ha["alert_relabel_configs"], name=f"replica-{replica}",
                scrape_interval=self.scrape_interval)
            kwargs: dict[str, Any] = {"replica": replica,
                                      "extra_args": ["--rules.alert.resend-delay=1s"]}
            if index < len(self.prometheus_ports):
                kwargs["port"] = self.prometheus_ports[index]
            self.replicas.append(started(stack, ReplicaPrometheus(
                self.base / f"replica-{replica}", config, **kwargs)))
        return self


__all__ = ["PROMETHEUS_BIN", "PrometheusServer"]
