"""Business collector: config validation, result shaping, and runs against a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import DEFAULTS
from exporter.collectors.business import BusinessCollector
from exporter.collectors.business_config import (
    BusinessConfig,
    BusinessQuery,
    LabelValues,
    business_defaults,
)
from exporter.collectors.business_results import (
    LabelFolder,
    QueryError,
    missing_requirements,
    next_range,
    result_samples,
    status_families,
)
from exporter.collectors.business_sql import sql_problem
from exporter.config import ConfigError, load_config
from tests.harness import (
    EXPORTER_PASSWORD,
    EXPORTER_ROLE,
    ExporterProcess,
    PostgresServer,
    Scrape,
    free_port,
    run_exporter,
    wait_for,
)

SUCCESS = "qatoolbox_business_query_success"


# --- helpers -------------------------------------------------------------------------------------


def load(workdir: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = workdir / "business.yml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path), env or {}, DEFAULTS)


def problems(workdir: Path, business: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(workdir, {"business": business})
    return info.value.problems


def query(metric: str, sql: str, **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "help": "A test metric.", "sql": sql, **extra}


def scrape(collector: BusinessCollector) -> Scrape:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return Scrape(generate_latest(registry).decode())


@pytest.fixture
def collectors() -> Iterator[list[BusinessCollector]]:
    """Collectors a test made; closed (workers joined) at the end."""
    made: list[BusinessCollector] = []
    yield made
    for collector in made:
        collector.close(timeout=10)


@pytest.fixture
def make_collector(
    workdir: Path, collectors: list[BusinessCollector]
) -> Callable[..., BusinessCollector]:
    def make(pg_env: dict[str, str], queries: list[dict[str, Any]], **business: Any
             ) -> BusinessCollector:
        config = load(workdir, {"business": {"defaults": False, "queries": queries, **business}},
                      pg_env)
        collector = BusinessCollector(config.business, config.postgres)
        collectors.append(collector)
        return collector

    return make


def settled(collector: BusinessCollector, names: list[str], timeout: float = 30) -> Scrape:
    """Scrape until every named query has finished a run (success 1, or a logged failure)."""
    result: list[Scrape] = []

    def done() -> bool:
        result[:] = [scrape(collector)]
        return all(
            result[0].value(SUCCESS, query=n) == 1
            or result[0].value("qatoolbox_business_query_duration_seconds", query=n)
            for n in names
        )

    wait_for(done, timeout, f"queries {names} to run")
    return result[0]


# --- SQL and config validation (no database) ----------------------------------------------------


def test_status_families_from_plain_data() -> None:
    """What a scrape serves, from the queries' last runs: a not-applicable query is neither a
    success nor a failure, a failed one serves no result, the reason only while down."""
    ok, failed, missing = (dataclasses.replace(business_defaults()[0], metric=name)
                           for name in ("q_ok", "q_failed", "q_missing"))
    served: list[tuple[tuple[str, ...], float]] = [((), 5.0)]
    snapshot = [(ok, served, 0.25, 1700.0, True), (failed, None, 1.5, 1600.0, None),
                (missing, None, 0.0, 0.0, False)]
    families = {f.name: f for f in status_families(snapshot, False, False, "timeout")}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("qatoolbox_business_query_success", (("query", "q_ok"),))] == 1.0
    assert samples[("qatoolbox_business_query_success", (("query", "q_failed"),))] == 0.0
    assert ("qatoolbox_business_query_success", (("query", "q_missing"),)) not in samples
    assert samples[("qatoolbox_business_query_applicable", (("query", "q_missing"),))] == 0.0
    assert ("qatoolbox_business_query_applicable", (("query", "q_failed"),)) not in samples
    assert samples[("qatoolbox_business_up", ())] == 0.0
    assert samples[("qatoolbox_business_connection_error", (("reason", "timeout"),))] == 1.0
    assert "q_ok" in families and "q_failed" not in families
    up = {f.name for f in status_families(snapshot, True, False, None)}
    assert "qatoolbox_business_connection_error" not in up


@pytest.mark.parametrize("sql", [
    "SELECT 1 AS value",
    "select count(*) as value from t;",
    "  -- leading comment\n WITH x AS (SELECT 1 AS v) SELECT v AS value FROM x",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
    "SELECT count(*) AS value FROM r",
    "SELECT count(*) AS value FROM t WHERE note <> 'update; delete' -- ; drop table t",
    'SELECT "update" AS value FROM t /* insert /* nested */ into */',
    "SELECT $tag$; DELETE FROM t$tag$ AS label, 1 AS value",
    "SELECT E'it\\'s; delete' AS label, 1 AS value",
    "SELECT count(*) AS value FROM t WHERE last_update > now() - interval '1 hour'",
    "SELECT substring(name FROM 1 FOR 3) AS label, 1 AS value FROM t",
])
def test_read_only_selects_are_accepted(sql: str) -> None:
    assert sql_problem(sql) is None


@pytest.mark.parametrize(("sql", "why"), [
    ("UPDATE t SET n = n + 1", "single SELECT"),
    ("DELETE FROM t", "single SELECT"),
    ("VALUES (1)", "single SELECT"),
    ("SELECT 1; SELECT 2", "single statement"),
    ("SELECT 1; DROP TABLE t", "single statement"),
    ("SELECT 1 /* unterminated", "unterminated"),
    ("SELECT 'unterminated", "unterminated"),
    ("WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) AS value FROM gone", "DELETE"),
    ("WITH n AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT 1 AS value", "INSERT"),
    ("WITH u AS (UPDATE t SET n = 0 RETURNING 1) SELECT count(*) AS value FROM u", "UPDATE"),
    ("SELECT * INTO copy_of_t FROM t", "INTO"),
    ("SELECT n AS value FROM t FOR UPDATE", "UPDATE"),
    ("SELECT n AS value FROM t FOR KEY SHARE", "FOR SHARE"),
    ("SELECT 1 AS value -- fine\n; TRUNCATE t", "single statement"),
])
def test_other_statements_are_rejected(sql: str, why: str) -> None:
    problem = sql_problem(sql)
    assert problem is not None and why in problem


def test_defaults_load_validate_and_are_overridable(workdir: Path) -> None:
    defaults = business_defaults()
    names = [q.metric for q in defaults]
    assert names == [
        "qatoolbox_users", "qatoolbox_users_active", "qatoolbox_users_online",
        "qatoolbox_users_by_status", "qatoolbox_chat_rooms",
        "qatoolbox_chat_rooms_cleanup_overdue", "qatoolbox_chat_messages_total",
        "qatoolbox_chat_messages_stored", "qatoolbox_chat_messages_last_hour",
        "qatoolbox_time_capsules", "qatoolbox_time_capsules_overdue",
    ]
    assert all(sql_problem(q.sql) is None and q.help.endswith(".") for q in defaults)
    # Every default declares what it reads, so a schema without it skips it.
    assert all(q.requires for q in defaults)
    filled = load(workdir, {"business": {"presence_window": "2m",
                                         "chat_cleanup_age": "6h"}}).business.all_queries()
    assert [q.metric for q in filled] == names
    online = next(q for q in filled if q.metric == "qatoolbox_users_online").sql
    assert "now() - interval '120.000000 seconds'" in online and "{" not in online
    idle = next(q for q in filled if q.metric == "qatoolbox_chat_rooms_cleanup_overdue").sql
    assert "interval '25200.000000 seconds'" in idle  # 6 h + the 1 h grace
    counter = next(q for q in filled if q.metric == "qatoolbox_chat_messages_total")
    assert "{after}" in counter.sql and "{upto}" in counter.sql  # filled per run
    assert load(workdir, {"business": {"defaults": False}}).business.all_queries() == ()

    mine = query("qatoolbox_users", "SELECT 1 AS value")
    extra = query("shop_orders", "SELECT 2 AS value")
    merged = load(workdir, {"business": {"queries": [extra, mine]}}).business.all_queries()
    assert [q.metric for q in merged] == [*names, "shop_orders"]
    assert merged[0].sql == "SELECT 1 AS value"
    assert merged[-1].interval == 60 and merged[-1].timeout == 2 and merged[-1].max_rows == 100


def test_every_kind_of_bad_query_is_a_config_error_naming_it(workdir: Path) -> None:
    found = problems(workdir, {"defaults": False, "concurrency": 0, "queries": [
        query("ok_metric", "SELECT 1 AS value"),
        query("ok_metric", "SELECT 2 AS value"),
        query("bad-name", "SELECT 1 AS value"),
        query("qatoolbox_postgres_mine", "SELECT 1 AS value"),
        query("qatoolbox_business_up", "SELECT 1 AS value"),
        query("qatoolbox_exporter_x", "SELECT 1 AS value"),
        query("orders", "SELECT 1 AS value", type="histogram"),
        query("orders_total", "SELECT 1 AS value"),
        query("orders_count", "SELECT 1 AS value", type="counter"),
        query("labelled", "SELECT 1 AS value", labels=["ok", "bad-label", "__x", "ok", "value"]),
        query("writer", "UPDATE t SET n = 1"),
        query("cte_writer", "WITH d AS (DELETE FROM t RETURNING 1) SELECT 1 AS value"),
        query("two", "SELECT 1 AS value; SELECT 2"),
        query("limits", "SELECT 1 AS value", interval="0s", timeout="10m", max_rows=0),
        {"metric": "no_help", "sql": "SELECT 1 AS value", "surprise": 1},
        {"metric": "no_sql", "help": "x"},
    ]})
    expected = [
        "business.concurrency: must be between 1 and 8",
        "business.queries[1] (ok_metric).metric: duplicate of business.queries[0] (ok_metric)",
        "business.queries[2].metric: expected a metric name",
        "business.queries[3] (qatoolbox_postgres_mine).metric: the prefix is reserved",
        "business.queries[4] (qatoolbox_business_up).metric: the prefix is reserved",
        "business.queries[5] (qatoolbox_exporter_x).metric: the prefix is reserved",
        "business.queries[6].type: expected one of gauge, counter",
        "business.queries[7] (orders_total).metric: _total is for counters",
        "business.queries[8] (orders_count).metric: a counter's name must end in _total",
        "business.queries[9] (labelled).labels[1]: expected a label name",
        "business.queries[9] (labelled).labels[2]: expected a label name",
        'business.queries[9] (labelled).labels[3]: "ok" is used twice',
        'business.queries[9] (labelled).labels[4]: "value" is used twice',
        "business.queries[10] (writer).sql: must be a single SELECT",
        "business.queries[11] (cte_writer).sql: must only read data, found DELETE",
        "business.queries[12] (two).sql: must be a single statement",
        "business.queries[13] (limits).interval: must be greater than 0",
        "business.queries[13] (limits).timeout: must be between 1ms and 300s",
        "business.queries[13] (limits).max_rows: must be between 1 and 10000",
        "business.queries[14].surprise: unknown key",
        "business.queries[14] (no_help).help: required",
        "business.queries[15] (no_sql).sql: required",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)
    assert len(found) == len(expected), found


def test_requires_label_values_and_watermark_are_checked(workdir: Path) -> None:
    found = problems(workdir, {
        "defaults": False, "presence_window": "0s", "chat_cleanup_age": "1s",
        "chat_cleanup_grace": "2d", "applicability_interval": "0s",
        "queries": [
            query("needs", "SELECT 1 AS value", requires=["ok_table(a, b)", "bad table",
                                                           "t(a,", "s.t"]),
            query("bounded", "SELECT 'x' AS k, 1 AS value", labels=["k"], label_values=[
                {"label": "nope", "known": ["a"]},
                {"label": "k", "known": ["a", "a"], "limit": 1},
                {"label": "k", "known": ["b"]}]),
            query("small", "SELECT 'x' AS k, 1 AS value", labels=["k"], max_rows=2,
                  label_values=[{"label": "k", "known": ["a", "b", "c"], "limit": 5}]),
            query("marked_total", "SELECT 1 AS value WHERE {after} < 1", type="counter",
                  watermark="not a column"),
            query("gauge_mark", "SELECT 1 AS value", watermark="t.id"),
            query("stray", "SELECT 1 AS value WHERE 1 > {upto}"),
        ]})
    expected = [
        "business.presence_window: must be between 1s and 86400s, got 0s",
        "business.chat_cleanup_age: must be between 60s and",
        "business.chat_cleanup_grace: must be between 0s and 86400s, got 172800s",
        "business.applicability_interval: must be between 1s and 86400s, got 0s",
        'business.queries[0] (needs).requires[1]: expected "table" or "table(column, ...)", '
        'got "bad table"',
        'business.queries[0] (needs).requires[2]: expected "table" or',
        'business.queries[1] (bounded).label_values[0].label: "nope" is not one of the '
        "query's labels (k)",
        "business.queries[1] (bounded).label_values[1].known: values must be distinct",
        "business.queries[1] (bounded).label_values[1].limit: must be between the number of "
        "known values",
        'business.queries[1] (bounded).label_values[2].label: "k" is bounded twice',
        "business.queries[2] (small).max_rows: 2 is fewer than the 3 label sets",
        'business.queries[3] (marked_total).watermark: expected "table.column", '
        'got "not a column"',
        "business.queries[3] (marked_total).sql: a watermark query must count the rows with "
        "{after} < column <= {upto}; {upto} missing",
        "business.queries[4] (gauge_mark).watermark: only a counter adds up new rows",
        "business.queries[4] (gauge_mark).sql: a watermark query must count the rows",
        "business.queries[5] (stray).sql: {after} and {upto} are filled only for a query "
        "with a watermark",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)
    assert len(found) == len(expected), found


def test_counter_and_gauge_of_one_family_collide(workdir: Path) -> None:
    found = problems(workdir, {"defaults": False, "queries": [
        query("orders", "SELECT 1 AS value"),
        query("orders_total", "SELECT 1 AS value", type="counter"),
    ]})
    assert found == ["business.queries[1] (orders_total).metric: duplicate of "
                     "business.queries[0] (orders)"]


def test_config_check_rejects_a_writing_query_by_name(workdir: Path) -> None:
    path = workdir / "bad.yml"
    path.write_text(yaml.safe_dump({"business": {"queries": [
        query("shop_orders", "SELECT count(*) AS value FROM orders"),
        query("shop_cleanup", "WITH gone AS (DELETE FROM orders RETURNING 1) "
                              "SELECT count(*) AS value FROM gone"),
    ]}}))
    result = run_exporter(["--config.check", "--config.file", str(path)])
    assert result.returncode == 2
    assert "business.queries[1] (shop_cleanup).sql: must only read data, found DELETE" \
        in result.stderr
    assert "shop_orders" not in result.stderr


# --- result shaping (no database) ---------------------------------------------------------------


def test_result_samples_converts_and_rejects() -> None:
    q = BusinessQuery(metric="m", help="h.", sql="SELECT", labels=("kind",), max_rows=3)
    assert result_samples(q, ["kind", "value"], [("a", 1), ("b", Decimal("2.5")),
                                                 (None, True)]) == [
        (("a",), 1.0), (("b",), 2.5), (("",), 1.0)]
    cases: list[tuple[list[str], list[tuple[Any, ...]], str]] = [
        (["kind"], [("a",)], "column value not in the result"),
        (["value"], [(1,)], "column kind not in the result"),
        (["kind", "value"], [(k, 1) for k in "abcd"], "too many rows"),
        (["kind", "value"], [("a", None)], "NULL"),
        (["kind", "value"], [("a", "12")], "non-numeric str"),
        (["kind", "value"], [("a", 1), ("a", 2)], 'two rows with the same labels {kind="a"}'),
    ]
    for columns, rows, message in cases:
        with pytest.raises(QueryError, match=message.replace("{", r"\{")):
            result_samples(q, columns, rows)


def test_label_values_fold_zero_fill_and_keep_sums() -> None:
    q = BusinessQuery(metric="m", help="h.", sql="SELECT", labels=("kind", "state"),
                      max_rows=50, label_values=(
                          LabelValues("kind", ("a", "b"), limit=3),
                          LabelValues("state", ("on", "off"), limit=2)))
    rows = [("x", "on", 7), ("a", "on", 5), ("y", "on", 4), ("b", "gone", 3), ("z", "off", 2),
            ("", "on", 1), ("k" * 300, "off", 1), ("other", "on", 1)]
    got = dict(result_samples(q, ["kind", "state", "value"], rows))
    # Known values zero-filled; x admitted (3rd value); y, z, "", over-long, "other" folded;
    # the state "gone" past the limit of 2 folded too.
    assert got == {("a", "on"): 5.0, ("a", "off"): 0.0, ("b", "on"): 0.0, ("b", "off"): 0.0,
                   ("x", "on"): 7.0, ("other", "on"): 4.0 + 1 + 1, ("b", "other"): 3.0,
                   ("other", "off"): 2.0 + 1}
    assert sum(got.values()) == sum(r[2] for r in rows)
    # Duplicate raw label sets are summed, not refused, once folding is on; max_rows bounds
    # the folded series.
    dup = dict(result_samples(q, ["kind", "state", "value"], [("a", "on", 1), ("a", "on", 2)]))
    assert dup[("a", "on")] == 3.0
    tight = dataclasses.replace(q, max_rows=4)
    with pytest.raises(QueryError, match="too many label sets after folding"):
        result_samples(tight, ["kind", "state", "value"], [("x", "on", 1)])


def test_a_counters_folder_keeps_what_it_admitted() -> None:
    q = BusinessQuery(metric="m_total", help="h.", sql="SELECT", type="counter",
                      labels=("kind",), max_rows=10,
                      label_values=(LabelValues("kind", ("a",), limit=2),))
    folder = LabelFolder(q)
    first = dict(result_samples(q, ["kind", "value"], [("x", 3), ("y", 1)], folder))
    assert first == {("a",): 0.0, ("x",): 3.0, ("other",): 1.0}
    # y now outnumbers x, but x keeps its series and y stays under "other" (a counter's
    # series never moves, so none goes down).
    second = dict(result_samples(q, ["kind", "value"], [("y", 9), ("x", 1)], folder))
    assert second == {("a",): 0.0, ("other",): 9.0, ("x",): 1.0}


def test_watermark_ranges_and_missing_requirements() -> None:
    assert next_range(None, 100) == (100, 100)  # first run: counting starts now
    assert next_range((100, 100), 130) == (100, 100)  # one run late: nothing yet
    assert next_range((100, 130), 170) == (100, 130)
    assert next_range((130, 170), 150) == (130, 150)  # newest rows deleted
    assert next_range((130, 170), 20) == (20, 20)  # emptied and restarted
    catalog = {"t": {"a", "b"}, "u": {"c"}}
    assert missing_requirements([("t", ("a",)), ("u", ())], catalog) == []
    assert missing_requirements([("t", ("a", "z")), ("v", ("q",))], catalog) == [
        "column t.z", "table v"]


# --- against a real PostgreSQL ------------------------------------------------------------------


SETUP = """
CREATE TABLE items (id serial PRIMARY KEY, kind text NOT NULL, amount numeric);
INSERT INTO items (kind, amount) VALUES ('a', 1.5), ('a', 2), ('b', NULL);
CREATE SEQUENCE ticket;
CREATE TABLE audit (at timestamptz DEFAULT now());
CREATE FUNCTION write_audit() RETURNS int LANGUAGE plpgsql VOLATILE AS
  $$ BEGIN INSERT INTO audit DEFAULT VALUES; RETURN 1; END $$;
"""


def database_state(pg: PostgresServer) -> list[Any]:
    return [
        pg.execute("SELECT id, kind, amount FROM items ORDER BY id"),
        pg.execute("SELECT last_value, is_called FROM ticket"),
        pg.execute("SELECT count(*) FROM audit"),
        pg.execute("SELECT count(*) FROM pg_class WHERE relname = 'stolen'"),
    ]


def test_broken_queries_fail_alone_and_change_nothing(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    postgres.execute(SETUP)
    before = database_state(postgres)
    good = [
        query("items", "SELECT count(*) AS value FROM items"),
        query("item_amount", "SELECT kind, sum(amount) AS value FROM items "
                             "WHERE amount IS NOT NULL GROUP BY kind", labels=["kind"]),
        query("items_seen_total", "SELECT count(*) AS value FROM items", type="counter"),
    ]
    broken = {
        "bad_syntax": query("bad_syntax", "SELECT count(* AS value FROM items"),
        "missing_table": query("missing_table", "SELECT count(*) AS value FROM no_such_table"),
        "text_value": query("text_value", "SELECT kind AS value FROM items LIMIT 1"),
        "null_value": query("null_value", "SELECT amount AS value FROM items WHERE kind = 'b'"),
        "too_many_rows": query("too_many_rows", "SELECT id::text AS id, 1 AS value FROM items",
                               labels=["id"], max_rows=2),
        "missing_column": query("missing_column", "SELECT 1 AS n"),
        "timed_out": query("timed_out", "SELECT 1 AS value FROM pg_sleep(30)",
                           timeout="300ms"),
        "writes_via_function": query("writes_via_function", "SELECT write_audit() AS value"),
        "takes_a_ticket": query("takes_a_ticket", "SELECT nextval('ticket') AS value"),
        "turns_read_only_off": query(
            "turns_read_only_off",
            "SELECT 1 AS value FROM (SELECT set_config('default_transaction_read_only', "
            "'off', false)) AS s, LATERAL (SELECT write_audit()) AS w"),
    }
    # One connection for all, failures first: each failure must leave it usable. As the
    # superuser on purpose (allowed explicitly): this proves the collector's own READ ONLY
    # transactions stop the writes. The least-privilege role would be stopped earlier by its
    # missing grants (nextval fails on the sequence's privilege before the read-only check)
    # and prove nothing of it.
    collector = make_collector(postgres.env(), [*broken.values(), *good], concurrency=1,
                               allow_superuser=True)
    result = settled(collector, [q["metric"] for q in good] + list(broken))

    assert result.value("items") == 3
    assert result.value("item_amount", kind="a") == 3.5
    assert result.value("item_amount", kind="b") is None
    assert result.value("items_seen_total") == 3
    assert "# TYPE items_seen_total counter" in result.text
    for name in [q["metric"] for q in good]:
        assert result.value(SUCCESS, query=name) == 1
        assert (result.value("qatoolbox_business_query_last_success_timestamp_seconds",
                             query=name) or 0) > 1e9
    for name in broken:
        assert result.value(SUCCESS, query=name) == 0, name
        assert not [n for n, _ in result.series(name)], f"{name} served a value"
        assert result.value("qatoolbox_business_query_last_success_timestamp_seconds",
                            query=name) == 0
    assert result.value("qatoolbox_business_up") == 1

    errors = {r.__dict__["query"]: r.__dict__["err"] for r in caplog.records
              if r.getMessage() == "business query failed"}
    assert set(errors) == set(broken)
    assert errors["bad_syntax"].startswith("SyntaxError: syntax error")
    assert errors["missing_table"] == 'UndefinedTable: relation "no_such_table" does not exist'
    assert errors["text_value"] == 'non-numeric str in value column "value"'
    assert errors["null_value"] == 'NULL in value column "value"'
    assert errors["too_many_rows"] == "too many rows: more than max_rows (2)"
    assert errors["missing_column"].startswith("column value not in the result")
    assert errors["timed_out"].startswith("QueryCanceled: canceling statement due to statement")
    assert "read-only transaction" in errors["writes_via_function"]
    assert "read-only transaction" in errors["takes_a_ticket"]
    assert "read-only transaction" in errors["turns_read_only_off"]
    assert database_state(postgres) == before


def test_results_are_reused_within_the_interval(
    pg_factory: Callable[..., PostgresServer], make_collector: Callable[..., BusinessCollector],
) -> None:
    pg = pg_factory(settings={"shared_preload_libraries": "pg_stat_statements"})
    pg.execute("CREATE EXTENSION pg_stat_statements; CREATE TABLE reuse_probe (n int); "
               "CREATE TABLE refresh_probe (n int); INSERT INTO reuse_probe VALUES (1), (2);")
    # The documented role, plus the grant docs/reliability.md asks for a custom query.
    pg.create_exporter_role()
    pg.execute(f"GRANT SELECT (n) ON reuse_probe, refresh_probe TO {EXPORTER_ROLE}")

    def calls(table: str) -> int:
        rows = pg.execute(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                          f"WHERE query LIKE '%FROM {table}%' "
                          f"AND query NOT LIKE '%pg_stat_statements%'")
        return int(rows[0][0])

    collector = make_collector(pg.exporter_env(), [
        query("reused", "SELECT count(*) AS value FROM reuse_probe", interval="1h"),
        query("refreshed", "SELECT count(*) AS value FROM refresh_probe", interval="200ms"),
    ])
    settled(collector, ["reused", "refreshed"])
    pg.execute("INSERT INTO reuse_probe VALUES (3)")
    for _ in range(30):
        result = scrape(collector)
        assert result.value("reused") == 2  # the cached result, not the table's 3 rows
    def refreshed_often() -> bool:
        scrape(collector)  # scrapes are what queue a due query
        return calls("refresh_probe") >= 3

    wait_for(refreshed_often, 30, "the short-interval query to run again")
    assert calls("reuse_probe") == 1


def test_database_down_paused_and_back(
    pg_factory: Callable[..., PostgresServer], make_collector: Callable[..., BusinessCollector],
) -> None:
    port = free_port()
    env = {"DB_HOST": "127.0.0.1", "DB_PORT": str(port), "DB_NAME": "postgres",
           "DB_USER": EXPORTER_ROLE, "DB_PASSWORD": EXPORTER_PASSWORD}
    names = ["one", "two", "three"]
    collector = make_collector(env, [query(n, "SELECT 1 AS value", interval="1s",
                                           timeout="500ms") for n in names])
    result = settled(collector, names)
    assert [result.value(SUCCESS, query=n) for n in names] == [0, 0, 0]
    assert result.value("qatoolbox_business_up") == 0

    pg = pg_factory(port=port)
    pg.create_exporter_role()
    wait_for(lambda: scrape(collector).value(SUCCESS, query="three") == 1, 30, "recovery")
    assert scrape(collector).value("qatoolbox_business_up") == 1

    # A server that stops answering: the watchdog cuts the connection, scrapes stay answered.
    # PostgreSQL's backends run in sessions of their own, so they are stopped one by one.
    backends = [int(row[0]) for row in pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'qatoolbox-exporter-business'")]
    assert backends
    pg.pause()
    for pid in backends:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: scrape(collector).value(SUCCESS, query="one") == 0, 30,
                 "the paused server's query to be cut")
        assert scrape(collector).value("one") is None
        assert scrape(collector).value("qatoolbox_business_up") == 0
    finally:
        for pid in backends:
            os.kill(pid, signal.SIGCONT)
        pg.resume()
    wait_for(lambda: scrape(collector).value(SUCCESS, query="one") == 1, 30, "recovery")


def test_database_restart_costs_no_failure(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = ["one", "two", "three"]
    postgres.create_exporter_role()
    collector = make_collector(postgres.exporter_env(),
                               [query(n, "SELECT 1 AS value", interval="1s") for n in names])
    settled(collector, names)
    # Queries only run when a scrape finds them due, so none runs during the restart; the
    # next ones meet pooled connections the restart killed.
    postgres.restart()
    before = scrape(collector)
    last = "qatoolbox_business_query_last_success_timestamp_seconds"

    def all_ran_again() -> bool:
        result = scrape(collector)
        return all((result.value(last, query=n) or 0) > (before.value(last, query=n) or 0)
                   for n in names)

    wait_for(all_ran_again, 30, "every query to run after the restart")
    assert [r.__dict__["err"] for r in caplog.records
            if r.getMessage() == "business query failed"] == []


def test_no_password_in_errors_or_logs(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "Sw0rdfish-business"
    postgres.create_exporter_role(password=secret)
    env = postgres.exporter_env(password=secret)
    collector = make_collector(env, [
        query("granted", "SELECT 1 AS value"),
        query("denied", "SELECT count(*) AS value FROM pg_authid"),
    ])
    result = settled(collector, ["granted", "denied"])
    assert result.value("granted") == 1 and result.value(SUCCESS, query="denied") == 0
    wrong = make_collector({**env, "DB_PASSWORD": secret + "-wrong"},
                           [query("granted", "SELECT 1 AS value")])
    assert settled(wrong, ["granted"]).value(SUCCESS, query="granted") == 0
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "permission denied" in logged and "password authentication failed" in logged
    assert secret not in logged
    assert secret not in result.text


def test_collect_with_no_queries(make_collector: Callable[..., BusinessCollector]) -> None:
    collector = make_collector({"DB_PORT": "1"}, [])
    text = scrape(collector).text
    assert "qatoolbox_business_up 0.0" in text


def test_business_config_defaults() -> None:
    config = BusinessConfig()
    assert config.defaults and config.concurrency == 2 and config.queries == ()
    assert len(config.all_queries()) == 11
    assert float(config.applicability_interval) == 300 == float(config.presence_window)
    assert float(config.chat_cleanup_age) == 12 * 3600
    assert float(config.chat_cleanup_grace) == 3600


def test_slow_query_never_holds_up_the_scrape(
    postgres: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
) -> None:
    others = {name: False for name in DEFAULTS if name != "business"}
    postgres.create_exporter_role()
    exporter = exporter_factory(env=postgres.exporter_env(), config={
        "collectors": others,
        "scrape": {"timeout": "2s"},
        "business": {"defaults": False, "queries": [
            query("sleepy", "SELECT 1 AS value FROM pg_sleep(60)", timeout="2m"),
            query("quick", "SELECT 42 AS value"),
        ]},
    })

    def sleeping() -> bool:
        # The query runs inside a FETCH of the collector's cursor, so it is found by its wait.
        return bool(postgres.execute("SELECT count(*) FROM pg_stat_activity "
                                     "WHERE application_name = 'qatoolbox-exporter-business' "
                                     "AND state = 'active' AND wait_event = 'PgSleep'")[0][0])

    wait_for(sleeping, 20, "the slow query to be running")
    wait_for(lambda: exporter.scrape().value("quick") == 42, 20, "the quick query")
    for _ in range(3):
        assert sleeping()
        result = exporter.scrape()
        # Within its 2 s budget although a query of the collector runs for a minute.
        assert result.value("qatoolbox_exporter_collector_success", collector="business") == 1
        assert result.value(SUCCESS, query="sleepy") == 0 and result.value("sleepy") is None
        assert result.value("quick") == 42
    # Shutting down cuts the running query instead of waiting for it (stop() kills the
    # exporter, exit code -9, if it has not ended 10 s after SIGTERM).
    assert exporter.stop() == 0


# --- why PostgreSQL cannot be reached: one summary line and a reason -----------------------------

TEN = [f"q{i}" for i in range(10)]
SUMMARY = re.compile(r"^(\d+) business quer(?:y|ies) failed: ")


def unreachable_case(make_collector: Callable[..., BusinessCollector],
                     caplog: pytest.LogCaptureFixture, env: dict[str, str], reason: str,
                     expected: str) -> None:
    """Ten queries against env all fail: up 0, connection_error{reason} 1 and nothing else,
    one warning for the collector naming the cause, every query's own failure at debug."""
    caplog.clear()
    collector = make_collector(env, [query(n, "SELECT 1 AS value", interval="1s")
                                     for n in TEN])
    result = settled(collector, TEN)
    assert [result.value(SUCCESS, query=n) for n in TEN] == [0] * 10
    assert result.value("qatoolbox_business_up") == 0
    found = {lbl["reason"] for _, lbl in result.series("qatoolbox_business_connection_error")}
    assert found == {reason}
    assert result.value("qatoolbox_business_connection_error", reason=reason) == 1
    took = "qatoolbox_business_query_duration_seconds"
    first = {n: result.value(took, query=n) for n in TEN}

    def ran_again() -> bool:
        again = scrape(collector)
        return all(again.value(took, query=n) != first[n] for n in TEN)

    # Every query runs again with the same cause: nothing more at warning.
    wait_for(ran_again, 30, "every query to run again")
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "exporter.business" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    summary = SUMMARY.match(warnings[0])
    assert summary is not None and summary[1] == "10", warnings
    assert expected in warnings[0]
    assert EXPORTER_PASSWORD not in warnings[0] and "wrong-password" not in warnings[0]
    per_query = {r.__dict__["query"] for r in caplog.records
                 if r.getMessage() == "business query failed" and r.levelno == logging.DEBUG}
    assert per_query == set(TEN)


def test_unreachable_database_one_summary_and_the_reason(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wrong password, missing database, a stopped server, each with its reason."""
    caplog.set_level(logging.DEBUG, logger="exporter.business")
    pg = postgres
    pg.create_exporter_role()
    env = pg.exporter_env()
    unreachable_case(make_collector, caplog, {**env, "DB_PASSWORD": "wrong-password"},
                     "authentication_failed", "password authentication failed")
    unreachable_case(make_collector, caplog, {**env, "DB_NAME": "qatoolbox"},
                     "database_missing", 'database "qatoolbox" does not exist')
    unreachable_case(make_collector, caplog, {**env, "DB_PORT": str(free_port())},
                     "connection_refused", "Connection refused")


def test_frozen_database_one_summary_then_one_recovery(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP on the server and its backends: reason timeout, one summary line; SIGCONT:
    one line saying the queries reach PostgreSQL again, none per query."""
    caplog.set_level(logging.DEBUG, logger="exporter.business")
    pg = postgres
    pg.create_exporter_role()
    collector = make_collector(pg.exporter_env(), [
        query(n, "SELECT 1 AS value", interval="1s", timeout="500ms") for n in TEN])
    wait_for(lambda: all(scrape(collector).value(SUCCESS, query=n) == 1 for n in TEN), 30,
             "every query to succeed")
    assert scrape(collector).series("qatoolbox_business_connection_error") == []
    backends = [int(row[0]) for row in pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'qatoolbox-exporter-business'")]
    caplog.clear()
    pg.pause()
    for pid in backends:
        os.kill(pid, signal.SIGSTOP)
    try:
        def cut() -> bool:
            result = scrape(collector)
            return (all(result.value(SUCCESS, query=n) == 0 for n in TEN)
                    and result.value("qatoolbox_business_connection_error", reason="timeout") == 1)

        wait_for(cut, 60, "every query to fail with reason timeout")
        assert scrape(collector).value("qatoolbox_business_up") == 0
    finally:
        for pid in backends:
            os.kill(pid, signal.SIGCONT)
        pg.resume()
    wait_for(lambda: all(scrape(collector).value(SUCCESS, query=n) == 1 for n in TEN), 30,
             "recovery")
    result = scrape(collector)
    assert result.value("qatoolbox_business_up") == 1
    assert result.series("qatoolbox_business_connection_error") == []
    logged = [(r.levelno, r.getMessage()) for r in caplog.records
              if r.name == "exporter.business" and r.levelno >= logging.INFO]
    warnings = [m for level, m in logged if level >= logging.WARNING]
    assert len(warnings) == 1 and SUMMARY.match(warnings[0]), logged
    assert "no answer from PostgreSQL" in warnings[0] or "timeout" in warnings[0], warnings
    assert [m for level, m in logged if level == logging.INFO] == [
        "business queries reach PostgreSQL again"], logged


def test_a_connection_attempt_outlived_by_a_good_one_is_tried_again(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attempt that started while PostgreSQL did not answer and failed after another
    worker's attempt succeeded (the server came back meanwhile) is tried once more, not
    reported as PostgreSQL unreachable: under load, a resumed server otherwise got a second
    "queries failed" summary right after "reach PostgreSQL again"."""
    import threading

    import psycopg

    from exporter import pgconn

    pg = postgres
    pg.create_exporter_role()
    collector = make_collector(pg.exporter_env(), [query("qatoolbox_probe", "SELECT 1 AS value")])
    real = pgconn.connect
    other_done = threading.Event()
    calls: list[str] = []

    def connect(params: dict[str, Any], autocommit: bool = False) -> Any:
        if threading.current_thread().name == "stale-attempt" and "stale" not in calls:
            calls.append("stale")
            assert other_done.wait(30)
            raise psycopg.OperationalError("connection timeout expired")
        calls.append("real")
        return real(params, autocommit)

    monkeypatch.setattr("exporter.collectors.business.pgconn.connect", connect)
    got: list[Any] = []
    first = threading.Thread(target=lambda: got.append(collector._connection(fresh=True)),
                             name="stale-attempt")
    first.start()
    try:
        while "stale" not in calls:
            time.sleep(0.01)
        second, _ = collector._connection(fresh=True)  # PostgreSQL is back: this one connects
        other_done.set()
        first.join(30)
        assert got and got[0][0] is not second and not got[0][0].closed
        assert calls.count("real") >= 2  # the good attempt and the stale one's retry
        assert collector._connect_failure is None
        got[0][0].close()
        second.close()
    finally:
        other_done.set()
        first.join(30)


def test_no_summary_after_recovery_for_queries_not_run_since(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once a connection succeeds again, the queries that failed to reach PostgreSQL before
    it and have not run since are not summarised again as failing (the next outcome of any
    query used to log "N business queries failed" right after "reach PostgreSQL again")."""
    pg = postgres
    pg.create_exporter_role()
    collector = make_collector(pg.exporter_env(), [
        query(n, "SELECT 1 AS value", interval="1h") for n in TEN])
    caplog.set_level(logging.DEBUG, logger="exporter.business")
    with collector._lock:
        for state in collector._states:
            state.queued = False
            state.error, state.unreachable = "cannot connect: timeout", "timeout"
            state.unreachable_at = collector._clock()
        collector._summarise()  # during the outage: one summary
        collector._collector_log.clear("unreachable")  # a connection succeeded again
        collector._connected_at = collector._clock() + 1
        collector._summarise()  # a later outcome: nothing new failed
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "exporter.business" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("10 business queries failed"), warnings
