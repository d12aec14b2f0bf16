"""The Redis dashboard: cache effectiveness, memory, clients, commands, key groups and
Celery queues."""

from __future__ import annotations

from dashboard import Dashboard, Row
from panels import bargauge, heatmap, stat, threshold_steps, timeseries, up_stat
from promql import hit_ratio, quantile, rate, selector


def dashboard() -> Dashboard:
    """Hit ratio, memory, clients, commands and latency, evictions, key groups and Celery
    queues of one server."""
    lookups_hit = hit_ratio("qatoolbox_redis_keyspace_hits_total",
                            "qatoolbox_redis_keyspace_misses_total", "server")
    return Dashboard("qatoolbox-redis", "QAToolBox / Redis",
                     "Hit ratio, memory, clients, commands and latency, evictions, key groups "
                     "and Celery queues.", [
        Row("Server"),
        up_stat("Up", "1 when the exporter's last Redis command succeeded.",
                [(selector("qatoolbox_redis_up"), "{{server}}")]),
        stat("Version", "Server version, mode and role.", "none",
             [(selector("qatoolbox_redis_version_info"), "{{version}} {{mode}} {{role}}")],
             text_mode="name", graph=False),
        stat("Uptime", "Time since the server started.", "s",
             [(selector("qatoolbox_redis_uptime_seconds"), "{{server}}")], graph=False),
        stat("Hit ratio", "Share of key lookups that found the key.", "percentunit",
             [(lookups_hit, "{{server}}")]),
        stat("Memory of limit",
             "Used memory against maxmemory, or against host memory when no limit is set "
             "(so the panel never shows N/A).", "percentunit",
             [(f"{selector('qatoolbox_redis_memory_used_bytes')}\n"
               f"/ on (job, instance) group_left ()\n"
               f"({selector('qatoolbox_redis_memory_max_bytes')} > 0\n or on (job, instance)\n"
               f"{selector('qatoolbox_host_memory_total_bytes')})", "{{server}}")],
             thresholds=threshold_steps((None, "green"), (0.8, "orange"), (0.9, "red"))),
        stat("Slow log", "Entries in the slow log.", "short",
             [(selector("qatoolbox_redis_slowlog_length"), "{{server}}")]),
        Row("Cache"),
        timeseries("Hit ratio", "Share of key lookups that found the key.", "percentunit",
                   [(lookups_hit, "{{server}}")],
                   max_=1),
        timeseries("Evicted and expired keys", "Keys evicted for lack of memory and keys "
                   "expired, per second.", "ops",
                   [(rate("qatoolbox_redis_evicted_keys_total"), "evicted"),
                    (rate("qatoolbox_redis_expired_keys_total"), "expired")]),
        timeseries("Keys per database", "Keys in each database, and those with a TTL.",
                   "short",
                   [(selector("qatoolbox_redis_db_keys"), "{{db}}"),
                    (selector("qatoolbox_redis_db_keys_expiring"), "{{db}} expiring")]),
        bargauge("Key groups", "QAToolBox key groups counted by the exporter's bounded SCAN.",
                 "short", [(selector("qatoolbox_redis_key_group_keys"), "{{group}}")], w=12),
        stat("Key count complete", "1 when the last count covered the whole keyspace "
             "within its budget.", "none",
             [(selector("qatoolbox_redis_key_group_scan_complete"), "{{server}}")], w=6, h=8,
             graph=False, mappings=[{"type": "value", "options": {
                 "0": {"text": "partial", "color": "orange", "index": 0},
                 "1": {"text": "complete", "color": "green", "index": 1}}}]),
        stat("Key count duration", "Time the last key-group count took.", "s",
             [(selector("qatoolbox_redis_key_group_scan_duration_seconds"), "{{server}}")],
             w=6, h=8),
        Row("Memory and clients"),
        timeseries("Memory", "Used, resident and peak memory, and maxmemory when set.", "bytes",
                   [(selector("qatoolbox_redis_memory_used_bytes"), "used"),
                    (selector("qatoolbox_redis_memory_rss_bytes"), "rss"),
                    (selector("qatoolbox_redis_memory_peak_bytes"), "peak"),
                    (f"{selector('qatoolbox_redis_memory_max_bytes')} > 0", "maxmemory")]),
        timeseries("Fragmentation", "RSS divided by used memory.", "none",
                   [(selector("qatoolbox_redis_memory_fragmentation_ratio"), "{{server}}")]),
        timeseries("Clients", "Connected and blocked clients against maxclients.", "short",
                   [(selector("qatoolbox_redis_connected_clients"), "connected"),
                    (selector("qatoolbox_redis_blocked_clients"), "blocked"),
                    (selector("qatoolbox_redis_max_clients"), "maxclients")]),
        timeseries("Connections", "Connections accepted and rejected per second.", "ops",
                   [(rate("qatoolbox_redis_connections_received_total"), "received"),
                    (rate("qatoolbox_redis_rejected_connections_total"), "rejected")]),
        timeseries("Network", "Bytes received and sent per second.", "Bps",
                   [(rate("qatoolbox_redis_net_input_bytes_total"), "in"),
                    (rate("qatoolbox_redis_net_output_bytes_total"), "out")]),
        timeseries("Replication and persistence",
                   "Connected replicas, master link state, changes since the last save.",
                   "short",
                   [(selector("qatoolbox_redis_connected_replicas"), "replicas"),
                    (selector("qatoolbox_redis_master_link_up"), "master link up"),
                    (selector("qatoolbox_redis_rdb_changes_since_last_save"), "unsaved changes"),
                    (f"time() - {selector('qatoolbox_redis_rdb_last_save_timestamp_seconds')}",
                     "seconds since save")]),
        Row("Commands"),
        timeseries("Commands by type", "Calls per second of the busiest commands.", "ops",
                   [(f"topk(10, sum by (cmd) ({rate('qatoolbox_redis_commands_total')}))",
                     "{{cmd}}"),
                    (f"sum({rate('qatoolbox_redis_commands_processed_total')})", "all")], w=12),
        timeseries("Mean command time", "Mean time per call of each command (from INFO "
                   "commandstats).", "s",
                   [(f"topk(10, sum by (cmd) "
                     f"({rate('qatoolbox_redis_commands_duration_seconds_total')})\n/\n"
                     f"sum by (cmd) ({rate('qatoolbox_redis_commands_total')}))", "{{cmd}}")],
                   w=12),
        heatmap("Command latency", "Distribution of command latencies (LATENCY HISTOGRAM, "
                "Redis 7 and later).", "s",
                f"sum by (le) ({rate('qatoolbox_redis_command_duration_seconds_bucket')})"),
        timeseries("Command latency p99", "99th percentile latency per command (LATENCY "
                   "HISTOGRAM).", "s",
                   [("topk(10, "
                     + quantile(0.99, "qatoolbox_redis_command_duration_seconds", "cmd") + ")",
                     "{{cmd}}")], w=12),
        Row("Celery queues"),
        timeseries("Queue length", "Messages waiting in each Celery queue (all priorities).",
                   "short",
                   [(f"sum by (queue) ({selector('qatoolbox_celery_queue_length')})", "{{queue}}")],
                   w=12),
        timeseries("Unacknowledged messages", "Messages delivered to workers and not yet "
                   "acknowledged.", "short",
                   [(selector("qatoolbox_celery_unacked_messages"), "{{server}}")], w=12),
    ])
