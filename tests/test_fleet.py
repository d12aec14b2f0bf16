"""A fleet against one PostgreSQL and one Redis, with the repository's rules and dashboards.

Two clusters share the database and cache, each scraped by one real Prometheus:
- `split`, the documented layout: three exporters with `--collectors.scope host` and one with
  `--collectors.scope service`;
- `default`, the operator who copies one config everywhere: three exporters with every
  collector, each reading the same database and cache.
Every host exporter serves application traffic from its own multiprocess folder. The tests
query Prometheus as the dashboards do, then stop PostgreSQL and count the PostgresDown alerts.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fleetstack import exporters, fleet_prometheus_config, started
from tests.grafana_queries import expand, iter_queries, load_dashboards
from tests.harness import ExporterProcess, PostgresServer, RedisServer, tempdir, wait_for
from tests.promstack import PrometheusServer, record_app_traffic
from tests.stack import prepare_demo_database

pytestmark = [pytest.mark.integration, pytest.mark.topology]

RATE_WINDOW = "15s"
HOSTS_PER_CLUSTER = 3
# Host-dashboard queries that may return nothing on this machine, with the reason.
# Queries that read the exporter itself: every exporter has them, the service one too.
EXPORTER_QUERIES = {"host.json / Collector duration / A", "host.json / Collector success / A"}
# Service-dashboard queries that differ by the exporter reading the server, with the reason.
READER_DEPENDENT = {
    "redis.json / Memory of limit / A": "without maxmemory it falls back to the memory of the "
                                        "exporter's host, which a service-scope exporter lacks",
}
HOST_NO_DATA = {
    "host.json / Pressure / A": "PSI needs a kernel with CONFIG_PSI",
    "host.json / Pressure / B": "PSI needs a kernel with CONFIG_PSI",
    "host.json / Pressure / C": "PSI needs a kernel with CONFIG_PSI",
}


@dataclass
class Fleet:
    pg: PostgresServer
    redis: RedisServer
    prometheus: PrometheusServer
    split_hosts: list[ExporterProcess]
    service: ExporterProcess
    default_hosts: list[ExporterProcess]

    def hosts(self) -> set[str]:
        return {f"127.0.0.1:{e.port}" for e in self.split_hosts + self.default_hosts}

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.prometheus.query(expr)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with tempdir() as base, contextlib.ExitStack() as stack:
        pg = started(stack, PostgresServer(base, settings={
            "shared_preload_libraries": "pg_stat_statements"}))
        redis = started(stack, RedisServer(base))
        prepare_demo_database(pg, redis, base, seed_args=("--users", "60", "--rooms", "10",
                                                          "--messages", "100",
                                                          "--capsules", "20"))
        pg.create_exporter_role("qatoolbox")
        # docs/reliability.md's role allows 10 sessions: one exporter's worth with room to
        # spare. Every exporter that reads the database needs up to 4 (docs/scaling.md), and
        # the default layout has four of them here.
        pg.execute(f"ALTER ROLE qatoolbox_exporter CONNECTION LIMIT {4 * (1 + HOSTS_PER_CLUSTER)}")
        env = {**pg.exporter_env("qatoolbox"), "REDIS_URL": redis.create_exporter_user()}
        service_config = {"postgres": {"cache_interval": "2s"},
                          "redis": {"key_scan_interval": "2s"}}

        def host_spec(index: int, scope: list[str]) -> dict[str, Any]:
            folder = base / f"app-{index}"
            folder.mkdir()
            record_app_traffic(folder)
            config = {**service_config, "app": {"multiprocess_dirs": [str(folder)]}}
            return {"config": config, "env": env, "args": scope}

        host_scope = ["--collectors.scope", "host"]
        split_hosts = stack.enter_context(exporters(base, [
            host_spec(i, host_scope) for i in range(HOSTS_PER_CLUSTER)]))
        (service,) = stack.enter_context(exporters(base, [
            {"config": service_config, "env": env, "args": ["--collectors.scope", "service"]}]))
        default_hosts = stack.enter_context(exporters(base, [
            host_spec(HOSTS_PER_CLUSTER + i, []) for i in range(HOSTS_PER_CLUSTER)]))
        address = [f"127.0.0.1:{e.port}" for e in (*split_hosts, service, *default_hosts)]
        config = fleet_prometheus_config(base, [
            (address[:HOSTS_PER_CLUSTER + 1], {"env": "test", "cluster": "split"}),
            (address[HOSTS_PER_CLUSTER + 1:], {"env": "test", "cluster": "default"})])
        prometheus = started(stack, PrometheusServer(base, config))
        prometheus.wait_targets_up("qatoolbox", timeout=60)
        result = Fleet(pg, redis, prometheus, split_hosts, service, default_hosts)

        def ready() -> bool:
            # Rates need two scrapes; the business queries a first run on each exporter.
            cpu = result.query("instance:qatoolbox_host_cpu_utilisation:ratio")
            users = result.query("qatoolbox_users")
            return len(cpu) == 2 * HOSTS_PER_CLUSTER and len(users) == 2 * (1 + 3)
        wait_for(ready, 60, "rates and business figures from every exporter", interval=0.5)
        time.sleep(4)  # a few more scrapes inside the rate window
        yield result


def _value(series: dict[str, Any]) -> float:
    return float(series["value"][1])


def _has_data(result: list[Any]) -> bool:
    return any(isinstance(s, dict) and not math.isnan(_value(s)) for s in result)


def _queries(dashboard: str) -> list[Any]:
    return list(iter_queries({dashboard: load_dashboards()[dashboard]}, with_annotations=False))


def _overview(title: str, ref: str = "A") -> str:
    (query,) = [q for q in _queries("overview.json") if (q.panel, q.ref) == (title, ref)]
    return expand(query.expr, RATE_WINDOW)


def test_business_totals_count_the_database_once(fleet: Fleet) -> None:
    registered = int(fleet.pg.execute("SELECT count(*) FROM auth_user", "qatoolbox")[0][0])
    active = int(fleet.pg.execute("SELECT count(*) FROM auth_user WHERE last_login >= "
                                  "now() - interval '24 hours'", "qatoolbox")[0][0])
    assert registered > 0 and active > 0
    for title, expected in (("Registered users", registered), ("Active users (24 h)", active)):
        got = {s["metric"]["cluster"]: _value(s) for s in fleet.query(_overview(title))}
        assert got == {"split": expected, "default": expected}, title
    # What the Overview summed before: the database once per exporter reading it.
    naive = {s["metric"]["cluster"]: _value(s)
             for s in fleet.query("sum by (cluster) (qatoolbox_users)")}
    assert naive == {"split": registered, "default": HOSTS_PER_CLUSTER * registered}


def test_overview_shows_each_server_once_and_every_host(fleet: Fleet) -> None:
    here = {s["metric"]["server"] for s in fleet.query("qatoolbox_postgres_up")}
    assert len(here) == 1  # every exporter names the one server alike
    for title in ("PostgreSQL", "Redis", "PostgreSQL connections", "Redis memory"):
        result = fleet.query(_overview(title))
        keys = sorted((s["metric"]["cluster"], s["metric"]["server"]) for s in result)
        assert len({c for c, _ in keys}) == 2 and len(keys) == 2, (title, keys)
    connections = {s["metric"]["cluster"]: _value(s)
                   for s in fleet.query(_overview("PostgreSQL connections"))}
    # One reading of the server in both layouts (the exporters' own sessions may differ by a
    # connection or two between scrapes), not three times it.
    assert abs(connections["default"] - connections["split"]) <= 3, connections
    hosts_table = [q for q in _queries("overview.json") if q.panel == "Hosts"]
    for query in hosts_table:
        rows = fleet.query(expand(query.expr, RATE_WINDOW))
        assert {s["metric"]["instance"] for s in rows} == fleet.hosts(), query.where
    (up,) = [q for q in hosts_table if q.ref == "A"]
    assert {_value(s) for s in fleet.query(expand(up.expr, RATE_WINDOW))} == {1.0}


def test_host_dashboard_has_a_series_per_host(fleet: Fleet) -> None:
    hosts = fleet.hosts()
    everyone = {*hosts, f"127.0.0.1:{fleet.service.port}"}
    problems = []
    for query in _queries("host.json"):
        result = fleet.query(expand(query.expr, RATE_WINDOW))
        if not _has_data(result):
            if query.where not in HOST_NO_DATA:
                problems.append(f"{query.where}: no data")
            continue
        seen = {s["metric"].get("instance") for s in result}
        if seen != (everyone if query.where in EXPORTER_QUERIES else hosts):
            problems.append(f"{query.where}: instances {sorted(map(str, seen))}")
    assert not problems, "\n".join(problems)
    # The service exporter has no host collector: it is not a host.
    assert f"127.0.0.1:{fleet.service.port}" not in hosts


def test_http_dashboard_reads_every_host(fleet: Fleet) -> None:
    # Fleet totals sum the hosts: 3 requests recorded on each of the six hosts.
    total = fleet.query("sum(qatoolbox_http_requests_total)")
    assert _value(total[0]) == 3 * 2 * HOSTS_PER_CLUSTER
    with_data = [q for q in _queries("http.json")
                 if _has_data(fleet.query(expand(q.expr, RATE_WINDOW)))]
    assert with_data, "no HTTP panel has data"


def _service_expr(expr: str, server: str, instance: str) -> str:
    # Grafana writes a single value as it is; its dots match themselves as a regex too.
    expr = expr.replace("$server", server).replace("$instance", instance)
    return expand(expr, RATE_WINDOW)


@pytest.mark.parametrize("dashboard", ["postgres.json", "redis.json", "business.json"])
def test_service_dashboards_look_the_same_through_any_exporter(fleet: Fleet,
                                                               dashboard: str) -> None:
    family = {"postgres.json": "qatoolbox_postgres_up", "redis.json": "qatoolbox_redis_up",
              "business.json": "qatoolbox_business_up"}[dashboard]
    (server,) = {s["metric"]["server"] for s in fleet.query(family)}
    readers = [fleet.service, *fleet.default_hosts]
    answered: dict[int, set[str]] = {}
    for exporter in readers:
        instance = f"127.0.0.1:{exporter.port}"
        answered[exporter.port] = set()
        for query in _queries(dashboard):
            result = fleet.query(_service_expr(query.expr, server, instance))
            instances = {s["metric"].get("instance") for s in result if isinstance(s, dict)}
            assert instances <= {instance, None}, (query.where, instances)
            if _has_data(result) and query.where not in READER_DEPENDENT:
                answered[exporter.port].add(query.where)
    first, *others = answered.values()
    assert len(first) >= 0.8 * len(_queries(dashboard)), sorted(first)
    for other in others:
        assert other == first, first ^ other


def test_stopping_postgres_fires_one_postgres_down_per_cluster(fleet: Fleet) -> None:
    fleet.pg.stop()
    firing = 'ALERTS{alertname="PostgresDown",alertstate="firing"}'
    wait_for(lambda: len(fleet.query(firing)) == 2, 60, "PostgresDown in both clusters",
             interval=0.5)
    # Four exporters read PostgreSQL and all four see it down: one alert per cluster, with
    # the server it is about and no exporter's instance.
    assert len(fleet.query("qatoolbox_postgres_up == 0")) == 1 + HOSTS_PER_CLUSTER
    deadline = time.monotonic() + 5  # several more evaluations: still one per cluster
    while time.monotonic() < deadline:
        alerts = fleet.query('ALERTS{alertname="PostgresDown"}')
        assert len(alerts) == 2, alerts
        time.sleep(0.5)
    labels = sorted((a["metric"]["cluster"], a["metric"].get("instance"), a["metric"]["server"])
                    for a in alerts)
    server = labels[0][2]
    assert labels == [("default", None, server), ("split", None, server)]
    assert all(a["metric"]["alertstate"] == "firing" for a in alerts)
