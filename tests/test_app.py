"""App collector: merging worker files, folding dead workers, crash safety, config."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import COLLECTORS, DEFAULTS
from exporter.collectors.app import AppCollector, accumulator_path, fold
from exporter.config import AppConfig, ConfigError, load_config
from exporter.instrument import Recorder
from exporter.instrument._store import read_entries
from tests.harness import parse_metrics

ROUTES = [f"api/r{i}/<int:id>/" for i in range(12)]


def scrape(collector: AppCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(_Wrap(collector))
    return parse_metrics(generate_latest(registry).decode())


class _Wrap:
    def __init__(self, collector: AppCollector) -> None:
        self.collector = collector

    def collect(self) -> Any:
        return list(self.collector.collect())


def total(found: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in found.items() if n == name and want <= set(lbl))


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def work(rec: Recorder, requests: int, offset: int = 0) -> None:
    for i in range(requests):
        route = ROUTES[(i + offset) % len(ROUTES)]
        rec.request_started()
        rec.request_finished(route, "GET", 200 if i % 5 else 500, 0.01 * (i % 7),
                             db_queries=i % 60, db_seconds=0.001)


def collector(*dirs: Path, compact: bool = True) -> AppCollector:
    return AppCollector(AppConfig(multiprocess_dirs=tuple(str(d) for d in dirs),
                                  compact=compact))


def test_no_dirs_yields_nothing() -> None:
    assert list(AppCollector(AppConfig()).collect()) == []
    assert DEFAULTS["app"] is True and "app" in COLLECTORS


def test_missing_dir_is_down(tmp_path: Path) -> None:
    found = scrape(collector(tmp_path / "nope"))
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(tmp_path / "nope")) == 0


def test_merges_workers_and_dirs(tmp_path: Path) -> None:
    web, celery = tmp_path / "web", tmp_path / "celery"
    web.mkdir()
    celery.mkdir()
    workers = [Recorder(str(web)) for _ in range(3)]
    for n, rec in enumerate(workers):
        work(rec, 10 * (n + 1))
    workers[0].request_started()  # one request in flight
    tasks = Recorder(str(celery))
    tasks.task_finished("chat.cleanup", "succeeded", 0.2)
    tasks.task_finished("chat.cleanup", "failed", 0.1)
    found = scrape(collector(web, celery))
    assert total(found, "qatoolbox_http_requests_total") == 60
    assert total(found, "qatoolbox_http_request_duration_seconds_count") == 60
    assert value(found, "qatoolbox_http_requests_in_flight") == 1
    assert value(found, "qatoolbox_celery_tasks_total", task="chat.cleanup", state="failed") == 1
    assert value(found, "qatoolbox_app_workers", dir=str(web)) == 3
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(celery)) == 1


def test_dead_workers_fold_and_totals_hold(tmp_path: Path) -> None:
    col = collector(tmp_path)
    a, b = Recorder(str(tmp_path)), Recorder(str(tmp_path))
    work(a, 30)
    work(b, 20)
    a.request_started()  # a dies with a request in flight
    before = scrape(col)
    assert value(before, "qatoolbox_http_requests_in_flight") == 1
    a.close()
    after = scrape(col)
    assert total(after, "qatoolbox_http_requests_total") == 50
    assert total(after, "qatoolbox_http_request_db_queries_count") == 50
    assert value(after, "qatoolbox_http_requests_in_flight") == 0
    assert value(after, "qatoolbox_app_workers_folded_total", dir=str(tmp_path)) == 1
    assert not [n for n in os.listdir(tmp_path) if a.store.ident in n]
    assert {k: v for k, v in after.items() if k[0].startswith("qatoolbox_http_request_d")} == \
        {k: v for k, v in before.items() if k[0].startswith("qatoolbox_http_request_d")}


def test_bare_lock_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A writer that died between creating its lock file and its first data file leaves only
    the lock (or its temporary name): removed once nobody holds it, never while someone does."""
    live = Recorder(str(tmp_path))
    work(live, 5)
    dead_lock = tmp_path / "4242-0123456789abcdef.lock"
    dead_lock.write_text("")
    old_tmp = tmp_path / ".4243-0123456789abcdef.lock.tmp"
    old_tmp.write_text("")
    os.utime(old_tmp, (time.time() - 120, time.time() - 120))
    young_tmp = tmp_path / ".4244-0123456789abcdef.lock.tmp"  # a writer starting right now
    young_tmp.write_text("")
    held = tmp_path / "4245-0123456789abcdef.lock"  # alive: locked, no data file yet
    held_fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held_fd, fcntl.LOCK_EX)
    try:
        found = scrape(collector(tmp_path))
        assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(tmp_path)) == 1
        assert total(found, "qatoolbox_http_requests_total") == 5
        names = set(os.listdir(tmp_path))
        assert dead_lock.name not in names and old_tmp.name not in names
        assert {young_tmp.name, held.name, f"{live.store.ident}.lock"} <= names
        # Without compaction nothing is deleted.
        dead_lock.write_text("")
        scrape(collector(tmp_path, compact=False))
        assert dead_lock.exists()
    finally:
        os.close(held_fd)
        live.close()


def test_reused_pid_never_double_counts(tmp_path: Path) -> None:
    # Both recorders live in this process, so they share a pid, as a worker whose pid the
    # kernel reused would; identity is the token and the held lock, not the pid.
    col = collector(tmp_path)
    old = Recorder(str(tmp_path))
    work(old, 7)
    old.close()
    assert total(scrape(col), "qatoolbox_http_requests_total") == 7
    new = Recorder(str(tmp_path))
    assert new.store.ident.split("-")[0] == old.store.ident.split("-")[0]
    work(new, 5)
    assert total(scrape(col), "qatoolbox_http_requests_total") == 12
    new.close()
    assert total(scrape(col), "qatoolbox_http_requests_total") == 12


def test_200_restarts_keep_totals_and_scrape_cost(tmp_path: Path) -> None:
    churn, steady = tmp_path / "churn", tmp_path / "steady"
    churn.mkdir()
    steady.mkdir()
    live = [Recorder(str(churn)) for _ in range(3)]
    baseline = [Recorder(str(steady)) for _ in range(3)]
    for rec in baseline:
        work(rec, 40)
    col = collector(churn)
    expected, last = 0, 0.0
    for restart in range(200):
        victim = live[restart % 3]
        work(victim, 4, offset=restart)
        expected += 4
        victim.close()
        live[restart % 3] = Recorder(str(churn))
        if restart % 20 == 19:
            found = scrape(col)
            now = total(found, "qatoolbox_http_requests_total")
            assert now == expected
            assert now >= last
            last = now
    for rec in live:
        work(rec, 2)
        expected += 2
    found = scrape(col)
    assert total(found, "qatoolbox_http_requests_total") == expected
    assert total(found, "qatoolbox_http_request_duration_seconds_count") == expected
    assert value(found, "qatoolbox_app_workers_folded_total", dir=str(churn)) == 200
    # What a scrape reads: the live workers' files plus the three accumulators (counters,
    # histograms, dead workers' gauge series at 0), as without churn.
    steady_found = scrape(collector(steady))
    files = value(found, "qatoolbox_app_multiprocess_files", dir=str(churn))
    steady_files = value(steady_found, "qatoolbox_app_multiprocess_files", dir=str(steady))
    assert files is not None and steady_files is not None
    assert files == steady_files + 3
    assert len([n for n in os.listdir(churn) if n.endswith(".db")]) == 3 * 3 + 3

    def best(c: AppCollector) -> float:
        list(c.collect())  # warm: file layouts parsed
        times = []
        for _ in range(7):
            # CPU time of this thread: other work on the machine does not count.
            start = time.thread_time()
            list(c.collect())
            times.append(time.thread_time() - start)
        return min(times)

    # Generous factor: the churned folder carries 12 routes' accumulated series on top.
    assert best(col) < 5 * best(collector(steady)) + 0.005


def test_without_compaction_dead_files_pile_up(tmp_path: Path) -> None:
    col = collector(tmp_path, compact=False)
    for _ in range(10):
        rec = Recorder(str(tmp_path))
        work(rec, 3)
        rec.request_started()
        rec.close()
    found = scrape(col)
    assert total(found, "qatoolbox_http_requests_total") == 30
    # No live worker: nothing in flight (dead workers' gauges count as 0).
    assert value(found, "qatoolbox_http_requests_in_flight") == 0
    assert value(found, "qatoolbox_app_multiprocess_files", dir=str(tmp_path)) == 30


def test_crash_after_accumulator_written_before_delete(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    col = collector(tmp_path)
    keep, dead = Recorder(str(tmp_path)), Recorder(str(tmp_path))
    work(keep, 10)
    work(dead, 15)
    dead.close()

    class CrashError(Exception):
        pass

    def crash(path: str, **kwargs: Any) -> None:
        raise CrashError(path)

    monkeypatch.setattr("exporter.collectors.app.os.unlink", crash)
    with pytest.raises(CrashError):
        fold(str(tmp_path), [dead.store.ident])
    monkeypatch.undo()
    # The accumulator already holds the dead worker, whose files are still there.
    acc = dict(read_entries(accumulator_path(str(tmp_path), "counter")))
    assert any(dead.store.ident in k for k in acc)
    assert any(dead.store.ident in n for n in os.listdir(tmp_path))
    # Scraping neither counts it twice nor folds it twice.
    found = scrape(col)
    assert total(found, "qatoolbox_http_requests_total") == 25
    assert total(scrape(col), "qatoolbox_http_requests_total") == 25
    assert not any(dead.store.ident in n for n in os.listdir(tmp_path))
    # The marker goes once its file is gone (the next fold prunes it).
    other = Recorder(str(tmp_path))
    work(other, 1)
    other.close()
    assert total(scrape(col), "qatoolbox_http_requests_total") == 26
    acc = dict(read_entries(accumulator_path(str(tmp_path), "counter")))
    assert not any(dead.store.ident in k for k in acc)


def test_crash_before_accumulator_replaced(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    col = collector(tmp_path)
    dead = Recorder(str(tmp_path))
    work(dead, 9)
    dead.close()

    def crash(src: str, dst: str, **kwargs: Any) -> None:
        raise OSError("crash")

    monkeypatch.setattr("exporter.instrument._store.os.rename", crash)
    with pytest.raises(OSError):
        fold(str(tmp_path), [dead.store.ident])
    monkeypatch.undo()
    assert not os.path.exists(accumulator_path(str(tmp_path), "counter"))
    assert total(scrape(col), "qatoolbox_http_requests_total") == 9
    assert total(scrape(col), "qatoolbox_http_requests_total") == 9
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_corrupt_file_drops_the_folder_not_the_scrape(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    work(Recorder(str(good)), 3)
    work(Recorder(str(bad)), 3)
    (bad / "counter_999.db").write_bytes(b"\xff\xff\x00\x00" + b"\0" * 60)
    found = scrape(collector(good, bad))
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(bad)) == 0
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(good)) == 1
    assert total(found, "qatoolbox_http_requests_total") == 3


def test_plain_prometheus_client_files_are_merged_not_folded(tmp_path: Path) -> None:
    from exporter.instrument._store import write_file

    key = '["app_jobs", "app_jobs_total", {}, "Jobs."]'
    write_file(str(tmp_path / "counter_4242.db"), [(key, 5.0)])
    write_file(str(tmp_path / "gauge_livesum_4242.db"),
               [('["app_busy", "app_busy", {}, "Busy."]', 2.0)])
    found = scrape(collector(tmp_path))
    assert value(found, "app_jobs_total") == 5
    assert value(found, "app_busy") == 2
    assert (tmp_path / "counter_4242.db").exists()


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("app:\n  multiprocess_dirs: [/run/qatb/web, /run/qatb/celery]\n")
    config = load_config(str(path), {}, DEFAULTS)
    assert config.app.multiprocess_dirs == ("/run/qatb/web", "/run/qatb/celery")
    assert config.app.compact is True and config.enabled("app")
    path.write_text("app:\n  multiprocess_dirs: [relative, /a, /a/]\n  compact: maybe\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {}, DEFAULTS)
    text = str(err.value)
    assert "app.multiprocess_dirs[0]: expected an absolute path" in text
    assert "app.multiprocess_dirs[2]: duplicate folder" in text
    assert "app.compact: expected true or false" in text


def test_random_churn_matches_a_reference(tmp_path: Path) -> None:
    """Scrape after scrape, with workers growing new series, dying and folding, the merged
    result equals adding up every worker's own in-memory values (gauges: live ones only)."""
    import random

    from exporter.instrument._merge import Merger

    rng = random.Random(5)
    col = collector(tmp_path)
    live = [Recorder(str(tmp_path)) for _ in range(3)]
    dead: list[Recorder] = []
    for step in range(30):
        for rec in live:
            for _ in range(rng.randrange(4)):
                route = rng.choice(ROUTES[: 2 + step // 3])
                rec.request_started()
                rec.request_finished(route, rng.choice(("GET", "POST")),
                                     rng.choice((200, 404, 500)), rng.random() * 3,
                                     db_queries=rng.randrange(80), db_seconds=rng.random())
            if rng.random() < 0.2:
                rec.task_finished(rng.choice(("a", "b")), "succeeded", rng.random())
        if rng.random() < 0.3:
            victim = live.pop(rng.randrange(len(live)))
            victim.close()
            dead.append(victim)
            live.append(Recorder(str(tmp_path)))
        reference = Merger()
        for rec in live + dead:
            for prefix, file in rec.store.files().items():
                if prefix.startswith("gauge") and rec in dead:
                    continue
                reference.add(prefix, file.entries())
        registry = CollectorRegistry()
        registry.register(_Families(reference.families()))
        want = parse_metrics(generate_latest(registry).decode())
        got = {k: v for k, v in scrape(col).items() if not k[0].startswith("qatoolbox_app_")}
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


class _Families:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return self.families


def test_a_stuck_peer_never_blocks_the_scrape(tmp_path: Path) -> None:
    import fcntl

    from exporter.collectors.app import DIR_LOCK

    col = collector(tmp_path)
    gone = Recorder(str(tmp_path))
    work(gone, 4)
    gone.close()
    fd = os.open(str(tmp_path / DIR_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # A peer reading (shared lock): no fold now, the totals are still right.
        fcntl.flock(fd, fcntl.LOCK_SH)
        found = scrape(col)
        assert total(found, "qatoolbox_http_requests_total") == 4
        assert value(found, "qatoolbox_app_workers_folded_total", dir=str(tmp_path)) == 0
        # A peer stopped in the middle of a fold (exclusive lock): this folder is skipped.
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = scrape(col)
        assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(tmp_path)) == 0
        assert total(found, "qatoolbox_http_requests_total") == 0
    finally:
        os.close(fd)
    found = scrape(col)
    assert total(found, "qatoolbox_http_requests_total") == 4
    assert value(found, "qatoolbox_app_workers_folded_total", dir=str(tmp_path)) == 1


def test_a_file_being_created_reads_as_empty(tmp_path: Path) -> None:
    rec = Recorder(str(tmp_path))
    work(rec, 2)
    # A worker caught between creating its file and writing the header.
    ident = "4321-00112233aabbccdd"
    (tmp_path / f"counter_{ident}.db").write_bytes(b"")
    (tmp_path / f"histogram_{ident}.db").write_bytes(b"\0" * 4096)
    found = scrape(collector(tmp_path, compact=False))
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(tmp_path)) == 1
    assert total(found, "qatoolbox_http_requests_total") == 2
    # Its writer died there: the fold takes nothing from it and removes it.
    found = scrape(collector(tmp_path))
    assert total(found, "qatoolbox_http_requests_total") == 2
    assert not [p for p in tmp_path.iterdir() if ident in p.name]
