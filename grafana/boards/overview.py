"""The Overview: one screen for administrators, fleet-wide (the design's monitoring dashboard)."""

from __future__ import annotations

from dashboard import Dashboard, Row, link
from panels import stat, table, threshold_steps, timeseries, up_stat
from promql import (
    SELECTED_CLUSTERS,
    once_per_server,
    rate,
    selector,
    share_of_hits,
    sum_per_server,
)

from boards.business import CLEANUP_HELP, NO_CAPSULES, ONLINE_HELP

# Every host collector emits it: a host is a target with this series.
BOOT_TIME = "qatoolbox_host_boot_time_seconds"


def shared(metric: str, labels: str = "") -> str:
    """A shared server's family from every exporter of the cluster, whatever host is selected."""
    return selector(metric, labels, scope=SELECTED_CLUSTERS)


def shared_rate(metric: str) -> str:
    """The rate of a shared server's counter from every exporter of the cluster."""
    return rate(metric, scope=SELECTED_CLUSTERS)


def per_host(expr: str) -> str:
    """One row per host of the hosts table."""
    return f"max by (cluster, instance) ({expr})"


def per_cluster(metric: str, labels: str = "", by: str = "") -> str:
    """A business figure once per database, summed per cluster."""
    return f"sum by (cluster) ({once_per_server(shared(metric, labels), by)})"


def dashboard() -> Dashboard:
    """Alerts, every host with its state, each shared database and cache once, requests and
    business figures."""
    alerts = [(f'count(ALERTS{{alertstate="firing",severity="{severity}"}}) or vector(0)',
               severity) for severity in ("critical", "warning", "info")]
    pg_hits = sum_per_server(shared_rate("qatoolbox_postgres_blocks_hit_total"), "datname")
    pg_reads = sum_per_server(shared_rate("qatoolbox_postgres_blocks_read_total"), "datname")
    redis_hits = once_per_server(shared_rate("qatoolbox_redis_keyspace_hits_total"))
    redis_misses = once_per_server(shared_rate("qatoolbox_redis_keyspace_misses_total"))
    return Dashboard("qatoolbox-overview", "QAToolBox / Overview",
                     "The fleet at a glance: alerts, every host with its state, each shared "
                     "database and cache once, requests and business figures.", [
        Row("Health and alerts"),
        stat("Exporters up", "Exporter targets Prometheus scrapes successfully, of all "
             "targets (the `up` series).", "short",
             [(f"count({selector('up')} == 1) or vector(0)", "up"),
              (f"count({selector('up')})", "targets")], graph=False),
        up_stat("PostgreSQL", "1 when an exporter's last query of the server succeeded; each "
                "server once, however many exporters read it.",
                [(once_per_server(shared("qatoolbox_postgres_up")), "{{server}}")],
                links=[link("qatoolbox-postgres", "PostgreSQL dashboard")]),
        up_stat("Redis", "1 when an exporter's last command to the server succeeded; each "
                "server once.",
                [(once_per_server(shared("qatoolbox_redis_up")), "{{server}}")],
                links=[link("qatoolbox-redis", "Redis dashboard")]),
        stat("Failing collectors", "Collectors whose last run failed or timed out, on every "
             "exporter.", "short",
             [(f"count({selector('qatoolbox_exporter_collector_success')} == 0) or vector(0)",
               "failing")], graph=False,
             thresholds=threshold_steps((None, "green"), (1, "red"))),
        stat("Firing alerts", "Alerts firing now, by severity (from ALERTS).", "short", alerts,
             w=8, graph=False, thresholds=threshold_steps((None, "green"), (1, "orange"))),
        table("Hosts", "Every host (exporter with the host collector) seen in the time range, "
              "with its state now: exporter up, CPU and memory utilisation, fullest file "
              "system, load per CPU and uptime. A host whose exporter is down stays listed "
              "with up 0.", "percentunit",
              [(per_host(f"{selector('up')} and on (job, instance) "
                         f"present_over_time({selector(BOOT_TIME)}[$__range])"), ""),
               (per_host(selector("instance:qatoolbox_host_cpu_utilisation:ratio")), ""),
               (per_host(selector("instance:qatoolbox_host_memory_utilisation:ratio")), ""),
               (per_host(
                   selector("instance_mountpoint:qatoolbox_host_filesystem_usage:ratio")), ""),
               (per_host(selector("instance:qatoolbox_host_load5_per_cpu:ratio")), ""),
               (per_host(f"time() - {selector(BOOT_TIME)}"), "")],
              h=8, columns={"A": "up", "B": "CPU", "C": "memory", "D": "fullest file system",
                            "E": "load per CPU", "F": "uptime"},
              units={"up": "bool", "load per CPU": "short", "uptime": "s"}, sort_by="CPU"),
        table("Firing alerts", "Every alert firing now with its labels.", "none",
              [('ALERTS{alertstate="firing"}', "")], h=6),
        Row("Host"),
        timeseries("CPU utilisation", "Share of CPU time busy (neither idle nor iowait), "
                   "averaged over CPUs: the recording rule HostCpuUsage* alert on, with their "
                   "80% and 95% lines.", "percentunit",
                   [(selector("instance:qatoolbox_host_cpu_utilisation:ratio"), "{{instance}}")],
                   min_=0, max_=1, alert_lines=(0.80, 0.95)),
        timeseries("Memory utilisation", "Share of memory not available for new work "
                   "(HostMemoryUsage* lines at 85% and 95%).", "percentunit",
                   [(selector("instance:qatoolbox_host_memory_utilisation:ratio"),
                     "{{instance}}")],
                   min_=0, max_=1, alert_lines=(0.85, 0.95)),
        timeseries("Fullest file system", "Used share of the fullest file system per host "
                   "(HostDiskUsage* lines at 90% and 95%).", "percentunit",
                   [(f"max by (instance) "
                     f"({selector('instance_mountpoint:qatoolbox_host_filesystem_usage:ratio')})",
                     "{{instance}}")], min_=0, max_=1, alert_lines=(0.90, 0.95)),
        Row("Database and cache"),
        timeseries("PostgreSQL connections", "Client connections against max_connections, "
                   "per server.", "short",
                   [(sum_per_server(shared("qatoolbox_postgres_connections"), "datname, state"),
                     "{{server}} connections"),
                    (once_per_server(shared("qatoolbox_postgres_max_connections")),
                     "{{server}} max_connections")], w=6),
        timeseries("Slow queries and lock waits",
                   "Active queries older than the slow threshold, and backends waiting on a "
                   "lock, per server.", "short",
                   [(sum_per_server(shared("qatoolbox_postgres_slow_queries"), "datname"),
                     "{{server}} slow queries"),
                    (sum_per_server(shared("qatoolbox_postgres_lock_waits"), "datname"),
                     "{{server}} lock waits")], w=6),
        timeseries("PostgreSQL cache hit ratio",
                   "Share of block reads served from shared buffers, per server.",
                   "percentunit", [(share_of_hits(pg_hits, pg_reads), "{{server}}")],
                   w=6, max_=1),
        timeseries("Redis hit ratio", "Share of key lookups that found the key, per server.",
                   "percentunit", [(share_of_hits(redis_hits, redis_misses), "{{server}}")],
                   w=6, max_=1),
        timeseries("Redis memory", "Memory Redis uses for data, and its limit when set.",
                   "bytes",
                   [(once_per_server(shared("qatoolbox_redis_memory_used_bytes")),
                     "{{server}} used"),
                    (f"{once_per_server(shared('qatoolbox_redis_memory_max_bytes'))} > 0",
                     "{{server}} maxmemory")], w=6),
        timeseries("Redis clients", "Connected and blocked clients.", "short",
                   [(once_per_server(shared("qatoolbox_redis_connected_clients")),
                     "{{server}} connected"),
                    (once_per_server(shared("qatoolbox_redis_blocked_clients")),
                     "{{server}} blocked")],
                   w=6),
        timeseries("Celery backlog", "Messages waiting in each Celery queue of each broker.",
                   "short",
                   [(once_per_server(shared("qatoolbox_celery_queue_length"), "queue"),
                     "{{server}} {{queue}}")], w=12),
        Row("Application"),
        timeseries("Request rate", "HTTP requests per second by status class, all hosts "
                   "together.", "reqps",
                   [(f"sum by (status) ({rate('qatoolbox_http_requests_total')})",
                     "{{status}}")], w=8, stack=True),
        timeseries("5xx ratio", "Share of requests answered with a server error over 5 "
                   "minutes, per instance (HttpErrorRatioHigh at 5%).", "percentunit",
                   [(selector("instance:qatoolbox_http_requests_5xx:ratio_rate5m"),
                     "{{instance}}")],
                   w=8, min_=0, alert_lines=(0.05,)),
        timeseries("Latency p95 / p99", "Request duration percentiles over all routes, over 5 "
                   "minutes (HttpLatencyP95High at 2 s).", "s",
                   [(selector("instance:qatoolbox_http_request_duration_seconds:p95_rate5m"),
                     "{{instance}} p95"),
                    (selector("instance:qatoolbox_http_request_duration_seconds:p99_rate5m"),
                     "{{instance}} p99")], w=8, alert_lines=(2.0,)),
        Row("Business"),
        stat("Registered users", "Accounts in auth_user (active and inactive), each database "
             "once, per cluster.", "short",
             [(per_cluster("qatoolbox_users", by="state"), "{{cluster}}")],
             links=[link("qatoolbox-business", "Business dashboard")]),
        stat("Active users (24 h)", "Users who logged in within the last 24 hours.", "short",
             [(per_cluster("qatoolbox_users_active", 'window="24h"', "window"), "{{cluster}}")]),
        stat("Online users", ONLINE_HELP, "short",
             [(per_cluster("qatoolbox_users_online"), "{{cluster}}")]),
        stat("Messages per minute", "Chat messages sent per minute.", "short",
             [(f"sum by (cluster) ("
               f"{once_per_server(shared_rate('qatoolbox_chat_messages_total'), 'message_type')}"
               f") * 60", "{{cluster}}")]),
        stat("Chat rooms past cleanup", CLEANUP_HELP, "short",
             [(per_cluster("qatoolbox_chat_rooms_cleanup_overdue"), "{{cluster}}")],
             thresholds=threshold_steps((None, "green"), (1, "orange"))),
        stat("Overdue time capsules",
             "Capsules past their unlock time by over an hour, still locked (unlock stalled). "
             "Only where the time capsule table exists (QAToolBox before its tools migration "
             "0070).", "short", [(per_cluster("qatoolbox_time_capsules_overdue"), "{{cluster}}")],
             thresholds=threshold_steps((None, "green"), (1, "orange")), no_value=NO_CAPSULES),
    ])
