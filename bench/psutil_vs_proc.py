"""psutil against the exporter's own /proc readers, side by side in one run (issue 18).

The host and process collectors read /proc and /sys themselves. This measures what psutil
would cost for the same readings, interleaved round by round so machine noise hits both:

- host: one HostCollector.collect() against psutil's reads of the same sources (CPU times per
  CPU, memory, swap, mounted file systems with their sizes, disk and network counters, load),
  without even building metric families from them: a lower bound for a psutil collector;
- process: one ProcessCollector.collect() (default groups) against psutil.process_iter over the
  attributes the collector needs (name, cmdline, CPU times, RSS, open fds, threads, start time);
- import: resident memory a fresh interpreter gains by importing psutil.

    python bench/psutil_vs_proc.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from exporter.collectors.host import HostCollector
from exporter.collectors.host_config import HostConfig
from exporter.collectors.process import ProcessCollector
from exporter.collectors.process_config import ProcessConfig

PROCESS_ATTRS = ["name", "cmdline", "cpu_times", "memory_info", "num_fds", "num_threads",
                 "create_time"]


def psutil_host() -> None:
    psutil.cpu_times(percpu=True)
    psutil.virtual_memory()
    psutil.swap_memory()
    for part in psutil.disk_partitions(all=False):
        with contextlib.suppress(OSError):
            psutil.disk_usage(part.mountpoint)
    psutil.disk_io_counters(perdisk=True)
    psutil.net_io_counters(pernic=True)
    os.getloadavg()


def psutil_processes() -> None:
    for proc in psutil.process_iter(PROCESS_ATTRS):
        proc.info  # noqa: B018 - the attributes are read by process_iter


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


_RSS = ("print(next(int(line.split()[1]) for line in open('/proc/self/status') "
        "if line.startswith('VmRSS:')))")


def import_rss(module: str) -> float:
    """KiB resident in a fresh interpreter after importing module (none: the bare one)."""
    code = f"import {module}; {_RSS}" if module else _RSS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return float(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    host = HostCollector(HostConfig())
    processes = ProcessCollector(ProcessConfig())
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "host": (lambda: list(host.collect()), psutil_host),
        "process": (lambda: list(processes.collect()), psutil_processes),
    }
    for ours, theirs in pairs.values():  # warm both (first scans classify every process)
        ours()
        theirs()
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
    for index in range(args.rounds):
        for name, (ours, theirs) in pairs.items():
            order = (ours, theirs) if index % 2 == 0 else (theirs, ours)
            first, second = timed(order[0]), timed(order[1])
            mine, psu = (first, second) if index % 2 == 0 else (second, first)
            times[name][0].append(mine)
            times[name][1].append(psu)
    print(f"{len(psutil.pids())} processes on this machine, {args.rounds} interleaved rounds")
    print(f"{'part':<8} {'ours median':>12} {'psutil median':>14} {'psutil/ours':>12}")
    for name, (ours_times, psutil_times) in times.items():
        a, b = statistics.median(ours_times), statistics.median(psutil_times)
        print(f"{name:<8} {a * 1e3:>10.2f}ms {b * 1e3:>12.2f}ms {b / a:>12.2f}")
    base = statistics.median(import_rss("") for _ in range(5))
    with_psutil = statistics.median(import_rss("psutil") for _ in range(5))
    print(f"import psutil: +{(with_psutil - base) / 1024:.1f} MB RSS "
          f"({base / 1024:.1f} -> {with_psutil / 1024:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
