"""Process collector: group matching, CPU accounting, a fake scan and real child processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from exporter.collectors.process import (
    CpuAccount,
    GroupMatcher,
    ProcessCollector,
    ProcSample,
    scan_processes,
)
from exporter.collectors.process_config import DEFAULT_PROCESS_GROUPS, ProcessConfig, ProcessGroup
from exporter.config import Regex
from tests.harness import Samples, family_samples, wait_for


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


# --- matching -------------------------------------------------------------------------------

DEFAULT = GroupMatcher(DEFAULT_PROCESS_GROUPS)


@pytest.mark.parametrize(("comm", "cmdline", "group"), [
    ("python3", ["python3", "-m", "gunicorn", "config.wsgi:application"], "web"),
    ("python", ["/venv/bin/python", "-u", "-m", "gunicorn", "app:app"], "web"),
    ("python", ["/venv/bin/python", "-W", "ignore", "-m", "gunicorn", "app:app"], "web"),
    ("python", ["python3", "-X", "dev", "/venv/bin/uvicorn", "app:app"], "web"),
    ("python", ["/venv/bin/python", "/venv/bin/gunicorn", "config.wsgi", "-w", "4"], "web"),
    ("python3.11", ["/usr/bin/python3.11", "/venv/bin/uvicorn", "app:app"], "web"),
    ("gunicorn", ["/venv/bin/gunicorn", "config.wsgi"], "web"),
    # setproctitle rewrites argv into one string (and psutil may split it at spaces)
    ("gunicorn: worke", ["gunicorn: worker [qatoolbox]"], "web"),
    ("python", ["gunicorn:", "worker", "[qatoolbox]"], "web"),
    ("python", ["gunicorn: master [config.wsgi:application]"], "web"),
    ("daphne", ["/venv/bin/python", "/venv/bin/daphne", "asgi:app"], "web"),
    ("uwsgi", ["uwsgi", "--ini", "app.ini"], "web"),
    ("celery", ["/venv/bin/python", "/venv/bin/celery", "-A", "qatoolbox", "worker", "-l",
                "info"], "celery"),
    ("python", ["python", "-m", "celery", "-A", "qatoolbox", "worker"], "celery"),
    ("celery", ["/venv/bin/celery", "-A", "qatoolbox", "beat"], None),
    ("postgres", ["postgres: checkpointer "], "postgres"),
    ("postgres", ["/usr/lib/postgresql/16/bin/postgres", "-D", "/var/lib/pg"], "postgres"),
    ("redis-server", ["redis-server 127.0.0.1:6379"], "redis"),
    ("bash", ["bash"], None),
    ("python3", ["python3", "manage.py", "runserver"], None),
    ("vim", ["vim", "gunicorn.conf.py"], None),
    ("python3", ["python3", "-c", "import gunicorn"], None),
    ("kworker/0:1", [], None),
])
def test_default_groups(comm: str, cmdline: list[str], group: str | None) -> None:
    assert DEFAULT.group_of(comm, cmdline) == group


def test_first_matching_group_wins_and_cmdline_regex() -> None:
    matcher = GroupMatcher([
        ProcessGroup(name="beat", cmdline=Regex(r"\bcelery\b.*\bbeat\b")),
        ProcessGroup(name="python", names=("python3",)),
        ProcessGroup(name="any-celery", cmdline=Regex("celery")),
    ])
    assert matcher.group_of("python3", ["python3", "-m", "celery", "beat"]) == "beat"
    assert matcher.group_of("python3", ["python3", "-m", "celery", "worker"]) == "python"
    assert matcher.group_of("celery", ["/bin/celery", "flower"]) == "any-celery"
    assert matcher.group_of("sh", ["sh"]) is None


def test_program_names() -> None:
    names = GroupMatcher.program_names("python3", ["/venv/bin/python3", "-m", "gunicorn", "x"])
    assert {"python3", "gunicorn"} <= names
    assert "x" not in names
    assert GroupMatcher.program_names("sh", []) == {"sh"}


# --- CPU accounting -------------------------------------------------------------------------


def proc(pid: int, user: float, system: float = 0.0, *, created: float = 1000.0,
         rss: float = 1e6, fds: float = 5, threads: float = 1) -> ProcSample:
    return ProcSample(pid, created, user, system, rss, fds, threads)


def test_cpu_account_adds_deltas_and_survives_exits() -> None:
    account = CpuAccount()
    assert account.update([("web", proc(1, 1.0, 0.5)), ("web", proc(2, 2.0, 1.0))]) == {
        "web": [3.0, 1.5]}
    assert account.update([("web", proc(1, 1.5, 0.5)), ("web", proc(2, 2.5, 1.25))]) == {
        "web": [4.0, 1.75]}
    # pid 2 exits: what it used stays in the total
    assert account.update([("web", proc(1, 2.0, 0.5))]) == {"web": [4.5, 1.75]}
    # every process exits: the counter holds
    assert account.update([]) == {"web": [4.5, 1.75]}


def test_cpu_account_pid_reuse_starts_a_new_account() -> None:
    account = CpuAccount()
    account.update([("celery", proc(7, 10.0, 2.0, created=1000.0))])
    # pid 7 reused by a new process with less CPU: its whole CPU is added, nothing subtracted
    totals = account.update([("celery", proc(7, 0.25, 0.125, created=2000.0))])
    assert totals == {"celery": [10.25, 2.125]}
    totals = account.update([("celery", proc(7, 0.5, 0.125, created=2000.0))])
    assert totals == {"celery": [10.5, 2.125]}


def test_cpu_account_never_decreases() -> None:
    account = CpuAccount()
    history = [
        [("web", proc(1, 5.0)), ("web", proc(2, 3.0))],
        [("web", proc(1, 4.0))],  # a bogus lower reading of the same process
        [("web", proc(2, 1.0, created=3000.0))],
        [],
        [("web", proc(3, 0.0))],
    ]
    previous = [0.0, 0.0]
    for scrape in history:
        now = account.update(scrape).get("web", [0.0, 0.0])
        assert now[0] >= previous[0] and now[1] >= previous[1]
        previous = now


def test_cpu_account_remembers_a_process_missing_from_one_scan() -> None:
    account = CpuAccount()
    account.update([("web", proc(1, 10.0, 1.0)), ("web", proc(2, 1.0))])
    # pid 1's cmdline could not be read this once: it is not in the scan
    assert account.update([("web", proc(2, 1.5))]) == {"web": [11.5, 1.0]}
    # back again: only what it used since it was last seen is added, not its 10 s again
    assert account.update([("web", proc(1, 10.5, 1.0)), ("web", proc(2, 1.5))]) == {
        "web": [12.0, 1.0]}
    # gone for good: forgotten after FORGET_AFTER scans, so memory stays bounded
    for _ in range(CpuAccount.FORGET_AFTER):
        account.update([])
    assert account._last == {}


def test_cpu_account_a_lower_reading_is_not_counted_twice() -> None:
    account = CpuAccount()
    account.update([("web", proc(1, 5.0))])
    account.update([("web", proc(1, 4.0))])  # a bogus lower reading
    # back to 5.5: only the 0.5 beyond the highest reading is new CPU
    assert account.update([("web", proc(1, 5.5))]) == {"web": [5.5, 0.0]}


def test_cpu_account_groups_are_separate() -> None:
    account = CpuAccount()
    totals = account.update([("web", proc(1, 1.0)), ("celery", proc(2, 4.0, 1.0))])
    assert totals == {"web": [1.0, 0.0], "celery": [4.0, 1.0]}


# --- the collector on a fake scan ----------------------------------------------------------


def fake_scan(rows: list[tuple[str, ProcSample]]) -> tuple[list[list[tuple[str, ProcSample]]],
                                                          object]:
    calls: list[list[tuple[str, ProcSample]]] = [rows]

    def scan(matcher: GroupMatcher) -> Iterator[tuple[str, ProcSample]]:
        assert isinstance(matcher, GroupMatcher)
        yield from calls[-1]

    return calls, scan


def test_collector_on_fake_scan() -> None:
    calls, scan = fake_scan([
        ("web", proc(10, 1.0, 0.5, created=100.0, rss=1000.0, fds=10, threads=2)),
        ("web", proc(11, 2.0, 0.5, created=50.0, rss=3000.0, fds=20, threads=4)),
        ("celery", proc(20, 7.0, 1.0, created=70.0, rss=500.0, fds=3, threads=1)),
    ])
    collector = ProcessCollector(ProcessConfig(), scan=scan)  # type: ignore[arg-type]
    assert collector.name == "process"
    found = family_samples(collector.collect())
    for group, n in (("web", 2), ("celery", 1), ("postgres", 0), ("redis", 0)):
        assert value(found, "qatoolbox_process_num_procs", group=group) == n, group
    assert value(found, "qatoolbox_process_cpu_seconds_total", group="web", mode="user") == 3.0
    assert value(found, "qatoolbox_process_cpu_seconds_total", group="web", mode="system") == 1.0
    assert value(found, "qatoolbox_process_cpu_seconds_total", group="redis", mode="user") == 0.0
    assert value(found, "qatoolbox_process_resident_memory_bytes", group="web") == 4000.0
    assert value(found, "qatoolbox_process_open_fds", group="web") == 30
    assert value(found, "qatoolbox_process_threads", group="web") == 6
    assert value(found, "qatoolbox_process_oldest_start_time_seconds", group="web") == 50.0
    assert value(found, "qatoolbox_process_oldest_start_time_seconds", group="celery") == 70.0
    # an empty group has a count of 0 and no start time
    assert value(found, "qatoolbox_process_resident_memory_bytes", group="postgres") == 0.0
    assert value(found, "qatoolbox_process_oldest_start_time_seconds", group="postgres") is None

    # the web workers die: count 0, CPU kept
    calls.append([("celery", proc(20, 8.0, 1.0, created=70.0))])
    found = family_samples(collector.collect())
    assert value(found, "qatoolbox_process_num_procs", group="web") == 0
    assert value(found, "qatoolbox_process_cpu_seconds_total", group="web", mode="user") == 3.0
    assert value(found, "qatoolbox_process_cpu_seconds_total", group="celery", mode="user") == 8.0
    assert value(found, "qatoolbox_process_oldest_start_time_seconds", group="web") is None


def test_collector_families() -> None:
    _, scan = fake_scan([])
    collector = ProcessCollector(ProcessConfig(groups=(ProcessGroup(name="g", names=("x",)),)),
                                 scan=scan)  # type: ignore[arg-type]
    types = {f.name: f.type for f in collector.collect()}
    assert types == {
        "qatoolbox_process_num_procs": "gauge",
        "qatoolbox_process_cpu_seconds": "counter",
        "qatoolbox_process_resident_memory_bytes": "gauge",
        "qatoolbox_process_open_fds": "gauge",
        "qatoolbox_process_threads": "gauge",
        "qatoolbox_process_oldest_start_time_seconds": "gauge",
    }


# --- real processes ------------------------------------------------------------------------

BURNER = """
import sys, time
deadline = time.process_time() + 0.2
while time.process_time() < deadline:
    pass
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_real_children_counted_then_gone(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    marker = f"qatb-burn-{os.getpid()}-{time.monotonic_ns()}"
    sleeper = f"qtsl{os.getpid() % 10**8}"
    sleep_copy = tmp_path / sleeper
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleep_copy)
    cfg = ProcessConfig(groups=(
        ProcessGroup(name="burners", cmdline=Regex(rf"\b{marker}\b")),
        ProcessGroup(name="sleepers", names=(sleeper,)),
    ))
    collector = ProcessCollector(cfg)
    found = family_samples(collector.collect())
    assert value(found, "qatoolbox_process_num_procs", group="burners") == 0
    assert value(found, "qatoolbox_process_num_procs", group="sleepers") == 0

    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", BURNER, marker], stdout=subprocess.PIPE)
        children.append(child)
        children.append(subprocess.Popen([str(sleep_copy), "120"]))
    for child in children[::2]:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"

    found = family_samples(collector.collect())
    assert value(found, "qatoolbox_process_num_procs", group="burners") == 2
    assert value(found, "qatoolbox_process_num_procs", group="sleepers") == 2
    user = value(found, "qatoolbox_process_cpu_seconds_total", group="burners", mode="user")
    system = value(found, "qatoolbox_process_cpu_seconds_total", group="burners", mode="system")
    assert user is not None and system is not None
    assert user + system >= 0.35  # each burned 0.2 s of CPU before saying ready
    expected_rss = sum(psutil.Process(c.pid).memory_info().rss for c in children[::2])
    rss = value(found, "qatoolbox_process_resident_memory_bytes", group="burners")
    assert rss == pytest.approx(expected_rss, rel=0.5)
    fds = value(found, "qatoolbox_process_open_fds", group="burners")
    assert fds is not None and fds >= 6
    threads = value(found, "qatoolbox_process_threads", group="sleepers")
    assert threads == 2
    oldest = min(psutil.Process(c.pid).create_time() for c in children[1::2])
    assert value(found, "qatoolbox_process_oldest_start_time_seconds",
                 group="sleepers") == pytest.approx(oldest, abs=0.05)

    for child in children:
        child.kill()
        child.wait(10)
    found = family_samples(collector.collect())
    assert value(found, "qatoolbox_process_num_procs", group="burners") == 0
    assert value(found, "qatoolbox_process_num_procs", group="sleepers") == 0
    after_user = value(found, "qatoolbox_process_cpu_seconds_total", group="burners", mode="user")
    after_system = value(found, "qatoolbox_process_cpu_seconds_total", group="burners",
                         mode="system")
    assert after_user is not None and after_system is not None
    assert after_user >= user and after_system >= system


def test_process_that_execs_into_a_group_is_counted(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    # Entry points often do `exec gunicorn ...`: same pid and start time, new program.
    sleeper = f"qtex{os.getpid() % 10**8}"
    sleep_copy = tmp_path / sleeper
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleep_copy)
    gate = tmp_path / "go"
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; exec {sleep_copy} 120"
    cfg = ProcessConfig(groups=(ProcessGroup(name="late", names=(sleeper,)),))
    collector = ProcessCollector(cfg)
    children.append(subprocess.Popen(["sh", "-c", script]))
    wait_for(lambda: psutil.Process(children[0].pid).name() == "sh", 10, "sh to start")
    found = family_samples(collector.collect())
    assert value(found, "qatoolbox_process_num_procs", group="late") == 0
    gate.touch()
    wait_for(lambda: psutil.Process(children[0].pid).name() == sleeper, 10, "the exec")
    found = family_samples(collector.collect())
    assert value(found, "qatoolbox_process_num_procs", group="late") == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _stat_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of /proc/<pid>/stat reads by pid, from now on."""
    from exporter.collectors import process

    reads: dict[str, int] = {}
    real = process._stat

    def counting(pid: str) -> tuple[str, list[bytes]] | None:
        reads[pid] = reads.get(pid, 0) + 1
        return real(pid)

    monkeypatch.setattr(process, "_stat", counting)
    return reads


def test_process_in_no_group_is_not_read_again_until_the_full_pass(
    tmp_path: Path, children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outsider costs a stat(2) of its /proc directory per scrape, not a read of its stat
    file; members are read every scrape; every process is read again once a minute."""
    from exporter.collectors.process import ProcessScanner

    member_name = f"qtmb{os.getpid() % 10**8}"
    member_copy = tmp_path / member_name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", member_copy)
    outsider = subprocess.Popen(["sleep", "120"])
    member = subprocess.Popen([str(member_copy), "120"])
    children.extend([outsider, member])
    wait_for(lambda: psutil.Process(member.pid).name() == member_name, 10, "the member")
    clock = FakeClock()
    scanner = ProcessScanner(clock=clock)
    scanner.YOUNG = 0.0  # the children are seconds old: count them as old
    matcher = GroupMatcher([ProcessGroup(name="m", names=(member_name,))])
    reads = _stat_reads(monkeypatch)
    for _ in range(3):
        assert [s.pid for _, s in scanner(matcher)] == [member.pid]
        clock.now += 15
    assert reads[str(member.pid)] == 3
    assert reads[str(outsider.pid)] == 1
    clock.now += ProcessScanner.FULL_PASS
    assert [s.pid for _, s in scanner(matcher)] == [member.pid]
    assert reads[str(outsider.pid)] == 2


def test_old_process_that_execs_into_a_group_is_counted_by_the_full_pass(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """exec keeps the proc inode: an old outsider that becomes a member is found at the next
    full pass (young ones at once: test_process_that_execs_into_a_group_is_counted)."""
    from exporter.collectors.process import ProcessScanner

    sleeper = f"qtox{os.getpid() % 10**8}"
    sleep_copy = tmp_path / sleeper
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleep_copy)
    gate = tmp_path / "go"
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; exec {sleep_copy} 120"
    children.append(subprocess.Popen(["sh", "-c", script]))
    wait_for(lambda: psutil.Process(children[0].pid).name() == "sh", 10, "sh to start")
    clock = FakeClock()
    scanner = ProcessScanner(clock=clock)
    scanner.YOUNG = 0.0
    matcher = GroupMatcher([ProcessGroup(name="late", names=(sleeper,))])
    assert list(scanner(matcher)) == []
    gate.touch()
    wait_for(lambda: psutil.Process(children[0].pid).name() == sleeper, 10, "the exec")
    clock.now += 15
    list(scanner(matcher))  # may not see it yet: same pid, start time and proc inode
    clock.now += ProcessScanner.FULL_PASS
    assert [s.pid for _, s in scanner(matcher)] == [children[0].pid]


def _own_stat_fields() -> list[bytes]:
    raw = Path(f"/proc/{os.getpid()}/stat").read_bytes()
    return raw.rpartition(b")")[2].split()


def test_stat_sample_matches_psutil_for_a_live_process() -> None:
    from exporter.collectors.process import _boot_time, _stat_sample

    sample = _stat_sample(str(os.getpid()), _own_stat_fields(), _boot_time())
    me = psutil.Process()
    assert sample is not None
    assert sample.pid == os.getpid()
    assert sample.create_time == pytest.approx(me.create_time(), abs=0.05)
    assert sample.threads == me.num_threads()
    assert sample.fds == pytest.approx(me.num_fds(), abs=3)
    assert sample.rss == pytest.approx(me.memory_info().rss, rel=0.2)
    assert sample.cpu_user <= me.cpu_times().user + 0.02


def test_vanished_process_is_skipped(children: list[subprocess.Popen[bytes]]) -> None:
    from exporter.collectors.process import _boot_time, _stat_sample

    child = subprocess.Popen(["sleep", "120"])
    children.append(child)
    fields = Path(f"/proc/{child.pid}/stat").read_bytes().rpartition(b")")[2].split()
    child.kill()
    child.wait(10)  # reaped: /proc/<pid> is gone between the stat read and the fd count
    assert _stat_sample(str(child.pid), fields, _boot_time()) is None


def test_zombie_process_is_skipped() -> None:
    from exporter.collectors.process import _boot_time, _stat_sample

    fields = _own_stat_fields()
    fields[0] = b"Z"
    assert _stat_sample(str(os.getpid()), fields, _boot_time()) is None


COUNT_AS_NOBODY = """
import os, sys
from exporter.collectors.process import ProcessCollector
from exporter.collectors.process_config import ProcessConfig, ProcessGroup
collector = ProcessCollector(ProcessConfig(groups=(ProcessGroup(name="g", names=(sys.argv[1],)),)))
os.setgid(65534)
os.setuid(65534)
for family in collector.collect():
    for s in family.samples:
        if s.name in ("qatoolbox_process_num_procs", "qatoolbox_process_resident_memory_bytes"):
            print(s.name, s.value)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root and drop to nobody")
def test_non_root_exporter_counts_other_users_processes(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    # The exporter runs as its own user; PostgreSQL and Redis run as theirs.
    name = f"qtnr{os.getpid() % 10**8}"
    binary = tmp_path / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    children.append(subprocess.Popen([str(binary), "120"]))
    wait_for(lambda: psutil.Process(children[0].pid).name() == name, 10, "the child")
    result = subprocess.run([sys.executable, "-c", COUNT_AS_NOBODY, name], capture_output=True,
                            text=True, timeout=60, check=True, cwd=Path(__file__).parent.parent)
    values = dict(line.split() for line in result.stdout.splitlines())
    assert float(values["qatoolbox_process_num_procs"]) == 1
    assert float(values["qatoolbox_process_resident_memory_bytes"]) > 0


def test_scan_processes_finds_this_process() -> None:
    me = psutil.Process()
    matcher = GroupMatcher([ProcessGroup(name="me", cmdline=Regex(r"pytest|py\.test|-m pytest")),
                            ProcessGroup(name="any", cmdline=Regex("."))])
    found = {s.pid: (g, s) for g, s in scan_processes(matcher)}
    assert os.getpid() in found
    group, sample = found[os.getpid()]
    assert group == "me"
    assert sample.create_time == pytest.approx(me.create_time(), abs=0.05)
    assert sample.threads >= 1 and sample.rss > 0
