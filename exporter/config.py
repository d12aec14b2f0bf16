"""Configuration: YAML file and environment, validated into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from exporter.redact import redact_url


class ConfigError(Exception):
    """Every problem found in a configuration, one per line, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        # Values quoted in a problem come from files and the environment: a newline or other
        # control character in one must not split the one-line message or forge another.
        problems = ["".join(c if c.isprintable() else repr(c)[1:-1] for c in p)
                    for p in problems]
        super().__init__("\n".join(problems))
        self.problems = problems


class Duration(float):
    """Seconds, written in the config as "500ms", "2s", "1m" or "1h30m"."""


class Regex(str):
    """A Python regular expression, checked at load time."""


class Secret(str):
    """A password or token: never shown in summaries, logs or errors."""

    def __repr__(self) -> str:
        return "'<secret>'" if self else "''"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Parse "1m30s" into 90.0; raise ValueError on anything else."""
    text = text.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(text)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(text)
    return total


def format_duration(seconds: float) -> str:
    """Render seconds the way the config writes them."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# --- the configuration tree -------------------------------------------------------------------

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["logfmt", "json"]
# Which collectors run by default (docs/scaling.md): every one, those about the machine the
# exporter runs on (one exporter per host), or those about shared services (one per database).
CollectorScope = Literal["all", "host", "service"]
SCOPES: tuple[CollectorScope, ...] = ("all", "host", "service")

# node_exporter's defaults: kernel and container-internal file systems carry no capacity signal.
DEFAULT_FS_TYPES_EXCLUDE = (
    r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs"
    r"|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs"
    r"|sysfs|tracefs)$"
)
DEFAULT_MOUNT_POINTS_EXCLUDE = (
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)


@dataclass(frozen=True)
class WebConfig:
    """HTTP server settings."""

    listen_address: str = ":9786"
    telemetry_path: str = "/metrics"
    max_requests: int = 40
    read_timeout: Duration = Duration(10.0)
    # A connection must have sent a whole request header (and finished TLS) within this long
    # (and within read_timeout), or it is closed: idle crowds cannot hold the server.
    header_timeout: Duration = Duration(5.0)
    config_file: str = ""  # exporter-toolkit web config (TLS, basic auth), see webconfig.py
    grafana_url: str = ""  # linked from the landing page (checked in exporter/checks.py)


@dataclass(frozen=True)
class LogConfig:
    """Logging settings."""

    level: LogLevel = "info"
    format: LogFormat = "logfmt"
    # A failing collector logs again with the same error only after this long.
    repeat_interval: Duration = Duration(300.0)


@dataclass(frozen=True)
class ScrapeConfig:
    """How the enabled collectors are run on each scrape."""

    timeout: Duration = Duration(4.0)


@dataclass(frozen=True)
class FilesystemConfig:
    """Which mounted file systems the host collector reports."""

    mount_points_include: Regex = Regex("")
    mount_points_exclude: Regex = Regex(DEFAULT_MOUNT_POINTS_EXCLUDE)
    fs_types_include: Regex = Regex("")
    fs_types_exclude: Regex = Regex(DEFAULT_FS_TYPES_EXCLUDE)


@dataclass(frozen=True)
class DeviceFilterConfig:
    """Which devices (disks or network interfaces) the host collector reports."""

    include: Regex = Regex("")
    exclude: Regex = Regex("")


@dataclass(frozen=True)
class HostConfig:
    """Host collector settings."""

    proc_path: str = "/proc"
    sys_path: str = "/sys"
    # Where the host's root file system is mounted: a container sees the host's mount table
    # through proc_path, and their sizes under this prefix (node_exporter's --path.rootfs).
    root_path: str = "/"
    filesystem: FilesystemConfig = FilesystemConfig()
    disk: DeviceFilterConfig = DeviceFilterConfig(exclude=Regex(r"^(ram|loop|fd|zram)\d+$"))
    network: DeviceFilterConfig = DeviceFilterConfig(
        exclude=Regex(r"^(veth.*|docker\d+|br-.*|cali.*|flannel.*|cni\d+)$")
    )


@dataclass(frozen=True)
class ProcessGroup:
    """A named set of processes, matched by name or by command line."""

    name: str = ""
    names: tuple[str, ...] = ()
    cmdline: Regex = Regex("")


DEFAULT_PROCESS_GROUPS = (
    ProcessGroup(name="web", names=("gunicorn", "uwsgi", "daphne", "uvicorn")),
    ProcessGroup(name="celery", cmdline=Regex(r"\bcelery\b.*\bworker\b")),
    ProcessGroup(name="postgres", names=("postgres", "postmaster")),
    ProcessGroup(name="redis", names=("redis-server",)),
)


@dataclass(frozen=True)
class ProcessConfig:
    """Process collector settings."""

    groups: tuple[ProcessGroup, ...] = DEFAULT_PROCESS_GROUPS


@dataclass(frozen=True)
class PostgresConfig:
    """PostgreSQL connection and collector settings (DB_* environment variables as defaults)."""

    host: str = "localhost"
    port: int = 5432
    dbname: str = "qatoolbox"
    user: str = "postgres"
    password: Secret = field(default=Secret(""), repr=False)
    password_file: str = ""
    sslmode: str = "prefer"
    connect_timeout: Duration = Duration(2.0)
    # Server-side statement_timeout of every query the collector runs.
    timeout: Duration = Duration(2.0)
    # Active queries running longer than this count as slow (QAToolBox's monitor used 5 s).
    slow_query_threshold: Duration = Duration(5.0)
    # Database sizes, table and statement statistics are re-read at most this often.
    cache_interval: Duration = Duration(60.0)
    top_tables: int = 50
    top_statements: int = 50


@dataclass(frozen=True)
class KeyGroup:
    """A named set of Redis keys, matched by glob patterns (the first matching group wins)."""

    name: str = ""
    patterns: tuple[str, ...] = ()


# None: keys are grouped by their structure (exporter.collectors.redis_keys.key_shape), which finds
# QAToolBox's cache keys (KEY_PREFIX "qatoolbox", version 1, whatever the code passed), its
# sessions and Celery's keys without a list that goes stale as the application changes.
DEFAULT_KEY_GROUPS: tuple[KeyGroup, ...] = ()
# QAToolBox's Celery configuration: task_default_queue "default", apps.tools.tasks routed to
# "tools". Reported even before (or without) the discovery from kombu's binding sets.
DEFAULT_CELERY_QUEUES = ("default", "tools")


@dataclass(frozen=True)
class RedisConfig:
    """Redis connection and collector settings (REDIS_URL as default)."""

    url: Secret = field(default=Secret("redis://127.0.0.1:6379"), repr=False)
    password_file: str = ""
    # Socket timeout of every call (connect, command); must fit in scrape.timeout.
    timeout: Duration = Duration(2.0)
    # Configured groups take precedence; the other keys are grouped by their structure, the
    # max_key_groups largest structures by key count named, the rest summed under "other".
    key_groups: tuple[KeyGroup, ...] = DEFAULT_KEY_GROUPS
    max_key_groups: int = 20
    # One key-group count stops after this many keys or this long, whichever comes first,
    # and the next count resumes where it stopped.
    key_scan_budget: int = 1_000_000
    key_scan_time_budget: Duration = Duration(1.0)
    key_scan_interval: Duration = Duration(60.0)
    key_scan_batch: int = 1000
    # Always reported; the queues kombu has declared (its _kombu.binding.* sets, read during the
    # key count) are added, up to max_celery_queues in all.
    celery_queues: tuple[str, ...] = DEFAULT_CELERY_QUEUES
    discover_celery_queues: bool = True
    max_celery_queues: int = 50
    # kombu's global_keyprefix transport option, prepended to every key Celery uses.
    celery_key_prefix: str = ""
    # kombu's priority_steps: step 0 is the queue's own list, step p is "<queue>\x06\x16<p>".
    celery_priority_steps: tuple[int, ...] = (0, 3, 6, 9)
    # Per-command series (commands_total, durations, latency histogram) for at most this many
    # commands; the rest are summed under cmd="other".
    max_command_labels: int = 30
    # CONFIG GET slowlog-log-slower-than (and maxclients where INFO lacks it). Off by default:
    # an ACL that allows CONFIG GET allows it for every parameter, requirepass and masterauth
    # included, so the least-privilege user of docs/reliability.md does not have it.
    config_get: bool = False


MetricType = Literal["gauge", "counter"]
# Connections the business collector may open at once (docs/reliability.md's role allows
# 1 + this + 1).
MAX_BUSINESS_CONCURRENCY = 8

# Families the exporter makes itself: a business query may not use these prefixes.
RESERVED_METRIC_PREFIXES = (
    "qatoolbox_exporter_", "qatoolbox_host_", "qatoolbox_process_", "qatoolbox_postgres_",
    "qatoolbox_redis_", "qatoolbox_http_", "qatoolbox_celery_", "qatoolbox_business_",
)


@dataclass(frozen=True)
class LabelValues:
    """The values one label of a business query may take: the known ones always (0 when no
    row has them), the others as the rows bring them, up to limit in all, the rest summed
    under "other"."""

    label: str = ""
    known: tuple[str, ...] = ()
    limit: int = 20


@dataclass(frozen=True)
class BusinessQuery:
    """One SQL query whose rows become the samples of one metric family."""

    metric: str = ""
    help: str = ""
    type: MetricType = "gauge"
    sql: str = ""
    labels: tuple[str, ...] = ()
    value: str = "value"
    # A result is served for this long before the query runs again.
    interval: Duration = Duration(60.0)
    timeout: Duration = Duration(2.0)
    max_rows: int = 100
    # Tables and columns the query reads ("table" or "table(column, ...)"): where one is
    # missing the query is not applicable, so it is not run and does not fail.
    requires: tuple[str, ...] = ()
    # Bounded label values (see LabelValues); rows are then summed by label set.
    label_values: tuple[LabelValues, ...] = ()
    # "table.column" (an id that only grows): the query counts the rows with
    # {after} < column <= {upto}, and each run's counts are added to a counter.
    watermark: str = ""

    @property
    def family(self) -> str:
        """The family name in the exposition (a counter's name without "_total")."""
        if self.type == "counter" and self.metric.endswith("_total"):
            return self.metric[: -len("_total")]
        return self.metric


@dataclass(frozen=True)
class BusinessConfig:
    """Business collector settings: declarative SQL queries that become metrics."""

    # Serve the QAToolBox queries shipped in exporter/business_defaults.yml; a query in
    # `queries` with the same metric name replaces the shipped one.
    defaults: bool = True
    queries: tuple[BusinessQuery, ...] = ()
    # Queries running at once, each on its own connection.
    concurrency: int = 2
    # Run the queries even when the role is a PostgreSQL superuser, whom a read-only
    # transaction does not stop (pg_terminate_backend, lo_export, pg_read_file).
    allow_superuser: bool = False
    # The catalog is read again this often to find which queries' tables and columns exist.
    applicability_interval: Duration = Duration(300.0)
    # {presence_window}: a presence row counts only if seen this recently (QAToolBox's
    # update_user_online_status marks is_online rows offline after 5 minutes).
    presence_window: Duration = Duration(300.0)
    # {chat_room_idle}: QAToolBox deletes rooms idle for 12 hours every 30 minutes; a room
    # idle for longer than cleanup age + grace means the cleanup is not running.
    chat_cleanup_age: Duration = Duration(12 * 3600.0)
    chat_cleanup_grace: Duration = Duration(3600.0)

    def placeholders(self) -> dict[str, str]:
        """The SQL each {name} in a query's text stands for."""
        return {"presence_window": _interval(self.presence_window),
                "chat_room_idle": _interval(self.chat_cleanup_age + self.chat_cleanup_grace)}

    def all_queries(self) -> tuple[BusinessQuery, ...]:
        """The queries to run: shipped defaults (overridden by name), then the others, with
        the placeholders of placeholders() filled in."""
        own = {q.metric: q for q in self.queries}
        merged = [own.pop(q.metric, q) for q in business_defaults()] if self.defaults else []
        queries = (*merged, *(q for q in self.queries if q.metric in own))
        values = self.placeholders()
        return tuple(dataclasses.replace(q, sql=fill_placeholders(q.sql, values))
                     for q in queries)


def _interval(seconds: float) -> str:
    return f"interval '{seconds:f} seconds'"


# {after} and {upto} are filled by the business collector on each run of a watermark query.
WATERMARK_PLACEHOLDERS = ("after", "upto")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def fill_placeholders(sql: str, values: Mapping[str, str]) -> str:
    """sql with each {name} of values replaced (other braces left as they are)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), sql)


_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_$]*"
_REQUIREMENT = re.compile(rf"\s*((?:{_IDENTIFIER}\.)?{_IDENTIFIER})\s*"
                          rf"(?:\(\s*({_IDENTIFIER}(?:\s*,\s*{_IDENTIFIER})*)\s*\))?\s*")
_WATERMARK = re.compile(rf"((?:{_IDENTIFIER}\.)?{_IDENTIFIER})\.({_IDENTIFIER})")


def parse_requirement(text: str) -> tuple[str, tuple[str, ...]] | None:
    """("table", (columns...)) from "table(column, ...)" (names lower-cased, as PostgreSQL folds
    unquoted ones), None when it is not written that way."""
    match = _REQUIREMENT.fullmatch(text)
    if match is None:
        return None
    columns = tuple(c.strip().lower() for c in match.group(2).split(",")) if match.group(2) else ()
    return match.group(1).lower(), columns


def parse_watermark(text: str) -> tuple[str, str] | None:
    """(table, column) from "table.column" or "schema.table.column", None otherwise."""
    match = _WATERMARK.fullmatch(text.strip())
    return (match.group(1).lower(), match.group(2).lower()) if match else None


BUSINESS_DEFAULTS_FILE = "business_defaults.yml"
_BUSINESS_DEFAULTS: dict[str, tuple[BusinessQuery, ...]] = {}


def business_defaults() -> tuple[BusinessQuery, ...]:
    """The QAToolBox queries shipped in the package (read once)."""
    if "queries" not in _BUSINESS_DEFAULTS:
        from importlib import resources

        text = resources.files("exporter").joinpath(BUSINESS_DEFAULTS_FILE).read_text("utf-8")
        errors: list[str] = []
        built = _build(BusinessConfig, yaml.safe_load(text), BUSINESS_DEFAULTS_FILE, errors)
        if errors:
            raise ConfigError(errors)
        _BUSINESS_DEFAULTS["queries"] = built.queries
    return _BUSINESS_DEFAULTS["queries"]


def _check_business(business: BusinessConfig) -> list[str]:
    """Business queries: names, labels, types, limits and read-only single-statement SQL."""
    # Here, not at the top: exporter.collectors imports this module.
    from exporter.collectors.business_sql import sql_problem

    problems: list[str] = []
    if not 1 <= business.concurrency <= MAX_BUSINESS_CONCURRENCY:
        problems.append(f"business.concurrency: must be between 1 and {MAX_BUSINESS_CONCURRENCY}, "
                        f"got {business.concurrency}")
    for key, value, low, high in (
            ("applicability_interval", business.applicability_interval, 1.0, 86400.0),
            ("presence_window", business.presence_window, 1.0, 86400.0),
            ("chat_cleanup_age", business.chat_cleanup_age, 60.0, 30 * 86400.0),
            ("chat_cleanup_grace", business.chat_cleanup_grace, 0.0, 86400.0)):
        if not low <= value <= high:
            problems.append(f"business.{key}: must be between {format_duration(low)} and "
                            f"{format_duration(high)}, got {format_duration(value)}")
    located = [(f"business.queries[{i}]", q) for i, q in enumerate(business.queries)]
    if business.defaults:
        try:
            overridden = {q.metric for q in business.queries}
            located += [(f"{BUSINESS_DEFAULTS_FILE}[{i}]", q)
                        for i, q in enumerate(business_defaults()) if q.metric not in overridden]
        except (OSError, ConfigError) as exc:
            problems.append(f"business.defaults: cannot load the shipped queries: {exc}")
    families: dict[str, str] = {}
    for where, query in located:
        name = query.metric
        label = f"{where} ({name})" if name else where
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name):
            problems.append(f"{where}.metric: expected a metric name (letters, digits, _), "
                            f"got {describe(name)}")
            continue
        if name.startswith(RESERVED_METRIC_PREFIXES):
            problems.append(f"{label}.metric: the prefix is reserved for the exporter's own "
                            f"metrics ({', '.join(p + '*' for p in RESERVED_METRIC_PREFIXES)})")
        if query.type == "counter" and not name.endswith("_total"):
            problems.append(f"{label}.metric: a counter's name must end in _total")
        if query.type == "gauge" and name.endswith("_total"):
            problems.append(f"{label}.metric: _total is for counters; drop it or use "
                            f"type: counter")
        if query.family in families:
            problems.append(f"{label}.metric: duplicate of {families[query.family]}")
        families.setdefault(query.family, label)
        if not query.help.strip():
            problems.append(f"{label}.help: required")
        seen: set[str] = set()
        for j, label_name in enumerate(query.labels):
            if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label_name) or \
                    label_name.startswith("__"):
                problems.append(f"{label}.labels[{j}]: expected a label name (letters, digits, "
                                f"_, not starting with __), got {describe(label_name)}")
            elif label_name in seen or label_name == query.value:
                problems.append(f"{label}.labels[{j}]: \"{label_name}\" is used twice "
                                f"(labels and value must be distinct columns)")
            seen.add(label_name)
        if not query.value:
            problems.append(f"{label}.value: required (the column holding the value)")
        if not query.sql.strip():
            problems.append(f"{label}.sql: required")
        elif (why := sql_problem(query.sql)) is not None:
            problems.append(f"{label}.sql: {why}")
        if query.interval <= 0:
            problems.append(f"{label}.interval: must be greater than 0")
        if not 0.001 <= query.timeout <= 300:
            problems.append(f"{label}.timeout: must be between 1ms and 300s, "
                            f"got {format_duration(query.timeout)}")
        if isinstance(query.max_rows, int) and not 1 <= query.max_rows <= 10000:
            problems.append(f"{label}.max_rows: must be between 1 and 10000, "
                            f"got {query.max_rows}")
        problems.extend(_check_query_shape(label, query))
    return problems


def _check_query_shape(label: str, query: BusinessQuery) -> list[str]:
    """requires, label_values and watermark of one business query."""
    problems: list[str] = []
    for j, requirement in enumerate(query.requires):
        if parse_requirement(requirement) is None:
            problems.append(f"{label}.requires[{j}]: expected \"table\" or "
                            f"\"table(column, ...)\", got {describe(requirement)}")
    bounded: set[str] = set()
    for j, values in enumerate(query.label_values):
        where = f"{label}.label_values[{j}]"
        if values.label not in query.labels:
            problems.append(f"{where}.label: {describe(values.label)} is not one of the "
                            f"query's labels ({', '.join(query.labels) or 'none'})")
        elif values.label in bounded:
            problems.append(f"{where}.label: \"{values.label}\" is bounded twice")
        bounded.add(values.label)
        if len(set(values.known)) != len(values.known):
            problems.append(f"{where}.known: values must be distinct")
        if isinstance(values.limit, int) and not max(1, len(values.known)) <= values.limit <= 1000:
            problems.append(f"{where}.limit: must be between the number of known values "
                            f"(at least 1) and 1000, got {values.limit}")
    known = {v.label: len(v.known) for v in query.label_values}
    if query.labels and all(known.get(name) for name in query.labels) and \
            isinstance(query.max_rows, int) and math.prod(known.values()) > query.max_rows:
        problems.append(f"{label}.max_rows: {query.max_rows} is fewer than the "
                        f"{math.prod(known.values())} label sets the known values make")
    used = set(_PLACEHOLDER.findall(query.sql)) & set(WATERMARK_PLACEHOLDERS)
    if query.watermark:
        if parse_watermark(query.watermark) is None:
            problems.append(f"{label}.watermark: expected \"table.column\", "
                            f"got {describe(query.watermark)}")
        if query.type != "counter":
            problems.append(f"{label}.watermark: only a counter adds up new rows; "
                            f"set type: counter")
        missing = [f"{{{name}}}" for name in WATERMARK_PLACEHOLDERS if name not in used]
        if missing:
            problems.append(f"{label}.sql: a watermark query must count the rows with "
                            f"{{after}} < column <= {{upto}}; {' and '.join(missing)} missing")
    elif used:
        problems.append(f"{label}.sql: {{after}} and {{upto}} are filled only for a query "
                        f"with a watermark")
    return problems


@dataclass(frozen=True)
class AppConfig:
    """App collector settings: folders the application's workers write metrics files to."""

    multiprocess_dirs: tuple[str, ...] = ()
    # Fold the files of exited workers into one accumulator per metric type (needs write
    # access to the folders); off, dead workers' files are read as they are, forever.
    compact: bool = True
    # A folder of the exporter's own where the kept routes are saved; empty: in each folder
    # above (when compact is on).
    state_dir: str = ""


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    web: WebConfig = WebConfig()
    log: LogConfig = LogConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    collectors: Mapping[str, bool] = field(default_factory=dict)
    # collectors.scope: the collectors' defaults before collectors.<name> and the flags. Set
    # from the collectors section, never a key of its own.
    scope: CollectorScope = field(default="all", metadata={"derived": True})
    host: HostConfig = HostConfig()
    process: ProcessConfig = ProcessConfig()
    postgres: PostgresConfig = PostgresConfig()
    redis: RedisConfig = RedisConfig()
    business: BusinessConfig = BusinessConfig()
    app: AppConfig = AppConfig()

    def enabled(self, name: str) -> bool:
        """Whether the collector called name runs."""
        return self.collectors.get(name, False)


# --- building dataclasses from plain data ------------------------------------------------------


def describe(value: Any) -> str:
    """A short, quoted rendering of a bad value for a one-line error."""
    if isinstance(value, str):
        return f'"{value}"' if len(value) < 60 else f'"{value[:57]}..."'
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    text = repr(value)  # bytes from !!binary, a date, a number: bounded like a string
    return text if len(text) < 60 else f"{text[:57]}..."


# Returned for a value that failed to convert (its problem is recorded): the field keeps its
# default, so later checks and the collectors never see a value of the wrong type.
_INVALID: Any = object()


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert one plain value to the annotated type, recording problems under path."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, path, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, (list, dict)) or value not in choices:
            options = ", ".join(str(c) for c in choices)
            errors.append(f"{path}: expected one of {options}, got {describe(value)}")
            return _INVALID
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {describe(value)}")
            return _INVALID
        items = (_convert(item_type, v, f"{path}[{i}]", errors) for i, v in enumerate(value))
        return tuple(item for item in items if item is not _INVALID)
    if origin in (Union, types.UnionType):
        raise TypeError(f"unsupported config type at {path}")
    return _convert_scalar(tp, value, path, errors)


def _convert_scalar(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    if tp is Duration:
        if isinstance(value, str):
            try:
                return Duration(parse_duration(value))
            except ValueError:
                pass
        errors.append(f'{path}: expected a duration like "2s", got {describe(value)}')
        return _INVALID
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {describe(value)}")
            return _INVALID
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected a whole number, got {describe(value)}")
            return _INVALID
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {describe(value)}")
            return _INVALID
        return float(value)
    if tp in (str, Regex, Secret):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            # A password written as `!!binary ...` or as a date is still the password.
            got = "something else (not shown: a secret)" if tp is Secret else describe(value)
            errors.append(f"{path}: expected a string, got {got}")
            return _INVALID
        if tp is Regex:
            try:
                re.compile(str(value))
            except re.error as exc:
                errors.append(f"{path}: invalid regular expression: {exc}")
            except (OverflowError, RecursionError) as exc:
                # re raises these, not re.error, for a{4294967296} and deep nesting.
                reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                errors.append(f"{path}: invalid regular expression: {reason}")
        return tp(str(value))
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _build(cls: type[Any], data: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass cls from a mapping; unknown keys and wrong types become errors."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        errors.append(f"{path or 'config'}: expected a mapping, got {describe(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    for key in data:
        if key not in known:
            errors.append(f"{prefix}{key}: unknown key")
    values = {
        name: _convert(hints[name], data[name], f"{prefix}{name}", errors)
        for name in known
        if name in data and name != "collectors"
    }
    return cls(**{name: value for name, value in values.items() if value is not _INVALID})


# --- loading ------------------------------------------------------------------------------------


# Hard caps on what is read from a file named by the configuration or the environment: a
# password is one line, a config file a few hundred. /dev/zero, a FIFO or a 200 MB file named
# by mistake or malice is a one-line error, not an endless read or a hang.
SECRET_FILE_LIMIT = 4096
CONFIG_FILE_LIMIT = 1 << 20
# A YAML document is refused beyond these, before PyYAML builds anything: its pure-Python
# parser needs seconds and hundreds of MB for a 1 MiB list of 500,000 items, an alias counts
# as often as it is used (a few lines of nested aliases would expand to 10^9 values, and the
# config is walked as a tree), and building a 1 MiB sexagesimal number (1:1:1:...) takes time
# quadratic in its length. Real configs stay far below.
YAML_MAX_NODES = 20_000
YAML_MAX_DEPTH = 64
YAML_MAX_NUMBER_LENGTH = 100
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


class FileReadError(Exception):
    """Why a file could not be read, in a few words for a one-line error."""


def _not_regular(mode: int) -> FileReadError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "something else")
    return FileReadError(f"not a regular file ({kind})")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"


def read_file(path: str, limit: int) -> bytes:
    """The content of a regular file of at most limit bytes, or FileReadError.

    Symbolic links are followed (Kubernetes mounts secrets as links to regular files). The
    open does not block (a FIFO without a writer would hang it), and the file is checked to be
    regular with fstat on the open descriptor, so it cannot be swapped after the check; a stat
    before the open spares devices an open at all. The read stops at limit + 1 bytes whatever
    the size said (a file may grow, /proc files say 0).
    """
    try:
        if not stat.S_ISREG((before := os.stat(path)).st_mode):
            raise _not_regular(before.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise FileReadError(exc.strerror or type(exc).__name__) from None
    except ValueError:  # a NUL byte, or characters the file system encoding cannot hold
        raise FileReadError("not a valid file name") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(info.st_mode)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit or info.st_size > limit:
            raise FileReadError(f"larger than the {_size(limit)} limit "
                              f"({max(size, info.st_size)} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise FileReadError(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)


class _RefusedError(Exception):
    """A YAML document beyond the limits above, with where it went over."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts nodes as it composes them (an alias by the size of
    what it refers to) and refuses a document past the limits before anything is built."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._nodes = 0
        self._depth = 0
        # Expanded size of each node composed so far; an anchor's is missing until its node is
        # complete, so an alias inside its own anchor (a recursive document) is found.
        self._sizes: dict[int, int] = {}

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        if self._nodes > YAML_MAX_NODES:
            raise _RefusedError(f"more than {YAML_MAX_NODES} values (an alias counts as many as "
                           f"it refers to)", mark)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # PyYAML's stubs leave peek_event unannotated: it returns the next parser event.
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:  # else PyYAML reports the undefined alias
                if id(anchored) not in self._sizes:
                    raise _RefusedError("an alias inside the value it refers to", event.start_mark)
                self._count(self._sizes[id(anchored)], event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            raise _RefusedError(f"nested too deeply (more than {YAML_MAX_DEPTH} levels)",
                           event.start_mark)
        first = self._nodes
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if node is not None:
            self._sizes[id(node)] = self._nodes - first
            if (isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS
                    and len(node.value) > YAML_MAX_NUMBER_LENGTH):
                raise _RefusedError(f"a number longer than {YAML_MAX_NUMBER_LENGTH} characters",
                               node.start_mark)
        return node


def read_yaml(path: str, what: str = "config file") -> Any:
    """Read a YAML file; ConfigError, prefixed "<what> <path>", for anything that is not data:
    a file that is not regular or is larger than CONFIG_FILE_LIMIT, I/O errors, syntax errors,
    text that is not UTF-8, a document past the YAML_MAX_* limits, and the values PyYAML's
    constructors cannot convert (`2001-13-01`, `!!int x`), for which it raises ValueError,
    AttributeError and the like."""
    shown = path.replace("\0", "\\0")
    prefix = f"{what} {shown}"
    try:
        text = read_file(path, CONFIG_FILE_LIMIT).decode("utf-8")
    except FileReadError as exc:
        raise ConfigError([f"{prefix}: cannot read: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{prefix}: not UTF-8 text"]) from None
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks the characters at once
        return loader.get_single_data()
    except (yaml.YAMLError, _RefusedError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{prefix}: invalid YAML{where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{prefix}: invalid YAML: nested too deeply"]) from None
    except Exception:
        # The library's message may quote the value; the file may hold secrets.
        raise ConfigError([f"{prefix}: invalid YAML: a value that cannot be converted (a bad "
                           f"date, number or tagged value)"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _env_postgres(env: Mapping[str, str], section: dict[str, Any], errors: list[str]) -> None:
    """Fill the postgres section from QAToolBox's DB_* variables where the file is silent."""
    for var, key in (("DB_NAME", "dbname"), ("DB_USER", "user"), ("DB_HOST", "host")):
        if var in env and key not in section:
            section[key] = env[var]
    if "DB_PORT" in env and "port" not in section:
        try:
            section["port"] = int(env["DB_PORT"])
        except ValueError:
            errors.append(f'DB_PORT: expected a port number, got "{env["DB_PORT"]}"')
    if "password" not in section and "password_file" not in section:
        if "DB_PASSWORD_FILE" in env:
            section["password_file"] = env["DB_PASSWORD_FILE"]
        elif "DB_PASSWORD" in env:
            section["password"] = env["DB_PASSWORD"]


def _env_redis(env: Mapping[str, str], section: dict[str, Any]) -> None:
    if "REDIS_URL" in env and "url" not in section:
        section["url"] = env["REDIS_URL"]
    if "REDIS_PASSWORD_FILE" in env and "password_file" not in section:
        section["password_file"] = env["REDIS_PASSWORD_FILE"]


def _read_secret(path: str, key: str, errors: list[str]) -> Secret:
    try:
        return Secret(read_file(path, SECRET_FILE_LIMIT).decode("utf-8").strip())
    except FileReadError as exc:
        errors.append(f"{key}: cannot read {path}: {exc}")
    except UnicodeDecodeError:
        # A binary file: the content is never echoed.
        errors.append(f"{key}: cannot read {describe(path)} as a text file")
    return Secret("")


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    return dict(value) if isinstance(value, Mapping) else {}


def _collectors(
    raw: Any, known: Mapping[str, bool], flags: Mapping[str, bool], errors: list[str],
    scopes: Mapping[str, str] | None = None,
) -> tuple[dict[str, bool], CollectorScope]:
    enabled = dict(known)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(f"collectors: expected a mapping of collector names to true/false, got "
                      f"{describe(raw)}")
        raw = {}
    scope: CollectorScope = "all"
    if "scope" in raw:
        if isinstance(raw["scope"], str) and raw["scope"] in SCOPES:
            scope = raw["scope"]
        else:
            errors.append(f"collectors.scope: expected one of {', '.join(SCOPES)}, got "
                          f"{describe(raw['scope'])}")
    if scope != "all":
        # A collector outside the scope is off unless named below or by a flag.
        enabled = {name: on and (scopes or {}).get(name) == scope
                   for name, on in enabled.items()}
    for name, value in raw.items():
        if name == "scope":
            continue
        if name not in known:
            errors.append(f"collectors.{name}: unknown collector (known: {', '.join(known)})")
        elif not isinstance(value, bool):
            errors.append(f"collectors.{name}: expected true or false, got {describe(value)}")
        else:
            enabled[name] = value
    enabled.update(flags)
    return enabled, scope


def load_config(
    path: str | None,
    env: Mapping[str, str],
    known_collectors: Mapping[str, bool],
    overrides: Mapping[str, Any] | None = None,
    collector_flags: Mapping[str, bool] | None = None,
    *,
    collector_scopes: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config from a YAML file (optional), the environment and flag overrides.

    overrides maps dotted keys ("web.listen_address") to raw values from flags; flags win
    over the file, the file wins over the environment, the environment over defaults.
    collector_scopes maps each collector to its scope ("host" or "service") for
    collectors.scope.
    """
    raw: Any = read_yaml(path) if path else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config file {path}: expected a mapping at the top level, "
                           f"got {describe(raw)}"])
    raw = dict(raw)
    errors: list[str] = []
    postgres = _section(raw, "postgres")
    _env_postgres(env, postgres, errors)
    redis = _section(raw, "redis")
    _env_redis(env, redis)
    # An empty section (all its keys commented out) is null: the environment still applies.
    if raw.get("postgres") is not None and not isinstance(raw["postgres"], Mapping):
        postgres = raw["postgres"]
    if raw.get("redis") is not None and not isinstance(raw["redis"], Mapping):
        redis = raw["redis"]
    raw["postgres"], raw["redis"] = postgres, redis
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        current = raw.get(section)
        raw[section] = {**(current if isinstance(current, Mapping) else {}), key: value}

    config: Config = _build(Config, raw, "", errors)
    enabled, scope = _collectors(raw.get("collectors"), known_collectors, collector_flags or {},
                                 errors, collector_scopes)
    config = dataclasses.replace(config, collectors=types.MappingProxyType(enabled), scope=scope)
    config = _resolve_secrets(config, errors)
    # A value that failed to convert was replaced by a placeholder: don't also report the
    # placeholder as out of range under the same key.
    failed = {problem.split(":", 1)[0] for problem in errors}
    errors.extend(p for p in _check(config) if p.split(":", 1)[0] not in failed)
    if errors:
        raise ConfigError(errors)
    return config


def _resolve_secrets(config: Config, errors: list[str]) -> Config:
    pg, rd = config.postgres, config.redis
    if pg.password_file:
        pg = dataclasses.replace(
            pg, password=_read_secret(pg.password_file, "postgres.password_file", errors)
        )
    if rd.password_file:
        password = _read_secret(rd.password_file, "redis.password_file", errors)
        try:
            rd = dataclasses.replace(rd, url=Secret(_url_with_password(rd.url, password)))
        except ValueError:
            # urllib's message is safe, but the URL may hold a password: name the key only.
            errors.append("redis.url: not a valid URL (a port that is not a number, or a bad "
                          "IPv6 address)")
    return dataclasses.replace(config, postgres=pg, redis=rd)


def _url_with_password(url: str, password: str) -> str:
    """Put password into a redis:// URL, keeping any username."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    user = parts.username or ""
    # The netloc after any userinfo, as written: hostname would lose an IPv6 address's [].
    host = parts.netloc.rpartition("@")[2] or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _check(config: Config) -> list[str]:
    """Cross-field checks that a single type cannot express."""
    problems: list[str] = []
    web = config.web
    if not web.telemetry_path.startswith("/") or web.telemetry_path in ("/", "/healthz"):
        problems.append(f'web.telemetry_path: must start with "/" and not be "/" or "/healthz", '
                        f'got "{web.telemetry_path}"')
    try:
        split_listen_address(web.listen_address)
    except ValueError as exc:
        problems.append(f"web.listen_address: {exc}")
    if isinstance(web.max_requests, int) and web.max_requests < 1:
        problems.append(f"web.max_requests: must be at least 1, got {web.max_requests}")
    for key in ("read_timeout", "header_timeout"):
        if getattr(web, key) <= 0:
            problems.append(f"web.{key}: must be greater than 0")
    if config.scrape.timeout <= 0:
        problems.append("scrape.timeout: must be greater than 0")
    pg = config.postgres
    if isinstance(pg.port, int) and not 0 < pg.port < 65536:
        problems.append(f"postgres.port: expected a port number, got {pg.port}")
    sslmodes = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    if pg.sslmode not in sslmodes:
        problems.append(f"postgres.sslmode: expected one of {', '.join(sslmodes)}, "
                        f"got {describe(pg.sslmode)}")
    # libpq counts connect_timeout in whole seconds (and psycopg raises anything below 2 to 2).
    if not 1 <= pg.connect_timeout <= 300:
        problems.append(f"postgres.connect_timeout: must be between 1s and 300s, "
                        f"got {format_duration(pg.connect_timeout)}")
    if not 0.001 <= pg.timeout <= 300:
        problems.append(f"postgres.timeout: must be between 1ms and 300s, "
                        f"got {format_duration(pg.timeout)}")
    if pg.slow_query_threshold <= 0:
        problems.append("postgres.slow_query_threshold: must be greater than 0")
    if not 0 <= pg.cache_interval <= 86400:
        problems.append(f"postgres.cache_interval: must be between 0s and 1d, "
                        f"got {format_duration(pg.cache_interval)}")
    for key, top in (("top_tables", pg.top_tables), ("top_statements", pg.top_statements)):
        # Bounded cardinality is the point of top N: more than 1000 would defeat it.
        if isinstance(top, int) and not 0 <= top <= 1000:
            problems.append(f"postgres.{key}: must be between 0 and 1000, got {top}")
    problems.extend(_check_redis(config.redis))
    problems.extend(_check_business(config.business))
    app_dirs = [os.path.normpath(d) if d else d for d in config.app.multiprocess_dirs]
    for i, directory in enumerate(app_dirs):
        if not directory.startswith("/"):
            problems.append(f"app.multiprocess_dirs[{i}]: expected an absolute path, "
                            f"got {describe(directory)}")
        elif app_dirs.index(directory) != i:
            problems.append(f"app.multiprocess_dirs[{i}]: duplicate folder {describe(directory)}")
    if config.app.state_dir and not config.app.state_dir.startswith("/"):
        problems.append(f"app.state_dir: expected an absolute path, "
                        f"got {describe(config.app.state_dir)}")
    seen: set[str] = set()
    for i, group in enumerate(config.process.groups):
        where = f"process.groups[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", group.name):
            problems.append(f"{where}.name: expected a short name (letters, digits, _ . -), "
                            f"got {describe(group.name)}")
        elif group.name in seen:
            problems.append(f"{where}.name: duplicate group \"{group.name}\"")
        seen.add(group.name)
        if not group.names and not group.cmdline:
            problems.append(f"{where}: needs names or cmdline to match processes")
    return problems


def _check_redis(rd: RedisConfig) -> list[str]:
    problems: list[str] = []
    if not rd.url.startswith(("redis://", "rediss://", "unix://")):
        problems.append("redis.url: expected a redis://, rediss:// or unix:// URL")
    else:
        from urllib.parse import urlsplit

        try:
            port = urlsplit(rd.url).port
        except ValueError:  # the message would quote the URL, password included
            port = -1
        if port is not None and not 0 <= port < 65536:
            problems.append("redis.url: the port is not a number from 0 to 65535")
    if rd.timeout <= 0:
        problems.append("redis.timeout: must be greater than 0")
    seen: set[str] = set()
    for i, group in enumerate(rd.key_groups):
        where = f"redis.key_groups[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", group.name) or group.name == "other":
            problems.append(f"{where}.name: expected a short name (letters, digits, _ . -) other "
                            f"than \"other\", got {describe(group.name)}")
        elif group.name in seen:
            problems.append(f"{where}.name: duplicate group \"{group.name}\"")
        seen.add(group.name)
        if not group.patterns or not all(group.patterns):
            problems.append(f"{where}.patterns: needs at least one non-empty glob pattern")
    for key, value, low, high in (("key_scan_budget", rd.key_scan_budget, 1, 10**9),
                                  ("key_scan_batch", rd.key_scan_batch, 1, 100_000),
                                  ("max_command_labels", rd.max_command_labels, 0, 1000),
                                  ("max_key_groups", rd.max_key_groups, 0, 1000),
                                  ("max_celery_queues", rd.max_celery_queues, 0, 1000)):
        if isinstance(value, int) and not low <= value <= high:
            problems.append(f"redis.{key}: must be between {low} and {high}, got {value}")
    if rd.key_scan_time_budget <= 0:
        problems.append("redis.key_scan_time_budget: must be greater than 0")
    if rd.key_scan_interval <= 0:
        problems.append("redis.key_scan_interval: must be greater than 0")
    if len(set(rd.celery_queues)) != len(rd.celery_queues) or not all(rd.celery_queues):
        problems.append("redis.celery_queues: expected distinct non-empty queue names")
    elif isinstance(rd.max_celery_queues, int) and len(rd.celery_queues) > rd.max_celery_queues:
        problems.append(f"redis.celery_queues: {len(rd.celery_queues)} queues, more than "
                        f"redis.max_celery_queues ({rd.max_celery_queues})")
    steps = rd.celery_priority_steps
    if any(isinstance(s, int) and not 0 <= s <= 255 for s in steps) or len(set(steps)) != len(
            steps):
        problems.append("redis.celery_priority_steps: expected distinct whole numbers from 0 "
                        "to 255")
    return problems


def split_listen_address(address: str) -> tuple[str, int]:
    """Split "host:port" (host may be empty or a bracketed IPv6 address)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'expected "host:port" or ":port", got "{address}"')
    return host.strip("[]"), int(port)


def summary(config: Config) -> list[str]:
    """A short description of what would run, with secrets left out."""
    lines = [f"listen on {config.web.listen_address}, metrics at {config.web.telemetry_path}",
             f"collector timeout {format_duration(config.scrape.timeout)}"]
    if config.scope != "all":
        lines.append(f"collectors scope: {config.scope}")
    for name, on in config.collectors.items():
        lines.append(f"collector {name}: {'enabled' if on else 'disabled'}")
    if config.enabled("postgres"):
        pg = config.postgres
        lines.append(f"postgres: {pg.user}@{pg.host}:{pg.port}/{pg.dbname} "
                     f"(password {'set' if pg.password else 'not set'})")
    if config.enabled("redis"):
        lines.append(f"redis: {redact_url(config.redis.url)}")
    if config.enabled("process"):
        lines.append("process groups: " + ", ".join(g.name for g in config.process.groups))
    if config.enabled("business"):
        # The catalog is not read here: a check reaches no server. The collector reads it at
        # start and every business.applicability_interval (qatoolbox_business_query_applicable).
        queries = config.business.all_queries()
        lines.append(f"business: {len(queries)} queries, applicability checked at run time")
        lines.extend(f"business query {q.metric}: runs where {', '.join(q.requires)} exist"
                     + ("s" if len(q.requires) == 1 else "")
                     for q in queries if q.requires)
    return lines
