"""The business collector's configuration section: its SQL queries (their placeholders,
requirements and watermarks), the shipped QAToolBox queries, and their load-time checks."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from exporter.collectors.business_sql import sql_problem
from exporter.configtypes import (
    ConfigError,
    Duration,
    Section,
    describe_value,
    format_duration,
    from_plain,
)

MetricType = Literal["gauge", "counter"]
# Connections the business collector may open at once (docs/reliability.md's role allows
# 1 + this + 1).
MAX_BUSINESS_CONCURRENCY = 8


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
        # The file next to the package's modules, read as a plain file: importlib.resources
        # would bring tempfile, zipfile, shutil and random for good (~1 MB resident).
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), BUSINESS_DEFAULTS_FILE)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        import yaml  # start-up work: the exporter lets go of PyYAML once serving (lean.py)

        errors: list[str] = []
        built = from_plain(BusinessConfig, yaml.safe_load(text), BUSINESS_DEFAULTS_FILE, errors)
        if errors:
            raise ConfigError(errors)
        _BUSINESS_DEFAULTS["queries"] = built.queries
    return _BUSINESS_DEFAULTS["queries"]


def check(business: BusinessConfig) -> list[str]:
    """Business queries: names, labels, types, limits and read-only single-statement SQL."""
    # Here, not at the top: the collector table imports this module. The prefixes are the
    # table's, so a collector added to it reserves its own.
    from exporter.collectors import reserved_metric_prefixes

    reserved = reserved_metric_prefixes()
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
                            f"got {describe_value(name)}")
            continue
        if name.startswith(reserved):
            problems.append(f"{label}.metric: the prefix is reserved for the exporter's own "
                            f"metrics ({', '.join(p + '*' for p in reserved)})")
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
                                f"_, not starting with __), got {describe_value(label_name)}")
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
                            f"\"table(column, ...)\", got {describe_value(requirement)}")
    bounded: set[str] = set()
    for j, values in enumerate(query.label_values):
        where = f"{label}.label_values[{j}]"
        if values.label not in query.labels:
            problems.append(f"{where}.label: {describe_value(values.label)} is not one of the "
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
                            f"got {describe_value(query.watermark)}")
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


def summary(business: BusinessConfig) -> list[str]:
    """How many queries, and where each with requirements runs, for --config.check."""
    # The catalog is not read here: a check reaches no server. The collector reads it at
    # start and every business.applicability_interval (qatoolbox_business_query_applicable).
    queries = business.all_queries()
    return [f"business: {len(queries)} queries, applicability checked at run time",
            *(f"business query {q.metric}: runs where {', '.join(q.requires)} exist"
              + ("s" if len(q.requires) == 1 else "")
              for q in queries if q.requires)]


SECTION = Section(BusinessConfig, check=check, metric_prefixes=("qatoolbox_business_",),
                  summary=summary)
