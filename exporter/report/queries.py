"""The report's PromQL: what each section shows, from which series, with which thresholds.

Peaks and 5-minute figures read the recording rules of prometheus/rules/recording.yml (the
same series the alerts use); totals, ratios and percentiles over the whole period are computed
from the raw counters and histogram buckets with increase() over the period, because an average
of 5-minute ratios or quantiles is not the period's ratio or quantile. SLO figures read Sloth's
series (slo:*). Placeholders: $sel the series selector (job="qatoolbox" by default), $w the
period as a PromQL range, $ws the period in seconds, $step the chart step, $peak the subquery
resolution of peaks over sums.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from string import Template

RATIO, SECONDS, BYTES, COUNT, RATE, TIMESTAMP = (
    "ratio", "seconds", "bytes", "count", "per_second", "timestamp")


@dataclass(frozen=True)
class Threshold:
    """A line on a chart, as the alert rules and dashboards draw it."""

    value: float
    label: str
    severity: str = "warning"  # warning or critical: the line's colour


@dataclass(frozen=True)
class Figure:
    """One number for the whole period, compared with the period before."""

    key: str
    title: str
    unit: str
    expr: str
    better: str = ""  # "higher", "lower" or "" (neither): colours the change


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    unit: str
    expr: str
    better: str = ""


@dataclass(frozen=True)
class Table:
    """Rows keyed by the `by` labels, one query per column; sorted by `sort` descending and cut
    to the report's --top unless `limit` is False."""

    key: str
    title: str
    by: tuple[str, ...]
    columns: tuple[Column, ...]
    sort: str
    limit: bool = True
    note: str = ""
    compare: bool = True  # False: no previous-period column (per-day tables)


@dataclass(frozen=True)
class Line:
    expr: str
    legend: str  # label names in braces, e.g. "{route}"; empty: the chart's title


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    unit: str
    lines: tuple[Line, ...]
    thresholds: tuple[Threshold, ...] = ()
    compare: bool = False  # also draw the previous period, shifted
    ymax: float | None = None


@dataclass(frozen=True)
class Daily:
    """Per-day figures: each expression evaluated at the end of each day of the period."""

    key: str
    title: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    probe: str  # the series whose absence means "nothing to report here"
    empty: str  # what the report says then
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    charts: tuple[Chart, ...] = ()
    daily: Daily | None = None
    selector: bool = True  # False: series without the job label (Sloth's)
    intro: str = ""


_NAME = re.compile(r"(?<![\w:])(?:[a-z_]+:)?qatoolbox_[a-z0-9_]+(?::[a-z0-9_]+)?(?![\w:])"
                   r"|(?<![\w:])slo:[a-z0-9_]+:[a-z0-9_]+(?![\w:])")


def names(expr: str) -> set[str]:
    """The metric names an expression reads."""
    return set(_NAME.findall(expr))


def render(expr: str, **values: str) -> str:
    return Template(expr).substitute(values)


REQ = "qatoolbox_http_requests_total"
REQ_5XX = 'qatoolbox_http_requests_total{$sel,status=~"5.."}'
DUR = "qatoolbox_http_request_duration_seconds_bucket"


def _ratio(bad: str, total: str, by: str = "") -> str:
    """bad/total over the period: 0 rather than nothing when there is traffic but no bad,
    nothing when there is no traffic."""
    grouping = f" by ({by})" if by else ""
    return (f"(sum{grouping} (increase({bad}[$w])) or sum{grouping} (increase({total}[$w])) * 0)"
            f" / (sum{grouping} (increase({total}[$w])) > 0)")


def _quantile(q: float, buckets: str, by: str = "") -> str:
    grouping = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({grouping}) (increase({buckets}{{$sel}}[$w])))"


def _mean(histogram: str, by: str) -> str:
    return (f"sum by ({by}) (increase({histogram}_sum{{$sel}}[$w]))"
            f" / (sum by ({by}) (increase({histogram}_count{{$sel}}[$w])) > 0)")


def _peak(rule: str, by: str) -> str:
    return f"max by ({by}) (max_over_time({rule}{{$sel}}[$w]))"


SLO_BY = "sloth_service, sloth_slo"

SLO = Section(
    "slo", "Service level objectives", "slo:objective:ratio",
    "No SLO rules found: Prometheus has no slo:objective:ratio series (Sloth's naming) in "
    "this period.",
    selector=False,
    intro="Attainment is one minus the period's mean 5-minute error ratio, as Sloth computes "
          "it; the error budget is what the SLO rules report left of their own window at the "
          "end of the period.",
    tables=(Table("objectives", "Objectives", ("sloth_service", "sloth_slo"), (
        Column("objective", "objective", RATIO,
               f"max by ({SLO_BY}) (last_over_time(slo:objective:ratio[$w]))"),
        Column("attainment", "attainment", RATIO,
               f"1 - max by ({SLO_BY}) (avg_over_time(slo:sli_error:ratio_rate5m[$w]))",
               "higher"),
        Column("budget_remaining", "error budget left", RATIO,
               f"max by ({SLO_BY}) "
               "(last_over_time(slo:period_error_budget_remaining:ratio[$w]))", "higher"),
        Column("burn_rate_peak", "peak burn rate", COUNT,
               f"max by ({SLO_BY}) (max_over_time(slo:current_burn_rate:ratio[$w]))", "lower"),
    ), "attainment", limit=False),),
    charts=(Chart("budget", "Error budget left", RATIO, (
        Line(f"max by ({SLO_BY}) "
             "(last_over_time(slo:period_error_budget_remaining:ratio[$step]))",
             "{sloth_service} {sloth_slo}"),), (Threshold(0, "budget spent", "critical"),)),),
)

HTTP = Section(
    "http", "Requests", REQ,
    "No request metrics: the app collector has no instrumented workers (see docs/app.md).",
    figures=(
        Figure("requests", "requests", COUNT, f"sum(increase({REQ}{{$sel}}[$w]))"),
        Figure("rate_mean", "mean requests per second", RATE,
               f"sum(increase({REQ}{{$sel}}[$w])) / $ws"),
        Figure("rate_peak", "peak requests per second (5 min)", RATE,
               "max_over_time(sum(instance:qatoolbox_http_requests:rate5m{$sel})[$w:$peak])"),
        Figure("errors", "5xx responses", COUNT,
               f"sum(increase({REQ_5XX}[$w])) or sum(increase({REQ}{{$sel}}[$w])) * 0",
               "lower"),
        Figure("error_ratio", "5xx ratio", RATIO, _ratio(REQ_5XX, f"{REQ}{{$sel}}"), "lower"),
        Figure("error_ratio_peak", "worst 5-minute 5xx ratio", RATIO,
               "max(max_over_time(instance:qatoolbox_http_requests_5xx:ratio_rate5m{$sel}[$w]))",
               "lower"),
        Figure("p95", "p95 latency", SECONDS, _quantile(0.95, DUR), "lower"),
        Figure("p99", "p99 latency", SECONDS, _quantile(0.99, DUR), "lower"),
        Figure("p99_peak", "worst 5-minute p99", SECONDS,
               "max(max_over_time(instance:qatoolbox_http_request_duration_seconds:p99_rate5m"
               "{$sel}[$w]))", "lower"),
    ),
    tables=(
        Table("routes", "Slowest routes", ("route",), (
            Column("requests", "requests", COUNT,
                   f"sum by (route) (increase({REQ}{{$sel}}[$w]))"),
            Column("p95", "p95", SECONDS, _quantile(0.95, DUR, "route"), "lower"),
            Column("p99", "p99", SECONDS, _quantile(0.99, DUR, "route"), "lower"),
            Column("p95_peak", "worst 5-min p95", SECONDS,
                   _peak("instance_route:qatoolbox_http_request_duration_seconds:p95_rate5m",
                         "route"), "lower"),
            Column("error_ratio", "5xx ratio", RATIO,
                   _ratio(REQ_5XX, f"{REQ}{{$sel}}", "route"), "lower"),
        ), "p95"),
        Table("db", "Most database queries per request", ("route",), (
            Column("queries_mean", "queries per request", COUNT,
                   _mean("qatoolbox_http_request_db_queries", "route"), "lower"),
            Column("queries_p95", "p95 queries", COUNT,
                   _quantile(0.95, "qatoolbox_http_request_db_queries_bucket", "route"),
                   "lower"),
            Column("queries_p95_peak", "worst 5-min p95 queries", COUNT,
                   _peak("instance_route:qatoolbox_http_request_db_queries:p95_rate5m", "route"),
                   "lower"),
            Column("db_seconds_mean", "DB time per request", SECONDS,
                   _mean("qatoolbox_http_request_db_seconds", "route"), "lower"),
        ), "queries_mean"),
    ),
    charts=(
        Chart("rate", "Requests per second", RATE,
              (Line(f"sum(rate({REQ}{{$sel}}[$step]))", "this period"),), compare=True),
        Chart("errors", "5xx ratio", RATIO, (Line(
            f"(sum(rate({REQ_5XX}[$step])) or sum(rate({REQ}{{$sel}}[$step])) * 0)"
            f" / (sum(rate({REQ}{{$sel}}[$step])) > 0)", "5xx"),),
              (Threshold(0.05, "warning 5%"), Threshold(0.20, "critical 20%", "critical"))),
        Chart("latency", "Latency", SECONDS, (
            Line(f"histogram_quantile(0.95, sum by (le) (rate({DUR}{{$sel}}[$step])))", "p95"),
            Line(f"histogram_quantile(0.99, sum by (le) (rate({DUR}{{$sel}}[$step])))", "p99")),
              (Threshold(2, "p95 warning 2s"), Threshold(5, "p99 critical 5s", "critical"))),
    ),
)

HOST = Section(
    "host", "Host capacity", "qatoolbox_host_cpu_seconds_total",
    "No host metrics: the host collector is off.",
    tables=(
        Table("machines", "CPU, memory and load", ("instance",), (
            Column("cpu_peak", "CPU peak (5 min)", RATIO,
                   _peak("instance:qatoolbox_host_cpu_utilisation:ratio", "instance"), "lower"),
            Column("cpu_mean", "CPU mean", RATIO,
                   "max by (instance) (avg_over_time("
                   "instance:qatoolbox_host_cpu_utilisation:ratio{$sel}[$w]))", "lower"),
            Column("memory_peak", "memory peak", RATIO,
                   _peak("instance:qatoolbox_host_memory_utilisation:ratio", "instance"),
                   "lower"),
            Column("memory_mean", "memory mean", RATIO,
                   "max by (instance) (avg_over_time("
                   "instance:qatoolbox_host_memory_utilisation:ratio{$sel}[$w]))", "lower"),
            Column("load_peak", "load5 per CPU peak", COUNT,
                   _peak("instance:qatoolbox_host_load5_per_cpu:ratio", "instance"), "lower"),
        ), "cpu_peak", limit=False),
        Table("filesystems", "File systems", ("instance", "mountpoint"), (
            Column("usage_end", "used at end", RATIO,
                   "max by (instance, mountpoint) (last_over_time("
                   "instance_mountpoint:qatoolbox_host_filesystem_usage:ratio{$sel}[$w]))",
                   "lower"),
            Column("usage_peak", "peak used", RATIO,
                   _peak("instance_mountpoint:qatoolbox_host_filesystem_usage:ratio",
                         "instance, mountpoint"), "lower"),
            Column("avail_end", "free at end", BYTES,
                   "max by (instance, mountpoint) (last_over_time("
                   "qatoolbox_host_filesystem_avail_bytes{$sel}[$w]))", "higher"),
            Column("full_in", "full in (period's trend)", SECONDS,
                   "max by (instance, mountpoint) (last_over_time("
                   "qatoolbox_host_filesystem_avail_bytes{$sel}[$w])"
                   " / -(deriv(qatoolbox_host_filesystem_avail_bytes{$sel}[$w]) < 0))", "higher"),
        ), "usage_end", note="The forecast extends the least-squares trend of free space over "
                             "the whole period; empty where free space did not shrink."),
    ),
    charts=(
        Chart("cpu", "CPU busy (peak per step)", RATIO, (Line(
            "max by (instance) (max_over_time(instance:qatoolbox_host_cpu_utilisation:ratio"
            "{$sel}[$step]))", "{instance}"),),
              (Threshold(0.80, "warning 80%"), Threshold(0.95, "critical 95%", "critical")),
              ymax=1),
        Chart("memory", "Memory used (peak per step)", RATIO, (Line(
            "max by (instance) (max_over_time(instance:qatoolbox_host_memory_utilisation:ratio"
            "{$sel}[$step]))", "{instance}"),),
              (Threshold(0.85, "warning 85%"), Threshold(0.95, "critical 95%", "critical")),
              ymax=1),
        Chart("disk", "File system usage", RATIO, (Line(
            "max by (instance, mountpoint) (max_over_time("
            "instance_mountpoint:qatoolbox_host_filesystem_usage:ratio{$sel}[$step]))",
            "{instance} {mountpoint}"),),
              (Threshold(0.90, "warning 90%"), Threshold(0.95, "critical 95%", "critical")),
              ymax=1),
    ),
)

_HIT = "qatoolbox_postgres_blocks_hit_total{$sel}"
_READ = "qatoolbox_postgres_blocks_read_total{$sel}"
_DB_SIZE = "qatoolbox_postgres_database_size_bytes{$sel}"
_TABLE_SIZE = "qatoolbox_postgres_table_size_bytes{$sel}"

# PostgreSQL and Redis rows are servers, not exporters: every sample of those collectors names
# the server it describes in `server` (exporter/fleet.py), and on a fleet several exporters
# (each host with the default configuration, an HA pair) watch the same one. Each exporter's
# figure for a server is computed alone (`by (job, instance, server)`), then one of them is
# kept (`max by (server)`): a sum across exporters would count a database once per watcher.
_EACH = "job, instance, server"


def _per_server(inner: str) -> str:
    """inner summed per exporter and server, then one exporter's figure per server."""
    return f"max by (server) (sum by ({_EACH}) ({inner}))"


def _server_ratio(good: str, other: str, window: str) -> str:
    """good / (good + other) per server from one exporter's counters (rates over window)."""
    each_good = f"sum by ({_EACH}) (increase({good}[{window}]))"
    each_other = f"sum by ({_EACH}) (increase({other}[{window}]))"
    return f"max by (server) ({each_good} / ({each_good} + {each_other} > 0))"


POSTGRES = Section(
    "postgres", "PostgreSQL", "qatoolbox_postgres_connections",
    "No PostgreSQL metrics: the postgres collector is off or never reached the server.",
    tables=(
        Table("servers", "Connections, slow queries, deadlocks, cache", ("server",), (
            Column("connections_peak", "peak connections", COUNT,
                   f"max by (server) (max_over_time(sum by ({_EACH}) "
                   "(qatoolbox_postgres_connections{$sel})[$w:$peak]))", "lower"),
            Column("max_connections", "max_connections", COUNT,
                   "max by (server) (last_over_time("
                   "qatoolbox_postgres_max_connections{$sel}[$w]))"),
            Column("connections_used_peak", "peak share of limit", RATIO,
                   _peak("instance:qatoolbox_postgres_connections_used:ratio", "server"),
                   "lower"),
            Column("slow_queries_peak", "peak slow queries", COUNT,
                   f"max by (server) (max_over_time(sum by ({_EACH}) "
                   "(qatoolbox_postgres_slow_queries{$sel})[$w:$peak]))", "lower"),
            Column("deadlocks", "deadlocks", COUNT,
                   _per_server("increase(qatoolbox_postgres_deadlocks_total{$sel}[$w])"),
                   "lower"),
            Column("cache_hit_ratio", "cache hit ratio", RATIO,
                   _server_ratio(_HIT, _READ, "$w"), "higher"),
            Column("database_size", "databases' size at end", BYTES,
                   _per_server(f"last_over_time({_DB_SIZE}[$w])")),
            Column("database_growth", "growth", BYTES,
                   _per_server(f"last_over_time({_DB_SIZE}[$w]) - {_DB_SIZE} offset $w")),
        ), "connections_peak", limit=False),
        Table("tables", "Largest tables", ("server", "schema", "table"), (
            Column("size", "size at end", BYTES,
                   f"max by (server, schema, table) (last_over_time({_TABLE_SIZE}[$w]))"),
            Column("growth", "growth", BYTES,
                   f"max by (server, schema, table) (last_over_time({_TABLE_SIZE}[$w])"
                   f" - {_TABLE_SIZE} offset $w)"),
        ), "size", note="Growth is the size at the end less the size at the start of the "
                        "period; empty for a table that did not exist at the start."),
    ),
    charts=(
        Chart("connections", "Connections used of the slots ordinary roles may use", RATIO, (Line(
            "max by (server) (max_over_time("
            "instance:qatoolbox_postgres_connections_used:ratio{$sel}[$step]))", "{server}"),),
              (Threshold(0.80, "warning 80%"), Threshold(0.95, "critical 95%", "critical")),
              ymax=1),
        Chart("cache", "Buffer cache hit ratio", RATIO, (Line(
            _server_ratio(_HIT, _READ, "$step"), "{server}"),),
              (Threshold(0.90, "warning below 90%"),), ymax=1),
    ),
)

_HITS = "qatoolbox_redis_keyspace_hits_total{$sel}"
_MISSES = "qatoolbox_redis_keyspace_misses_total{$sel}"

REDIS = Section(
    "redis", "Redis", "qatoolbox_redis_memory_used_bytes",
    "No Redis metrics: the redis collector is off or never reached the server.",
    tables=(Table("servers", "Hit ratio, memory, evictions", ("server",), (
        Column("hit_ratio", "hit ratio", RATIO, _server_ratio(_HITS, _MISSES, "$w"), "higher"),
        Column("memory_peak", "peak memory", BYTES,
               _peak("qatoolbox_redis_memory_used_bytes", "server"), "lower"),
        Column("maxmemory", "maxmemory", BYTES,
               "max by (server) (last_over_time(qatoolbox_redis_memory_max_bytes{$sel}[$w]))"),
        Column("memory_used_peak", "peak share of maxmemory", RATIO,
               _peak("instance:qatoolbox_redis_memory_utilisation:ratio", "server"), "lower"),
        Column("evictions", "evicted keys", COUNT,
               _per_server("increase(qatoolbox_redis_evicted_keys_total{$sel}[$w])"), "lower"),
    ), "memory_peak", limit=False),),
    charts=(
        Chart("memory", "Memory used (peak per step)", BYTES, (Line(
            "max by (server) (max_over_time(qatoolbox_redis_memory_used_bytes{$sel}[$step]))",
            "{server}"),)),
        Chart("hits", "Keyspace hit ratio", RATIO, (Line(
            _server_ratio(_HITS, _MISSES, "$step"), "{server}"),),
              (Threshold(0.80, "warning below 80%"),), ymax=1),
    ),
)

_TASKS = "qatoolbox_celery_tasks_total"
_FINISHED = '{$sel,state=~"succeeded|failed"}'

CELERY = Section(
    "celery", "Celery", "qatoolbox_celery_queue_length",
    "No Celery metrics: no queue lengths (redis collector) and no task runs (app collector).",
    tables=(
        Table("queues", "Queues", ("queue",), (
            Column("peak", "peak length", COUNT,
                   "max by (queue) (max_over_time(qatoolbox_celery_queue_length{$sel}[$w]))",
                   "lower"),
            Column("mean", "mean length", COUNT,
                   "max by (queue) (avg_over_time(qatoolbox_celery_queue_length{$sel}[$w]))",
                   "lower"),
        ), "peak"),
        Table("tasks", "Slowest tasks", ("task",), (
            Column("runs", "finished runs", COUNT,
                   f"sum by (task) (increase({_TASKS}{_FINISHED}[$w]))"),
            Column("failure_ratio", "failure ratio", RATIO,
                   _ratio(f'{_TASKS}{{$sel,state="failed"}}', f"{_TASKS}{_FINISHED}", "task"),
                   "lower"),
            Column("p95", "p95 run time", SECONDS,
                   _quantile(0.95, "qatoolbox_celery_task_duration_seconds_bucket", "task"),
                   "lower"),
            Column("mean", "mean run time", SECONDS,
                   _mean("qatoolbox_celery_task_duration_seconds", "task"), "lower"),
        ), "p95"),
    ),
    charts=(Chart("queues", "Queue length (peak per step)", COUNT, (Line(
        "max by (queue) (max_over_time(qatoolbox_celery_queue_length{$sel}[$step]))",
        "{queue}"),), (Threshold(100, "warning 100"),)),),
)

_USERS = "qatoolbox_users{$sel}"
# Business figures: one reading per database (several exporters may read the same one, their
# samples differing only by job and instance), summed over databases and label values.
_ONCE = "max without (job, instance)"

BUSINESS = Section(
    "business", "Business", "qatoolbox_users_active",
    "No business metrics: the business collector is off or its queries fail.",
    figures=(
        Figure("active_users_7d", "users active in the last 7 days (at end)", COUNT,
               f'sum({_ONCE} (last_over_time(qatoolbox_users_active{{$sel,window="7d"}}[$w])))',
               "higher"),
        Figure("daily_active_peak", "peak daily active users", COUNT,
               f'max_over_time(sum({_ONCE} (qatoolbox_users_active{{$sel,window="24h"}}))'
               "[$w:$peak])", "higher"),
        Figure("messages", "chat messages", COUNT,
               f"sum({_ONCE} (increase(qatoolbox_chat_messages_total{{$sel}}[$w])))", "higher"),
        Figure("rooms_active", "active chat rooms (at end)", COUNT,
               f'sum({_ONCE} (last_over_time(qatoolbox_chat_rooms{{$sel,status="active"}}[$w])))',
               "higher"),
        Figure("users", "user accounts (at end)", COUNT,
               f"sum({_ONCE} (last_over_time({_USERS}[$w])))", "higher"),
        Figure("users_growth", "new user accounts", COUNT,
               f"sum({_ONCE} (last_over_time({_USERS}[$w]))) - sum({_ONCE} ({_USERS} offset $w))",
               "higher"),
    ),
    daily=Daily("days", "Day by day", (
        Column("active_users", "daily active users", COUNT,
               f'sum({_ONCE} (last_over_time(qatoolbox_users_active{{$sel,window="24h"}}[1d])))'),
        Column("messages", "messages", COUNT,
               f"sum({_ONCE} (increase(qatoolbox_chat_messages_total{{$sel}}[1d])))"),
        Column("rooms_active", "active rooms", COUNT,
               f'sum({_ONCE} (last_over_time(qatoolbox_chat_rooms{{$sel,status="active"}}[1d])))'),
    )),
)

SECTIONS = (SLO, HTTP, HOST, POSTGRES, REDIS, CELERY, BUSINESS)

# Whole-report queries.
UP = "up{$sel}"
UP_STEPS = "max by (instance) (up{$sel})"
ALERTS_FIRING = 'ALERTS{alertstate="firing"}[$w]'
ALERTS_FOR_STATE = "ALERTS_FOR_STATE[$w]"


@dataclass(frozen=True)
class Context:
    """Values for the placeholders."""

    selector: str
    window: int
    step: int
    peak: int = 60
    extra: dict[str, str] = field(default_factory=dict)

    def fill(self, expr: str, selector: bool = True) -> str:
        return render(expr, sel=self.selector if selector else "", w=f"{self.window}s",
                      ws=str(self.window), step=f"{self.step}s", peak=f"{self.peak}s",
                      peaks=str(self.peak), **self.extra)
