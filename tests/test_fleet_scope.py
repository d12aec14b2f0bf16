"""Collector scopes (collectors.scope, --collectors.scope) and the `server` label."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from exporter.collectors import COLLECTORS, DEFAULTS, SCOPES, build
from exporter.config import ConfigError, load_config
from exporter.fleet import ServerLabelled, postgres_server, redis_server, with_server_label
from tests.harness import ExporterProcess, run_exporter


def load(text: str, tmp_path: Path, flags: dict[str, bool] | None = None,
         overrides: dict[str, str] | None = None) -> dict[str, bool]:
    path = tmp_path / "c.yml"
    path.write_text(text)
    config = load_config(str(path), {}, DEFAULTS, overrides, flags, collector_scopes=SCOPES)
    return dict(config.collectors)


def test_every_collector_has_a_scope() -> None:
    assert set(SCOPES) == set(COLLECTORS)
    assert set(SCOPES.values()) == {"host", "service"}
    assert {n for n, s in SCOPES.items() if s == "host"} == {"host", "process", "app"}


def test_scope_picks_the_defaults_and_names_still_win(tmp_path: Path) -> None:
    assert load("", tmp_path) == DEFAULTS
    host = load("collectors:\n  scope: host\n", tmp_path)
    assert host == {"host": True, "process": True, "app": True, "postgres": False,
                    "business": False, "redis": False}
    service = load("collectors:\n  scope: service\n", tmp_path)
    assert {n for n, on in service.items() if on} == {"postgres", "business", "redis"}
    # A name in the file, then a flag, win over the scope.
    mixed = load("collectors:\n  scope: service\n  redis: false\n  host: true\n", tmp_path,
                 flags={"app": True, "business": False})
    assert {n for n, on in mixed.items() if on} == {"postgres", "host", "app"}
    # The flag's value goes where the file's would.
    flag = load("collectors:\n  scope: service\n", tmp_path,
                overrides={"collectors.scope": "host"})
    assert {n for n, on in flag.items() if on} == {"host", "process", "app"}


@pytest.mark.parametrize("text, problem", [
    ("collectors:\n  scope: hosts\n",
     'collectors.scope: expected one of all, host, service, got "hosts"'),
    ("collectors:\n  scope: [host]\n", "collectors.scope: expected one of all, host, service, "
                                       "got a list"),
    ("scope: host\n", "scope: unknown key"),
])
def test_bad_scope_is_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "c.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), {}, DEFAULTS, None, None, collector_scopes=SCOPES)
    assert exc.value.problems == [problem]


def test_scope_flag_on_the_command_line() -> None:
    result = run_exporter(["--config.check", "--collectors.scope", "service",
                           "--no-collector.redis"])
    assert result.returncode == 0, result.stderr
    assert "collectors scope: service" in result.stdout
    for name, state in (("postgres", "enabled"), ("business", "enabled"), ("redis", "disabled"),
                        ("host", "disabled"), ("app", "disabled")):
        assert f"collector {name}: {state}" in result.stdout
    bad = run_exporter(["--config.check", "--collectors.scope", "fleet"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].strip() == (
        'collectors.scope: expected one of all, host, service, got "fleet"')
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("host, port, expected", [
    ("db.internal", 5432, "db.internal:5432"),
    ("DB.Internal", 5433, "db.internal:5433"),
    ("10.0.0.7", 5432, "10.0.0.7:5432"),
    ("fd00::7", 5432, "[fd00::7]:5432"),
    ("localhost", 5432, "web1:5432"),
    ("127.0.0.1", 6000, "web1:6000"),
    ("::1", 5432, "web1:5432"),
    ("/var/run/postgresql", 5432, "web1:5432"),
])
def test_postgres_server_names_the_server(host: str, port: int, expected: str) -> None:
    assert postgres_server(host, port, hostname="web1") == expected


@pytest.mark.parametrize("url, expected", [
    ("redis://cache.internal:6380/2", "cache.internal:6380"),
    ("rediss://user:s3cret@cache.internal/0", "cache.internal:6379"),
    ("redis://:s3cret@127.0.0.1:6379/0", "web1:6379"),
    ("redis://localhost", "web1:6379"),
    ("unix:///run/redis/redis.sock?db=1", "web1:/run/redis/redis.sock"),
    ("redis://[fd00::9]:7000", "[fd00::9]:7000"),
])
def test_redis_server_names_the_server_without_secrets(url: str, expected: str) -> None:
    assert redis_server(url, hostname="web1") == expected
    assert "s3cret" not in redis_server(url)


class _Fake:
    name = "redis"

    def __init__(self) -> None:
        self.closed = False

    def collect(self) -> list[Metric]:
        up = GaugeMetricFamily("qatoolbox_redis_up", "Up.", value=1)
        keys = CounterMetricFamily("qatoolbox_redis_things", "Things.", labels=["server", "db"])
        keys.add_metric(["from-a-query", "0"], 3)
        return [up, keys]

    def failure_metrics(self) -> list[Metric]:
        return [GaugeMetricFamily("qatoolbox_redis_up", "Up.", value=0)]

    def close(self) -> None:
        self.closed = True


def test_wrapper_labels_every_sample_and_keeps_a_clashing_label() -> None:
    inner = _Fake()
    wrapped = ServerLabelled(inner, "cache:6379")
    up, things = wrapped.collect()
    assert [s.labels for s in up.samples] == [{"server": "cache:6379"}]
    assert [(s.name, s.labels, s.value) for s in things.samples] == [
        ("qatoolbox_redis_things_total",
         {"exported_server": "from-a-query", "db": "0", "server": "cache:6379"}, 3)]
    assert things.type == "counter"
    (down,) = wrapped.failure_metrics()
    assert [(s.labels, s.value) for s in down.samples] == [({"server": "cache:6379"}, 0)]
    wrapped.close()
    assert inner.closed


class _Cached(_Fake):
    """Serves the same families every time, one label dict shared by two samples (as
    postgres' cached families and some builders do)."""

    def __init__(self) -> None:
        super().__init__()
        shared = {"server": "from-a-query", "db": "0"}
        family = GaugeMetricFamily("qatoolbox_redis_things", "Things.")
        family.samples.extend([Sample("qatoolbox_redis_things", shared, 1.0),
                               Sample("qatoolbox_redis_things", shared, 2.0)])
        self.families: list[Metric] = [family]

    def collect(self) -> list[Metric]:
        return self.families


def test_labels_survive_families_served_again_and_shared_dicts() -> None:
    wrapped = ServerLabelled(_Cached(), "cache:6379")
    expected = {"exported_server": "from-a-query", "db": "0", "server": "cache:6379"}
    for _ in range(3):
        (things,) = wrapped.collect()
        assert [s.labels for s in things.samples] == [expected, expected]


def test_only_service_collectors_are_wrapped(tmp_path: Path) -> None:
    config = load_config(None, {"DB_HOST": "db.internal", "REDIS_URL": "redis://127.0.0.1:1/0"},
                         DEFAULTS, None, {"app": False},
                         collector_scopes=SCOPES)
    collectors = build(config)
    try:
        kinds = {c.name: type(c).__name__ for c in collectors}
        assert kinds["postgres"] == kinds["business"] == kinds["redis"] == "ServerLabelled"
        assert kinds["host"] != "ServerLabelled" and kinds["process"] != "ServerLabelled"
        servers = {c.name: c.server for c in collectors if isinstance(c, ServerLabelled)}
        assert servers == {"postgres": "db.internal:5432", "business": "db.internal:5432",
                           "redis": f"{socket.gethostname()}:1"}
    finally:
        for collector in collectors:
            close: Callable[[], None] | None = getattr(collector, "close", None)
            if close is not None:
                close()
    assert with_server_label(collectors[0], None) is collectors[0]
    assert COLLECTORS["host"].server is None and COLLECTORS["app"].server is None


@pytest.mark.integration
def test_running_exporter_labels_service_samples_only(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory(env={"REDIS_URL": "redis://u:pw-9f2@127.0.0.1:1/0"},
                                args=["--no-collector.app"])
    scrape = exporter.scrape()
    here = socket.gethostname()
    servers = {(name.split("_")[1], dict(labels).get("server"))
               for name, labels in scrape.samples if name.startswith("qatoolbox_")}
    assert ("postgres", f"{here}:1") in servers and ("redis", f"{here}:1") in servers
    assert ("business", f"{here}:1") in servers
    for prefix in ("host", "process", "exporter"):
        assert {s for p, s in servers if p == prefix} == {None}, prefix
    assert "pw-9f2" not in scrape.text


def test_host_root_path_sizes_the_host_file_systems(tmp_path: Path) -> None:
    """In a DaemonSet the host's mount table is read through host.proc_path and each file
    system is measured under host.root_path; the labels keep the host's mount points."""
    from exporter.collectors.host import HostCollector
    from exporter.collectors.host_config import HostConfig

    asked: list[str] = []

    def statvfs(path: str) -> os.statvfs_result:
        asked.append(path)
        return os.statvfs_result((4096, 1024, 1000, 400, 300, 500, 200, 200, 0, 255))

    mounts = ("/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /var/lib/postgresql xfs rw 0 0\n"
              "proc /proc proc rw 0 0\n")

    def read(path: str) -> str:
        if path == "/host/proc/1/mounts":
            return mounts
        raise FileNotFoundError(path)

    collector = HostCollector(HostConfig(proc_path="/host/proc", sys_path=str(tmp_path),
                                         root_path="/host/root"),
                              read=read, statvfs=statvfs, ticks_per_second=100.0,
                              timex=lambda: None)
    families = {f.name: f for f in collector._filesystems()}
    sizes = families["qatoolbox_host_filesystem_size_bytes"].samples
    assert sorted(s.labels["mountpoint"] for s in sizes) == ["/", "/var/lib/postgresql"]
    assert sorted(asked) == ["/host/root/", "/host/root/var/lib/postgresql"]
