"""Unit tests of the Redis collector's parsing, key classification and bookkeeping."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.collectors import redis as rc
from exporter.collectors import redis_info as ri
from exporter.collectors import redis_keys as rk
from exporter.collectors.redis_config import DEFAULT_KEY_GROUPS, KeyGroup, RedisConfig
from exporter.config import ConfigError, Secret, load_config
from exporter.redact import redact_url
from exporter.resp import ServerError
from tests.harness import free_port

INFO_TEXT = """# Server\r
redis_version:7.0.15\r
redis_mode:standalone\r
run_id:95e0572945f25eac0cab64805729b64e6a1be28b\r
uptime_in_seconds:305\r
\r
# Clients\r
connected_clients:3\r
maxclients:10000\r
\r
# Memory\r
used_memory:1325416\r
mem_fragmentation_ratio:5.54\r
maxmemory_policy:noeviction\r
\r
# Stats\r
keyspace_hits:1001\r
keyspace_misses:3\r
\r
# Replication\r
role:master\r
\r
# Commandstats\r
cmdstat_get:calls=1002,usec=123,usec_per_call=0.12,rejected_calls=0,failed_calls=0\r
cmdstat_client|setname:calls=1,usec=2,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r
cmdstat_broken:calls=x\r
\r
# Keyspace\r
db0:keys=104,expires=2,avg_ttl=0\r
db12:keys=5,expires=0,avg_ttl=0\r
"""


def test_parse_info_fields_and_sections() -> None:
    info = ri.parse_info(INFO_TEXT)
    assert info["redis_version"] == "7.0.15"
    assert info["role"] == "master"
    assert ri.number(info, "mem_fragmentation_ratio") == 5.54
    assert ri.number(info, "maxmemory_policy") is None
    assert ri.number(info, "absent") is None
    assert not any(k.startswith("#") for k in info)


def test_command_stats_and_keyspace() -> None:
    info = ri.parse_info(INFO_TEXT)
    assert ri.command_stats(info) == {"get": (1002.0, 123e-6), "client|setname": (1.0, 2e-6)}
    assert ri.keyspace(info) == {"db0": (104.0, 2.0), "db12": (5.0, 0.0)}
    assert ri.parse_fields("keys=1,expires=0") == {"keys": "1", "expires": "0"}


def test_latency_histogram_resp2_and_resp3_shapes() -> None:
    resp2 = [b"get", [b"calls", 1002, b"histogram_usec", [1, 999, 4, 1001, 8, 1002]],
             b"info", [b"calls", 1, b"histogram_usec", [264, 1]]]
    resp3 = {b"get": {b"calls": 1002, b"histogram_usec": {1: 999, 4: 1001, 8: 1002}},
             b"info": {b"calls": 1, b"histogram_usec": {264: 1}}}
    expected = {"get": (1002, {1.0: 999, 4.0: 1001, 8.0: 1002}), "info": (1, {264.0: 1})}
    assert ri.parse_latency_histogram(resp2) == expected
    assert ri.parse_latency_histogram(resp3) == expected
    assert ri.parse_latency_histogram([]) == {}


def test_histogram_counts_on_fixed_bounds() -> None:
    # Bounds are 1.024us * 2**k for k = 3, 5, ..., 15: 8.192us, 32.8us, 131us, 524us, ...
    assert ri.HISTOGRAM_BOUNDS[0] == pytest.approx(8.192e-6)
    assert ri.HISTOGRAM_BOUNDS[-1] == pytest.approx(0.033554432)
    # 1 and 4 us fall under 8.192, 8 us is exactly the 8.192 bucket (Redis rounds it down).
    assert ri.histogram_counts({1: 999, 4: 1001, 8: 1002}) == [1002] * 7
    # Redis labels 2**16 * 1.024us as 65 us and 2**18 as 262 us: buckets 6 and 8.
    assert ri.histogram_counts({16: 2, 65: 5, 262: 7}) == [0, 2, 5, 7, 7, 7, 7]
    assert ri.histogram_counts({}) == [0] * 7
    # 1048576 us (2**20 * 1.024 us rounded down) is past the last bound: only in +Inf.
    assert ri.histogram_counts({32: 3, 1048576: 11}) == [0, 3, 3, 3, 3, 3, 3]
    counts = ri.histogram_counts({2: 1, 32: 3, 1048: 10, 1048576: 11})
    assert counts == sorted(counts)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("qatoolbox:1:user:*", ["qatoolbox:1:user:1", "qatoolbox:1:user:"],
         ["qatoolbox:1:users:1", "xqatoolbox:1:user:1"]),
        ("h?llo", ["hello", "hallo"], ["hllo", "heello"]),
        ("h[ae]llo", ["hello", "hallo"], ["hillo"]),
        ("h[^e]llo", ["hallo", "hbllo"], ["hello"]),
        ("h[a-b]llo", ["hallo", "hbllo"], ["hcllo"]),
        ("a\\*b", ["a*b"], ["axb"]),
        ("a.b+c", ["a.b+c"], ["axbbc"]),
        ("line*", ["line\nbreak"], []),
        ("a[]", [], ["a", "a]", "ab"]),
        ("a[^]", ["ab", "a]"], ["a", "abc"]),
        ("a[bc", ["ab", "ac"], ["a[bc", "a"]),
        ("a[\\]]b", ["a]b"], ["ab", "a\\b"]),
        ("end\\", ["end\\"], ["end"]),
    ],
)
def test_glob_to_regex_follows_redis_glob(pattern: str, matches: list[str],
                                          misses: list[str]) -> None:
    regex = re.compile(rk.glob_to_regex(pattern), re.DOTALL)
    for key in matches:
        assert regex.fullmatch(key), (pattern, key)
    for key in misses:
        assert not regex.fullmatch(key), (pattern, key)


def test_classifier_first_group_wins_and_other() -> None:
    classifier = rk.KeyClassifier([KeyGroup("a", ("x:*",)), KeyGroup("b", ("x:1*", "y:*"))])
    counts = [0, 0, 0]
    classifier.count([b"x:1", b"x:2", b"y:9", b"z", b"\xff\xfe"], counts)
    assert counts == [2, 1, 2]
    empty = rk.KeyClassifier([])
    counts = [0]
    empty.count([b"a", b"b"], counts)
    assert counts == [2]


SESSION_KEY = "x7k2m9q1w3e5r7t9y1u3i5o7p9a1s3d5"  # Django's 32 characters of [a-z0-9]


@pytest.mark.parametrize(("key", "group"), [
    # QAToolBox's Django cache: KEY_PREFIX "qatoolbox", version 1, what the code passed.
    (f"qatoolbox:1:django.contrib.sessions.cached_db{SESSION_KEY}", "session"),
    (f"qatoolbox:1:django.contrib.sessions.cache{SESSION_KEY}", "session"),
    (f"session:1:django.contrib.sessions.cache{SESSION_KEY}", "session"),
    ("qatoolbox:1:shard_stats", "shard_stats"),
    ("qatoolbox:1:monitoring_data", "monitoring_data"),
    ("qatoolbox:1:user:42", "user:{id}"),
    ("qatoolbox:1:user:42:profile", "user:{id}:profile"),
    ("qatoolbox:1:chat_room:0acada4a-4dd4-45a9-b27b-4ab2b8f3b05d:messages",
     "chat_room:{id}:messages"),
    ("qatoolbox:1:tool_usage_5_pdf_30", "tool_usage_{id}_pdf_{id}"),
    ("qatoolbox:1:boss_login_12", "boss_login_{id}"),
    ("qatoolbox:1:slow_query_log:20250101123000", "slow_query_log:{id}"),
    ("qatoolbox:1:md5:d41d8cd98f00b204e9800998ecf8427e", "md5:{id}"),
    ("qatoolbox:1:available_features_v2_7", "available_features_v2_{id}"),
    # Celery's keys (no cache prefix): results, queues with their priority lists, kombu's.
    ("celery-task-meta-0acada4a-4dd4-45a9-b27b-4ab2b8f3b05d", "celery-task-meta-{id}"),
    ("default", "default"),
    ("default\x06\x163", "default"),
    ("_kombu.binding.tools", "_kombu.binding.tools"),
    ("unacked_index", "unacked_index"),
    ("user123456", "user{id}"),
])
def test_key_shape_replaces_ids(key: str, group: str) -> None:
    assert rk.key_shape(key.encode()) == group


def test_key_shape_is_a_bounded_printable_label() -> None:
    assert rk.key_shape(b"\xff\xfe\x00x") == "\ufffd\ufffd?x"
    long = rk.key_shape(b"qatoolbox:1:" + b"word-" * 100)
    assert len(long) == rk.MAX_GROUP_NAME and long.endswith("...")


@given(st.lists(st.tuples(st.sampled_from(["user:{}", "chat_room:{}:messages", "shard_stats",
                                           "django.contrib.sessions.cached_db{}",
                                           "boss_login_{}"]),
                          st.integers(min_value=0, max_value=10**12)), max_size=60),
       st.lists(st.text(alphabet="ab:_1.", max_size=8), max_size=30),
       st.integers(min_value=0, max_value=6))
def test_every_key_counted_once_each_family_in_one_group(
        family_keys: list[tuple[str, int]], noise: list[str], limit: int) -> None:
    keys = [("qatoolbox:1:" + f.format(f"{n:032d}" if "sessions" in f else n)).encode()
            for f, n in family_keys]
    keys += [n.encode() for n in noise]
    tally = rk.KeyTally.empty(1)
    rk.KeyClassifier([KeyGroup("mine", ("qatoolbox:1:boss_login_*",))]).tally(keys, tally)
    counts = tally.counts(["mine"], limit)
    assert sum(counts.values()) == len(keys)
    assert len(counts) <= 1 + limit + 1  # configured, the largest structures, other
    assert counts["mine"] == sum(1 for f, _ in family_keys if f.startswith("boss"))
    # Without a bound, every family is exactly one group.
    every = tally.counts(["mine"], 10**6)
    for family, name in (("user:{}", "user:{id}"), ("shard_stats", "shard_stats"),
                         ("chat_room:{}:messages", "chat_room:{id}:messages"),
                         ("django.contrib.sessions.cached_db{}", "session")):
        assert every.get(name, 0) == sum(1 for f, _ in family_keys if f == family)


@given(st.lists(st.text(alphabet="ab0123456789:_-fF.x", max_size=40), max_size=40),
       st.lists(st.uuids(), max_size=5))
def test_skeleton_cache_gives_what_key_shape_gives(texts: list[str], ids: list[Any]) -> None:
    keys = [t.encode() for t in texts]
    keys += [f"qatoolbox:1:room:{u}:{t}".encode() for u in ids for t in texts[:3]]
    classifier = rk.KeyClassifier([])
    for _ in range(2):  # filled, then read from the cache
        tally = rk.KeyTally.empty(0)
        classifier.tally(keys, tally)
        expected: dict[str, int] = {}
        for key in keys:
            expected[rk.key_shape(key)] = expected.get(rk.key_shape(key), 0) + 1
        assert tally.shapes == expected


def test_largest_structures_named_the_rest_other() -> None:
    tally = rk.KeyTally([5], {"a": 3, "b": 9, "c": 3, "other": 1, "mine": 2}, untracked=4)
    # A structure named like a configured group (or "other") adds to it and takes no place
    # among the largest; a tie goes by name.
    assert tally.counts(["mine"], 2) == {"mine": 7.0, "b": 9.0, "a": 3.0, "other": 8.0}
    assert sum(tally.counts(["mine"], 0).values()) == 5 + 3 + 9 + 3 + 1 + 2 + 4


def test_structures_past_the_tracking_bound_go_to_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rk, "MAX_TRACKED_SHAPES", 3)
    tally = rk.KeyTally.empty(0)
    rk.KeyClassifier([]).tally([f"k{c}".encode() for c in "abcdef"] + [b"ka"], tally)
    assert tally.shapes == {"ka": 2, "kb": 1, "kc": 1} and tally.untracked == 3


def test_binding_members_and_skipped_exchanges() -> None:
    prefix = rk.KOMBU_BINDING.encode()
    assert rk.binding_exchange(b"_kombu.binding.default", prefix) == "default"
    for control in (b"_kombu.binding.celery.pidbox", b"_kombu.binding.reply.celery.pidbox",
                    b"_kombu.binding.celeryev"):
        assert rk.binding_exchange(control, prefix) is None
    assert rk.binding_queue(b"tools\x06\x16\x06\x16tools") == "tools"
    assert rk.binding_queue(b"\x06\x16\x06\x16chat_cleanup") == "chat_cleanup"
    for bad in (b"tools", b"a\x06\x16b", b"a\x06\x16b\x06\x16", b"a\x06\x16b\x06\x16\xff",
                b"a\x06\x16b\x06\x16" + b"q" * 101, b"a\x06\x16b\x06\x16bad\nname"):
        assert rk.binding_queue(bad) is None
    tally = rk.KeyTally.empty(0)
    rk.KeyClassifier([]).tally([b"_kombu.binding.tools", b"default", b"_kombu.bindingx"],
                               tally, prefix)
    assert tally.bindings == {b"_kombu.binding.tools"}


def test_celery_keys_follow_kombu_naming() -> None:
    assert rk.celery_keys(["celery"], "", (0, 3, 6, 9)) == [
        ("celery", "celery"), ("celery", "celery\x06\x163"), ("celery", "celery\x06\x166"),
        ("celery", "celery\x06\x169")]
    assert rk.celery_keys(["a", "b"], "qa:", (0, 5)) == [
        ("a", "qa:a"), ("a", "qa:a\x06\x165"), ("b", "qa:b"), ("b", "qa:b\x06\x165")]


def test_count_lookups_hits_misses_and_wrong_type() -> None:
    replies = [3, 0, ServerError("WRONGTYPE Operation against a key"),
               ServerError("NOPERM no permissions"), 1]
    hits, misses, lengths = ri.count_lookups(replies)
    assert (hits, misses) == (3, 1)
    assert lengths == [3, 0, 0, 0, 1]


def test_lookup_account_subtracts_own_and_follows_resets() -> None:
    account = ri.LookupAccount()
    assert account.adjust("a", 100, 50, 1000, 0) == (100, 50)
    account.record(2, 3)
    assert account.adjust("a", 110, 53, 1010, 5) == (108, 50)
    account.record(2, 3)
    # Restarted server: new run_id, counters from zero.
    assert account.adjust("b", 7, 1, 20, 0) == (7, 1)
    account.record(4, 4)
    # CONFIG RESETSTAT: the command count went back.
    assert account.adjust("b", 9, 9, 5, 8) == (9, 9)
    account.record(1, 1)
    # RESETSTAT again, seen through LLEN/HLEN calls fewer than our own lookups.
    assert account.adjust("b", 30, 30, 5000, 1) == (30, 30)


def test_command_labels_bounded_and_stable() -> None:
    labels = ri.CommandLabels(2)
    assert labels.labels({"get": 10, "set": 5, "del": 1}) == {
        "get": "get", "set": "set", "del": "other"}
    # del becomes the busiest: get and set keep their labels, no churn.
    assert labels.labels({"get": 11, "set": 5, "del": 100, "hget": 1000}) == {
        "get": "get", "set": "set", "del": "other", "hget": "other"}
    labels.reset()
    assert labels.labels({"hget": 1000, "get": 1, "del": 100})["get"] == "other"
    assert ri.CommandLabels(0).labels({"get": 1}) == {"get": "other"}


def test_version_parsing() -> None:
    assert ri.version("7.0.15") == (7, 0, 15)
    assert ri.version("6.2.14") < (7, 0)
    assert ri.version("") == ()
    assert ri.version("7.2.rc1") == (7, 2)


def test_collector_imports_no_redis_client_library_nor_ssl() -> None:
    """The collector speaks RESP itself (exporter/resp.py): importing it pulls in neither
    redis-py nor ssl (that comes only with a rediss:// URL), and a client connects lazily."""
    code = ("import sys, exporter.collectors.redis as m; "
            "c = m.connect('redis://127.0.0.1:1/0', 1.5); "
            "print(sorted(n for n in ('redis', 'ssl', 'asyncio') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# --- configuration ------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    path = tmp_path / "c.yml"
    path.write_text(text)
    return load_config(str(path), env or {}, {"redis": True})


def test_config_defaults_and_yaml(tmp_path: Path) -> None:
    config = load_config(None, {"REDIS_URL": "redis://u:p@h:7/2"}, {"redis": True})
    assert config.redis.url == "redis://u:p@h:7/2"
    assert config.redis.key_groups == DEFAULT_KEY_GROUPS == ()
    assert config.redis.max_key_groups == 20
    assert config.redis.key_scan_budget == 1_000_000
    assert config.redis.key_scan_time_budget == 1.0
    assert config.redis.key_scan_interval == 60.0
    assert config.redis.celery_queues == ("default", "tools")
    assert config.redis.discover_celery_queues and config.redis.max_celery_queues == 50
    config = _load(tmp_path, """
redis:
  key_groups:
    - {name: carts, patterns: ["shop:cart:*", "cart:*"]}
  key_scan_budget: 5000
  key_scan_time_budget: 250ms
  celery_queues: [celery, mail]
  celery_key_prefix: "qa:"
""")
    assert config.redis.key_groups == (KeyGroup("carts", ("shop:cart:*", "cart:*")),)
    assert config.redis.key_scan_time_budget == 0.25
    assert config.redis.celery_queues == ("celery", "mail")


def test_config_password_file_keeps_user(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr:t@\n")
    config = load_config(None, {"REDIS_URL": "redis://exporter@127.0.0.1:7/0",
                                "REDIS_PASSWORD_FILE": str(secret)}, {"redis": True})
    assert config.redis.url == "redis://exporter:s3cr%3At%40@127.0.0.1:7/0"
    assert "s3cr" not in repr(config)


def test_config_bad_port_without_quoting_the_url() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"REDIS_URL": "redis://u:Secret-pw@h:port/0"}, {"redis": True})
    assert caught.value.problems == ["redis.url: the port is not a number from 0 to 65535"]


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, """
redis:
  url: http://x
  timeout: 0s
  key_groups:
    - {name: other, patterns: ["a*"]}
    - {name: "bad name", patterns: []}
  key_scan_budget: 0
  key_scan_batch: 1000000
  key_scan_interval: 0s
  celery_queues: ["", x]
  celery_priority_steps: [0, 0, 300]
  max_command_labels: -1
""")
    text = str(caught.value)
    for key in ("redis.url", "redis.timeout", "redis.key_groups[0].name",
                "redis.key_groups[1].name", "redis.key_groups[1].patterns",
                "redis.key_scan_budget", "redis.key_scan_batch", "redis.key_scan_interval",
                "redis.celery_queues", "redis.celery_priority_steps",
                "redis.max_command_labels"):
        assert key in text, key
    assert len(caught.value.problems) == 11


def test_databases_past_db15_are_summed_under_other() -> None:
    """3,000 non-empty databases: 16 series of their own at most, one more for the rest."""
    info = ri.parse_info("# Keyspace\r\n" + "".join(
        f"db{n}:keys={n + 1},expires={n % 2},avg_ttl=0\r\n" for n in range(3000)))
    dbs = ri.keyspace(info)
    assert len(dbs) == 3000
    labelled = ri.db_labels(dbs)
    assert set(labelled) == {f"db{n}" for n in range(ri.MAX_DB_LABELS)} | {"other"}
    assert labelled["db15"] == (16.0, 1.0)
    assert labelled["other"] == (sum(n + 1 for n in range(16, 3000)),
                                 sum(n % 2 for n in range(16, 3000)))
    # Only numbers Redis writes get their own series: "db01" or a Unicode digit does not.
    assert ri.db_labels({"db0": (1.0, 0.0), "db01": (2.0, 0.0), "db\u00b2": (3.0, 1.0)}) == {
        "db0": (1.0, 0.0), "other": (5.0, 1.0)}
    assert ri.db_labels({}) == {}


@pytest.mark.parametrize("url", [
    "redis://:SECRET-1@127.0.0.1:{port}/0?password=SECRET-2",
    "redis://app:SECRET-1@127.0.0.1:{port}/0",
    "redis://127.0.0.1:{port}/0?password=SECRET-2&db=0",
    "unix://{sock}?password=SECRET-2&db=0",
    "unix://:SECRET-1@localhost{sock}?db=0",
    # Parameters redis-py cannot use fail inside redis-py with ValueError or TypeError.
    "redis://:SECRET-1@127.0.0.1:{port}/0?db=notanumber",
    "redis://127.0.0.1:{port}/0?unknown=SECRET-2",
    # A password with an unescaped "/": redis-py takes its first part for the port.
    "redis://:12/SECRET@127.0.0.1:{port}/0",
])
def test_connection_errors_never_show_the_password(url: str, tmp_path: Path) -> None:
    """A real failing connection (a closed loopback port, a missing socket): the error names
    the server with every secret replaced."""
    url = url.format(port=free_port(), sock=tmp_path / "missing.sock")
    collector = rc.RedisCollector(RedisConfig(url=Secret(url), celery_queues=()), 2.0)
    try:
        with pytest.raises(rc.RedisUnavailableError) as caught:
            collector.collect()
    finally:
        collector.close()
    message = str(caught.value)
    assert message.startswith(f"redis at {redact_url(url)}: "), message
    assert "SECRET" not in message and "localhost:12" not in message, message
    assert "Error" in message, message


def test_histogram_leaves_out_introspection_commands() -> None:
    for cmd in ("get", "set", "llen", "hlen", "scan", "eval", "brpop"):
        assert ri.wants_histogram(cmd), cmd
    for cmd in ("info", "ping", "auth", "hello", "config|get", "client|setname", "slowlog|len",
                "latency|histogram"):
        assert not ri.wants_histogram(cmd), cmd
