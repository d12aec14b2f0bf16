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
from exporter.collectors.app import AppCollector
from exporter.collectors.app_config import AppConfig
from exporter.collectors.app_fold import fold
from exporter.collectors.app_folder import accumulator_path
from exporter.config import ConfigError, load_config
from exporter.instrument import Recorder
from exporter.instrument.safefiles import read_entries
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


def test_an_accumulator_is_read_again_only_when_replaced(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Accumulators are replaced whole, never written in place: while one keeps its inode,
    mtime and size, its values are those read last and it is not read again; a new one (a
    fold) or a new mtime is read."""
    from exporter.instrument.readplan import read_values

    col = collector(tmp_path)
    live, dead = Recorder(str(tmp_path)), Recorder(str(tmp_path))
    work(live, 10)
    work(dead, 20)
    dead.close()
    assert total(scrape(col), "qatoolbox_http_requests_total") == 30  # dead is folded
    scrape(col)  # (the routes the fold met are decided after it: its layout grows once more)
    read: list[str] = []

    def counted(layout: Any, data: Any) -> Any:
        read.append(data.name)
        return read_values(layout, data)

    monkeypatch.setattr("exporter.instrument.filemerge.read_values", counted)
    work(live, 5)
    assert total(scrape(col), "qatoolbox_http_requests_total") == 35
    assert f"counter_{live.store.ident}.db" in read
    assert not [name for name in read if "folded" in name]
    read.clear()
    other = Recorder(str(tmp_path))
    work(other, 7)
    other.close()
    assert total(scrape(col), "qatoolbox_http_requests_total") == 42  # a new accumulator
    assert "counter_folded.db" in read
    read.clear()
    path = accumulator_path(str(tmp_path), "counter")
    os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns + 1_000_000))
    assert total(scrape(col), "qatoolbox_http_requests_total") == 42
    assert "counter_folded.db" in read


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


def test_200_restarts_keep_totals_and_files_read(tmp_path: Path) -> None:
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
    # histograms, dead workers' gauge series at 0), as without churn. That is what keeps the
    # scrape's cost flat across restarts; the time itself is measured in bench/app_overhead.py,
    # never asserted here.
    steady_found = scrape(collector(steady))
    files = value(found, "qatoolbox_app_multiprocess_files", dir=str(churn))
    steady_files = value(steady_found, "qatoolbox_app_multiprocess_files", dir=str(steady))
    assert files is not None and steady_files is not None
    assert files == steady_files + 3
    assert len([n for n in os.listdir(churn) if n.endswith(".db")]) == 3 * 3 + 3



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

    monkeypatch.setattr("exporter.instrument.store.os.rename", crash)
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
    from exporter.instrument.safefiles import write_file

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
    assert config.app.state_dir == ""
    path.write_text("app:\n  multiprocess_dirs: [relative, /a, /a/]\n  compact: maybe\n"
                    "  state_dir: var/lib/x\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {}, DEFAULTS)
    text = str(err.value)
    assert "app.multiprocess_dirs[0]: expected an absolute path" in text
    assert "app.multiprocess_dirs[2]: duplicate folder" in text
    assert "app.compact: expected true or false" in text
    assert 'app.state_dir: expected an absolute path, got "var/lib/x"' in text
    path.write_text("app:\n  state_dir: /var/lib/qatoolbox-exporter\n")
    assert load_config(str(path), {}, DEFAULTS).app.state_dir == "/var/lib/qatoolbox-exporter"


@pytest.fixture(params=[None, 64, 1000])
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """Files read in windows of the real size, or of a few entries (64 bytes: every entry
    larger than a window; 1000: entries across window edges)."""
    if request.param is not None:
        monkeypatch.setattr("exporter.instrument.safefiles.WINDOW", request.param)
        monkeypatch.setattr("exporter.instrument.readplan.WINDOW", request.param)
    return request.param  # type: ignore[no-any-return]


def test_random_churn_matches_a_reference(tmp_path: Path, window: int | None) -> None:
    """Scrape after scrape, with workers growing new series, dying and folding, the merged
    result equals adding up every worker's own in-memory values (gauges: live ones only)."""
    import random

    from exporter.instrument.merge import Merger

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

    from exporter.collectors.app_folder import DIR_LOCK

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


# --- the route cap: routes past MAX_ROUTES summed under "<other>", the kept set saved ------


def hit(rec: Recorder, route: str, requests: int, status: int = 200) -> None:
    for _ in range(requests):
        rec.request_started()
        rec.request_finished(route, "GET", status, 0.02, db_queries=2, db_seconds=0.001)


def by_route(found: dict[Any, float]) -> dict[str, float]:
    """Requests per route label."""
    out: dict[str, float] = {}
    for (name, labels), v in found.items():
        if name == "qatoolbox_http_requests_total":
            route = dict(labels)["route"]
            out[route] = out.get(route, 0.0) + v
    return out


def http(found: dict[Any, float]) -> dict[Any, float]:
    return {k: v for k, v in found.items() if k[0].startswith("qatoolbox_http_")}


def kept_of(found: dict[Any, float]) -> set[str]:
    return set(by_route(found)) - {"<other>"}


def ranked_folder(folder: Path) -> Recorder:
    """A live worker that served MAX_ROUTES + 10 routes, route i i+1 times (the last ones
    busiest), then traffic shifted: the ten quietest became the busiest."""
    from exporter.collectors.app_folder import MAX_ROUTES

    rec = Recorder(str(folder))
    for i in range(MAX_ROUTES + 10):
        hit(rec, f"r{i}/", i + 1)
    return rec


def shift(rec: Recorder) -> None:
    for i in range(10):
        hit(rec, f"r{i}/", 500)


def test_kept_routes_survive_a_restart(tmp_path: Path) -> None:
    from exporter.collectors.app_folder import MAX_ROUTES, ROUTES_FILE

    rec = ranked_folder(tmp_path)
    try:
        before = scrape(collector(tmp_path))
        kept = kept_of(before)
        assert kept == {f"r{i}/" for i in range(10, MAX_ROUTES + 10)}  # the busiest at start
        assert (tmp_path / ROUTES_FILE).exists()
        shift(rec)
        first = collector(tmp_path)
        running = scrape(first)  # (a new instance adopts the saved set too)
        assert kept_of(running) == kept
        # The restart: a new collector on the same folder serves exactly what the running
        # one serves, though the ranking is now another. No route moved.
        restarted = collector(tmp_path)
        assert http(scrape(restarted)) == http(running)
        assert http(scrape(restarted)) == http(scrape(first))
        # Control: without the saved set a restart would rank again and move ten routes.
        (tmp_path / ROUTES_FILE).unlink()
        ranked_again = kept_of(scrape(collector(tmp_path, compact=False)))
        assert {f"r{i}/" for i in range(10)} <= ranked_again != kept
    finally:
        rec.close()


def test_kept_routes_saved_in_state_dir_when_the_folder_is_not_written(tmp_path: Path) -> None:
    from exporter.collectors.app_folder import ROUTES_FILE, STATE_ROUTES_FILE

    folder, state = tmp_path / "web", tmp_path / "state"
    folder.mkdir()
    state.mkdir()

    def col() -> AppCollector:
        return AppCollector(AppConfig(multiprocess_dirs=(str(folder),), compact=False,
                                      state_dir=str(state)))

    rec = ranked_folder(folder)
    try:
        before = scrape(col())
        assert (state / STATE_ROUTES_FILE).exists()
        assert not (folder / ROUTES_FILE).exists()
        shift(rec)
        running = col()
        assert kept_of(scrape(running)) == kept_of(before)
        assert http(scrape(col())) == http(scrape(running))
    finally:
        rec.close()


def test_a_route_past_the_cap_stays_folded_across_restarts(tmp_path: Path) -> None:
    """Once the set is full a new route goes to "<other>", however busy, and stays there
    after a restart (its counts never move out of "<other>")."""
    rec = ranked_folder(tmp_path)
    try:
        kept = kept_of(scrape(collector(tmp_path)))
        hit(rec, "new/", 5000)
        col = collector(tmp_path)
        found = scrape(col)
        assert kept_of(found) == kept and "new/" not in by_route(found)
        other = by_route(found)["<other>"]
        hit(rec, "new/", 10)
        assert by_route(scrape(collector(tmp_path)))["<other>"] == other + 10
    finally:
        rec.close()


def test_routes_kept_while_there_is_room_are_saved_as_they_come(tmp_path: Path) -> None:
    from exporter.collectors.app_folder import ROUTES_FILE
    from exporter.collectors.app_routes import decode_routes

    rec = Recorder(str(tmp_path))
    try:
        col = collector(tmp_path)
        hit(rec, "a/", 1)
        scrape(col)
        assert decode_routes((tmp_path / ROUTES_FILE).read_bytes()) == ["a/"]
        hit(rec, "b/", 1)
        scrape(col)
        assert decode_routes((tmp_path / ROUTES_FILE).read_bytes()) == ["a/", "b/"]
        # gunicorn empties the folder when it starts: the set is written again.
        (tmp_path / ROUTES_FILE).unlink()
        scrape(col)
        assert decode_routes((tmp_path / ROUTES_FILE).read_bytes()) == ["a/", "b/"]
    finally:
        rec.close()


def test_two_exporters_on_one_folder_keep_the_same_routes(tmp_path: Path) -> None:
    """The second exporter adopts the set the first saved, though it would rank otherwise."""
    rec = ranked_folder(tmp_path)
    try:
        first = collector(tmp_path)
        kept = kept_of(scrape(first))
        shift(rec)
        second = collector(tmp_path)
        assert kept_of(scrape(second)) == kept
        assert http(scrape(second)) == http(scrape(first))
    finally:
        rec.close()


def test_routes_of_a_folder_read_halfway_are_decided_when_it_is_read(tmp_path: Path) -> None:
    """A folder that cannot be served decides no route: once it can, the busiest are kept."""
    from exporter.collectors.app_folder import MAX_ROUTES

    rec = ranked_folder(tmp_path)
    bad = tmp_path / "counter_4270.db"
    bad.write_bytes((4096).to_bytes(4, "little") + b"\0" * 4)  # header beyond the file
    try:
        col = collector(tmp_path)
        found = scrape(col)
        assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(tmp_path)) == 0
        shift(rec)
        bad.unlink()
        found = scrape(col)
        ranked = sorted(range(MAX_ROUTES + 10), key=lambda i: -(i + 1 + (500 if i < 10 else 0)))
        assert kept_of(found) == {f"r{i}/" for i in ranked[:MAX_ROUTES]}
        assert sum(by_route(found).values()) == sum(range(1, MAX_ROUTES + 11)) + 10 * 500
    finally:
        rec.close()


_RELABELLED: dict[tuple[str, bool], str] = {}
_ROUTES: dict[str, str | None] = {}


def _relabelled(key: str, kept: set[str]) -> str:
    """key with its route renamed "<other>" when the route is not kept (memoised: the same
    keys come back step after step)."""
    import json

    if key not in _ROUTES:
        _ROUTES[key] = json.loads(key)[2].get("route")
    route = _ROUTES[key]
    if route is None or route in kept or route == "<other>":
        return key
    if (key, False) not in _RELABELLED:
        metric, sample, labels, help_text = json.loads(key)
        labels["route"] = "<other>"
        _RELABELLED[(key, False)] = json.dumps([metric, sample, labels, help_text],
                                               sort_keys=True)
    return _RELABELLED[(key, False)]


def test_many_routes_churn_matches_a_reference(tmp_path: Path, window: int | None) -> None:
    """Workers serving up to 75 routes, dying and folding: every scrape equals adding up the
    workers' own values with the routes the collector does not keep renamed "<other>"; while
    there is room every route is kept, the kept set only grows, to MAX_ROUTES, and a route
    once summed under "<other>" is never served under its own label."""
    import random

    from exporter.collectors.app_folder import MAX_ROUTES
    from exporter.instrument.merge import Merger

    rng = random.Random(7)
    col = collector(tmp_path)
    reference = Merger()  # one, for its cache of parsed keys
    live = [Recorder(str(tmp_path)) for _ in range(3)]
    dead: list[Recorder] = []
    seen: set[str] = set()
    kept: set[str] = set()
    folded: set[str] = set()
    try:
        for step in range(14):
            for rec in live:
                for _ in range(rng.randrange(30)):
                    route = f"r{rng.randrange(10 + 5 * step)}/"
                    seen.add(route)
                    hit(rec, route, 1, rng.choice((200, 500)))
            if rng.random() < 0.3:
                victim = live.pop(rng.randrange(len(live)))
                victim.close()
                dead.append(victim)
                live.append(Recorder(str(tmp_path)))
            got = http(samples(col.collect()))
            now_kept = kept_of(got)
            assert kept <= now_kept and len(now_kept) <= MAX_ROUTES
            assert len(now_kept) == MAX_ROUTES or now_kept == seen
            assert not now_kept & folded
            kept, folded = now_kept, seen - now_kept
            reference.reset()
            for rec in live + dead:
                for prefix, file in rec.store.files().items():
                    if prefix.startswith("gauge") and rec in dead:
                        continue
                    reference.add(prefix, [(_relabelled(k, kept), v) for k, v in file.entries()])
            want = http(samples(reference.families()))
            assert got.keys() == want.keys()
            for key, expected in want.items():
                assert got[key] == pytest.approx(expected, rel=1e-9, abs=1e-9), key
        assert len(kept) == MAX_ROUTES and folded
    finally:
        for rec in live:
            rec.close()


def samples(families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of families, without encoding them."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families for sample in family.samples}


@pytest.mark.integration
def test_kept_routes_survive_an_exporter_process_restart(
        workdir: Path, exporter_factory: Any) -> None:
    """The real exporter, stopped (SIGTERM) and started again after the ranking changed:
    every http sample it serves is the same as before the restart."""
    from exporter.collectors.app_folder import ROUTES_FILE

    folder = workdir / "web"
    folder.mkdir()
    config = {"app": {"multiprocess_dirs": [str(folder)]},
              "collectors": {"host": False, "process": False, "postgres": False,
                             "business": False, "redis": False}}
    rec = ranked_folder(folder)
    try:
        first = exporter_factory(config=config)
        kept = {labels["route"] for _, labels in first.scrape().series(
            "qatoolbox_http_requests_total")} - {"<other>"}
        assert len(kept) == 50 and "r0/" not in kept
        shift(rec)
        before = http(first.scrape().samples)
        assert (folder / ROUTES_FILE).exists()
        assert first.stop() == 0
        second = exporter_factory(config=config)
        assert http(second.scrape().samples) == before
    finally:
        rec.close()
