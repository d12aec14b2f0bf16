"""Host collector: parsers on text samples, the collector on fake files, and real kernel values."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

import pytest

from exporter.collectors.host import HostCollector, device_filter, select_mounts
from exporter.collectors.host_config import DeviceFilterConfig, FilesystemConfig, HostConfig
from exporter.collectors.host_proc import (
    Mount,
    parse_diskstats,
    parse_loadavg,
    parse_meminfo,
    parse_mounts,
    parse_net_dev,
    parse_pressure,
    parse_stat,
    parse_vmstat,
)
from exporter.collectors.host_timex import STA_NANO, STA_UNSYNC, TIME_ERROR, Timex, timex_values
from exporter.config import Regex
from tests.harness import Samples, family_samples

STAT = """\
cpu  1000 20 300 50000 40 5 6 7 0 0
cpu0 600 10 200 25000 20 3 4 5 0 0
cpu1 400 10 100 25000 20 2 2 2 0 0
intr 12345 0 0
ctxt 987654
btime 1700000000
processes 4242
procs_running 2
"""

MEMINFO = """\
MemTotal:       16318480 kB
MemFree:         1180744 kB
MemAvailable:   10734296 kB
Buffers:          420012 kB
Cached:          8597592 kB
SwapCached:            0 kB
SwapTotal:       2097148 kB
SwapFree:        2097000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

DISKSTATS = """\
   7       0 loop0 50 0 100 3 0 0 0 0 0 4 3 0 0 0 0
   8       0 sda 1000 10 20000 500 2000 20 40000 700 1 1200 1300 0 0 0 0 0 0
   8       1 sda1 900 10 18000 450 1900 20 38000 650 0 1100 1100 0 0 0 0
 253       0 vda 11 0 22 33 44 0 66 77 0 99 111
 259       0 nvme0n1 5 0 8 1 6 0 16 2 0 3 3
"""

NET_DEV = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs "
    "drop fifo colls carrier compressed\n"
) + """\
    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0
  eth0: 123456 789 1 2 0 0 0 3 654321 987 4 5 0 0 0 0
veth12ab: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0
"""

PRESSURE_CPU = """\
some avg10=0.00 avg60=0.10 avg300=0.05 total=2500000
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""
PRESSURE_IO = """\
some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000
full avg10=0.00 avg60=0.00 avg300=0.00 total=750000
"""

MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda1 / ext4 rw,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev,size=1638400k 0 0
/dev/vdb1 /data xfs rw,relatime 0 0
/dev/vdc1 /data xfs ro,relatime 0 0
/dev/vdd1 /srv/my\\040files ext4 ro,noatime 0 0
overlay /var/lib/docker/overlay2/abc/merged overlay rw 0 0
/dev/vda1 /var/lib/docker/containers/x ext4 rw 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw 0 0
"""




def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


# --- parsers -----------------------------------------------------------------------------------


def test_parse_stat() -> None:
    cpus, boot = parse_stat(STAT, 100.0)
    assert boot == 1700000000.0
    assert set(cpus) == {"0", "1"}  # the aggregate "cpu" line is not a CPU
    assert cpus["0"] == [6.0, 0.1, 2.0, 250.0, 0.2, 0.03, 0.04, 0.05]
    assert cpus["1"][0] == 4.0


def test_parse_stat_old_kernel_without_steal() -> None:
    cpus, _ = parse_stat("cpu0 100 0 50 1000 0 0 0\n", 100.0)
    assert cpus["0"] == [1.0, 0.0, 0.5, 10.0, 0.0, 0.0, 0.0, 0.0]


def test_parse_meminfo() -> None:
    info = parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 16318480 * 1024
    assert info["MemAvailable"] == 10734296 * 1024
    assert info["SwapFree"] == 2097000 * 1024
    assert info["HugePages_Total"] == 0  # no unit: not scaled


def test_parse_loadavg() -> None:
    assert parse_loadavg("0.42 1.50 2.00 3/456 7890\n") == (0.42, 1.5, 2.0)


def test_parse_diskstats() -> None:
    disks = parse_diskstats(DISKSTATS)
    assert set(disks) == {"loop0", "sda", "sda1", "vda", "nvme0n1"}
    assert disks["sda"][:10] == [1000, 10, 20000, 500, 2000, 20, 40000, 700, 1, 1200]
    assert disks["vda"][:10] == [11, 0, 22, 33, 44, 0, 66, 77, 0, 99]


def test_parse_net_dev() -> None:
    devices = parse_net_dev(NET_DEV)
    assert set(devices) == {"lo", "eth0", "veth12ab"}
    assert devices["eth0"][:4] == [123456, 789, 1, 2]
    assert devices["eth0"][8:12] == [654321, 987, 4, 5]


def test_parse_pressure() -> None:
    assert parse_pressure(PRESSURE_IO) == {"some": 1.5, "full": 0.75}
    assert parse_pressure(PRESSURE_CPU) == {"some": 2.5, "full": 0.0}


VMSTAT = """\
nr_free_pages 123456
pgfault 987654321
oom_kill 3
weird line here
nr_bad notanumber
"""


def test_parse_vmstat() -> None:
    counters = parse_vmstat(VMSTAT)
    assert counters == {"nr_free_pages": 123456, "pgfault": 987654321, "oom_kill": 3}


def test_timex_values_in_micro_and_nanoseconds() -> None:
    # A synchronised clock 1.5 ms ahead, 10 ppm fast, in microseconds (no STA_NANO).
    synced = timex_values(Timex(state=0, status=0x0001, offset=-1500, freq=10 * 65536,
                                maxerror=250000, esterror=1200))
    assert synced == {"offset_seconds": -0.0015, "sync_status": 1.0, "maxerror_seconds": 0.25,
                      "estimated_error_seconds": 0.0012,
                      "frequency_adjustment_ratio": pytest.approx(1.00001)}
    # The same offset reported in nanoseconds.
    nano = timex_values(Timex(0, STA_NANO, -1_500_000, 0, 0, 0))
    assert nano["offset_seconds"] == pytest.approx(-0.0015)
    # Unsynchronised: the kernel returns TIME_ERROR and sets STA_UNSYNC.
    lost = timex_values(Timex(TIME_ERROR, STA_UNSYNC, 0, 0, 16_000_000, 16_000_000))
    assert lost["sync_status"] == 0.0 and lost["maxerror_seconds"] == 16.0


def test_parse_mounts_octal_escapes_and_shadowing() -> None:
    mounts = {m.mountpoint: m for m in parse_mounts(MOUNTS)}
    assert mounts["/srv/my files"] == Mount("/dev/vdd1", "/srv/my files", "ext4", True)
    # /dev/vdc1 was mounted over /dev/vdb1 on /data: only the top one is visible
    assert mounts["/data"] == Mount("/dev/vdc1", "/data", "xfs", True)
    assert [m.mountpoint for m in parse_mounts(MOUNTS)].count("/data") == 1
    assert mounts["/"].readonly is False
    tab = parse_mounts("a\\011b /x\\134y ext4 rw 0 0\nshort line\n")
    assert tab == [Mount("a\tb", "/x\\y", "ext4", False)]


def test_default_filesystem_filters() -> None:
    kept = {m.mountpoint for m in select_mounts(parse_mounts(MOUNTS), FilesystemConfig())}
    assert kept == {"/", "/run", "/data", "/srv/my files"}


def test_filesystem_include_and_exclude_patterns() -> None:
    mounts = parse_mounts(MOUNTS)
    only_data = FilesystemConfig(mount_points_include=Regex("^/data$"))
    assert [m.mountpoint for m in select_mounts(mounts, only_data)] == ["/data"]
    no_tmpfs = FilesystemConfig(fs_types_exclude=Regex("^(tmpfs|sysfs|proc|cgroup2|overlay)$"),
                                mount_points_exclude=Regex(""))
    kept = {m.mountpoint for m in select_mounts(mounts, no_tmpfs)}
    assert kept == {"/", "/data", "/srv/my files", "/var/lib/docker/containers/x"}
    xfs_only = FilesystemConfig(fs_types_include=Regex("^xfs$"))
    assert [m.fstype for m in select_mounts(mounts, xfs_only)] == ["xfs"]


def test_device_filter() -> None:
    default_disks = device_filter(HostConfig().disk)
    assert default_disks("sda") and default_disks("nvme0n1")
    assert not default_disks("loop0") and not default_disks("ram1") and not default_disks("zram0")
    default_net = device_filter(HostConfig().network)
    assert default_net("eth0") and default_net("lo")
    assert not default_net("veth12ab") and not default_net("docker0")
    only = device_filter(DeviceFilterConfig(include=Regex("^eth"), exclude=Regex("^eth1$")))
    assert only("eth0") and not only("eth1") and not only("lo")


# --- the collector on fake files ---------------------------------------------------------------


def fake_statvfs(path: str) -> os.statvfs_result:
    if path == "/gone":
        raise FileNotFoundError(path)
    # bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax
    flag = os.ST_RDONLY if path == "/data" else 0
    return os.statvfs_result((4096, 1024, 1000, 400, 300, 500, 200, 200, flag, 255))


def make_host(tmp_path: Path, files: dict[str, str], timex: Timex | None = None,
              **cfg: object) -> HostCollector:
    block = tmp_path / "sys" / "block"
    block.mkdir(parents=True, exist_ok=True)
    for disk in ("sda", "vda", "loop0", "nvme0n1"):
        (block / disk).mkdir(exist_ok=True)

    def read(path: str) -> str:
        rel = os.path.relpath(path, "/fakeproc")
        if rel not in files:
            raise FileNotFoundError(path)
        return files[rel]

    config = HostConfig(proc_path="/fakeproc", sys_path=str(tmp_path / "sys"), **cfg)  # type: ignore[arg-type]
    return HostCollector(config, read=read, statvfs=fake_statvfs, ticks_per_second=100.0,
                         timex=lambda: timex)


FILES = {
    "stat": STAT, "meminfo": MEMINFO, "loadavg": "0.25 0.50 0.75 1/100 42\n",
    "diskstats": DISKSTATS, "net/dev": NET_DEV, "1/mounts": MOUNTS + "/dev/x /gone ext4 rw 0 0\n",
    "pressure/cpu": PRESSURE_CPU, "pressure/memory": PRESSURE_IO, "pressure/io": PRESSURE_IO,
    "vmstat": VMSTAT, "sys/net/netfilter/nf_conntrack_count": "312\n",
    "sys/net/netfilter/nf_conntrack_max": "262144\n",
}
FAKE_TIMEX = Timex(state=0, status=0x0001, offset=-32, freq=-65536, maxerror=8000, esterror=40)


def test_collector_on_fake_files(tmp_path: Path) -> None:
    found = family_samples(make_host(tmp_path, FILES, FAKE_TIMEX).collect())
    assert value(found, "qatoolbox_host_cpu_seconds_total", cpu="0", mode="user") == 6.0
    assert value(found, "qatoolbox_host_cpu_seconds_total", cpu="1", mode="system") == 1.0
    steal = value(found, "qatoolbox_host_cpu_seconds_total", cpu="0", mode="steal")
    assert steal == pytest.approx(0.05)
    modes = {dict(k[1])["mode"] for k in found if k[0] == "qatoolbox_host_cpu_seconds_total"}
    assert modes == {"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}
    assert value(found, "qatoolbox_host_boot_time_seconds") == 1700000000.0
    assert value(found, "qatoolbox_host_load1") == 0.25
    assert value(found, "qatoolbox_host_load5") == 0.5
    assert value(found, "qatoolbox_host_load15") == 0.75
    for name, kb in (("memory_total", 16318480), ("memory_available", 10734296),
                     ("memory_free", 1180744), ("memory_cached", 8597592),
                     ("memory_buffers", 420012), ("swap_total", 2097148),
                     ("swap_free", 2097000)):
        assert value(found, f"qatoolbox_host_{name}_bytes") == kb * 1024, name

    root = {"device": "/dev/vda1", "mountpoint": "/", "fstype": "ext4"}
    assert value(found, "qatoolbox_host_filesystem_size_bytes", **root) == 1000 * 1024
    assert value(found, "qatoolbox_host_filesystem_free_bytes", **root) == 400 * 1024
    assert value(found, "qatoolbox_host_filesystem_avail_bytes", **root) == 300 * 1024
    assert value(found, "qatoolbox_host_filesystem_files", **root) == 500
    assert value(found, "qatoolbox_host_filesystem_files_free", **root) == 200
    assert value(found, "qatoolbox_host_filesystem_readonly", **root) == 0
    data = {"device": "/dev/vdc1", "mountpoint": "/data", "fstype": "xfs"}
    assert value(found, "qatoolbox_host_filesystem_readonly", **data) == 1
    spaced = {"device": "/dev/vdd1", "mountpoint": "/srv/my files", "fstype": "ext4"}
    assert value(found, "qatoolbox_host_filesystem_readonly", **spaced) == 1  # from "ro"
    points = {dict(k[1])["mountpoint"] for k in found
              if k[0] == "qatoolbox_host_filesystem_size_bytes"}
    assert points == {"/", "/run", "/data", "/srv/my files"}  # /gone vanished: skipped

    # whole disks only (sda1 is a partition, not in /sys/block), loop devices excluded
    disks = {dict(k[1])["device"] for k in found
             if k[0] == "qatoolbox_host_disk_read_bytes_total"}
    assert disks == {"sda", "vda", "nvme0n1"}
    sda = {"device": "sda"}
    assert value(found, "qatoolbox_host_disk_reads_completed_total", **sda) == 1000
    assert value(found, "qatoolbox_host_disk_read_bytes_total", **sda) == 20000 * 512
    assert value(found, "qatoolbox_host_disk_read_time_seconds_total", **sda) == pytest.approx(0.5)
    assert value(found, "qatoolbox_host_disk_writes_completed_total", **sda) == 2000
    assert value(found, "qatoolbox_host_disk_written_bytes_total", **sda) == 40000 * 512
    assert value(found, "qatoolbox_host_disk_write_time_seconds_total", **sda) == pytest.approx(0.7)
    assert value(found, "qatoolbox_host_disk_io_time_seconds_total", **sda) == pytest.approx(1.2)

    nets = {dict(k[1])["device"] for k in found
            if k[0] == "qatoolbox_host_network_receive_bytes_total"}
    assert nets == {"lo", "eth0"}
    eth = {"device": "eth0"}
    for name, expected in (("receive_bytes", 123456), ("receive_packets", 789),
                           ("receive_errors", 1), ("receive_drop", 2),
                           ("transmit_bytes", 654321), ("transmit_packets", 987),
                           ("transmit_errors", 4), ("transmit_drop", 5)):
        assert value(found, f"qatoolbox_host_network_{name}_total", **eth) == expected, name

    assert value(found, "qatoolbox_host_pressure_cpu_waiting_seconds_total") == 2.5
    assert value(found, "qatoolbox_host_pressure_memory_waiting_seconds_total") == 1.5
    assert value(found, "qatoolbox_host_pressure_io_waiting_seconds_total") == 1.5

    assert value(found, "qatoolbox_host_vmstat_oom_kill_total") == 3
    assert value(found, "qatoolbox_host_nf_conntrack_entries") == 312
    assert value(found, "qatoolbox_host_nf_conntrack_entries_limit") == 262144
    assert value(found, "qatoolbox_host_timex_offset_seconds") == pytest.approx(-32e-6)
    assert value(found, "qatoolbox_host_timex_sync_status") == 1
    assert value(found, "qatoolbox_host_timex_maxerror_seconds") == pytest.approx(0.008)
    assert value(found, "qatoolbox_host_timex_estimated_error_seconds") == pytest.approx(40e-6)
    ratio = value(found, "qatoolbox_host_timex_frequency_adjustment_ratio")
    assert ratio == pytest.approx(1 - 1e-6)


def test_collector_types_and_help(tmp_path: Path) -> None:
    types = {}
    for family in make_host(tmp_path, FILES, FAKE_TIMEX).collect():
        assert family.documentation.endswith("."), family.name
        types[family.name] = family.type
    counters = {n for n, t in types.items() if t == "counter"}
    gauges = {n for n, t in types.items() if t == "gauge"}
    assert counters == {f"qatoolbox_host_{n}" for n in (
        "cpu_seconds", "disk_read_bytes", "disk_written_bytes", "disk_reads_completed",
        "disk_writes_completed", "disk_io_time_seconds", "disk_read_time_seconds",
        "disk_write_time_seconds", "network_receive_bytes", "network_transmit_bytes",
        "network_receive_packets", "network_transmit_packets", "network_receive_errors",
        "network_transmit_errors", "network_receive_drop", "network_transmit_drop",
        "pressure_cpu_waiting_seconds", "pressure_memory_waiting_seconds",
        "pressure_io_waiting_seconds", "pressure_memory_stalled_seconds",
        "pressure_io_stalled_seconds", "vmstat_oom_kill")}
    assert gauges == {f"qatoolbox_host_{n}" for n in (
        "load1", "load5", "load15", "boot_time_seconds", "memory_total_bytes",
        "memory_available_bytes", "memory_free_bytes", "memory_cached_bytes",
        "memory_buffers_bytes", "swap_total_bytes", "swap_free_bytes",
        "filesystem_size_bytes", "filesystem_avail_bytes", "filesystem_free_bytes",
        "filesystem_files", "filesystem_files_free", "filesystem_readonly",
        "nf_conntrack_entries", "nf_conntrack_entries_limit", "timex_offset_seconds",
        "timex_sync_status", "timex_maxerror_seconds", "timex_estimated_error_seconds",
        "timex_frequency_adjustment_ratio")}


def test_collector_without_pressure_and_pid1_mounts(tmp_path: Path) -> None:
    files = {k: v for k, v in FILES.items() if not k.startswith(("pressure/", "1/"))}
    files["self/mounts"] = "/dev/vda1 / ext4 rw 0 0\n"
    found = family_samples(make_host(tmp_path, files).collect())
    assert not [k for k in found if "pressure" in k[0]]
    # No timex reading (adjtimex refused): no clock families rather than a failure.
    assert not [k for k in found if "timex" in k[0]]
    points = {dict(k[1])["mountpoint"] for k in found
              if k[0] == "qatoolbox_host_filesystem_size_bytes"}
    assert points == {"/"}


def test_collector_device_filters_from_config(tmp_path: Path) -> None:
    host = make_host(tmp_path, FILES,
                     disk=DeviceFilterConfig(include=Regex("^vd")),
                     network=DeviceFilterConfig(exclude=Regex("^lo$")),
                     filesystem=FilesystemConfig(mount_points_include=Regex("^/data")))
    found = family_samples(host.collect())
    assert {dict(k[1])["device"] for k in found
            if k[0] == "qatoolbox_host_disk_reads_completed_total"} == {"vda"}
    assert {dict(k[1])["device"] for k in found
            if k[0] == "qatoolbox_host_network_receive_bytes_total"} == {"eth0", "veth12ab"}
    assert {dict(k[1])["mountpoint"] for k in found
            if k[0] == "qatoolbox_host_filesystem_size_bytes"} == {"/data"}


def test_optional_files_missing_or_garbled(tmp_path: Path) -> None:
    # An old kernel without oom_kill, no nf_conntrack module, or a garbled count: each family
    # is left out, the rest of the host families stay.
    files = {k: v for k, v in FILES.items() if not k.startswith("sys/")}
    files["vmstat"] = "nr_free_pages 1\n"
    found = family_samples(make_host(tmp_path, files).collect())
    names = {k[0] for k in found}
    assert not names & {"qatoolbox_host_vmstat_oom_kill_total",
                        "qatoolbox_host_nf_conntrack_entries",
                        "qatoolbox_host_nf_conntrack_entries_limit"}
    assert "qatoolbox_host_load1" in names
    files["sys/net/netfilter/nf_conntrack_count"] = "lots\n"
    files["sys/net/netfilter/nf_conntrack_max"] = "262144\n"
    names = {k[0] for k in family_samples(make_host(tmp_path, files).collect())}
    assert "qatoolbox_host_nf_conntrack_entries_limit" not in names


def test_missing_required_file_raises(tmp_path: Path) -> None:
    files = {k: v for k, v in FILES.items() if k != "meminfo"}
    with pytest.raises(OSError):
        list(make_host(tmp_path, files).collect())


# --- real values from this kernel -----------------------------------------------------------


def real_host(**cfg: object) -> HostCollector:
    return HostCollector(HostConfig(**cfg))  # type: ignore[arg-type]


def test_memory_total_matches_proc_meminfo() -> None:
    found = family_samples(real_host().collect())
    memtotal_kb = next(int(line.split()[1]) for line in
                       Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:"))
    assert value(found, "qatoolbox_host_memory_total_bytes") == memtotal_kb * 1024
    assert 0 < value(found, "qatoolbox_host_memory_available_bytes") <= memtotal_kb * 1024


def test_root_filesystem_matches_statvfs() -> None:
    # Include "/" whatever its type (a container's root is an overlay, excluded by default).
    fs = FilesystemConfig(mount_points_include=Regex("^/$"), fs_types_exclude=Regex(""))
    found = family_samples(real_host(filesystem=fs).collect())
    st = os.statvfs("/")
    sizes = {dict(k[1])["mountpoint"]: v for k, v in found.items()
             if k[0] == "qatoolbox_host_filesystem_size_bytes"}
    assert set(sizes) == {"/"}
    assert sizes["/"] == st.f_blocks * st.f_frsize
    avail = [v for k, v in found.items() if k[0] == "qatoolbox_host_filesystem_avail_bytes"]
    # others write to this disk meanwhile: allow 1 GiB of drift
    assert avail[0] == pytest.approx(st.f_bavail * st.f_frsize, abs=2**30)
    files = [v for k, v in found.items() if k[0] == "qatoolbox_host_filesystem_files"]
    assert files[0] == st.f_files


def test_default_filters_keep_a_real_disk_filesystem() -> None:
    found = family_samples(real_host().collect())
    fstypes = {dict(k[1])["fstype"] for k in found
               if k[0] == "qatoolbox_host_filesystem_size_bytes"}
    assert fstypes, "no file system reported"
    assert not fstypes & {"proc", "sysfs", "cgroup2", "devpts", "mqueue"}


def read_cpu_ticks() -> dict[str, list[int]]:
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and not line.startswith("cpu "):
            name, *values = line.split()
            ticks[name[3:]] = [int(v) for v in values[:8]]
    return ticks


def test_cpu_seconds_match_proc_stat() -> None:
    hz = os.sysconf("SC_CLK_TCK")
    before = read_cpu_ticks()
    found = family_samples(real_host().collect())
    after = read_cpu_ticks()
    assert set(before) == {dict(k[1])["cpu"] for k in found
                           if k[0] == "qatoolbox_host_cpu_seconds_total"}
    modes = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    for cpu, ticks in before.items():
        for i, mode in enumerate(modes):
            got = value(found, "qatoolbox_host_cpu_seconds_total", cpu=cpu, mode=mode)
            # a counter read between two readings of /proc/stat (iowait may even dip)
            assert ticks[i] / hz - 0.5 <= got <= after[cpu][i] / hz + 0.5, (cpu, mode)


def test_boot_time_load_and_loopback_counters_are_real() -> None:
    btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    before = parse_net_dev(Path("/proc/net/dev").read_text())
    found = family_samples(real_host().collect())
    after = parse_net_dev(Path("/proc/net/dev").read_text())
    assert value(found, "qatoolbox_host_boot_time_seconds") == btime
    assert value(found, "qatoolbox_host_load1") == pytest.approx(os.getloadavg()[0], abs=2.0)
    if "lo" in before:
        got = value(found, "qatoolbox_host_network_receive_bytes_total", device="lo")
        assert before["lo"][0] <= got <= after["lo"][0]


def read_pressure() -> dict[str, float]:
    totals = {}
    for resource in ("cpu", "memory", "io"):
        with contextlib.suppress(OSError):  # kernel without PSI
            text = Path(f"/proc/pressure/{resource}").read_text()
            totals[resource] = parse_pressure(text)["some"]
    return totals


def test_pressure_where_the_kernel_has_it() -> None:
    before = read_pressure()
    found = family_samples(real_host().collect())
    after = read_pressure()
    for resource in ("cpu", "memory", "io"):
        name = f"qatoolbox_host_pressure_{resource}_waiting_seconds_total"
        if resource not in before:
            assert (name, ()) not in found
        else:
            assert before[resource] <= found[(name, ())] <= after[resource]


def test_oom_kills_and_conntrack_match_the_kernel() -> None:
    def oom_kills() -> float | None:
        return parse_vmstat(Path("/proc/vmstat").read_text()).get("oom_kill")

    before = oom_kills()
    found = family_samples(real_host().collect())
    after = oom_kills()
    if before is None:  # a kernel older than 4.13
        assert ("qatoolbox_host_vmstat_oom_kill_total", ()) not in found
    else:
        assert after is not None
        assert before <= found[("qatoolbox_host_vmstat_oom_kill_total", ())] <= after
    limit_file = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    if limit_file.exists():
        assert found[("qatoolbox_host_nf_conntrack_entries_limit", ())] == float(
            limit_file.read_text())
        assert 0 <= found[("qatoolbox_host_nf_conntrack_entries", ())] <= float(
            limit_file.read_text())
    else:
        assert ("qatoolbox_host_nf_conntrack_entries", ()) not in found


class _KernelTimex(ctypes.Structure):
    # The test's own reading of struct timex through clock_adjtime(CLOCK_REALTIME), a
    # different entry point from the collector's adjtimex: only the leading fields matter.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("rest", ctypes.c_byte * 256)]


def test_clock_values_come_from_the_kernel() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    direct = _KernelTimex()
    state = libc.clock_adjtime(0, ctypes.byref(direct))
    found = family_samples(real_host().collect())
    if state < 0:  # the call is filtered here: the collector must leave the family out
        assert ("qatoolbox_host_timex_sync_status", ()) not in found
        return
    assert found[("qatoolbox_host_timex_sync_status", ())] == (0.0 if state == 5 else 1.0)
    unit = 1e9 if direct.status & 0x2000 else 1e6
    # The kernel may adjust the offset between the two readings, but not by a second.
    assert found[("qatoolbox_host_timex_offset_seconds", ())] == pytest.approx(
        direct.offset / unit, abs=1.0)
    # maxerror grows by 500 ppm of elapsed time between readings (capped at 16 s).
    assert found[("qatoolbox_host_timex_maxerror_seconds", ())] == pytest.approx(
        direct.maxerror / 1e6, abs=0.01)
    assert found[("qatoolbox_host_timex_estimated_error_seconds", ())] == direct.esterror / 1e6
    assert found[("qatoolbox_host_timex_frequency_adjustment_ratio", ())] == pytest.approx(
        1 + direct.freq / 65536 / 1e6)
