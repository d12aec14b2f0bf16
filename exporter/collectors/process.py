"""Process collector: counts and resources of named process groups (web, celery, ...)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.collectors.process_config import ProcessConfig, ProcessGroup


@dataclass(frozen=True)
class ProcSample:
    """What the collector reads of one process."""

    pid: int
    create_time: float
    cpu_user: float
    cpu_system: float
    rss: float
    fds: float
    threads: float


class GroupMatcher:
    """Decides which group, if any, a process belongs to (first matching group wins)."""

    _INTERPRETERS = re.compile(r"^python[0-9.]*$")

    def __init__(self, groups: Sequence[ProcessGroup]) -> None:
        self._groups = [
            (g.name, frozenset(g.names), re.compile(g.cmdline) if g.cmdline else None)
            for g in groups
        ]

    @classmethod
    def program_names(cls, comm: str, cmdline: Sequence[str]) -> set[str]:
        """The names a process goes by: its comm, argv[0], and the script or -m module of a
        Python interpreter (so `python -m gunicorn` is a gunicorn)."""
        names = {comm}
        if cmdline:
            argv0 = os.path.basename(cmdline[0])
            names.add(argv0)
            names.add(argv0.split(":", 1)[0])  # "gunicorn: worker [app]" from setproctitle
            if cls._INTERPRETERS.match(argv0):
                args = list(cmdline[1:])
                while args and args[0].startswith("-") and args[0] != "-m":
                    # -W and -X take a value of their own: it is not the script
                    if args.pop(0) in ("-W", "-X") and args:
                        args.pop(0)
                if len(args) >= 2 and args[0] == "-m":
                    names.add(args[1])
                elif args:
                    names.add(os.path.basename(args[0]))
        return names

    def group_of(self, comm: str, cmdline: Sequence[str]) -> str | None:
        """The group name for a process, or None."""
        names: set[str] | None = None
        joined: str | None = None
        for group, wanted, pattern in self._groups:
            if wanted:
                if names is None:
                    names = self.program_names(comm, cmdline)
                if names & wanted:
                    return group
            if pattern is not None:
                if joined is None:
                    joined = " ".join(cmdline)
                if pattern.search(joined):
                    return group
        return None


class CpuAccount:
    """Per-group CPU counters that never go backwards when processes exit.

    A group's counter is the CPU of the processes seen so far: each scrape adds, per live
    process, what it used since it was last seen (the whole of it for a new process). A process
    is identified by pid and start time, so a reused pid starts a new account. A process missing
    from a scan (its cmdline could not be read that once) is remembered for FORGET_AFTER scans,
    so when it comes back only its new CPU is added, not all of it again.
    """

    FORGET_AFTER = 5

    def __init__(self) -> None:
        # (pid, start time) -> (group, user, system, scans missed)
        self._last: dict[tuple[int, float], tuple[str, float, float, int]] = {}
        self._totals: dict[str, list[float]] = {}

    def update(self, samples: Iterable[tuple[str, ProcSample]]) -> dict[str, list[float]]:
        """Fold this scrape's samples in; return {group: [user, system]} totals."""
        seen: dict[tuple[int, float], tuple[str, float, float, int]] = {}
        for group, s in samples:
            key = (s.pid, s.create_time)
            total = self._totals.setdefault(group, [0.0, 0.0])
            previous = self._last.get(key)
            if previous is not None and previous[0] == group:
                total[0] += max(0.0, s.cpu_user - previous[1])
                total[1] += max(0.0, s.cpu_system - previous[2])
                user, system = max(s.cpu_user, previous[1]), max(s.cpu_system, previous[2])
            else:
                total[0] += s.cpu_user
                total[1] += s.cpu_system
                user, system = s.cpu_user, s.cpu_system
            seen[key] = (group, user, system, 0)
        for key, (group, user, system, missed) in self._last.items():
            if key not in seen and missed + 1 < self.FORGET_AFTER:
                seen[key] = (group, user, system, missed + 1)
        self._last = seen
        return {g: list(v) for g, v in self._totals.items()}


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _fd_count_in_size() -> bool:
    """Whether stat(2) of /proc/<pid>/fd gives the number of open fds (Linux 6.2 and later;
    earlier kernels say 0): one call instead of listing every fd of every group member."""
    try:
        return os.stat("/proc/self/fd").st_size > 0
    except OSError:
        return False


_FD_COUNT_IN_SIZE = _fd_count_in_size()


def _boot_time() -> float:
    """btime of /proc/stat: what process start times (ticks since boot) count from."""
    try:
        with open("/proc/stat", "rb") as handle:
            for line in handle:
                if line.startswith(b"btime"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _stat_sample(pid: str, fields: list[bytes], boot_time: float) -> ProcSample | None:
    """The sample from the fields of /proc/<pid>/stat after the name (already read to classify
    the process) and a listing of /proc/<pid>/fd: what psutil would read, in two system calls
    instead of six files (that was most of this collector's time with many group members)."""
    if fields[0] in (b"Z", b"X"):
        return None  # exited, not yet reaped: no resources left to report
    try:
        if _FD_COUNT_IN_SIZE:
            fds = float(os.stat(f"/proc/{pid}/fd").st_size)
        else:
            fds = float(len(os.listdir(f"/proc/{pid}/fd")))
    except PermissionError:
        # /proc/<pid>/fd is open only to the process's user (or root); the rest of
        # /proc/<pid> is public, so a non-root exporter still counts the process.
        fds = 0.0
    except OSError:
        return None  # exited since its stat was read
    return ProcSample(
        pid=int(pid),
        create_time=boot_time + int(fields[19]) / _TICKS,
        cpu_user=int(fields[11]) / _TICKS,
        cpu_system=int(fields[12]) / _TICKS,
        rss=float(int(fields[21]) * _PAGE),
        fds=fds,
        threads=float(int(fields[17])),
    )


def _stat(pid: str) -> tuple[str, list[bytes]] | None:
    """comm and the fields after it of /proc/<pid>/stat, from one read."""
    # os.open/os.read rather than open(): no buffered file object for one small read, a third
    # less time over a few hundred processes.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    head, _, tail = raw.rpartition(b")")
    fields = tail.split()
    if len(fields) < 22:
        return None
    return head.partition(b"(")[2].decode(errors="replace"), fields


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class ProcessScanner:
    """Finds the processes of the groups, remembering each process's group between scrapes.

    A process is classified once, by pid and start time, so a scrape reads one small file per
    process and reads the rest only for processes that belong to a group. A process that
    belongs to none is not even read again while it stays the same process: stat(2) of its
    /proc/<pid> directory tells (a pid reused by a new process gets a new proc inode), at a
    quarter of the cost of reading its stat file; that was most of this collector's time
    with a few hundred processes on the host (docs/benchmarks.md). A program that exec()s
    keeps its proc inode, so young processes (which is when entry points `exec gunicorn`) are
    read every time, and every process once a minute.
    """

    # Seconds a process counts as young; seconds between passes that read every process.
    YOUNG = 60.0
    FULL_PASS = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._groups: dict[tuple[int, int, str], str | None] = {}
        # pid -> (proc inode, its ctime, classification key) of the processes in no group
        self._outsiders: dict[str, tuple[int, int, tuple[int, int, str]]] = {}
        # Fixed while the machine runs (a suspend does not move it), so read once.
        self._boot_time = _boot_time()
        self._clock = clock
        self._last_full: float | None = None

    def __call__(self, matcher: GroupMatcher) -> Iterator[tuple[str, ProcSample]]:
        seen: dict[tuple[int, int, str], str | None] = {}
        outsiders: dict[str, tuple[int, int, tuple[int, int, str]]] = {}
        try:
            pids = [name for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            pids = []
        boot_time = self._boot_time
        now = self._clock()
        full = self._last_full is None or now - self._last_full >= self.FULL_PASS
        if full:
            self._last_full = now
        young_since = (time.time() - boot_time - self.YOUNG) * _TICKS
        known = self._outsiders
        for pid in pids:
            outsider = known.get(pid)
            if outsider is not None and not full:
                try:
                    st = os.stat(f"/proc/{pid}")
                except OSError:
                    continue  # exited since the listing
                if st.st_ino == outsider[0] and st.st_ctime_ns == outsider[1]:
                    outsiders[pid] = outsider
                    seen[outsider[2]] = None
                    continue
            stat = _stat(pid)
            if stat is None:
                continue  # exited since the listing
            comm, fields = stat
            start = int(fields[19])
            # exec keeps pid and start time but changes comm (`exec gunicorn` in an entry
            # point): classify again then.
            key = (int(pid), start, comm)
            if key in self._groups:
                group = self._groups[key]
            else:
                group = matcher.group_of(comm, _cmdline(pid))
            seen[key] = group
            if group is None:
                if start < young_since:
                    try:
                        st = os.stat(f"/proc/{pid}")
                    except OSError:
                        continue
                    outsiders[pid] = (st.st_ino, st.st_ctime_ns, key)
                continue
            sample = _stat_sample(pid, fields, boot_time)
            if sample is not None:
                yield group, sample
        self._groups = seen
        self._outsiders = outsiders


def scan_processes(matcher: GroupMatcher) -> Iterator[tuple[str, ProcSample]]:
    """Every process that belongs to a group, with its sample (no memory between calls)."""
    return ProcessScanner()(matcher)


class ProcessCollector:
    """Process groups configured by name or command line.

    qatoolbox_process_num_procs{group="web"} 4
    qatoolbox_process_cpu_seconds_total{group="web",mode="user"} 12.5
    qatoolbox_process_resident_memory_bytes{group="web"} 2.3e+08
    qatoolbox_process_open_fds{group="web"} 48
    qatoolbox_process_threads{group="web"} 8
    qatoolbox_process_oldest_start_time_seconds{group="web"} 1.7e+09
    """

    name = "process"

    def __init__(
        self,
        cfg: ProcessConfig,
        scan: Callable[[GroupMatcher], Iterable[tuple[str, ProcSample]]] | None = None,
    ) -> None:
        self._groups = [g.name for g in cfg.groups]
        self._matcher = GroupMatcher(cfg.groups)
        self._scan = scan if scan is not None else ProcessScanner()
        self._cpu = CpuAccount()
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        """Scan the process table once and yield per-group families."""
        samples = list(self._scan(self._matcher))
        with self._lock:
            cpu = self._cpu.update(samples)
        labels = ["group"]
        count = GaugeMetricFamily(
            "qatoolbox_process_num_procs", "Processes in the group.", labels=labels
        )
        cpu_family = CounterMetricFamily(
            "qatoolbox_process_cpu_seconds_total",
            "CPU time used by the group's processes, including those that have exited.",
            labels=["group", "mode"],
        )
        rss = GaugeMetricFamily(
            "qatoolbox_process_resident_memory_bytes",
            "Resident memory of the group's processes.",
            labels=labels,
        )
        fds = GaugeMetricFamily(
            "qatoolbox_process_open_fds", "Open file descriptors of the group.", labels=labels
        )
        threads = GaugeMetricFamily(
            "qatoolbox_process_threads", "Threads in the group's processes.", labels=labels
        )
        oldest = GaugeMetricFamily(
            "qatoolbox_process_oldest_start_time_seconds",
            "Unix time the group's oldest running process started.",
            labels=labels,
        )
        for group in self._groups:
            members = [s for g, s in samples if g == group]
            count.add_metric([group], float(len(members)))
            user, system = cpu.get(group, [0.0, 0.0])
            cpu_family.add_metric([group, "user"], user)
            cpu_family.add_metric([group, "system"], system)
            rss.add_metric([group], sum(s.rss for s in members))
            fds.add_metric([group], sum(s.fds for s in members))
            threads.add_metric([group], sum(s.threads for s in members))
            if members:
                oldest.add_metric([group], min(s.create_time for s in members))
        yield from (count, cpu_family, rss, fds, threads, oldest)
