"""Redis collector against real Redis servers: values, key groups, Celery, failures, auth."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import DEFAULTS
from exporter.collectors.redis import RedisCollector
from exporter.collectors.redis_config import KeyGroup, RedisConfig
from exporter.collectors.redis_keys import KeyClassifier
from exporter.config import Secret
from tests.harness import (
    EXPORTER_ROLE,
    ExporterProcess,
    RedisServer,
    Scrape,
    documented_acl_rules,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUPS = ("user", "chat_room", "chat_message", "time_capsule", "heart_link", "stats", "api")

# Fills QAToolBox-style keys server-side: i % 9 picks one of the 7 cache families, a session or
# a Celery result; every third cache key has a ":suffix" as callers add.
FILL_SCRIPT = """
local groups = {'user','chat_room','chat_message','time_capsule','heart_link','stats','api'}
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local slot = i % 9
  local key
  if slot < 7 then
    key = 'qatoolbox:1:' .. groups[slot + 1] .. ':' .. i
    if i % 3 == 0 then key = key .. ':detail' end
  elseif slot == 7 then
    key = 'session:1:django.contrib.sessions.cache' .. i
  else
    key = 'celery-task-meta-' .. i
  end
  redis.call('SET', key, 'x')
end
return n
"""


@pytest.fixture
def connect() -> Iterator[Callable[..., Any]]:
    """connect(server, **kwargs): a redis-py client closed at the end of the test (one left to
    the garbage collector can surface later, in another test, as a ResourceWarning)."""
    made: list[Any] = []

    def make(server: RedisServer, **kwargs: Any) -> Any:
        client = server.client(**kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            client.close()


def expected_groups(n: int) -> dict[str, int]:
    """The groups FILL_SCRIPT's keys fall in by structure: 16, all named (the bound is 20)."""
    counts: dict[str, int] = {"other": 0}
    for i in range(n):
        slot = i % 9
        if slot < 7:
            group = f"{GROUPS[slot]}:{{id}}" + (":detail" if i % 3 == 0 else "")
        else:
            group = "session" if slot == 7 else "celery-task-meta-{id}"
        counts[group] = counts.get(group, 0) + 1
    return counts


def only_redis() -> dict[str, bool]:
    return {name: name == "redis" for name in DEFAULTS}


def collect(collector: RedisCollector) -> Scrape:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return Scrape(generate_latest(registry).decode())


def info(client: Any, section: str = "everything") -> dict[str, Any]:
    result: dict[str, Any] = client.info(section)
    return result


def start_exporter(factory: Callable[..., ExporterProcess], server: RedisServer | None,
                   redis_cfg: dict[str, Any] | None = None, timeout: str = "2s",
                   env: dict[str, str] | None = None) -> ExporterProcess:
    """The exporter with only the redis collector; on server, as the ACL user of
    docs/reliability.md (created from the doc)."""
    config = {"collectors": only_redis(), "scrape": {"timeout": timeout},
              "redis": redis_cfg or {}}
    full_env = {"REDIS_URL": server.create_exporter_user()} if server else {}
    full_env.update(env or {})
    return factory(config=config, env=full_env)


def as_exporter_user(server: RedisServer, **kwargs: Any) -> RedisConfig:
    """A RedisConfig for the ACL user of docs/reliability.md, created on server from the doc."""
    return RedisConfig(url=Secret(server.create_exporter_user()), **kwargs)


def assert_nothing_refused(server: RedisServer) -> None:
    """The server refused the ACL user no command (Redis counts every NOPERM it answers, the
    exporter's optional probes and the key group SCAN included)."""
    with contextlib.closing(server.client()) as admin:
        assert "errorstat_NOPERM" not in admin.info("errorstats")


def redis_series(scrape: Scrape) -> list[str]:
    return sorted({name for name, _ in scrape.series("qatoolbox_redis_")}
                  | {name for name, _ in scrape.series("qatoolbox_celery_")})


# --- values ------------------------------------------------------------------------------------


def test_values_match_info_for_a_workload(redis_server: RedisServer,
                                          connect: Callable[..., Any]) -> None:
    client = connect(redis_server)
    for i in range(10):
        client.set(f"k{i}", "v", ex=600 if i < 3 else None)
    for _ in range(25):
        client.get("k1")
    for i in range(7):
        client.get(f"missing{i}")
    extra = [connect(redis_server) for _ in range(3)]
    for c in extra:
        c.ping()
    blocker = connect(redis_server)
    thread = threading.Thread(target=blocker.blpop, args=(["wake"],), kwargs={"timeout": 20})
    thread.start()
    collector = RedisCollector(as_exporter_user(redis_server, celery_queues=()), 4.0)
    try:
        wait_for(lambda: client.info("clients")["blocked_clients"] == 1, 10, "BLPOP")
        clients_before = client.info("clients")["connected_clients"]
        scrape = collect(collector)
        server = client.info("everything")
        assert scrape.value("qatoolbox_redis_up") == 1
        assert scrape.value("qatoolbox_redis_keyspace_hits_total") == server["keyspace_hits"] == 25
        assert scrape.value("qatoolbox_redis_keyspace_misses_total") == server[
            "keyspace_misses"] == 7
        assert scrape.value("qatoolbox_redis_db_keys", db="db0") == 10
        assert scrape.value("qatoolbox_redis_db_keys_expiring", db="db0") == 3
        # test client, 3 extra, the blocked one, then the exporter's own connection
        assert clients_before == 5
        assert scrape.value("qatoolbox_redis_connected_clients") == 6
        assert scrape.value("qatoolbox_redis_blocked_clients") == 1
        assert scrape.value("qatoolbox_redis_max_clients") == server["maxclients"]
        assert scrape.value("qatoolbox_redis_commands_total", cmd="get") == 32
        assert scrape.value("qatoolbox_redis_command_duration_seconds_count", cmd="get") == 32
        assert scrape.value("qatoolbox_redis_command_duration_seconds_bucket", cmd="get",
                            le="+Inf") == 32
        # Introspection commands such as the exporter's INFO are counted, without a histogram.
        assert scrape.value("qatoolbox_redis_commands_total", cmd="info")
        assert scrape.value("qatoolbox_redis_command_duration_seconds_count", cmd="info") is None
        assert scrape.value("qatoolbox_redis_commands_duration_seconds_total", cmd="get") == (
            pytest.approx(server["cmdstat_get"]["usec"] / 1e6))
        assert scrape.value("qatoolbox_redis_memory_max_bytes") == 0
        used = scrape.value("qatoolbox_redis_memory_used_bytes")
        assert used is not None and 0.5 < used / server["used_memory"] < 2
        assert scrape.value("qatoolbox_redis_version_info", version=server["redis_version"],
                            mode="standalone", role="master") == 1
        assert scrape.value("qatoolbox_redis_slowlog_length") == 0
        # CONFIG GET is off by default (redis.config_get): no threshold, and nothing refused.
        assert scrape.value("qatoolbox_redis_slowlog_threshold_seconds") is None
        assert scrape.value("qatoolbox_redis_rdb_changes_since_last_save") == server[
            "rdb_changes_since_last_save"]
        assert scrape.value("qatoolbox_redis_master_link_up") is None
        # No celery queues configured: no lookups, no families.
        assert scrape.value("qatoolbox_celery_unacked_messages") is None
        assert_nothing_refused(redis_server)
    finally:
        client.lpush("wake", "x")
        thread.join(10)
        collector.close()


def test_counters_follow_resetstat_and_restart(redis_server: RedisServer,
                                               connect: Callable[..., Any]) -> None:
    client = connect(redis_server)
    client.lpush("celery", "m")
    collector = RedisCollector(as_exporter_user(redis_server), 4.0)
    try:
        for _ in range(3):
            collect(collector)
        client.config_resetstat()
        for _ in range(5):
            client.get("nothing")
        scrape = collect(collector)
        assert scrape.value("qatoolbox_redis_keyspace_misses_total") == 5
        assert scrape.value("qatoolbox_redis_keyspace_hits_total") == 0
        redis_server.restart()
        redis_server.create_exporter_user()
        connect(redis_server).get("nothing")
        scrape = collect(collector)  # redis-py notices the closed socket and reconnects
        assert scrape.value("qatoolbox_redis_up") == 1
        assert scrape.value("qatoolbox_redis_keyspace_misses_total") == 1
        assert scrape.value("qatoolbox_redis_slowlog_length") == 0
        assert_nothing_refused(redis_server)
    finally:
        collector.close()


def test_replica_role_and_link(redis_factory: Callable[..., RedisServer],
                               connect: Callable[..., Any]) -> None:
    # No 5 s wait for more replicas before the first sync.
    master = redis_factory(extra_args=["--repl-diskless-sync-delay", "0"])
    replica = redis_factory()
    replica_client = connect(replica)
    replica_client.replicaof("127.0.0.1", master.port)
    wait_for(lambda: replica_client.info("replication")["master_link_status"] == "up", 15,
             "replication link")
    # ACL users are not replicated: one on each.
    collectors = [RedisCollector(as_exporter_user(s), 4.0) for s in (master, replica)]
    try:
        on_master, on_replica = (collect(c) for c in collectors)
        assert on_master.value("qatoolbox_redis_connected_replicas") == 1
        assert on_master.value("qatoolbox_redis_master_link_up") is None
        version = on_replica.series("qatoolbox_redis_version_info")[0][1]
        assert version["role"] == "replica"
        assert on_replica.value("qatoolbox_redis_master_link_up") == 1
        for server in (master, replica):
            assert_nothing_refused(server)
        master.kill()
        wait_for(lambda: collect(collectors[1]).value("qatoolbox_redis_master_link_up") == 0, 15,
                 "the replica to see its master gone")
    finally:
        for c in collectors:
            c.close()


def test_hit_ratio_not_distorted_by_scrapes(redis_server: RedisServer,
                                            exporter_factory: Callable[..., ExporterProcess],
                                            workdir: Path, connect: Callable[..., Any]) -> None:
    client = connect(redis_server)
    client.lpush("celery", "a", "b")
    client.lpush("celery\x06\x166", "c")
    client.hset("unacked", "tag", "m")
    client.set("qatoolbox:1:user:1", "x")
    client.get("qatoolbox:1:user:1")
    client.get("qatoolbox:1:user:2")
    exporter = start_exporter(exporter_factory, redis_server, {
        "celery_queues": ["celery", "mail"], "key_scan_interval": "1s"})
    before = info(client, "stats")
    values = set()
    for _ in range(50):
        scrape = exporter.scrape()
        assert scrape.value("qatoolbox_redis_up") == 1
        values.add((scrape.value("qatoolbox_redis_keyspace_hits_total"),
                    scrape.value("qatoolbox_redis_keyspace_misses_total")))
        time.sleep(0.2)
    after = info(client, "stats")
    assert values == {(1.0, 1.0)}
    # The exporter's 9 lookups a scrape did reach the server's counters: 3 hits, 6 misses.
    assert after["keyspace_hits"] - before["keyspace_hits"] >= 3 * 50
    assert after["keyspace_misses"] - before["keyspace_misses"] >= 6 * 50
    assert scrape.value("qatoolbox_celery_queue_length", queue="celery") == 3
    assert scrape.value("qatoolbox_celery_queue_length", queue="mail") == 0
    assert scrape.value("qatoolbox_celery_unacked_messages") == 1
    assert_nothing_refused(redis_server)
    metrics = workdir / "metrics.txt"
    metrics.write_text(scrape.text)
    lint = subprocess.run(["promtool", "check", "metrics"], input=scrape.text,
                          capture_output=True, text=True, check=False)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
        lint.stdout + lint.stderr)


# --- key groups -----------------------------------------------------------------------------


def test_key_groups_200k_keys(redis_server: RedisServer,
                              exporter_factory: Callable[..., ExporterProcess],
                              connect: Callable[..., Any]) -> None:
    n = 200_000
    client = connect(redis_server, socket_timeout=60)
    assert client.eval(FILL_SCRIPT, 0, n) == n
    expected = expected_groups(n)

    # The budget allows a full count: exact numbers.
    full = start_exporter(exporter_factory, redis_server, {
        "key_scan_time_budget": "60s", "key_scan_interval": "60s"})
    # One key at a time: a count takes many seconds, scrapes must not wait for it.
    slow = start_exporter(exporter_factory, redis_server, {
        "key_scan_batch": 10, "key_scan_time_budget": "60s", "key_scan_interval": "60s"})
    # Tiny budget: a partial count, flagged as such.
    tiny = start_exporter(exporter_factory, redis_server, {
        "key_scan_budget": 1000, "key_scan_batch": 100, "key_scan_interval": "60s"})

    for exporter in (slow, tiny, full):
        exporter.scrape()  # starts the counts
    scrape = slow.scrape()
    assert scrape.value("qatoolbox_exporter_collector_success", collector="redis") == 1
    assert scrape.value("qatoolbox_redis_key_group_scan_complete") == 0
    assert scrape.value("qatoolbox_redis_key_group_keys", group="other") is None

    def counted(exporter: ExporterProcess) -> Scrape | None:
        result = exporter.scrape()
        return result if result.value("qatoolbox_redis_key_group_keys", group="other") \
            is not None else None

    wait_for(lambda: full.scrape().value("qatoolbox_redis_key_group_scan_complete") == 1, 60,
             "the full key group count")
    scrape = full.scrape()
    assert scrape.value("qatoolbox_redis_key_group_scan_complete") == 1
    groups = {labels["group"]: scrape.value(name, **labels)
              for name, labels in scrape.series("qatoolbox_redis_key_group_keys")}
    assert groups == expected
    assert (scrape.value("qatoolbox_redis_key_group_scan_duration_seconds") or 0) > 0

    wait_for(lambda: counted(tiny), 30, "the partial key group count")
    scrape = tiny.scrape()
    assert scrape.value("qatoolbox_exporter_collector_success", collector="redis") == 1
    assert scrape.value("qatoolbox_redis_key_group_scan_complete") == 0
    partial = sum(scrape.value(name, **labels) or 0
                  for name, labels in scrape.series("qatoolbox_redis_key_group_keys"))
    assert 1000 <= partial <= 1100 + 100  # stops at the first batch past the budget
    duration = scrape.value("qatoolbox_exporter_collector_duration_seconds", collector="redis")
    assert duration is not None and duration < 2
    assert_nothing_refused(redis_server)


def test_3000_databases_add_one_series(redis_factory: Callable[..., RedisServer],
                                       connect: Callable[..., Any]) -> None:
    """Issue 14: a Redis with 3,000 non-empty databases added 6,000 series. db0 to db15 keep
    their own series; the others are summed under db="other"."""
    server = redis_factory(extra_args=["--databases", "3001"])
    client = connect(server, socket_timeout=60)
    pipe = client.pipeline(transaction=False)
    for n in range(1, 3001):
        pipe.execute_command("SELECT", n)
        pipe.execute_command("SET", "k", "v", *(("EX", 600) if n % 3 == 0 else ()))
    pipe.execute()
    client.close()  # its connection is left on db 3000
    keyspace = info(connect(server), "keyspace")
    assert len(keyspace) == 3000
    collector = RedisCollector(as_exporter_user(server, celery_queues=()), 4.0)
    try:
        scrape = collect(collector)
    finally:
        collector.close()
    keys = {labels["db"]: scrape.value(name, **labels)
            for name, labels in scrape.series("qatoolbox_redis_db_keys")
            if name == "qatoolbox_redis_db_keys"}
    assert set(keys) == {f"db{n}" for n in range(1, 16)} | {"other"}  # db0 is empty
    assert keys["other"] == sum(v["keys"] for db, v in keyspace.items() if int(db[2:]) >= 16)
    assert keys["other"] == 2985 and sum(keys.values()) == 3000  # type: ignore[arg-type]
    assert scrape.value("qatoolbox_redis_db_keys_expiring", db="other") == sum(
        1 for n in range(16, 3001) if n % 3 == 0)
    assert scrape.value("qatoolbox_redis_db_keys_expiring", db="db3") == 1
    assert len(scrape.series("qatoolbox_redis_db_keys")) == 2 * 16


def test_key_group_globs_agree_with_redis_match(redis_server: RedisServer,
                                                connect: Callable[..., Any]) -> None:
    keys = ["user:1", "user:22", "user:", "users:1", "h?llo", "hello", "hallo", "h*llo",
            "a[b]c", "abc", "x\\y", "x-y", "ca", "cz", "c^", "a]c", "ab", "a"]
    client = connect(redis_server)
    for key in keys:
        client.set(key, "1")
    patterns = ["user:*", "user:?", "h?llo", "h[ae]llo", "h[^e]llo", "h\\*llo", "a\\[b\\]c",
                "c[a-m]", "c[^a]", "*", "a[]", "a[^]", "a[bc", "a[\\]]c", "x\\\\y"]
    for pattern in patterns:
        cursor, found = 0, set()
        while True:
            cursor, batch = client.scan(cursor, match=pattern, count=100)
            found.update(batch)
            if cursor == 0:
                break
        classifier = KeyClassifier([KeyGroup("g", (pattern,))])
        matched = set()
        for key in keys:
            counts = [0, 0]
            classifier.count([key.encode()], counts)
            if counts[0]:
                matched.add(key.encode())
        assert matched == found, pattern


# QAToolBox's keys as its code writes them (Django cache "qatoolbox:1:<key>", sessions of the
# cached_db engine, the cache service's "user:<id>" and "chat_room:<id>:messages", single
# figures), 30 one-off structures past the bound, and Celery's keys.
def real_shaped_keys(client: Any, n: int) -> None:
    import random
    import uuid

    rng = random.Random(5)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        session = "".join(rng.choice(alphabet) for _ in range(32))
        pipe.set(f"qatoolbox:1:django.contrib.sessions.cached_db{session}", "s", ex=3600)
        pipe.set(f"qatoolbox:1:user:{1000 + i}", "u")
        pipe.set(f"qatoolbox:1:chat_room:{uuid.UUID(int=rng.getrandbits(128))}:messages", "[]")
    for word in ("shard_stats", "monitoring_data"):
        pipe.set(f"qatoolbox:1:{word}", "{}")
    for k in range(30):  # feature flags by name: one key each, 30 structures
        pipe.set(f"qatoolbox:1:feature_flag_{chr(97 + k // 26)}{chr(97 + k % 26)}", "1")
    pipe.execute()


def test_real_shaped_keys_bounded_groups_and_declared_queues(
        redis_server: RedisServer, connect: Callable[..., Any]) -> None:
    client = connect(redis_server)
    n = 150
    real_shaped_keys(client, n)
    from celery import Celery  # type: ignore[import-untyped]
    from kombu import Queue  # type: ignore[attr-defined]

    # QAToolBox's Celery: default queue "default", the tools app routed to "tools"; the
    # other config's "chat_cleanup"; a worker's remote-control queue (not a task queue).
    app = Celery("qa", broker=redis_server.url)
    app.conf.update(task_default_queue="default", task_default_exchange="default",
                    task_default_routing_key="default",
                    task_queues=[Queue("default", routing_key="default"),
                                 Queue("tools", routing_key="tools")],
                    task_routes={"apps.tools.tasks.*": {"queue": "tools"}})
    try:
        for _ in range(3):
            app.send_task("health_check_task")
        app.send_task("health_check_task", priority=6)  # kombu's list "default\x06\x166"
        for _ in range(2):
            app.send_task("apps.tools.tasks.cleanup_inactive_chat_rooms")
        app.send_task("apps.tools.tasks.cleanup_expired_heart_links", queue="chat_cleanup")
    finally:
        app.close()
    client.sadd("_kombu.binding.celery.pidbox", "\x06\x16\x06\x16celery@web1.celery.pidbox")
    keys = client.dbsize()

    def counted(cfg: RedisConfig) -> Scrape:
        collector = RedisCollector(cfg, 4.0)
        found: list[Scrape] = []
        try:
            def ready() -> bool:
                found[:] = [collect(collector)]
                return found[0].value("qatoolbox_redis_key_group_scan_complete") == 1

            wait_for(ready, 30, "a complete key count")
            return collect(collector)  # the queues the count found are in the next round trip
        finally:
            collector.close()

    def groups_of(scrape: Scrape) -> dict[str, float]:
        return {labels["group"]: scrape.value(name, **labels) or 0.0
                for name, labels in scrape.series("qatoolbox_redis_key_group_keys")}

    # Every structure named (a bound above their number): each family is one group.
    groups = groups_of(counted(as_exporter_user(redis_server, max_key_groups=100)))
    assert sum(groups.values()) == keys
    assert groups["session"] == n
    assert groups["user:{id}"] == n
    assert groups["chat_room:{id}:messages"] == n
    assert groups["shard_stats"] == 1 and groups["monitoring_data"] == 1
    assert groups["default"] == 2  # the queue's list and its priority list
    assert groups["other"] == 0
    assert len(groups) == 3 + 2 + 30 + 8 + 1  # Celery's and kombu's keys: 8 structures

    # The default bound: the 20 largest named, the rest under other.
    scrape = counted(as_exporter_user(redis_server))
    bounded = groups_of(scrape)
    assert sum(bounded.values()) == keys
    assert len(bounded) == 20 + 1
    for family in ("session", "user:{id}", "chat_room:{id}:messages", "default"):
        assert bounded[family] == groups[family]
    assert bounded["other"] == sum(v for g, v in groups.items() if g not in bounded)
    # The queues kombu declared, with their depths (priority lists included); not the
    # worker's remote-control queue.
    queues = {labels["queue"]: scrape.value(name, **labels)
              for name, labels in scrape.series("qatoolbox_celery_queue_length")}
    assert queues == {"default": 4, "tools": 2, "chat_cleanup": 1}

    # Configured groups take precedence; the bound is configurable; queues from config only
    # when discovery is off.
    scrape = counted(as_exporter_user(
        redis_server, key_groups=(KeyGroup("sessions", ("qatoolbox:1:django.contrib.sessions*",)),),
        max_key_groups=3, discover_celery_queues=False))
    groups = groups_of(scrape)
    assert groups["sessions"] == n and "session" not in groups
    assert set(groups) == {"sessions", "user:{id}", "chat_room:{id}:messages", "default",
                           "other"}
    assert sum(groups.values()) == keys
    configured = {labels["queue"] for _, labels in scrape.series("qatoolbox_celery_queue_length")}
    assert configured == {"default", "tools"}
    assert_nothing_refused(redis_server)


# --- Celery ---------------------------------------------------------------------------------


def test_celery_queue_length_sums_priorities(redis_server: RedisServer,
                                             connect: Callable[..., Any]) -> None:
    client = connect(redis_server)
    client.lpush("qa:celery", "m1", "m2")
    client.lpush("qa:celery\x06\x163", "m3")
    client.lpush("qa:celery\x06\x166", "m4", "m5", "m6")
    client.lpush("qa:celery\x06\x169", "m7", "m8", "m9", "m10")
    client.lpush("qa:mail", *[f"x{i}" for i in range(5)])
    client.set("qa:mail\x06\x169", "not a list")
    client.lpush("celery", *range(100))  # unprefixed: another app's queue
    client.hset("qa:unacked", mapping={"t1": "a", "t2": "b", "t3": "c"})
    cfg = as_exporter_user(redis_server, celery_queues=("celery", "mail", "gone"),
                           celery_key_prefix="qa:")
    collector = RedisCollector(cfg, 4.0)
    try:
        scrape = collect(collector)
        assert scrape.value("qatoolbox_celery_queue_length", queue="celery") == 10
        assert scrape.value("qatoolbox_celery_queue_length", queue="mail") == 5
        assert scrape.value("qatoolbox_celery_queue_length", queue="gone") == 0
        assert scrape.value("qatoolbox_celery_unacked_messages") == 3
        client.rpop("qa:celery\x06\x169")
        assert collect(collector).value("qatoolbox_celery_queue_length", queue="celery") == 9
        assert_nothing_refused(redis_server)
    finally:
        collector.close()


# --- failures ---------------------------------------------------------------------------------


def assert_down(exporter: ExporterProcess, reason: str) -> Scrape:
    """Redis down: up 0 and the reason, nothing else of the collector's."""
    scrape = exporter.scrape()
    assert scrape.value("qatoolbox_redis_up") == 0
    assert scrape.value("qatoolbox_exporter_collector_success", collector="redis") == 0
    assert redis_series(scrape) == ["qatoolbox_redis_connection_error", "qatoolbox_redis_up"]
    reasons = [labels["reason"] for _, labels in scrape.series("qatoolbox_redis_connection_error")]
    assert reasons == [reason], exporter.logs()[-2000:]
    assert scrape.value("qatoolbox_redis_connection_error", reason=reason) == 1
    return scrape


def test_server_stopped_or_killed_then_back(redis_server: RedisServer,
                                            exporter_factory: Callable[..., ExporterProcess]
                                            ) -> None:
    exporter = start_exporter(exporter_factory, redis_server)
    assert exporter.scrape().value("qatoolbox_redis_up") == 1
    redis_server.stop()
    for _ in range(3):
        assert_down(exporter, "connection_refused")
    redis_server.start()
    redis_server.create_exporter_user()
    assert exporter.scrape().value("qatoolbox_redis_up") == 1
    redis_server.kill()
    assert_down(exporter, "connection_refused")
    redis_server.start()
    redis_server.create_exporter_user()
    scrape = exporter.scrape()
    assert scrape.value("qatoolbox_redis_up") == 1
    assert scrape.value("qatoolbox_exporter_collector_success", collector="redis") == 1
    assert scrape.series("qatoolbox_redis_connection_error") == []  # only while down
    failures = [line for line in exporter.logs().splitlines()
                if "collector failed" in line and "collector=redis" in line]
    assert 2 <= len(failures) <= 4, failures  # once per outage (and per distinct error)
    # The user, not the password.
    where = f"redis at redis://{EXPORTER_ROLE}:<secret>@127.0.0.1:"
    assert all(where in line for line in failures), failures


def test_server_paused(redis_server: RedisServer,
                       exporter_factory: Callable[..., ExporterProcess],
                       connect: Callable[..., Any]) -> None:
    """A SIGSTOPped server: every scrape answers within its budget with up 0 and reason
    timeout, threads and connections do not pile up, and the exporter recovers by itself.

    Robust under load: nothing here depends on how fast the machine is. The per-scrape bound
    is budget + 5 s (a scrape that waited once per command or per attempt would take 10 s and
    more); the baselines are taken once the exporter is steady (its key count thread and HTTP
    worker started, its connections open), and every "no more than before" is waited for
    rather than sampled once, since a thread or a connection the server has not read yet may
    linger for a moment after the scrape that ended it."""
    budget = 1.0
    exporter = start_exporter(exporter_factory, redis_server, {"key_scan_interval": "1s"},
                              timeout=f"{budget:g}s")
    probe = connect(redis_server)
    for _ in range(3):
        assert exporter.scrape().value("qatoolbox_redis_up") == 1
        time.sleep(0.4)
    # Steady: the scrape connection, the key count's, and the probe.
    wait_for(lambda: exporter.scrape().value("qatoolbox_redis_key_group_scan_complete") == 1,
             60, "a first complete key count")
    wait_for(lambda: len(probe.client_list()) == 3, 30, "3 client connections")
    threads = exporter.threads()
    clients = 3
    redis_server.pause()
    try:
        for _ in range(20):
            started = time.monotonic()
            scrape = exporter.scrape(timeout=budget + 30)
            elapsed = time.monotonic() - started
            assert elapsed < budget + 5, elapsed
            assert scrape.value("qatoolbox_redis_up") == 0
            assert redis_series(scrape) == ["qatoolbox_redis_connection_error",
                                            "qatoolbox_redis_up"]
            assert scrape.value("qatoolbox_redis_connection_error", reason="timeout") == 1
        assert exporter.threads() <= threads
    finally:
        redis_server.resume()
    wait_for(lambda: exporter.scrape().value("qatoolbox_redis_up") == 1, 60, "recovery")
    # Connections abandoned during the pause are closed once the server reads them again.
    wait_for(lambda: len(probe.client_list()) <= clients, 60,
             f"at most {clients} client connections")
    wait_for(lambda: exporter.threads() <= threads, 30, f"at most {threads} threads")
    assert_nothing_refused(redis_server)


# --- authentication ---------------------------------------------------------------------------

PASSWORD = "pw-Secret-123"
WRONG = "wrong-Pass-456"
ACL_PASSWORD = "exp-Secret-789"
def acl_without_latency() -> list[str]:
    """The documented ACL rules less +latency|histogram, which docs/reliability.md calls
    optional (the documented rules never grant CONFIG GET: it reads requirepass too)."""
    rules = documented_acl_rules(ACL_PASSWORD)
    assert "+latency|histogram" in rules and "+config|get" not in rules, rules
    return [rule for rule in rules if rule != "+latency|histogram"]


def test_password_acl_and_optional_commands(redis_server: RedisServer,
                                            exporter_factory: Callable[..., ExporterProcess],
                                            workdir: Path, connect: Callable[..., Any]) -> None:
    server = redis_server
    # Set at run time: the harness waits for an unauthenticated PING at start.
    connect(server).config_set("requirepass", PASSWORD)
    admin = connect(server, password=PASSWORD)
    server.create_exporter_user(ACL_PASSWORD, admin_password=PASSWORD)
    admin.execute_command("ACL", "SETUSER", "limited", *acl_without_latency())
    # An operator who opts in to CONFIG GET grants it on top of the documented rules.
    admin.execute_command("ACL", "SETUSER", "opted", *documented_acl_rules(ACL_PASSWORD),
                          "+config|get")
    admin.lpush("celery", "m")
    base = f"127.0.0.1:{server.port}/0"
    secret_file = workdir / "redis-password"
    secret_file.write_text("exp-Secret-789\n")

    good = start_exporter(exporter_factory, None, env={"REDIS_URL": f"redis://:{PASSWORD}@{base}"})
    wrong = start_exporter(exporter_factory, None, env={"REDIS_URL": f"redis://:{WRONG}@{base}"})
    acl = start_exporter(exporter_factory, None, {"key_scan_interval": "1s",
                                                  "celery_queues": ["celery"]}, env={
        "REDIS_URL": f"redis://{EXPORTER_ROLE}@{base}", "REDIS_PASSWORD_FILE": str(secret_file)})
    # redis.config_get on, but neither CONFIG GET nor LATENCY allowed: both probes refused.
    limited = start_exporter(exporter_factory, None, {"config_get": True}, env={
        "REDIS_URL": f"redis://limited:exp-Secret-789@{base}"})
    opted = start_exporter(exporter_factory, None, {"config_get": True}, env={
        "REDIS_URL": f"redis://opted:exp-Secret-789@{base}"})

    assert good.scrape().value("qatoolbox_redis_up") == 1
    for _ in range(3):
        scrape = assert_down(wrong, "authentication_failed")
        assert WRONG not in scrape.text and PASSWORD not in scrape.text
    failures = [line for line in wrong.logs().splitlines() if "collector=redis" in line]
    assert len(failures) == 1, failures
    assert "AuthenticationError" in failures[0]
    assert "redis at redis://:<secret>@127.0.0.1:" in failures[0]
    for exporter in (good, wrong, acl, limited, opted):
        assert WRONG not in exporter.logs() and PASSWORD not in exporter.logs()
        assert "exp-Secret-789" not in exporter.logs()

    # Everything the ACL allows is there, and the count of refused commands stays at 0.
    wait_for(lambda: acl.scrape().value("qatoolbox_redis_key_group_keys", group="celery") == 1,
             10, "key groups as the ACL user")
    scrape = acl.scrape()
    assert scrape.value("qatoolbox_redis_command_duration_seconds_count", cmd="get") is None
    assert scrape.value("qatoolbox_redis_command_duration_seconds_count", cmd="llen")
    assert scrape.value("qatoolbox_redis_slowlog_threshold_seconds") is None  # not asked
    assert scrape.value("qatoolbox_redis_max_clients") == 10000  # from INFO, no CONFIG GET
    assert scrape.value("qatoolbox_celery_queue_length", queue="celery") == 1
    assert "refused" not in acl.logs()
    # Opted in to CONFIG GET, with the grant: the threshold is there, still nothing refused.
    assert opted.scrape().value("qatoolbox_redis_slowlog_threshold_seconds") == 0.01
    assert "refused" not in opted.logs()
    assert "errorstat_NOPERM" not in admin.info("errorstats")

    # Without CONFIG and LATENCY: probed once, one log line each, no errors afterwards.
    first = limited.scrape()
    assert first.value("qatoolbox_redis_up") == 1
    refused_after_probe = admin.info("errorstats")["errorstat_NOPERM"]["count"]
    for _ in range(5):
        scrape = limited.scrape()
        assert scrape.value("qatoolbox_exporter_collector_success", collector="redis") == 1
        assert scrape.value("qatoolbox_redis_command_duration_seconds_count", cmd="llen") is None
        assert scrape.value("qatoolbox_redis_slowlog_threshold_seconds") is None
        assert scrape.value("qatoolbox_redis_commands_total", cmd="info")
    assert admin.info("errorstats")["errorstat_NOPERM"]["count"] == refused_after_probe
    refusals = [line for line in limited.logs().splitlines() if "refused" in line]
    assert len(refusals) == 2, refusals
    assert {re.search(r"part=(\w+)", line).group(1) for line in refusals} == {  # type: ignore[union-attr]
        "latency", "config"}


def test_password_in_the_url_query_works_and_never_shows(
        redis_factory: Callable[..., RedisServer],
        exporter_factory: Callable[..., ExporterProcess], workdir: Path,
        connect: Callable[..., Any]) -> None:
    """Issue 22: a password in the URL's query (redis-py honours it; a unix:// socket has no
    other place for one) reached --config.check and the `redis target` log line in clear.
    Right and wrong passwords, over TCP and a unix socket: the log, /metrics and the landing
    page never hold either."""
    socket_path = workdir / "redis.sock"
    server = redis_factory(extra_args=["--unixsocket", str(socket_path), "--unixsocketperm",
                                       "700"])
    connect(server).config_set("requirepass", PASSWORD)
    tcp = f"127.0.0.1:{server.port}/0"
    urls = {
        "tcp query": (f"redis://{tcp}?password={PASSWORD}", 1),
        "unix query": (f"unix://{socket_path}?password={PASSWORD}&db=0", 1),
        # redis-py takes the userinfo password over the query's.
        "tcp both, wrong userinfo": (f"redis://:{WRONG}@{tcp}?password={PASSWORD}", 0),
        "unix query, wrong": (f"unix://{socket_path}?password={WRONG}&db=0", 0),
        "unix, no such socket": (f"unix://{workdir}/none.sock?password={PASSWORD}&db=0", 0),
    }
    exporters = {name: start_exporter(exporter_factory, None, env={"REDIS_URL": url})
                 for name, (url, _) in urls.items()}
    for name, exporter in exporters.items():
        up = urls[name][1]
        scrape = exporter.scrape()
        assert scrape.value("qatoolbox_redis_up") == up, (name, exporter.logs())
        landing = exporter.get("/")[2].decode()
        if not up:
            wait_for(lambda exporter=exporter: "collector failed" in exporter.logs(), 10,
                     f"{name}: the failure in the log")
        logs = exporter.logs()
        target = [line for line in logs.splitlines() if "redis target" in line]
        assert len(target) == 1 and "password=<secret>" in target[0], (name, target)
        if not up:
            failure = next(ln for ln in logs.splitlines() if "collector failed" in ln)
            assert "redis at " in failure and "<secret>" in failure, failure
        for text in (logs, scrape.text, landing):
            assert PASSWORD not in text and WRONG not in text, (name, text[-2000:])
