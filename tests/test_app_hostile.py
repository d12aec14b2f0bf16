"""The app's metrics folder filled by an attacker with the web user's rights (issues 14, 22).

Every test plants the exact entries of the attack report in a folder and runs the real
collector, or the real exporter process where shutdown and memory are the point.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import COLLECTORS
from exporter.collectors.app import AppCollector
from exporter.collectors.app_config import AppConfig
from exporter.collectors.app_folder import DIR_LOCK, MAX_ROUTES, ROUTES_FILE, accumulator_path
from exporter.collectors.app_routes import decode_routes, encode_routes
from exporter.config import Config
from exporter.instrument import Recorder
from exporter.instrument.fileformat import mmap_key
from exporter.instrument.safefiles import MAX_FILE_BYTES, REFUSAL_REASONS, write_file
from tests.harness import ExporterProcess, wait_for
from tests.test_app import collector, scrape, total, value, work

SECRET = b"db_password = hunter2-very-secret\n"
ONLY_APP = {"host": False, "process": False, "postgres": False, "business": False,
            "redis": False}
# The exporter's default scrape.timeout: what "answers within the budget" means.
BUDGET = 4.0
WORKER = "4242-0123456789abcdef"  # a writer's ident with no lock: a dead worker


def dead_worker(folder: Path, requests: int) -> str:
    """A worker that recorded requests, then exited (its files wait to be folded)."""
    rec = Recorder(str(folder))
    try:
        work(rec, requests)
    finally:
        rec.close()
    return rec.store.ident


def rejected(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], folder: Path,
             reason: str) -> float | None:
    return value(found, "qatoolbox_app_files_rejected_total", dir=str(folder), reason=reason)


def refusal_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.getMessage() == "app metrics file refused" and getattr(r, "file", "") == name]


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-only file outside the folder, like the attack's 35-byte config file."""
    path = tmp_path / "victim.conf"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "web"
    path.mkdir()
    return path


def _link(folder: Path, name: str, target: Path) -> str:
    (folder / name).symlink_to(target)
    return name


def _replace_dead_workers_lock(folder: Path, target: Path) -> str:
    """A dead worker (3 requests) whose lock file is swapped for a symlink."""
    ident = dead_worker(folder, 3)
    lock = folder / f"{ident}.lock"
    lock.unlink()
    lock.symlink_to(target)
    return lock.name


# (plant the symlink, counted as refused, requests planted with it): every name the collector
# opens, writes, renames or deletes, and the temporary name the old writer used
# (`<path>.<pid>.tmp`, opened with O_CREAT|O_TRUNC: the write that overwrote the attack's
# victim). The collector runs in this process, so os.getpid() is its pid.
SYMLINKS: dict[str, tuple[Callable[[Path, Path], str], bool, int]] = {
    "counter accumulator": (lambda f, t: _link(f, "counter_folded.db", t), True, 0),
    "histogram accumulator": (lambda f, t: _link(f, "histogram_folded.db", t), True, 0),
    "gauge accumulator": (lambda f, t: _link(f, "gauge_livesum_folded.db", t), True, 0),
    "folder lock": (lambda f, t: _link(f, DIR_LOCK, t), True, 0),
    "old tmp name": (lambda f, t: _link(f, f"counter_folded.db.{os.getpid()}.tmp", t), False,
                     0),
    "dead worker's data file": (lambda f, t: _link(f, f"counter_{WORKER}.db", t), True, 0),
    "bare lock": (lambda f, t: _link(f, "4243-0123456789abcdef.lock", t), True, 0),
    "dead worker's lock": (_replace_dead_workers_lock, True, 3),
    "saved routes": (lambda f, t: _link(f, ROUTES_FILE, t), True, 0),
}


@pytest.mark.parametrize("points_at", ["victim", "missing file"])
@pytest.mark.parametrize("case", list(SYMLINKS))
def test_symlinks_never_lead_outside_the_folder(case: str, points_at: str, folder: Path,
                                                victim: Path, tmp_path: Path) -> None:
    """A symlink at any name the collector touches, with a dead worker to fold at every
    scrape: the victim it points to is unchanged byte for byte, a missing file it points to
    is not created, the folder's counts are all served and the link is counted as refused."""
    plant, counted, expected = SYMLINKS[case]
    nowhere = tmp_path / "created-by-the-exporter"
    name = plant(folder, victim if points_at == "victim" else nowhere)
    col = collector(folder)
    try:
        for _ in range(3):
            expected += 5
            dead_worker(folder, 5)
            found = scrape(col)
            assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
            assert total(found, "qatoolbox_http_requests_total") == expected
        assert victim.read_bytes() == SECRET
        assert victim.stat().st_mode & 0o777 == 0o600
        assert not nowhere.exists()
        if counted:
            assert (rejected(found, folder, "symlink") or 0) >= 1
    finally:
        if (folder / name).is_symlink():
            (folder / name).unlink()


def test_a_planted_accumulator_symlink_is_replaced_not_followed(folder: Path,
                                                                victim: Path) -> None:
    """The new accumulator is renamed over the link: the link is gone, the victim intact."""
    (folder / "counter_folded.db").symlink_to(victim)
    dead_worker(folder, 4)
    found = scrape(collector(folder))
    assert total(found, "qatoolbox_http_requests_total") == 4
    assert not (folder / "counter_folded.db").is_symlink()
    assert victim.read_bytes() == SECRET
    # Temporary names are random, and none is left behind.
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


FIFO_CASES = {
    "data files": ["counter_4250.db", f"histogram_{WORKER}.db", "counter_folded.db"],
    # ... and the dead worker's own lock, swapped for a FIFO.
    "lock files": ["4251-0123456789abcdef.lock", ".4252-0123456789abcdef.lock.tmp"],
    # Without a usable folder lock nothing is folded (so no bare lock is opened either).
    "folder lock": [DIR_LOCK],
    "saved routes": [ROUTES_FILE],
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(FIFO_CASES))
def test_fifos_never_block_a_scrape_or_shutdown(
        case: str, workdir: Path, exporter_factory: Callable[..., ExporterProcess]) -> None:
    """FIFOs named like data and lock files: every scrape answers within the budget with the
    rest of the folder served, and SIGTERM stops the exporter within 5 s."""
    metrics = workdir / "web"
    metrics.mkdir()
    live = Recorder(str(metrics))
    try:
        work(live, 7)
        ident = dead_worker(metrics, 5)
        for name in FIFO_CASES[case]:
            os.mkfifo(metrics / name)
        if case == "lock files":
            (metrics / f"{ident}.lock").unlink()
            os.mkfifo(metrics / f"{ident}.lock")
        old_tmp = metrics / ".4252-0123456789abcdef.lock.tmp"
        if old_tmp.exists():  # past the minute a starting writer is given
            os.utime(old_tmp, (time.time() - 120, time.time() - 120))
        exporter = exporter_factory(config={"app": {"multiprocess_dirs": [str(metrics)]},
                                            "collectors": ONLY_APP})
        for _ in range(3):
            started = time.monotonic()
            found = exporter.scrape(timeout=30)
            assert time.monotonic() - started < BUDGET
            assert found.value("qatoolbox_exporter_collector_success", collector="app") == 1
            assert found.value("qatoolbox_app_multiprocess_dir_up", dir=str(metrics)) == 1
            assert sum(v for (n, _), v in found.samples.items()
                       if n == "qatoolbox_http_requests_total") == 12
        assert (found.value("qatoolbox_app_files_rejected_total", dir=str(metrics),
                            reason="not_regular") or 0) >= 1
        wait_for(lambda: all(f"file={name} reason=not_regular" in exporter.logs()
                             for name in FIFO_CASES[case]), 10, "log lines naming the FIFOs")
        assert exporter.proc is not None
        started = time.monotonic()
        exporter.proc.send_signal(signal.SIGTERM)
        try:
            exporter.proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not stop the exporter within 5 s")
        assert time.monotonic() - started < 5
    finally:
        live.close()


def _peak_rss_mb(exporter: ExporterProcess) -> float:
    assert exporter.proc is not None
    status = Path(f"/proc/{exporter.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) / 1024


def _sparse_gib(folder: Path) -> str:
    """1 GiB, all holes but a header declaring every byte used; named like a dead worker's
    file, which the fold used to read whole."""
    name = f"counter_{WORKER}.db"
    with open(folder / name, "wb") as handle:
        handle.write((1 << 30).to_bytes(4, "little") + b"\0" * 4)
        handle.truncate(1 << 30)
    return name


def _dev_zero(folder: Path) -> str:
    """Named like a dead worker's file too: the fold used to read it to the end."""
    name = f"histogram_{WORKER}.db"
    (folder / name).symlink_to("/dev/zero")
    return name


BLOAT = {"1 GiB sparse file": (_sparse_gib, "too_large", 0.0),
         "symlink to /dev/zero": (_dev_zero, "symlink", 1.0)}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BLOAT))
def test_huge_entries_are_not_read(case: str, workdir: Path,
                                   exporter_factory: Callable[..., ExporterProcess]) -> None:
    """A 1 GiB sparse file and a symlink to /dev/zero: the scrapes answer and the exporter's
    peak RSS stays under 100 MB. The sparse file is a regular file of the app's, too large to
    count: the folder serves nothing (dir_up 0) rather than totals without it."""
    plant, reason, up = BLOAT[case]
    metrics = workdir / "web"
    metrics.mkdir()
    dead_worker(metrics, 5)
    name = plant(metrics)
    exporter = exporter_factory(config={"app": {"multiprocess_dirs": [str(metrics)]},
                                        "collectors": ONLY_APP})
    scrapes = [exporter.scrape(timeout=60) for _ in range(3)]
    assert _peak_rss_mb(exporter) < 100
    for found in scrapes:
        assert found.value("qatoolbox_exporter_collector_success", collector="app") == 1
        assert found.value("qatoolbox_app_multiprocess_dir_up", dir=str(metrics)) == up
    assert found.value("qatoolbox_app_files_rejected_total", dir=str(metrics),
                       reason=reason) == 3
    if up:
        assert sum(v for (n, _), v in found.samples.items()
                   if n == "qatoolbox_http_requests_total") == 5
    wait_for(lambda: f"file={name} " in exporter.logs(), 10, "a log line naming the file")
    assert (metrics / name).is_symlink() or (metrics / name).stat().st_size == 1 << 30


def _spoofing_files(folder: Path) -> None:
    """The exporter's own build_info, and the redis collector's Celery names, next to the
    app's own metrics in the same files."""
    write_file(str(folder / "gauge_livesum_4260.db"), [
        (mmap_key("qatoolbox_exporter_build_info", "qatoolbox_exporter_build_info",
                  {"version": "6.6.6", "python_version": "0"}, "Spoofed."), 1.0),
        (mmap_key("qatoolbox_celery_queue_length", "qatoolbox_celery_queue_length",
                  {"queue": "celery"}, "Spoofed."), 999.0),
        (mmap_key("app_busy_workers", "app_busy_workers", {}, "Busy."), 2.0),
    ])
    write_file(str(folder / "counter_4260.db"), [
        (mmap_key("app_jobs", "app_jobs_total", {}, "Jobs."), 5.0),
        (mmap_key("qatoolbox_celery_unacked_messages", "qatoolbox_celery_unacked_messages",
                  {}, "Spoofed."), 1.0),
    ])


@pytest.mark.integration
def test_the_folder_cannot_spoof_the_exporters_families(
        workdir: Path, exporter_factory: Callable[..., ExporterProcess]) -> None:
    metrics = workdir / "web"
    metrics.mkdir()
    _spoofing_files(metrics)
    live = Recorder(str(metrics))
    try:
        live.task_finished("chat.cleanup", "succeeded", 0.5)  # the app's own celery names
        exporter = exporter_factory(config={"app": {"multiprocess_dirs": [str(metrics)]},
                                            "collectors": ONLY_APP})
        found = exporter.scrape()
        check = subprocess.run(["promtool", "check", "metrics"], input=found.text,
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
            check.stdout + check.stderr
        builds = [lbl for n, lbl in found.series("qatoolbox_exporter_build_info")]
        assert len(builds) == 1 and builds[0]["version"] != "6.6.6"
        assert not found.series("qatoolbox_celery_queue_length")
        assert not found.series("qatoolbox_celery_unacked_messages")
        # Only the offending entries are refused: the rest of those files is served.
        assert found.value("app_jobs_total") == 5
        assert found.value("app_busy_workers") == 2
        assert found.value("qatoolbox_celery_tasks_total", task="chat.cleanup",
                           state="succeeded") == 1
        assert found.value("qatoolbox_app_multiprocess_dir_up", dir=str(metrics)) == 1
        assert found.value("qatoolbox_app_files_rejected_total", dir=str(metrics),
                           reason="reserved_name") == 2
        wait_for(lambda: "file=gauge_livesum_4260.db reason=reserved_name" in exporter.logs()
                 and "file=counter_4260.db reason=reserved_name" in exporter.logs(), 10,
                 "log lines naming the files")
        logs = exporter.logs()
        assert "qatoolbox_exporter_build_info" in logs
        exporter.scrape()
        assert exporter.logs().count("file=gauge_livesum_4260.db") == 1  # logged once
    finally:
        live.close()


def test_business_families_are_reserved_when_business_runs(folder: Path) -> None:
    """The factory hands the business queries' families to the app collector."""
    write_file(str(folder / "gauge_livesum_4261.db"), [
        (mmap_key("qatoolbox_users", "qatoolbox_users", {"state": "active"}, "Spoofed."), 1e9),
        (mmap_key("qatoolbox_signups", "qatoolbox_signups", {}, "The app's own."), 3.0),
    ])
    write_file(str(folder / "counter_4261.db"), [
        (mmap_key("qatoolbox_chat_messages", "qatoolbox_chat_messages_total", {}, "Spoofed."),
         1.0),
    ])
    app = AppConfig(multiprocess_dirs=(str(folder),))
    with_business = COLLECTORS["app"].factory(Config(app=app, collectors={"business": True}))
    found = scrape(with_business)  # type: ignore[arg-type]
    assert value(found, "qatoolbox_users", state="active") is None
    assert value(found, "qatoolbox_chat_messages_total") is None
    assert value(found, "qatoolbox_signups") == 3
    assert rejected(found, folder, "reserved_name") == 2
    # Without the business collector nobody else serves those names.
    alone = COLLECTORS["app"].factory(Config(app=app, collectors={"business": False}))
    assert value(scrape(alone), "qatoolbox_users", state="active") == 1e9  # type: ignore[arg-type]


def _entry(key: bytes, number: float = 1.0) -> bytes:
    """One entry in the file layout, built by hand (bytes the encoder would never write)."""
    padded = key + b" " * (8 - (len(key) + 4) % 8)
    return len(key).to_bytes(4, "little") + padded + struct.pack("dd", number, 0.0)


def _file(body: bytes, used: int | None = None) -> bytes:
    used = 8 + len(body) if used is None else used
    return used.to_bytes(4, "little") + b"\0" * 4 + body


MALFORMED = {
    "header beyond the file": _file(b"", used=4096),
    "entry running past the used part": _file(b"\xff\x00\x00\x00" + b"x" * 20),
    "header cut inside an entry's length": _file(b"", used=10) + b"\0" * 6,
    "negative length": _file(b"\xf0\xff\xff\xff" + b"\0" * 28),
    "key not UTF-8": _file(_entry(b'["a\xff", "a", {}, ""]')),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_takes_its_folder_down_and_is_named(
        case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The folder serves nothing (not totals without that file, which would look like a
    counter reset); other folders are served; the log names the file, once."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    dead_worker(good, 3)
    dead_worker(bad, 4)
    (bad / "counter_4270.db").write_bytes(MALFORMED[case])
    col = collector(good, bad)
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        for _ in range(2):
            found = scrape(col)
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(bad)) == 0
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(good)) == 1
    assert total(found, "qatoolbox_http_requests_total") == 3
    assert rejected(found, bad, "malformed") == 2
    lines = refusal_lines(caplog, "counter_4270.db")
    assert len(lines) == 1 and getattr(lines[0], "reason", "") == "malformed"
    assert getattr(lines[0], "dir", "") == str(bad)


BAD_ENTRIES = {
    "key nested 100,000 deep": "[" * 100_000,
    "metric name with a space": '["app jobs", "app jobs_total", {}, ""]',
    "metric name with a newline": '["app_jobs\\n# HELP x", "app_jobs\\n# HELP x_total", {}, ""]',
    "label name with a dash": '["app_jobs", "app_jobs_total", {"a-b": "1"}, ""]',
    "reserved label name": '["app_jobs", "app_jobs_total", {"__name__": "x"}, ""]',
    "sample of another family": '["app_jobs", "up", {}, ""]',
    "le outside a histogram bucket": '["app_jobs", "app_jobs_total", {"le": "1.0"}, ""]',
    "a marker in a worker's file": '["__folded__", "1-0123456789abcdef", {}, ""]',
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_entries_the_text_format_cannot_carry_are_dropped(
        case: str, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Only the entry goes: the folder stays up, the file's other entries and the rest of the
    folder are served, and the output passes promtool."""
    dead_worker(folder, 3)
    write_file(str(folder / "counter_4271.db"), [
        (BAD_ENTRIES[case], 7.0), (mmap_key("app_ok", "app_ok_total", {}, "Fine."), 2.0)])
    col = collector(folder)
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        registry = CollectorRegistry()
        registry.register(_Wrap(col))
        text = generate_latest(registry).decode()
    found = scrape(col)
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
    assert value(found, "app_ok_total") == 2
    assert total(found, "qatoolbox_http_requests_total") == 3
    assert rejected(found, folder, "bad_entry") == 2
    assert len(refusal_lines(caplog, "counter_4271.db")) == 1
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


class _Wrap:
    def __init__(self, col: AppCollector) -> None:
        self.col = col

    def collect(self) -> Any:
        return list(self.col.collect())


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another owner needs root")


def _owned_by_someone_else(folder: Path) -> str:
    _needs_root()
    write_file(str(folder / "counter_4280.db"), [(mmap_key("a", "a_total", {}, ""), 1.0)])
    os.chown(folder / "counter_4280.db", 54321, 54321)
    return "counter_4280.db"


def _hard_link(folder: Path) -> str:
    outside = folder.parent / "outside.db"
    write_file(str(outside), [(mmap_key("a", "a_total", {}, ""), 1.0)])
    os.link(outside, folder / "counter_4281.db")
    return "counter_4281.db"


def _folder_entry(folder: Path) -> str:
    (folder / "counter_4282.db").mkdir()
    return "counter_4282.db"


def _too_large(folder: Path) -> str:
    with open(folder / "counter_4283.db", "wb") as handle:
        handle.write((16).to_bytes(4, "little") + b"\0" * 12)
        handle.truncate(MAX_FILE_BYTES + 1)
    return "counter_4283.db"


def _reserved(folder: Path) -> str:
    write_file(str(folder / "counter_4284.db"), [
        (mmap_key("qatoolbox_app_workers_folded", "qatoolbox_app_workers_folded_total",
                  {"dir": "/x"}, ""), 1e6)])
    return "counter_4284.db"


# (plant, reason, dir_up): refused regular files that could be the app's take the folder down.
REASONS: dict[str, tuple[Callable[[Path], str], str, float]] = {
    "symlink": (lambda f: _link(f, "counter_4286.db", Path("/etc/hostname")), "symlink", 1.0),
    "folder named like a file": (_folder_entry, "not_regular", 1.0),
    "hard link": (_hard_link, "hardlink", 0.0),
    "another owner": (_owned_by_someone_else, "owner", 0.0),
    "too large": (_too_large, "too_large", 0.0),
    "reserved name": (_reserved, "reserved_name", 1.0),
}


@pytest.mark.parametrize("case", list(REASONS))
def test_each_refusal_is_counted_under_its_reason(
        case: str, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    plant, reason, up = REASONS[case]
    dead_worker(folder, 2)
    name = plant(folder)
    col = collector(folder)
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        for _ in range(2):
            found = scrape(col)
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == up
    assert {r: rejected(found, folder, r) for r in REFUSAL_REASONS} == \
        {r: 2.0 if r == reason else 0.0 for r in REFUSAL_REASONS}
    lines = refusal_lines(caplog, name)
    assert len(lines) == 1 and getattr(lines[0], "reason", "") == reason
    if up:
        assert total(found, "qatoolbox_http_requests_total") == 2
    assert os.path.lexists(folder / name)  # refused entries are left where they are


def test_folder_checks_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Mode and kind of each folder are checked when the collector is built (one warning
    naming the folder and what is wrong) and at every scrape."""
    open_to_all, sticky, linked, target = (tmp_path / n for n in
                                           ("open", "sticky", "linked", "target"))
    for path in (open_to_all, sticky, target):
        path.mkdir()
        dead_worker(path, 2)
    open_to_all.chmod(0o777)
    sticky.chmod(0o1777)
    linked.symlink_to(target, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        col = collector(open_to_all, sticky, linked)
    by_dir = {getattr(r, "dir", ""): r for r in caplog.records}
    assert "writable by every user" in getattr(by_dir[str(open_to_all)], "problem", "")
    assert "symlink" in getattr(by_dir[str(linked)], "problem", "")
    assert "sticky" in by_dir[str(sticky)].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        found = scrape(col)
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(open_to_all)) == 0
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(linked)) == 0
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(sticky)) == 1
    assert total(found, "qatoolbox_http_requests_total") == 2
    assert not caplog.records  # known problems are not logged again every scrape
    open_to_all.chmod(0o755)
    found = scrape(col)
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(open_to_all)) == 1


def test_a_group_writable_folder_of_the_exporters_own_is_warned_about(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Owned by the exporter's user (or root), written by the app as a group member: the
    app's files would all be refused for their owner."""
    folder.chmod(0o770)
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        collector(folder)
    assert any("writable by its group" in r.getMessage() and getattr(r, "dir", "") ==
               str(folder) for r in caplog.records)
    # The app's user as the owner, the exporter in the group: as documented, no warning.
    _needs_root()
    caplog.clear()
    os.chown(folder, 54321, os.getegid())
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        collector(folder)
    assert not caplog.records


def test_a_workers_file_cannot_mark_others_as_folded(folder: Path) -> None:
    """Markers are the exporter's bookkeeping: a worker's file claiming a live worker's file
    is already in the accumulator must not hide that worker's counts; nor may an accumulator
    replaced by the app, with markers spelled differently, break the fold."""
    live = Recorder(str(folder))
    try:
        work(live, 6)
        spoof = '["__folded__", "%s", {}, ""]' % live.store.ident  # noqa: UP031
        write_file(str(folder / f"counter_{WORKER}.db"), [
            (spoof, 1.0), (mmap_key("qatoolbox_http_requests", "qatoolbox_http_requests_total",
                                    {"route": "x/", "method": "GET", "status": "200"}, ""), 1.0)])
        col = collector(folder)
        found = scrape(col)
        assert total(found, "qatoolbox_http_requests_total") == 7
        found = scrape(col)
        assert total(found, "qatoolbox_http_requests_total") == 7
        # The app rewrites the accumulator with a marker in other spacing, for a file that
        # is gone: the fold drops it instead of failing.
        write_file(accumulator_path(str(folder), "counter"), [
            ('["__folded__","9-0123456789abcdef",{},""]', 1.0),
            (mmap_key("qatoolbox_http_requests", "qatoolbox_http_requests_total",
                      {"route": "x/", "method": "GET", "status": "200"}, ""), 1.0)])
        dead_worker(folder, 2)
        found = scrape(col)
        assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
        assert total(found, "qatoolbox_http_requests_total") == 9
    finally:
        live.close()


def test_stale_temporary_files_are_removed(folder: Path) -> None:
    stale = folder / ".counter_folded.db.0123456789abcdef.tmp"
    stale.write_bytes(b"half an accumulator")
    other = folder / "notes.tmp"  # not ours: left alone
    other.write_bytes(b"")
    dead_worker(folder, 1)
    scrape(collector(folder))
    assert not stale.exists() and other.exists()


def test_a_folder_of_too_many_entries_is_not_read(folder: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("exporter.collectors.app_folder.MAX_DIR_ENTRIES", 40)
    dead_worker(folder, 1)
    for i in range(40):
        (folder / f"junk-{i}").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        found = scrape(collector(folder))
    assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 0
    assert any("more than 40 entries" in getattr(r, "problem", "") for r in caplog.records)


def test_refusal_lines_are_rate_limited(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """50 symlinks: 20 lines and one saying more were held back; counted all the same."""
    for i in range(50):
        (folder / f"counter_{4300 + i}.db").symlink_to("/dev/null")
    col = collector(folder)
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        for _ in range(2):
            found = scrape(col)
    assert len([r for r in caplog.records if r.getMessage() == "app metrics file refused"]) == 20
    assert len([r for r in caplog.records if r.getMessage().startswith("more app")]) == 1
    assert rejected(found, folder, "symlink") == 100


def test_entry_names_in_log_lines_are_escaped(folder: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    name = "counter_4399\r\x1b[2Jlevel=error.db"
    (folder / name).symlink_to("/dev/null")
    with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
        scrape(collector(folder))
    files = [getattr(r, "file", "") for r in caplog.records]
    assert files == ["counter_4399\\r\\x1b[2Jlevel=error.db"]


def test_scrape_with_all_attacks_at_once(folder: Path, victim: Path) -> None:
    """Everything in one folder, folded over several scrapes: the victim is intact and the
    app's counts are exact (the sparse file is left out: it takes the folder down)."""
    expected = 0
    (folder / "counter_folded.db").symlink_to(victim)
    (folder / f"counter_folded.db.{os.getpid()}.tmp").symlink_to(victim)
    (folder / DIR_LOCK).symlink_to(victim)
    (folder / "gauge_livesum_folded.db").symlink_to("/dev/zero")
    (folder / f"histogram_{WORKER}.db").symlink_to("/dev/urandom")
    (folder / "4243-0123456789abcdef.lock").symlink_to(victim)
    _spoofing_files(folder)
    col = collector(folder)
    for _ in range(3):
        expected += 4
        dead_worker(folder, 4)
        found = scrape(col)
        assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
        assert total(found, "qatoolbox_http_requests_total") == expected
    assert victim.read_bytes() == SECRET
    assert value(found, "qatoolbox_exporter_build_info", version="6.6.6",
                 python_version="0") is None


def _routes_json(routes: list[object]) -> bytes:
    import json

    return json.dumps({"version": 1, "routes": routes}).encode()


# (content planted as the saved route set, the reason it is refused for)
TAMPERED_ROUTES: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"\xff\xfe not json", "malformed"),
    "nested 100,000 deep": (b"[" * 100_000, "malformed"),
    "a list, not the document": (b'["api/"]', "malformed"),
    "another version": (b'{"version": 2, "routes": []}', "malformed"),
    "an extra key": (b'{"version": 1, "routes": [], "kept": ["x"]}', "malformed"),
    "routes not a list": (b'{"version": 1, "routes": "api/"}', "malformed"),
    "a number for a route": (_routes_json([1]), "malformed"),
    "an empty route": (_routes_json([""]), "malformed"),
    "the overflow route": (_routes_json(["<other>"]), "malformed"),
    "a lone surrogate": (b'{"version": 1, "routes": ["\\ud800"]}', "malformed"),
    "a route twice": (_routes_json(["a/", "a/"]), "malformed"),
    "more routes than the cap": (_routes_json([f"x{i}/" for i in range(MAX_ROUTES + 1)]),
                                 "malformed"),
    "a route of 3,000 characters": (_routes_json(["a" * 3000]), "malformed"),
    "over 1 MiB": (_routes_json(["a" * (1 << 20)]), "too_large"),
}


@pytest.mark.parametrize("case", list(TAMPERED_ROUTES))
def test_a_tampered_route_set_is_refused_and_replaced(
        case: str, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The saved set is the app user's to spoil: a bad one is refused whole (counted, logged
    once, the folder stays up and every count is served), the routes are ranked afresh and
    a valid set is written over it."""
    content, reason = TAMPERED_ROUTES[case]
    live = Recorder(str(folder))
    try:
        work(live, 36)  # 12 routes
        (folder / ROUTES_FILE).write_bytes(content)
        col = collector(folder)
        with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
            found = scrape(col)
            again = scrape(col)
        for result in (found, again):
            assert value(result, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
            assert total(result, "qatoolbox_http_requests_total") == 36
            assert rejected(result, folder, reason) == 1  # the file is valid after the first
        lines = refusal_lines(caplog, ROUTES_FILE)
        assert len(lines) == 1 and getattr(lines[0], "reason", "") == reason
        routes = {dict(labels)["route"] for (name, labels) in found
                  if name == "qatoolbox_http_requests_total"}
        assert set(decode_routes((folder / ROUTES_FILE).read_bytes())) == routes
    finally:
        live.close()


def test_a_planted_route_set_only_chooses_among_the_apps_routes(folder: Path) -> None:
    """A valid set the app user wrote is taken (it may only spoil the app's own metrics):
    routes of its own invention never become labels, nothing is lost, the cap holds."""
    bogus = [f"bogus{i}/" for i in range(MAX_ROUTES - 1)] + ["api/r3/<int:id>/"]
    (folder / ROUTES_FILE).write_bytes(encode_routes(bogus))
    live = Recorder(str(folder))
    try:
        work(live, 36)
        found = scrape(collector(folder))
        routes = {dict(labels)["route"] for (name, labels) in found
                  if name.startswith("qatoolbox_http_") and "route" in dict(labels)}
        assert routes == {"api/r3/<int:id>/", "<other>"}
        assert total(found, "qatoolbox_http_requests_total") == 36
    finally:
        live.close()


def test_a_hard_link_at_the_route_set_is_not_read_nor_written_through(
        folder: Path, victim: Path) -> None:
    os.link(victim, folder / ROUTES_FILE)
    live = Recorder(str(folder))
    try:
        work(live, 6)
        found = scrape(collector(folder))
        assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
        assert rejected(found, folder, "hardlink") == 1
        assert victim.read_bytes() == SECRET and victim.stat().st_nlink == 1
        assert decode_routes((folder / ROUTES_FILE).read_bytes())
    finally:
        live.close()


def test_a_folder_at_the_route_set_name_only_stops_saving(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / ROUTES_FILE).mkdir()
    live = Recorder(str(folder))
    try:
        work(live, 6)
        col = collector(folder)
        with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
            for _ in range(3):
                found = scrape(col)
                assert value(found, "qatoolbox_app_multiprocess_dir_up", dir=str(folder)) == 1
                assert total(found, "qatoolbox_http_requests_total") == 6
        assert rejected(found, folder, "not_regular") == 3
        saving = [r for r in caplog.records if r.getMessage().startswith(
            "app kept routes cannot be saved")]
        assert len(saving) == 1
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    finally:
        live.close()


def test_a_bad_or_missing_state_dir_only_stops_saving(
        tmp_path: Path, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A garbled app-routes.json in app.state_dir is refused (the routes are ranked afresh
    and a valid set written over it); a state_dir that does not exist means no saving, one
    warning, and every scrape still served."""
    from exporter.collectors.app_folder import STATE_ROUTES_FILE

    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_ROUTES_FILE).write_bytes(b"[" * 100_000)
    live = Recorder(str(folder))
    try:
        work(live, 12)
        with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
            col = AppCollector(AppConfig(multiprocess_dirs=(str(folder),),
                                         state_dir=str(state)))
            found = scrape(col)
        assert total(found, "qatoolbox_http_requests_total") == 12
        assert [r for r in caplog.records if r.getMessage().startswith(
            "app saved routes refused")]
        assert len(decode_routes((state / STATE_ROUTES_FILE).read_bytes())) == 12
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="exporter.collectors.app"):
            col = AppCollector(AppConfig(multiprocess_dirs=(str(folder),),
                                         state_dir=str(tmp_path / "nowhere")))
            for _ in range(3):
                found = scrape(col)
                assert total(found, "qatoolbox_http_requests_total") == 12
        messages = [r.getMessage() for r in caplog.records]
        assert messages.count("app kept routes cannot be saved; a restart may choose other "
                              "routes to keep") == 1
        assert not (tmp_path / "nowhere").exists()
    finally:
        live.close()
