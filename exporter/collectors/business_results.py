"""One business query run: its session steps, rows fetched in bounded batches, checked, folded;
and the families a scrape serves from the runs' results."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg import sql
from psycopg.pq import TransactionStatus

from exporter.collectors.business_config import BusinessQuery, parse_watermark

# Rows are read this many at a time (FETCH FORWARD), and at most max_rows + 1 in all: what a
# query's result costs in memory is bounded by its widest row times this, plus what is kept.
FETCH_BATCH = 500
# A query with label_values is folded as it is read (what is kept is bounded by its limits),
# so its rows are not bounded by max_rows; this many rows fail it.
MAX_FOLDED_ROWS = 1_000_000
# A label value longer than this fails the query: what is kept of a result is bounded by
# max_rows x labels x this, and a series with a label of kilobytes is a query bug.
MAX_LABEL_LENGTH = 256
# The label value bounded label values are summed under past their limit.
OTHER = "other"

Sample = tuple[tuple[str, ...], float]
Connection = psycopg.Connection[tuple[Any, ...]]


class QueryError(Exception):
    """A query ran (or could not run) and its result cannot be served; the message says why."""


def _number(value: object) -> float | None:
    if isinstance(value, (bool, int, float, Decimal)):
        try:
            return float(value)
        except OverflowError:  # an int past float's range
            return math.inf if value > 0 else -math.inf
    return None


def _label(value: object) -> str:
    """A label value: bytes-like values (bytea) as PostgreSQL prints them (\\x and hex digits),
    NULL as the empty string, anything else as its str()."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    return str(value)


class LabelFolder:
    """Bounds the label values of a query that declares label_values: a label's known values
    are always kept, other values are admitted in the order the rows bring them (the defaults
    order their rows by count, largest first) until the label has `limit` values, and any
    further value, an over-long one and an empty one are summed under OTHER. A counter keeps
    one folder for its life (what was admitted stays admitted, so no series moves into
    "other" and goes down); a gauge gets a new one per run (the largest values of the day)."""

    def __init__(self, query: BusinessQuery) -> None:
        positions = {name: i for i, name in enumerate(query.labels)}
        self._bounds = [(positions[v.label], v.limit, set(v.known)) for v in query.label_values
                        if v.label in positions]
        known = {positions[v.label]: v.known for v in query.label_values if v.label in positions}
        # Zero-filled label sets: every combination of known values, when every label has some.
        self.zero_filled: list[tuple[str, ...]] = []
        if query.labels and all(known.get(i) for i in range(len(query.labels))):
            self.zero_filled = [tuple(c) for c in itertools.product(
                *(known[i] for i in range(len(query.labels))))]

    @property
    def active(self) -> bool:
        """Whether any label is bounded."""
        return bool(self._bounds)

    def fold(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """labels with each bounded value kept or replaced by OTHER."""
        out = list(labels)
        for position, limit, admitted in self._bounds:
            value = labels[position]
            if value in admitted:
                continue
            if (value and value != OTHER and len(value) <= MAX_LABEL_LENGTH
                    and len(admitted) < limit):
                admitted.add(value)
            else:
                out[position] = OTHER
        return tuple(out)


def result_samples(
    query: BusinessQuery, columns: Sequence[str], rows: Iterable[Sequence[object]],
    folder: LabelFolder | None = None,
) -> list[Sample]:
    """Turn a query's result into (label values, value) samples; raise QueryError when the
    result does not fit the query's declaration (missing column, too many rows, NULL,
    non-numeric or invalid value, a label value too long, the same label values twice).
    rows is read one row at a time, and not past the row after max_rows.

    A query with label_values is folded instead (folder, or a new one): its known label sets
    come first with 0, rows whose bounded labels fold to the same values are summed, and
    max_rows bounds the series that result rather than the rows read."""
    index: dict[str, int] = {}
    for i, column in enumerate(columns):
        index.setdefault(column, i)
    missing = [c for c in (*query.labels, query.value) if c not in index]
    if missing:
        raise QueryError(f"column {', '.join(missing)} not in the result "
                         f"(columns: {', '.join(columns) or 'none'})")
    value_at = index[query.value]
    label_at = [index[name] for name in query.labels]
    if folder is None and query.label_values:
        folder = LabelFolder(query)
    folded: dict[tuple[str, ...], float] | None = None
    if folder is not None and folder.active:
        folded = dict.fromkeys(folder.zero_filled, 0.0)
    samples: list[Sample] = []
    seen: set[tuple[str, ...]] = set()
    for row in rows:
        if folded is None and len(samples) == query.max_rows:
            raise QueryError(f"too many rows: more than max_rows ({query.max_rows})")
        raw = row[value_at]
        if raw is None:
            raise QueryError(f'NULL in value column "{query.value}"')
        value = _number(raw)
        if value is None:
            raise QueryError(f'non-numeric {type(raw).__name__} in value column "{query.value}"')
        # A counter only goes up from 0: OpenMetrics parsers refuse a negative or NaN one,
        # and rate() over an infinite one is NaN. A gauge may be NaN or infinite (both
        # formats carry them).
        if query.type == "counter" and not (math.isfinite(value) and value >= 0):
            raise QueryError(f'counter value {_shown(value)} in value column "{query.value}": '
                             f"a counter must be a finite number, 0 or more")
        labels = tuple(_label(row[i]) for i in label_at)
        if folded is not None and folder is not None:
            labels = folder.fold(labels)
        for name, text in zip(query.labels, labels, strict=True):
            if len(text) > MAX_LABEL_LENGTH:
                raise QueryError(f'label "{name}": a value of {len(text)} characters, more '
                                 f"than {MAX_LABEL_LENGTH}")
        if folded is not None:
            if labels not in folded and len(folded) == query.max_rows:
                raise QueryError(f"too many label sets after folding: more than max_rows "
                                 f"({query.max_rows})")
            folded[labels] = folded.get(labels, 0.0) + value
            continue
        if labels in seen:
            pairs = ", ".join(f'{k}="{v}"' for k, v in zip(query.labels, labels, strict=True))
            raise QueryError(f"two rows with the same labels {{{pairs}}}")
        seen.add(labels)
        samples.append((labels, value))
    return samples if folded is None else list(folded.items())


def _shown(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:g}"


def fetch_rows(conn: Connection, cursor: psycopg.ServerCursor[tuple[Any, ...]], limit: int,
          deadline: float) -> Iterator[tuple[Any, ...]]:
    """The cursor's rows, FETCH_BATCH at a time, never more than limit in all. The query runs
    inside the FETCHes and statement_timeout counts per statement, so each FETCH after the
    first gets only what is left of the query's time (deadline, monotonic)."""
    fetched = 0
    while fetched < limit:
        if fetched:
            left = max(1, round((deadline - time.monotonic()) * 1000))
            conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{left}ms"])
        want = min(FETCH_BATCH, limit - fetched)
        batch = cursor.fetchmany(want)
        fetched += len(batch)
        yield from batch
        if len(batch) < want:
            return


def capped_rows(rows: Iterator[tuple[Any, ...]], cap: int) -> Iterator[tuple[Any, ...]]:
    """rows, failing the query at the row past cap."""
    for count, row in enumerate(rows, 1):
        if count > cap:
            raise QueryError(f"too many rows: more than {cap}")
        yield row


# The columns of every required table that exists (a missing one has no row), resolved by the
# session's search_path as the queries' own table names are. pg_attribute is readable by
# every role: the least-privilege role needs no grant for it.
CATALOG_SQL = """
SELECT t.name, a.attname
FROM unnest(%s::text[]) AS t(name)
JOIN pg_catalog.pg_attribute AS a
  ON a.attrelid = to_regclass(t.name) AND a.attnum > 0 AND NOT a.attisdropped
"""


def read_catalog(conn: Connection, tables: Sequence[str], timeout: float) -> dict[str, set[str]]:
    """{table: its columns} for each of tables that exists, in a read-only transaction that is
    rolled back."""
    try:
        conn.execute("SELECT set_config('statement_timeout', %s, true)",
                     [f"{max(1, round(timeout * 1000))}ms"])
        catalog: dict[str, set[str]] = {}
        for table, column in conn.execute(CATALOG_SQL, [list(tables)]).fetchall():
            catalog.setdefault(table, set()).add(column)
        return catalog
    finally:
        if not conn.broken:
            conn.rollback()


def missing_requirements(needs: Sequence[tuple[str, tuple[str, ...]]],
                         catalog: Mapping[str, set[str]]) -> list[str]:
    """What of needs (table, columns) the catalog lacks, as "table x" and "column x.y"."""
    gaps: list[str] = []
    for table, columns in needs:
        found = catalog.get(table)
        if found is None:
            gaps.append(f"table {table}")
        else:
            gaps.extend(f"column {table}.{c}" for c in columns if c not in found)
    return gaps


def next_range(previous: tuple[int, int] | None, highest: int) -> tuple[int, int]:
    """(after, upto): the ids a watermark query counts this run. previous is (counted up to,
    highest id seen at the previous run), highest the highest id now.

    Rows are counted one run late: the ids up to the previous run's highest, which every
    transaction that was writing then has committed since (an id is taken when a row is
    inserted, the row is seen when its transaction commits, and a later id may commit first).
    The first run counts nothing (the counter starts at 0 with the exporter, like any
    process's counter); ids that went back below what was counted (a table emptied and its
    sequence reset) restart the range there."""
    if previous is None or highest < previous[0]:
        return highest, highest
    counted, seen = previous
    return counted, min(seen, highest)


def highest_id(conn: Connection, watermark: str) -> int:
    """The highest value of the watermark column now (0 for an empty table)."""
    parsed = parse_watermark(watermark)
    assert parsed is not None  # checked when the config was loaded
    table, column = parsed
    statement = sql.SQL("SELECT max({}) FROM {}").format(
        sql.Identifier(column), sql.Identifier(*table.split(".")))
    row = conn.execute(statement).fetchone()
    value = row[0] if row else None
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise QueryError(f"watermark {watermark}: {type(value).__name__} values, not "
                         f"whole numbers")
    return value


def end_run(conn: Connection) -> bool:
    """Roll the run's transaction back and release the session-level advisory locks a
    query may have taken (they outlive a rollback and would stay held by a pooled
    connection); False when the connection is not fit for another run."""
    try:
        if conn.info.transaction_status == TransactionStatus.INTRANS:
            conn.execute("SELECT pg_advisory_unlock_all()")
            conn.rollback()
        else:  # the transaction failed: leave it first
            conn.rollback()
            conn.execute("SELECT pg_advisory_unlock_all()")
            conn.rollback()
    except psycopg.Error:
        return False
    return True


def is_superuser(conn: Connection) -> bool:
    """Whether the role is a superuser. PostgreSQL reports is_superuser when the session
    starts; a pooler may not pass that on, and then it is asked."""
    flag = conn.info.parameter_status("is_superuser")
    if flag is None:
        row = conn.execute("SELECT current_setting('is_superuser')").fetchone()
        conn.rollback()
        return row is not None and row[0] == "on"
    return flag == "on"


def query_family(query: BusinessQuery, samples: list[Sample]) -> Metric:
    family: GaugeMetricFamily | CounterMetricFamily
    if query.type == "counter":
        family = CounterMetricFamily(query.metric, query.help, labels=list(query.labels))
    else:
        family = GaugeMetricFamily(query.metric, query.help, labels=list(query.labels))
    for labels, value in samples:
        family.add_metric(list(labels), value)
    return family


def status_families(
    snapshot: Iterable[tuple[BusinessQuery, list[Sample] | None, float, float, bool | None]],
    up: bool, refused: bool, reason: str | None,
) -> Iterator[Metric]:
    """The served results and the collector's own families, from a snapshot of each query's
    (query, samples or None, duration, last success, applicable) and the collector's state:
    plain data, so the scrape side never waits on the workers or the database."""
    success = GaugeMetricFamily(
        "qatoolbox_business_query_success",
        "Whether the query's last run succeeded and its result is served (1) or not (0).",
        labels=["query"],
    )
    duration = GaugeMetricFamily(
        "qatoolbox_business_query_duration_seconds",
        "Time the query's last run took.",
        labels=["query"],
    )
    last = GaugeMetricFamily(
        "qatoolbox_business_query_last_success_timestamp_seconds",
        "Unix time of the query's last successful run (0 before the first).",
        labels=["query"],
    )
    applicable = GaugeMetricFamily(
        "qatoolbox_business_query_applicable",
        "Whether the tables and columns the query requires exist (1) or not (0), when "
        "the query requires any and the catalog has been read.",
        labels=["query"],
    )
    for query, samples, took, last_success, fits in snapshot:
        if fits is not None:
            applicable.add_metric([query.metric], 1.0 if fits else 0.0)
        if fits is False:
            continue  # not run here: neither a success nor a failure
        success.add_metric([query.metric], 0.0 if samples is None else 1.0)
        duration.add_metric([query.metric], took)
        last.add_metric([query.metric], last_success)
        if samples is not None:
            yield query_family(query, samples)
    yield GaugeMetricFamily(
        "qatoolbox_business_up",
        "Whether the business collector reached PostgreSQL on its last attempt (1) or not "
        "(0).",
        value=1.0 if up else 0.0,
    )
    if not up and reason is not None:
        unreachable = GaugeMetricFamily(
            "qatoolbox_business_connection_error",
            "Why the business collector could not reach PostgreSQL, while "
            "qatoolbox_business_up is 0; always 1.",
            labels=["reason"],
        )
        unreachable.add_metric([reason], 1.0)
        yield unreachable
    yield GaugeMetricFamily(
        "qatoolbox_business_superuser_refused",
        "Whether business queries are refused because the role is a PostgreSQL superuser "
        "and business.allow_superuser is not set (1) or not (0).",
        value=1.0 if refused else 0.0,
    )
    yield success
    yield duration
    yield last
    yield applicable
