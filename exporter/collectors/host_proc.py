"""Parsers of /proc files and mount tables: text in, plain values out (no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def parse_stat(text: str, ticks_per_second: float) -> tuple[dict[str, list[float]], float]:
    """Per-CPU seconds by mode (CPU_MODES order) and the boot time from /proc/stat."""
    cpus: dict[str, list[float]] = {}
    boot_time = 0.0
    for line in text.splitlines():
        if line.startswith("cpu") and not line.startswith("cpu "):
            name, *values = line.split()
            ticks = [float(v) for v in values[: len(CPU_MODES)]]
            ticks += [0.0] * (len(CPU_MODES) - len(ticks))
            cpus[name[3:]] = [t / ticks_per_second for t in ticks]
        elif line.startswith("btime "):
            boot_time = float(line.split()[1])
    return cpus, boot_time


def parse_meminfo(text: str) -> dict[str, float]:
    """Bytes by /proc/meminfo field name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            scale = 1024.0 if len(parts) > 1 and parts[1] == "kB" else 1.0
            values[key] = float(parts[0]) * scale
    return values


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    one, five, fifteen = text.split()[:3]
    return float(one), float(five), float(fifteen)


def parse_diskstats(text: str) -> dict[str, list[float]]:
    """Raw counters by device name (fields after the name)."""
    disks: dict[str, list[float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 14:
            disks[parts[2]] = [float(v) for v in parts[3:]]
    return disks


def parse_net_dev(text: str) -> dict[str, list[float]]:
    """Raw counters by interface (16 fields: 8 receive, 8 transmit)."""
    devices: dict[str, list[float]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        values = rest.split()
        if sep and len(values) >= 16:
            devices[name.strip()] = [float(v) for v in values[:16]]
    return devices


def parse_pressure(text: str) -> dict[str, float]:
    """Total stall seconds by kind ("some", "full") from a /proc/pressure file."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for item in fields:
            if item.startswith("total="):
                totals[kind] = float(item[6:]) / 1e6
    return totals


def parse_vmstat(text: str) -> dict[str, float]:
    """Counters by name from /proc/vmstat ("name value" lines)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return values


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of a mounts table."""

    device: str
    mountpoint: str
    fstype: str
    readonly: bool


def parse_mounts(text: str) -> list[Mount]:
    """Mounts in order; a later mount on the same point hides the earlier one."""
    by_point: dict[str, Mount] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        device, point, fstype, options = (
            _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), p) for p in parts[:4]
        )
        by_point.pop(point, None)
        by_point[point] = Mount(device, point, fstype, "ro" in options.split(","))
    return list(by_point.values())

