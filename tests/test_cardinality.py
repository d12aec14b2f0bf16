"""The series budget: one exporter with every collector on the demo stack stays within it, and
stays flat when the database and the cache grow (docs/bench-compare.md)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.instrument import Recorder
from tests.harness import ExporterProcess, PostgresServer, RedisServer, Scrape, wait_for
from tests.stack import prepare_demo_database

pytestmark = pytest.mark.integration

# Series of one exporter on the demo stack: the budget docs/bench-compare.md proposes.
SERIES_BUDGET = 5000
# Growth allowed between two sizes past the top-N limits (statements and plans come and go).
FLAT_SLACK = 60

# The demo app's routes (tools/urls.py) as the Django middleware names them.
ROUTES = ("healthz", "login/", "rooms/", "rooms/<str:room_id>/messages/", "capsules/",
          "capsules/<int:capsule_id>/unlock/", "slow/", "fail/")
TASKS = ("tools.tasks.cleanup_expired_chat_rooms", "tools.tasks.unlock_due_capsules")


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for rec in made:
        rec.close()


def app_traffic(directory: Path, recorders: list[Recorder]) -> None:
    """Four live workers and twenty that exited, each having served every route: the files
    gunicorn workers recording through exporter.instrument leave."""
    directory.mkdir()
    rng = random.Random(7)
    for index in range(24):
        rec = Recorder(str(directory))
        for _ in range(60):
            route = rng.choice(ROUTES)
            method = "POST" if route in ("login/", "capsules/") else rng.choice(("GET", "POST"))
            status = rng.choice((200, 200, 200, 201, 302, 400, 404, 500))
            rec.request_started()
            rec.request_finished(route, method, status, rng.expovariate(20),
                                 db_queries=rng.randrange(12), db_seconds=rng.random() / 50)
        for task in TASKS:
            rec.task_finished(task, rng.choice(("succeeded", "failed", "retried")), 0.5)
        if index < 4:
            recorders.append(rec)
        else:
            rec.close()


def add_tables(pg: PostgresServer, first: int, count: int) -> None:
    pg.execute(f"""
        DO $$ BEGIN
          FOR i IN {first}..{first + count - 1} LOOP
            EXECUTE format('CREATE TABLE grow_t%s (id int PRIMARY KEY, v text)', i);
            IF i % 500 = 0 THEN COMMIT; END IF;
          END LOOP;
        END $$""", dbname="qatoolbox")
    pg.execute("ANALYZE", dbname="qatoolbox")


FILL = """
local groups = {'user', 'chat_room', 'chat_message', 'time_capsule', 'stats', 'session', 'x'}
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  local g = groups[(i % #groups) + 1]
  local key = (g == 'session' and 'session:' or ('qatoolbox:1:' .. g .. ':')) .. i
  redis.call('SET', key, 'v')
end
return 0
"""


def settled(exporter: ExporterProcess) -> Scrape:
    """A scrape once PostgreSQL and Redis are up, every business query has run and a key-group
    count has completed (the background parts have filled in)."""

    def ready() -> bool:
        scrape = exporter.scrape()
        business = [v for (name, _), v in scrape.samples.items()
                    if name == "qatoolbox_business_query_success"]
        return (scrape.value("qatoolbox_postgres_up") == 1
                and scrape.value("qatoolbox_redis_up") == 1
                and scrape.value("qatoolbox_redis_key_group_scan_complete") == 1
                and bool(business) and all(v == 1 for v in business))

    # Generous: with 3,000 tables and 100,000 keys, the first catalog reads, business queries
    # and key count take a few seconds alone, and several times that on a loaded machine (the
    # whole suite, other jobs); 60 s was seen to run out there. Returns as soon as settled.
    wait_for(ready, 300, "the exporter to settle", interval=0.5)
    scrape = exporter.scrape()
    # Nothing was refused to the least-privilege role and ACL user (a refused PostgreSQL
    # family or optional Redis command is only left out, with a warning).
    assert "permission denied" not in exporter.logs()
    assert "command refused" not in exporter.logs()
    # One exporter at a time: the documented role's CONNECTION LIMIT 8 does not fit three
    # (one session for the postgres collector and two for the business queries each).
    exporter.stop()
    return scrape


def start_exporter(factory: Callable[..., ExporterProcess], pg: PostgresServer,
                   redis: RedisServer, app_dir: Path) -> ExporterProcess:
    # Default configuration: only where things are, as the least-privilege PostgreSQL role
    # and Redis ACL user of docs/reliability.md (what an operator runs, series included).
    return factory(config={"app": {"multiprocess_dirs": [str(app_dir)]}},
                   env={**pg.exporter_env("qatoolbox"), "REDIS_URL": redis.exporter_url()})


def by_collector(scrape: Scrape) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _ in scrape.samples:
        area = name.split("_")[1]
        counts[area] = counts.get(area, 0) + 1
    return counts


def test_series_within_budget_and_flat_as_database_and_cache_grow(
    pg_factory: Callable[..., PostgresServer], redis_server: RedisServer,
    exporter_factory: Callable[..., ExporterProcess], workdir: Path,
    recorders: list[Recorder],
) -> None:
    pg = pg_factory(settings={"shared_preload_libraries": "pg_stat_statements",
                              "max_locks_per_transaction": "256"})
    prepare_demo_database(pg, redis_server, workdir)
    pg.create_exporter_role("qatoolbox")
    redis_server.create_exporter_user()
    app_dir = workdir / "app-metrics"
    app_traffic(app_dir, recorders)
    client: Any = redis_server.client(socket_timeout=60)
    client.eval(FILL, 0, 0, 999)
    client.lpush("celery", *range(10))

    base = settled(start_exporter(exporter_factory, pg, redis_server, app_dir))
    counts = by_collector(base)
    # Every collector contributes (a budget met by a collector that silently served nothing
    # would prove nothing).
    for area in ("host", "process", "postgres", "redis", "http", "celery", "business",
                 "exporter"):
        assert counts.get(area, 0) > 0, (area, counts)
    assert len(base.samples) <= SERIES_BUDGET, counts

    # Grow: 2,000 tables and 50,000 keys; then as much again. Past the top-N limits (tables,
    # statements) and with fixed key groups, the second step must add next to nothing.
    add_tables(pg, 1, 2000)
    client.eval(FILL, 0, 1000, 50_999)
    grown = settled(start_exporter(exporter_factory, pg, redis_server, app_dir))
    assert len(grown.samples) <= SERIES_BUDGET, by_collector(grown)
    assert grown.value("qatoolbox_redis_key_group_keys", group="user:{id}") is not None

    add_tables(pg, 2001, 1000)
    client.eval(FILL, 0, 51_000, 100_999)
    again = settled(start_exporter(exporter_factory, pg, redis_server, app_dir))
    assert len(again.samples) <= SERIES_BUDGET
    assert abs(len(again.samples) - len(grown.samples)) <= FLAT_SLACK, (
        by_collector(grown), by_collector(again))
    assert "errorstat_NOPERM" not in client.info("errorstats")  # the server counts refusals


def requests_by_route(families: list[Any]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "qatoolbox_http_requests_total":
                route = sample.labels["route"]
                totals[route] = totals.get(route, 0.0) + sample.value
    return totals


def test_routes_past_the_cap_are_summed_under_other(tmp_path: Path,
                                                    recorders: list[Recorder]) -> None:
    from exporter.collectors.app import AppCollector
    from exporter.collectors.app_config import AppConfig
    from exporter.collectors.app_folder import MAX_ROUTES

    rec = Recorder(str(tmp_path))
    recorders.append(rec)
    # Route i gets i+1 requests: the busiest are the last ones.
    for i in range(MAX_ROUTES + 150):
        for _ in range(i + 1):
            rec.request_started()
            rec.request_finished(f"r{i}/", "GET", 200, 0.01, db_queries=2, db_seconds=0.001)
    collector = AppCollector(AppConfig(multiprocess_dirs=(str(tmp_path),)))
    first = list(collector.collect())
    totals = requests_by_route(first)
    kept = set(totals) - {"<other>"}
    assert len(kept) == MAX_ROUTES
    assert kept == {f"r{i}/" for i in range(150, MAX_ROUTES + 150)}  # the busiest
    n = MAX_ROUTES + 150
    assert sum(totals.values()) == n * (n + 1) / 2  # nothing lost
    assert totals["<other>"] == 150 * 151 / 2
    durations = {s.labels["route"] for f in first for s in f.samples
                 if s.name == "qatoolbox_http_request_duration_seconds_count"}
    assert durations == kept | {"<other>"}

    # A new, very busy route arrives: the kept routes stay kept (no series moves into
    # "<other>", whose counters only grow), the newcomer goes to "<other>".
    for _ in range(10_000):
        rec.request_started()
        rec.request_finished("new/", "GET", 200, 0.01)
    second = requests_by_route(list(collector.collect()))
    assert set(second) - {"<other>"} == kept
    assert second["<other>"] == totals["<other>"] + 10_000
