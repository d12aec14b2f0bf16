"""The Host dashboard: machine resources and process groups."""

from __future__ import annotations

from dashboard import Dashboard, Row, interval_variable
from panels import bargauge, stat, table, threshold_steps, timeseries
from promql import rate, selector


def dashboard() -> Dashboard:
    """CPU, load, memory, file systems, disks, network, process groups and the exporter."""
    has_fstype = 'fstype!=""'
    host = "{{instance}} "  # All hosts by default: every line names its host
    idle = 'mode="idle"'
    return Dashboard("qatoolbox-host", "QAToolBox / Host",
                     "CPU, load, memory, file systems, disks, network and process groups.", [
        Row("CPU and load"),
        timeseries("CPU by mode", "Share of CPU time in each mode, averaged over CPUs.",
                   "percentunit",
                   [(f"avg by (instance, mode) ({rate('qatoolbox_host_cpu_seconds_total')})",
                     host + "{{mode}}")], w=12, stack=True, max_=1),
        timeseries("Load", "Load averages against the number of CPUs.", "short",
                   [(selector("qatoolbox_host_load1"), host + "load1"),
                    (selector("qatoolbox_host_load5"), host + "load5"),
                    (selector("qatoolbox_host_load15"), host + "load15"),
                    (f"count by (instance) ({rate('qatoolbox_host_cpu_seconds_total', idle)})",
                     host + "CPUs")], w=12),
        timeseries("Pressure", "Share of time some task waited for CPU, memory or I/O "
                   "(PSI, where the kernel has it).", "percentunit",
                   [(rate("qatoolbox_host_pressure_cpu_waiting_seconds_total"), host + "cpu"),
                    (rate("qatoolbox_host_pressure_memory_waiting_seconds_total"), host + "memory"),
                    (rate("qatoolbox_host_pressure_io_waiting_seconds_total"), host + "io")], w=12),
        timeseries("Load per CPU", "5-minute load average per CPU (HostHighLoad at 2).", "short",
                   [(selector("instance:qatoolbox_host_load5_per_cpu:ratio"), "{{instance}}")],
                   w=12, alert_lines=(2.0,)),
        timeseries("Clock offset", "Offset of the clock from its reference as the kernel "
                   "knows it (adjtimex); HostClockSkew at +-50 ms.", "s",
                   [(selector("qatoolbox_host_timex_offset_seconds"), "{{instance}}")], w=12,
                   alert_lines=(-0.05, 0.05)),
        stat("Uptime", "Time since the host booted.", "s",
             [(f"time() - {selector('qatoolbox_host_boot_time_seconds')}", "{{instance}}")],
             w=6, h=8, graph=False),
        stat("Clock synchronised", "1 while the kernel considers the clock synchronised.",
             "none", [(selector("qatoolbox_host_timex_sync_status"), "{{instance}}")], w=6, h=8,
             graph=False, thresholds=threshold_steps((None, "red"), (1, "green")),
             mappings=[{"type": "value", "options": {
                 "0": {"text": "not synced", "color": "red", "index": 0},
                 "1": {"text": "synced", "color": "green", "index": 1}}}]),
        Row("Memory"),
        timeseries("Memory", "Used (total minus available), cached, buffers and free memory.",
                   "bytes",
                   [(f"{selector('qatoolbox_host_memory_total_bytes')} - "
                     f"{selector('qatoolbox_host_memory_available_bytes')}", host + "used"),
                    (selector("qatoolbox_host_memory_cached_bytes"), host + "cached"),
                    (selector("qatoolbox_host_memory_buffers_bytes"), host + "buffers"),
                    (selector("qatoolbox_host_memory_free_bytes"), host + "free"),
                    (selector("qatoolbox_host_memory_total_bytes"), host + "total")], w=12),
        timeseries("Swap", "Swap in use and swap size.", "bytes",
                   [(f"{selector('qatoolbox_host_swap_total_bytes')} - "
                     f"{selector('qatoolbox_host_swap_free_bytes')}", host + "used"),
                    (selector("qatoolbox_host_swap_total_bytes"), host + "total")], w=12),
        Row("File systems"),
        bargauge("File system usage", "Used share of each file system, coloured at the "
                 "HostDiskUsage* lines (90% warning, 95% critical).", "percentunit",
                 [(selector("instance_mountpoint:qatoolbox_host_filesystem_usage:ratio",
                            has_fstype), host + "{{mountpoint}}")],
                 w=8, max_=1, thresholds=threshold_steps((None, "green"), (0.90, "orange"),
                                                     (0.95, "red"))),
        timeseries("Free space predicted in 24 h",
                   "Linear prediction of available bytes 24 h ahead from the trend window; "
                   "below zero means the file system fills within a day.", "bytes",
                   [(f"predict_linear("
                     f"{selector('qatoolbox_host_filesystem_avail_bytes', has_fstype)}"
                     f"[$trend_window], 86400)", host + "{{mountpoint}}")], w=8),
        table("File systems", "Size, free space and inodes per file system.", "bytes",
              [(selector("qatoolbox_host_filesystem_size_bytes", has_fstype), ""),
               (selector("qatoolbox_host_filesystem_avail_bytes", has_fstype), ""),
               (f"1 - {selector('qatoolbox_host_filesystem_files_free', has_fstype)}\n/\n"
                f"{selector('qatoolbox_host_filesystem_files', has_fstype)}", ""),
               (selector("qatoolbox_host_filesystem_readonly", has_fstype), "")],
              w=8, columns={"A": "size", "B": "available", "C": "inodes used", "D": "read-only"},
              units={"inodes used": "percentunit", "read-only": "bool"}),
        Row("Disks and network"),
        timeseries("Disk throughput", "Bytes read (negative) and written per second by disk.",
                   "Bps",
                   [(f"-{rate('qatoolbox_host_disk_read_bytes_total')}", host + "{{device}} read"),
                    (rate("qatoolbox_host_disk_written_bytes_total"), host + "{{device}} written")],
                   w=8),
        timeseries("Disk utilisation", "Share of time each disk was busy with I/O.",
                   "percentunit",
                   [(rate("qatoolbox_host_disk_io_time_seconds_total"), host + "{{device}}")], w=8),
        timeseries("Disk IOPS", "Reads and writes completed per second.", "iops",
                   [(rate("qatoolbox_host_disk_reads_completed_total"), host + "{{device}} reads"),
                    (rate("qatoolbox_host_disk_writes_completed_total"),
                     host + "{{device}} writes")],
                   w=8),
        timeseries("Network throughput",
                   "Bytes received (negative) and transmitted per second by interface.", "Bps",
                   [(f"-{rate('qatoolbox_host_network_receive_bytes_total')}",
                     host + "{{device}} in"),
                    (rate("qatoolbox_host_network_transmit_bytes_total"), host + "{{device}} out")],
                   w=12),
        timeseries("Network errors and drops", "Errors and dropped packets per second.", "pps",
                   [(f"sum by (instance, device) "
                     f"({rate('qatoolbox_host_network_receive_errors_total')}"
                     f" + {rate('qatoolbox_host_network_transmit_errors_total')})",
                     host + "{{device}} errors"),
                    (f"sum by (instance, device) "
                     f"({rate('qatoolbox_host_network_receive_drop_total')}"
                     f" + {rate('qatoolbox_host_network_transmit_drop_total')})",
                     host + "{{device}} drops")], w=12),
        Row("Process groups"),
        timeseries("Processes", "Processes per group; 0 means the group is down.", "short",
                   [(selector("qatoolbox_process_num_procs"), host + "{{group}}")], w=8),
        timeseries("Process CPU", "CPU seconds per second used by each group (1 = one core).",
                   "short",
                   [(f"sum by (instance, group) ({rate('qatoolbox_process_cpu_seconds_total')})",
                     host + "{{group}}")], w=8),
        timeseries("Process memory", "Resident memory of each group.", "bytes",
                   [(selector("qatoolbox_process_resident_memory_bytes"), host + "{{group}}")],
                   w=8),
        timeseries("Open files", "Open file descriptors of each group.", "short",
                   [(selector("qatoolbox_process_open_fds"), host + "{{group}}")], w=8),
        timeseries("Threads", "Threads of each group.", "short",
                   [(selector("qatoolbox_process_threads"), host + "{{group}}")], w=8),
        timeseries("Oldest process age", "Time since the oldest process of each group started; "
                   "a drop means the group restarted.", "s",
                   [(f"time() - {selector('qatoolbox_process_oldest_start_time_seconds')}",
                     host + "{{group}}")], w=8),
        Row("Exporter"),
        timeseries("Collector duration", "Time each collector took in the last scrape "
                   "(each runs under the scrape.timeout budget).", "s",
                   [(selector("qatoolbox_exporter_collector_duration_seconds"),
                     host + "{{collector}}")],
                   w=12),
        timeseries("Collector success", "1 when the collector's last run succeeded, 0 when it "
                   "failed or ran out of time.", "none",
                   [(selector("qatoolbox_exporter_collector_success"), host + "{{collector}}")],
                   w=12, min_=0, max_=1),
    ], [interval_variable("trend_window", "Trend window", ["1h", "6h", "24h"], "6h")])
