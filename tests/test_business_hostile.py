"""Business SQL from a hostile config author: escapes from read-only, superuser sessions,
unbounded results and invalid values, against real PostgreSQL servers and exporters."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from psycopg import pq

from exporter.collectors import DEFAULTS
from exporter.collectors.business import BusinessCollector
from exporter.collectors.business_config import BusinessConfig, BusinessQuery
from exporter.collectors.business_results import MAX_LABEL_LENGTH, QueryError, result_samples
from exporter.collectors.business_sql import sql_problem, sql_words
from exporter.collectors.postgres_config import PostgresConfig
from exporter.config import Duration, Secret
from tests.harness import (
    EXPORTER_ROLE,
    ExporterProcess,
    PostgresServer,
    run_exporter,
    wait_for,
)

# The fixtures collectors and make_collector are used by name, as test arguments.
from tests.test_business import collectors, make_collector, query, settled  # noqa: F401

SUCCESS = "qatoolbox_business_query_success"
ONLY_BUSINESS = {name: False for name in DEFAULTS if name != "business"}

# The two strings of the outside attack (issue 14), which passed --config.check and, sent as
# one simple-protocol string, deleted rows as the postgres superuser.
BYPASS_CR = "SELECT 1 AS value; --\rCOMMIT; DELETE FROM victim WHERE id = 1; SELECT 1 AS value"
BYPASS_DOLLAR = ("SELECT 1 AS value, 2 AS \u20ac$b$; COMMIT; DELETE FROM victim WHERE id = 2; "
                 "SELECT 1 AS value --\u20ac$b$")
# More ways to make a lexer see a comment or a string where PostgreSQL sees code.
STATIC_BYPASSES = {
    "cr_comment": BYPASS_CR,
    "dollar_in_identifier": BYPASS_DOLLAR,
    # A no-break space and an Arabic-Indic digit are identifier characters to PostgreSQL.
    "nbsp_identifier": "SELECT 1 AS value, 2 AS \u00a0$b$; COMMIT; DELETE FROM victim; "
                       "SELECT 1 AS value --\u00a0$b$",
    "digit_identifier": "SELECT 1 AS value, 2 AS \u0663$b$; COMMIT; DELETE FROM victim; "
                        "SELECT 1 AS value --\u0663$b$",
    # E'x' continued on the next line stays an E'' string, so \' there escapes the quote.
    "e_continuation": "SELECT E'x'\n'\\' AS a, ' ; COMMIT; DELETE FROM victim WHERE id = 3; "
                      "SELECT 1 AS value --'",
    # €e is one identifier (a type name for the literal after it), not € and an E'' prefix.
    "e_after_identifier": "SELECT 1 AS value, \u20ace'\\' AS x; COMMIT; DELETE FROM victim; "
                          "SELECT 1 AS value --'",
}


# --- the load-time check (no database) ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STATIC_BYPASSES))
def test_lexer_sees_the_second_statement(name: str) -> None:
    assert sql_problem(STATIC_BYPASSES[name]) == "must be a single statement, found more after ';'"


@pytest.mark.parametrize(("sql", "words"), [
    ("SELECT 1 AS value --\f; DELETE", ["select", "as", "value"]),  # \f does not end --
    ("SELECT 1 AS value --\v; DELETE", ["select", "as", "value"]),
    ("SELECT a$b$c AS value", ["select", "a$b$c", "as", "value"]),
    ("SELECT $a$ $b$ ' $a$ AS value", ["select", "as", "value"]),
    ("SELECT $a$x$b$a$ AS value", ["select", "as", "value"]),  # $b$a$ holds the closing $a$
    ("SELECT E'\\\\' AS value", ["select", "as", "value"]),
    ("SELECT 'a'\n  -- note\n'b' AS value", ["select", "as", "value"]),
    ("SELECT E'a' /* no */\n'\\' AS value", ["select", "as", "value"]),  # not continued
    ('SELECT U&"d\\0061t""a" AS value', ["select", "u", "as", "value"]),
    ("SELECT B'1''0' AS value", ["select", "as", "value"]),
    ("SELECT \u212aEY AS value", ["select", "\u212aey", "as", "value"]),  # Kelvin is no k
    ("SELECT 1 /*/ nested /* */ */ AS value", ["select", "as", "value"]),
])
def test_lexer_follows_postgresql_rules(sql: str, words: list[str]) -> None:
    assert sql_words(sql) == words


@pytest.mark.parametrize(("sql", "why"), [
    ("SELECT 1 AS value\0", "contains a NUL character"),
    ("SELECT 1 AS \ud800value", "is not valid UTF-8 text"),
    ("SELECT 'it''s", "unterminated quoted string"),
    ("SELECT E'\\'", "unterminated quoted string"),
    ('SELECT "x', "unterminated quoted identifier"),
    ("SELECT $a$ x $b$", "unterminated dollar-quoted string"),
    ("SELECT 1 /* /* */", "unterminated /* comment"),
])
def test_lexer_refuses_what_cannot_be_one_statement(sql: str, why: str) -> None:
    assert sql_problem(sql) == why


def test_config_check_names_each_bypass_in_one_line(workdir: Path) -> None:
    path = workdir / "bypass.yml"
    path.write_text(yaml.safe_dump({"business": {"defaults": False, "queries": [
        query("bypass_cr", BYPASS_CR), query("bypass_dollar", BYPASS_DOLLAR)]}}))
    result = run_exporter(["--config.check", "--config.file", str(path)])
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "business.queries" in line]
    assert lines == [
        "  business.queries[0] (bypass_cr).sql: must be a single statement, found more after ';'",
        "  business.queries[1] (bypass_dollar).sql: must be a single statement, found more "
        "after ';'",
    ], result.stderr
    assert "Traceback" not in result.stderr


# Pieces a lexer can misread: comment and string starts, line ends PostgreSQL counts or not,
# identifier characters, dollar tags, and a second statement.
PIECES = [" ", "\n", "\r", "\r\n", "\t", "\f", "\v", "--", "-- c", "/*", "*/", "'", "''", "\\",
          "E", "e", "U&", "x", "\u20ac", "\u00e9", "\u00a0", "$", "$$", "$a$", "a$b$", '"', ";",
          "; SELECT 2", ",", " AS ", "1"]


def _ours(sql: str) -> str:
    try:
        sql_words(sql)
    except ValueError as exc:
        return "several" if "single statement" in str(exc) else "unterminated"
    return "one"


@pytest.fixture
def parser(postgres: PostgresServer) -> Iterator[Any]:
    """One connection to a PostgreSQL for every example (Parse only, nothing runs)."""
    with postgres.connect() as conn:
        yield conn


@settings(max_examples=4000, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=10))
def test_lexer_never_misses_a_statement_postgresql_sees(parser: Any, pieces: list[str]) -> None:
    """PostgreSQL itself is the reference: Parse (the extended protocol) of the text says
    "cannot insert multiple commands" exactly when its lexer and grammar found a second
    statement. Whenever it does, the load-time check must have refused the text too; and
    where PostgreSQL reads one whole statement, the check finds no unterminated literal."""
    sql = "SELECT 1 " + "".join(pieces)
    result = parser.pgconn.prepare(b"", sql.encode())
    message = (result.error_message or b"").decode(errors="replace")
    if result.status == pq.ExecStatus.COMMAND_OK:
        assert _ours(sql) != "unterminated", repr(sql)
    elif "cannot insert multiple commands" in message:
        assert _ours(sql) != "one", repr(sql)


# --- the server's guarantees, as a superuser the config explicitly allows ----------------------


@pytest.fixture
def unchecked(collectors: list[BusinessCollector]) -> Callable[..., BusinessCollector]:  # noqa: F811
    """A collector built from queries directly, so the load-time check is skipped (the
    collector never re-checks): only PostgreSQL stands between the SQL and the data."""
    def make(env: dict[str, str], queries: dict[str, str], **business: Any) -> BusinessCollector:
        built = tuple(BusinessQuery(metric=name, help="A hostile query.", sql=sql,
                                    timeout=Duration(5)) for name, sql in queries.items())
        pg = PostgresConfig(host=env["DB_HOST"], port=int(env["DB_PORT"]),
                            dbname=env["DB_NAME"], user=env["DB_USER"],
                            password=Secret(env["DB_PASSWORD"]))
        collector = BusinessCollector(BusinessConfig(defaults=False, queries=built,
                                                     concurrency=1, **business), pg)
        collectors.append(collector)
        return collector

    return make


VICTIM_SETUP = """
CREATE TABLE victim (id int PRIMARY KEY);
INSERT INTO victim SELECT generate_series(1, 5);
CREATE FUNCTION purge_victim() RETURNS int LANGUAGE plpgsql VOLATILE AS
  $$ BEGIN DELETE FROM victim; RETURN 1; END $$;
"""
MULTIPLE = "SyntaxError: cannot insert multiple commands into a prepared statement"
# Each is given to the collector without the load-time check (the unchecked fixture).
ESCAPES = {
    **{name: (sql, MULTIPLE) for name, sql in STATIC_BYPASSES.items()},
    "crlf_comment": ("SELECT 1 AS value; --x\r\nCOMMIT; DELETE FROM victim; SELECT 1 AS value",
                     MULTIPLE),
    "nested_comment": ("SELECT 1 AS value /* a /* b */ c */; COMMIT; DELETE FROM victim", MULTIPLE),
    "dollar_quote": ("SELECT $a$x$a$ AS s, 1 AS value; COMMIT; DELETE FROM victim", MULTIPLE),
    "unicode_identifier": ('SELECT 1 AS U&"v\\0061lue"; COMMIT; DELETE FROM victim', MULTIPLE),
    "session_characteristics": ("SELECT 1 AS value; SET SESSION CHARACTERISTICS AS TRANSACTION "
                                "READ WRITE; COMMIT; BEGIN; DELETE FROM victim; COMMIT",
                                MULTIPLE),
    "read_only_off": ("SELECT 1 AS value; SET default_transaction_read_only = off; COMMIT; "
                      "DELETE FROM victim", MULTIPLE),
    "begin_read_write": ("SELECT 1 AS value; COMMIT; BEGIN READ WRITE; DELETE FROM victim; "
                         "COMMIT", MULTIPLE),
    "set_transaction": ("SELECT 1 AS value; ROLLBACK; SET TRANSACTION READ WRITE; "
                        "DELETE FROM victim", MULTIPLE),
    "do_block": ("SELECT 1 AS value; COMMIT; DO $$ BEGIN DELETE FROM victim; END $$", MULTIPLE),
    "delete_alone": ("DELETE FROM victim", 'SyntaxError: syntax error at or near "DELETE"'),
    "commit_alone": ("COMMIT", 'SyntaxError: syntax error at or near "COMMIT"'),
    "cte_delete": ("WITH d AS (DELETE FROM victim RETURNING 1) SELECT count(*) AS value FROM d",
                   "FeatureNotSupported: DECLARE CURSOR must not contain data-modifying "
                   "statements in WITH"),
    "select_into": ("SELECT * INTO stolen FROM victim",
                    "SyntaxError: SELECT ... INTO is not allowed here"),
    "row_lock": ("SELECT id AS value FROM victim FOR UPDATE",
                 "ReadOnlySqlTransaction: cannot execute SELECT FOR UPDATE in a read-only "
                 "transaction"),
    "transaction_read_write": ("SELECT set_config('transaction_read_only', 'off', true) AS x, "
                               "purge_victim() AS value",
                               "ActiveSqlTransaction: transaction read-write mode must be set "
                               "before any query"),
}


def test_no_escape_from_read_only_even_as_an_allowed_superuser(
    postgres: PostgresServer, unchecked: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture, workdir: Path,
) -> None:
    """The issue's Done-when: the victim rows survive every bypass attempt while the exporter
    connects as a superuser (business.allow_superuser set)."""
    postgres.execute(VICTIM_SETUP)
    copied = workdir / "copied"
    escapes = {
        **ESCAPES,
        # Not a write to the database, so a read-only transaction allows it to a superuser;
        # as a cursor's body it is not a statement at all.
        "copy_to_file": (f"COPY (SELECT 1) TO '{copied}'",
                         'SyntaxError: syntax error at or near "COPY"'),
    }
    queries = {name: sql for name, (sql, _) in escapes.items()}
    # Next on the same connection (one worker, in order): the session default turned off
    # inside a query, then a write. The first one's rollback takes the change back.
    queries["default_off"] = ("SELECT 1 AS value "
                              "FROM set_config('default_transaction_read_only', 'off', false)")
    queries["then_write"] = "SELECT purge_victim() AS value"
    # What the session was given at its start, not by BEGIN READ ONLY.
    queries["session_settings"] = (
        "SELECT count(*) AS value FROM pg_settings WHERE source = 'client' AND setting = 'on' "
        "AND name IN ('default_transaction_read_only', 'standard_conforming_strings')")
    collector = unchecked(postgres.env(), queries, allow_superuser=True)
    result = settled(collector, list(queries))

    assert postgres.execute("SELECT array_agg(id ORDER BY id) FROM victim") == [([1, 2, 3, 4, 5],)]
    assert postgres.execute("SELECT to_regclass('stolen')") == [(None,)]
    assert not copied.exists()
    errors = {r.__dict__["query"]: r.__dict__["err"] for r in caplog.records
              if r.getMessage() == "business query failed"}
    for name, (_, expected) in escapes.items():
        assert result.value(SUCCESS, query=name) == 0, name
        assert errors.get(name) == expected, (name, errors.get(name))
    assert result.value("default_off") == 1
    assert "read-only transaction" in errors["then_write"]
    assert result.value("session_settings") == 2
    assert any("business.allow_superuser is set" in r.getMessage() for r in caplog.records)


# --- superusers refused by default --------------------------------------------------------------


def test_a_superuser_is_refused_and_nothing_runs(
    pg_factory: Callable[..., PostgresServer],
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    """What a newcomer sees with the default user (postgres, a superuser): the postgres
    collector works, the business queries are refused with one line saying what to do, and no
    business SQL reaches the server."""
    pg = pg_factory(settings={"log_statement": "all"})
    config = {"collectors": {name: name in ("postgres", "business") for name in DEFAULTS},
              "business": {"defaults": False, "queries": [
                  query("probe_one", "SELECT 4242 AS value"),
                  query("probe_two", "SELECT 4343 AS value"),
                  query("probe_three", "SELECT 4444 AS value")]}}
    exporter = exporter_factory(env=pg.env(), config=config)

    def refused() -> bool:
        result = exporter.scrape()
        return (result.value("qatoolbox_business_superuser_refused") == 1
                and result.value("qatoolbox_business_query_duration_seconds",
                                 query="probe_three") is not None)

    wait_for(refused, 30, "the business collector to refuse the superuser")
    result = exporter.scrape()
    assert result.value("qatoolbox_postgres_up") == 1
    assert result.value("qatoolbox_business_up") == 0
    for name in ("probe_one", "probe_two", "probe_three"):
        assert result.value(SUCCESS, query=name) == 0 and result.value(name) is None
    lines = [line for line in exporter.logs().splitlines() if "logger=exporter.business" in line]
    assert len(lines) == 1, lines
    assert 'msg="business queries refused: the PostgreSQL role is a superuser' in lines[0]
    assert "level=error" in lines[0] and "user=postgres" in lines[0]
    assert "DB_USER=qatoolbox_exporter" in lines[0] and "business.allow_superuser" in lines[0]
    logged = pg.log_path.read_text(errors="replace")
    assert "statement:" in logged  # log_statement=all records the postgres collector's SQL
    for text in ("4242", "4343", "4444"):
        assert text not in logged, "a business query reached the server"


def test_allow_superuser_runs_the_queries_with_a_warning(
    postgres: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
) -> None:
    exporter = exporter_factory(env=postgres.env(), config={
        "collectors": ONLY_BUSINESS,
        "business": {"defaults": False, "allow_superuser": True,
                     "queries": [query("probe", "SELECT 42 AS value")]}})
    wait_for(lambda: exporter.scrape().value("probe") == 42, 30, "the allowed query")
    result = exporter.scrape()
    assert result.value("qatoolbox_business_superuser_refused") == 0
    assert result.value("qatoolbox_business_up") == 1
    warnings = [line for line in exporter.logs().splitlines()
                if "business.allow_superuser is set" in line]
    assert len(warnings) == 1 and "level=warning" in warnings[0], exporter.logs()


# --- the least-privilege role: nothing harmful works --------------------------------------------


def test_least_privilege_role_cannot_harm(
    postgres: PostgresServer, unchecked: Callable[..., BusinessCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    postgres.execute(VICTIM_SETUP)
    postgres.create_exporter_role()
    witness = postgres.connect()  # an application's session the queries try to end
    try:
        pid = witness.execute("SELECT pg_backend_pid()").fetchone()[0]
        denied = {
            "terminate": f"SELECT pg_terminate_backend({pid})::int AS value",
            "cancel": f"SELECT pg_cancel_backend({pid})::int AS value",
            "lo_import": "SELECT lo_import('/etc/hostname')::int AS value",
            "lo_export": "SELECT lo_export(1, '/tmp/qatoolbox-lo-export')::int AS value",
            "read_file": "SELECT length(pg_read_file('/etc/hostname')) AS value",
            "list_dir": "SELECT count(*) AS value FROM pg_ls_dir('.')",
            "reload": "SELECT pg_reload_conf()::int AS value",
        }
        several = [name for name, (_, error) in ESCAPES.items() if error == MULTIPLE]
        queries = {**denied, **{name: ESCAPES[name][0] for name in several}}
        queries["purge"] = "SELECT purge_victim() AS value"  # read-only refuses it first
        # Allowed, but a session-level lock must not outlive the run on a pooled connection.
        queries["advisory"] = "SELECT 1 AS value FROM pg_advisory_lock(4242)"
        collector = unchecked(postgres.exporter_env(), queries)
        result = settled(collector, list(queries))
        errors = {r.__dict__["query"]: r.__dict__["err"] for r in caplog.records
                  if r.getMessage() == "business query failed"}
        for name in denied:
            assert result.value(SUCCESS, query=name) == 0, name
            assert errors[name].startswith("InsufficientPrivilege:"), (name, errors[name])
        for name in several:
            assert errors[name] == MULTIPLE, name
        assert errors["purge"].startswith("ReadOnlySqlTransaction:"), errors["purge"]
        assert result.value("advisory") == 1
        assert postgres.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") \
            == [(0,)]
        assert postgres.exporter_sessions() >= 1  # the pooled connection is still open
        assert witness.execute("SELECT 1").fetchone() == (1,)
        assert postgres.execute("SELECT count(*) FROM victim") == [(5,)]
    finally:
        witness.close()


# --- label values -------------------------------------------------------------------------------


def test_bytes_labels_are_hex_and_long_labels_fail() -> None:
    q = BusinessQuery(metric="m", help="h.", sql="SELECT", labels=("k",))
    assert result_samples(q, ["k", "value"], [
        (b"\xde\xad", 1), (bytearray(b"\x00"), 2), (memoryview(b"ok"), 3), (b"", 4),
    ]) == [(("\\xdead",), 1.0), (("\\x00",), 2.0), (("\\x6f6b",), 3.0), (("\\x",), 4.0)]
    assert result_samples(q, ["k", "value"], [("x" * MAX_LABEL_LENGTH, 1)])
    with pytest.raises(QueryError, match=f'label "k": a value of {MAX_LABEL_LENGTH + 1} '
                                         f"characters, more than {MAX_LABEL_LENGTH}"):
        result_samples(q, ["k", "value"], [("x" * (MAX_LABEL_LENGTH + 1), 1)])


def test_bytea_label_from_postgresql(
    postgres: PostgresServer, make_collector: Callable[..., BusinessCollector],  # noqa: F811
) -> None:
    postgres.create_exporter_role()
    collector = make_collector(postgres.exporter_env(), [
        query("blob", "SELECT '\\xdeadbeef'::bytea AS k, 1 AS value", labels=["k"]),
        query("huge_label", "SELECT repeat('x', 100000) AS k, 1 AS value", labels=["k"]),
    ])
    result = settled(collector, ["blob", "huge_label"])
    assert result.value("blob", k="\\xdeadbeef") == 1
    assert '\\\\xdeadbeef' in result.text  # escaped once in the exposition
    assert result.value(SUCCESS, query="huge_label") == 0


# --- bounded results ----------------------------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_max_rows_bounds_what_is_read(
    pg_factory: Callable[..., PostgresServer],
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    """A million rows, narrow and wide, against max_rows 100: each query fails with the clear
    error after at most 101 rows left the server, and the exporter's peak RSS stays far from
    what holding the results would take (the old fetch-everything peaked at 553 MB)."""
    pg = pg_factory(settings={"shared_preload_libraries": "pg_stat_statements"})
    pg.execute("CREATE EXTENSION pg_stat_statements")
    pg.create_exporter_role()
    exporter = exporter_factory(env=pg.exporter_env(), config={
        "collectors": ONLY_BUSINESS,
        "business": {"defaults": False, "queries": [
            query("narrow", "SELECT i::text AS id, 1 AS value FROM generate_series(1, 1000000) "
                            "AS i", labels=["id"], timeout="60s"),
            query("wide", "SELECT i::text AS id, repeat('x', 400) AS pad, 1 AS value "
                          "FROM generate_series(1, 1000000) AS i", labels=["id"], timeout="60s"),
        ]}})

    def both_failed() -> bool:
        logs = exporter.logs()
        return all(f'query={name} err="too many rows: more than max_rows (100)"' in logs
                   for name in ("narrow", "wide"))

    wait_for(both_failed, 120, "both queries to fail on max_rows", interval=0.2)
    result = exporter.scrape()
    assert result.value(SUCCESS, query="narrow") == 0 and result.value(SUCCESS, query="wide") == 0
    assert exporter.proc is not None
    assert _peak_rss_kib(exporter.proc.pid) < 100 * 1024
    # Rows the server sent to the exporter's role, per statement and call.
    most = pg.execute(f"SELECT max(rows::float8 / calls) FROM pg_stat_statements "
                      f"WHERE userid = '{EXPORTER_ROLE}'::regrole")[0][0]
    assert most is not None and most <= 101, most
    assert pg.execute(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{EXPORTER_ROLE}' "
                      f"AND state = 'active'") == [(0,)]


# --- values checked before they are served ------------------------------------------------------


def test_invalid_counter_values_fail_alone_and_the_body_parses(
    postgres: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
) -> None:
    postgres.create_exporter_role()
    bad = {
        "negative_total": "SELECT -5 AS value",
        "nan_total": "SELECT 'NaN'::float8 AS value",
        "infinite_total": "SELECT 'Infinity'::float8 AS value",
        "numeric_nan_total": "SELECT 'NaN'::numeric AS value",
    }
    good = {
        "fine_total": ("SELECT 5 AS value", "counter", 5.0),
        "gauge_negative": ("SELECT -5 AS value", "gauge", -5.0),
        "gauge_nan": ("SELECT 'NaN'::float8 AS value", "gauge", None),
        "gauge_infinite": ("SELECT '-Infinity'::float8 AS value", "gauge", float("-inf")),
    }
    queries = [query(name, sql, type="counter") for name, sql in bad.items()]
    queries += [query(name, sql, type=kind) for name, (sql, kind, _) in good.items()]
    exporter = exporter_factory(env=postgres.exporter_env(), config={
        "collectors": ONLY_BUSINESS, "business": {"defaults": False, "queries": queries}})

    def all_ran() -> bool:
        result = exporter.scrape()
        return all(result.value("qatoolbox_business_query_duration_seconds", query=q["metric"])
                   for q in queries)

    wait_for(all_ran, 30, "every query to run")
    result = exporter.scrape()
    for name in bad:
        assert result.value(SUCCESS, query=name) == 0 and result.value(name) is None, name
    assert result.value("fine_total") == 5
    assert result.value("gauge_negative") == -5
    assert result.value("gauge_infinite") == float("-inf")
    nan = result.value("gauge_nan")
    assert nan is not None and math.isnan(nan)
    logs = exporter.logs()
    for name, shown in (("negative_total", "-5"), ("nan_total", "NaN"),
                        ("infinite_total", "+Inf"), ("numeric_nan_total", "NaN")):
        assert (f'query={name} err="counter value {shown} in value column \\"value\\": '
                f'a counter must be a finite number, 0 or more"') in logs, logs

    status, _, body = exporter.get("/metrics",
                                   {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    families = {f.name: f for f in openmetrics_families(body.decode())}
    assert "fine" in families and "negative" not in families
    check = subprocess.run(["promtool", "check", "metrics"], input=result.text,
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), \
        check.stdout + check.stderr
