"""Hashmod sharding into VictoriaMetrics, from deploy/sharding/ and Debian's binaries.

20 targets: 4 real exporters (3 host scope with application traffic, 1 service scope against a
throwaway PostgreSQL and Redis) and 16 static targets serving a copy of a host exporter's
exposition (a fixed body, so 16 more instances cost a thread each, not an exporter). Three
Prometheus servers with deploy/sharding/prometheus-shard-*.yml: shard 0 as an HA pair
(replicas a and b), shard 1 alone; all remote_write into one VictoriaMetrics started as
victoria-metrics.default says (replica label dropped, one sample per scrape interval kept). A
reference Prometheus scrapes all 20 with the same recording rules, to compare the dashboards.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fleetstack import (
    ReplicaPrometheus,
    VictoriaMetrics,
    exporters,
    fleet_prometheus_config,
    started,
)
from tests.grafana_queries import expand, iter_queries, load_dashboards
from tests.harness import ROOT, PostgresServer, RedisServer, free_port, tempdir, wait_for
from tests.promstack import PrometheusServer, record_app_traffic

pytestmark = [pytest.mark.integration, pytest.mark.topology]

SHARDING = ROOT / "deploy" / "sharding"
TARGETS = 20
STATIC_TARGETS = 16
SCRAPE = "2s"
RATE_WINDOW = "20s"


class StaticTargets:
    """HTTP servers on free loopback ports, each answering /metrics with one fixed body."""

    def __init__(self, body: bytes, count: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(count)]
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True)
                        for s in self.servers]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.server_address[1]}" for s in self.servers]

    def __enter__(self) -> StaticTargets:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def vm_query(vm: VictoriaMetrics, expr: str) -> list[dict[str, Any]]:
    """An instant query through VictoriaMetrics' Prometheus-compatible API."""
    url = f"{vm.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr}: {exc.code} {exc.read()[:300]!r}") from None
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def shard_config(base: Path, shard: int, replica: str, addresses: list[str],
                 vm: VictoriaMetrics) -> Path:
    """deploy/sharding/prometheus-shard-<shard>.yml for this test: its relabelling, rules,
    external labels and remote_write as committed, with the test's targets, VictoriaMetrics
    address and intervals."""
    repo = yaml.safe_load((SHARDING / f"prometheus-shard-{shard}.yml").read_text())
    config_file = fleet_prometheus_config(base, [(addresses, {"env": "test", "cluster": "shop"})],
                                          name=f"shard-{shard}{replica}", scrape_interval=SCRAPE)
    config = yaml.safe_load(config_file.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "qatoolbox"]
    (repo_job,) = repo["scrape_configs"]
    job["relabel_configs"] = repo_job["relabel_configs"]
    config["scrape_configs"] = [job]
    config["global"]["external_labels"] = repo["global"]["external_labels"]
    config["rule_files"] = [f"rules/{Path(r).name}" for r in repo["rule_files"]]
    config["remote_write"] = [{**repo["remote_write"][0],
                               "url": f"{vm.url}/api/v1/write"}]
    config["remote_write"][0]["queue_config"] = {**repo["remote_write"][0]["queue_config"],
                                                 "batch_send_deadline": "1s"}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_file


@dataclass
class Sharded:
    addresses: list[str]
    shards: dict[str, ReplicaPrometheus]
    vm: VictoriaMetrics
    reference: PrometheusServer


@pytest.fixture(scope="module")
def sharded() -> Iterator[Sharded]:
    with tempdir() as base, contextlib.ExitStack() as stack:
        pg = started(stack, PostgresServer(base))
        redis = started(stack, RedisServer(base))
        env = {**pg.env(), "REDIS_URL": redis.url}
        specs: list[dict[str, Any]] = []
        for index in range(3):
            folder = base / f"app-{index}"
            folder.mkdir()
            record_app_traffic(folder)
            specs.append({"args": ["--collectors.scope", "host"],
                          "config": {"app": {"multiprocess_dirs": [str(folder)]}}})
        specs.append({"args": ["--collectors.scope", "service", "--no-collector.business"],
                      "env": env, "config": {"postgres": {"cache_interval": "2s"}}})
        procs = stack.enter_context(exporters(base, specs))
        static = stack.enter_context(StaticTargets(procs[0].scrape().text.encode(),
                                                   STATIC_TARGETS))
        addresses = [f"127.0.0.1:{p.port}" for p in procs] + static.addresses
        assert len(addresses) == TARGETS
        vm = VictoriaMetrics(base, dedup_interval=SCRAPE,
                             relabel_config=SHARDING / "victoria-metrics-relabel.yml")
        started(stack, vm)
        shards = {}
        for shard, replica in ((0, "a"), (0, "b"), (1, "a")):
            config = shard_config(base, shard, replica, addresses, vm)
            shards[f"{shard}{replica}"] = started(stack, ReplicaPrometheus(
                base / f"shard-{shard}{replica}", config, replica=replica))
        reference_config = fleet_prometheus_config(
            base, [(addresses, {"env": "test", "cluster": "shop"})], name="reference",
            scrape_interval=SCRAPE)
        reference_doc = yaml.safe_load(reference_config.read_text())
        reference_doc["rule_files"] = ["rules/recording.yml"]  # what the shards evaluate
        reference_config.write_text(yaml.safe_dump(reference_doc, sort_keys=False))
        reference = started(stack, PrometheusServer(base / "reference", reference_config,
                                                    port=free_port()))
        result = Sharded(addresses, shards, vm, reference)

        def everything_arrived() -> bool:
            # Rates need a few scrapes on both sides; the shards write every second.
            ready = reference.query("count(instance:qatoolbox_host_cpu_utilisation:ratio)")
            stored = vm_query(vm, "count(instance:qatoolbox_host_cpu_utilisation:ratio)")
            return bool(ready and stored and float(stored[0]["value"][1]) == TARGETS - 1)
        wait_for(everything_arrived, 90, "recording rules on every host in both views",
                 interval=1)
        time.sleep(6)  # more samples inside the rate window
        yield result


def _active(prometheus: PrometheusServer) -> set[str]:
    return {t["labels"]["instance"] for t in prometheus.targets()
            if t["labels"].get("job") == "qatoolbox"}


def test_each_target_is_scraped_by_exactly_one_shard(sharded: Sharded) -> None:
    s0a, s0b, s1 = (_active(sharded.shards[k]) for k in ("0a", "0b", "1a"))
    assert s0a == s0b, "the two replicas of a shard scrape the same targets"
    assert not s0a & s1
    assert s0a | s1 == set(sharded.addresses)
    assert s0a and s1, (len(s0a), len(s1))


def test_victoria_metrics_sees_all_targets_once(sharded: Sharded) -> None:
    vm = sharded.vm
    wait_for(lambda: float(vm_query(vm, 'count(up{job="qatoolbox"})')[0]["value"][1])
             == TARGETS, 30, "all targets' up in VictoriaMetrics")
    per_instance = vm_query(vm, 'count by (instance) (up{job="qatoolbox"})')
    assert {s["metric"]["instance"] for s in per_instance} == set(sharded.addresses)
    assert {s["value"][1] for s in per_instance} == {"1"}, "HA duplicates must be gone"
    assert not vm_query(vm, 'up{replica=~".+"}'), "the replica label is dropped"
    shards = {s["metric"]["shard"]: int(s["value"][1])
              for s in vm_query(vm, 'count by (shard) (up{job="qatoolbox"})')}
    assert shards == {"0": len(_active(sharded.shards["0a"])),
                      "1": len(_active(sharded.shards["1a"]))}
    # Samples, not only series, are deduplicated: shard 0's pair scrapes each target twice
    # per interval, VictoriaMetrics keeps one sample per interval.
    target = sorted(_active(sharded.shards["0a"]))[0]
    samples = vm_query(vm, f'count_over_time(up{{instance="{target}"}}[20s])')
    assert float(samples[0]["value"][1]) <= 12, samples


def _has_data(result: list[Any]) -> bool:
    if result and not isinstance(result[0], dict):
        return not math.isnan(float(result[1]))
    return any(not math.isnan(float(s["value"][1])) for s in result)


def test_dashboards_work_unchanged_against_victoria_metrics(sharded: Sharded) -> None:
    queries = list(iter_queries(load_dashboards(), with_annotations=True))
    on_prometheus, on_vm, failed = set(), set(), []
    for query in queries:
        expr = expand(query.expr, RATE_WINDOW)
        if _has_data(sharded.reference.query(expr)):
            on_prometheus.add(query.where)
        try:
            if _has_data(vm_query(sharded.vm, expr)):
                on_vm.add(query.where)
        except AssertionError as exc:
            failed.append(f"{query.where}: {exc}")
    assert not failed, "\n".join(failed)
    assert on_prometheus, "the reference Prometheus answered nothing"
    assert on_vm == on_prometheus, (sorted(on_prometheus - on_vm), sorted(on_vm - on_prometheus))
