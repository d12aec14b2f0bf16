"""The landing page: each collector's true state, targets without secrets, hostile text escaped;
rendered by headless Chromium against real exporters, PostgreSQL and Redis."""

from __future__ import annotations

import ast
import html
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter import landing
from exporter.collectors import COLLECTORS
from exporter.collectors.app_config import AppConfig
from exporter.collectors.business_config import BusinessConfig
from exporter.collectors.redis_config import RedisConfig
from exporter.config import Config, Secret, WebConfig
from exporter.instrument import Recorder
from exporter.landing import (
    DEGRADED,
    DISABLED,
    FAILING,
    NOT_APPLICABLE,
    NOT_CONFIGURED,
    NOT_RUN,
    OK,
    LandingPage,
    RecordingRunner,
    _e,
    build_view,
    page,
    read_by_page,
)
from exporter.scrape import Outcome, ScrapeRunner
from tests.harness import (
    EXPORTER_PASSWORD,
    ExporterProcess,
    PostgresServer,
    RedisServer,
    wait_for,
)
from tests.test_report import CHROMIUM_FLAGS, chromium

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0


# --- reading a page back ---------------------------------------------------------------------


class _Tables(HTMLParser):
    """The text of every table row, cell by cell, under the heading before the table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._heading = ""
        self._in_heading = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._in_heading, self._heading = True, ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "li" and self._cell is not None:
            self._cell.append(" ; ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_heading = False
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()).strip(" ;"))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables.setdefault(self._heading, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self._heading += data
        elif self._cell is not None:
            self._cell.append(data)


def tables(document: str) -> dict[str, dict[str, list[str]]]:
    """{heading: {first cell: cells}} of every table in the page."""
    parser = _Tables()
    parser.feed(document)
    return {title: {row[0]: row for row in rows[1:]} for title, rows in parser.tables.items()}


def text_of(document: str) -> str:
    """The page's visible text, one space between words."""
    body = re.sub(r"<style>.*?</style>", " ", document, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


# --- plain data: states from outcomes and families --------------------------------------------


def gauge(name: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, "Test.", labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def ok(duration: float = 0.01) -> Outcome:
    return Outcome(True, duration, "", NOW - 5)


def view(families: Sequence[Metric], outcomes: dict[str, Outcome], config: Config,
         names: list[str] | None = None) -> str:
    enabled = names if names is not None else [n for n in COLLECTORS if config.enabled(n)]
    return page(build_view(enabled, outcomes, families, config.web, config,
                           collected_at=NOW - 5, now=NOW, all_names=list(COLLECTORS)))


def every_collector(**overrides: bool) -> Config:
    return Config(collectors={name: overrides.get(name, True) for name in COLLECTORS},
                  app=AppConfig(multiprocess_dirs=("/srv/app/metrics",)))


def states(document: str) -> dict[str, str]:
    return {name: cells[1] for name, cells in tables(document)["Collectors"].items()}


def test_all_ok_when_everything_answers() -> None:
    families: list[Metric] = [
        gauge("qatoolbox_postgres_up", 1, server="db:5432"),
        gauge("qatoolbox_redis_up", 1, server="cache:6379"),
        gauge("qatoolbox_business_up", 1),
        gauge("qatoolbox_business_query_success", 1, query="qatoolbox_users"),
        gauge("qatoolbox_business_query_last_success_timestamp_seconds", NOW - 30,
              query="qatoolbox_users"),
        gauge("qatoolbox_business_query_duration_seconds", 0.002, query="qatoolbox_users"),
        gauge("qatoolbox_app_multiprocess_dir_up", 1, dir="/srv/app/metrics"),
        gauge("qatoolbox_app_workers", 3, dir="/srv/app/metrics"),
    ]
    document = view(families, {n: ok() for n in COLLECTORS}, every_collector())
    assert states(document) == dict.fromkeys(COLLECTORS, OK)
    found = tables(document)
    assert found["Business queries"]["qatoolbox_users"][1:3] == [OK, "succeeded 30 s ago"]
    assert found["App metrics folders"]["/srv/app/metrics"][1:] == [OK, "3 live workers"]
    assert "5 s ago" in found["Collectors"]["host"][2]


def test_never_ok_for_a_failure_or_a_missing_configuration() -> None:
    """The issue's examples: business 'ok' while its queries all failed, app 'ok' with no
    folder; and an up 0 from a collector whose run itself succeeded."""
    families: list[Metric] = [
        gauge("qatoolbox_postgres_up", 0),
        gauge("qatoolbox_postgres_connection_error", 1, reason="database_missing"),
        gauge("qatoolbox_business_up", 0),
        *[gauge("qatoolbox_business_query_success", 0, query=f"q{i}") for i in range(10)],
        *[gauge("qatoolbox_business_query_duration_seconds", 0.001, query=f"q{i}")
          for i in range(10)],
    ]
    config = Config(collectors=dict.fromkeys(COLLECTORS, True))
    document = view(families, {n: ok() for n in COLLECTORS}, config)
    found = states(document)
    assert found["postgres"] == FAILING
    assert found["business"] == FAILING
    assert found["app"] == NOT_CONFIGURED
    rows = tables(document)["Collectors"]
    assert "reason: database missing" in rows["postgres"][4]
    assert "all 10 queries that ran failed" in rows["business"][4]
    assert "app.multiprocess_dirs" in rows["app"][4]
    assert {cells[1] for cells in tables(document)["Business queries"].values()} == {FAILING}


def test_failed_run_degraded_parts_not_applicable_disabled_and_not_run() -> None:
    families: list[Metric] = [
        gauge("qatoolbox_business_up", 1),
        gauge("qatoolbox_business_query_success", 1, query="a"),
        gauge("qatoolbox_business_query_success", 0, query="b"),
        gauge("qatoolbox_business_query_duration_seconds", 0.5, query="b"),
        gauge("qatoolbox_business_query_applicable", 0, query="c"),
        gauge("qatoolbox_app_multiprocess_dir_up", 1, dir="/srv/a"),
        gauge("qatoolbox_app_multiprocess_dir_up", 0, dir="/srv/b"),
    ]
    config = Config(collectors={**dict.fromkeys(COLLECTORS, True), "process": False},
                    app=AppConfig(multiprocess_dirs=("/srv/a", "/srv/b")))
    outcomes = {n: ok() for n in COLLECTORS if n not in ("process", "redis")}
    outcomes["host"] = Outcome(False, 4.0, "timed out after 4s", NOW - 1)
    document = view(families, outcomes, config,
                    names=[n for n in COLLECTORS if n != "process"])
    found = states(document)
    assert found["host"] == FAILING and "timed out after 4s" in document
    assert found["process"] == DISABLED
    assert found["redis"] == NOT_RUN
    assert found["business"] == DEGRADED
    assert found["app"] == DEGRADED
    queries = tables(document)["Business queries"]
    assert [queries[q][1] for q in "abc"] == [OK, FAILING, NOT_APPLICABLE]
    # Only queries whose tables are missing: the collector is not applicable here.
    only_missing = [gauge("qatoolbox_business_up", 1),
                    gauge("qatoolbox_business_query_applicable", 0, query="c")]
    assert states(view(only_missing, outcomes, config))["business"] == NOT_APPLICABLE
    # Before the background queries first ran: not run yet, not failing.
    starting = [gauge("qatoolbox_business_up", 0),
                gauge("qatoolbox_business_query_success", 0, query="a")]
    assert states(view(starting, outcomes, config))["business"] == NOT_RUN
    # ...unless the run itself failed, or the role is refused as a superuser.
    refused = [*starting, gauge("qatoolbox_business_superuser_refused", 1)]
    document = view(refused, outcomes, config)
    assert states(document)["business"] == FAILING
    assert "superuser" in tables(document)["Collectors"]["business"][4]
    crashed = {**outcomes, "business": Outcome(False, 0.1, "RuntimeError: boom", NOW)}
    assert states(view(starting, crashed, config))["business"] == FAILING
    no_queries = Config(collectors=config.collectors, business=BusinessConfig(defaults=False))
    assert states(view([], outcomes, no_queries))["business"] == NOT_CONFIGURED


def test_hostile_text_is_escaped_cut_and_secrets_are_hidden() -> None:
    attack = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    long_error = "OperationalError: " + "x" * 5000
    families: list[Metric] = [
        gauge("qatoolbox_business_up", 1),
        gauge("qatoolbox_business_query_success", 0, query=attack),
        gauge("qatoolbox_business_query_duration_seconds", 0.1, query=attack),
        gauge("qatoolbox_app_multiprocess_dir_up", 1, dir=attack),
        gauge("qatoolbox_postgres_up", 0),
        gauge("qatoolbox_postgres_connection_error", 1, reason=attack),
    ]
    url = "redis://app:hunter2-redis@cache:6379/0?password=hunter3"
    config = Config(collectors=dict.fromkeys(COLLECTORS, True),
                    redis=RedisConfig(url=Secret(url)),
                    app=AppConfig(multiprocess_dirs=("/srv/app",)),
                    web=WebConfig(grafana_url='https://grafana.example/d?x="><script>'))
    outcomes = {n: ok() for n in COLLECTORS}
    outcomes["redis"] = Outcome(False, 0.1, f"cannot connect to {url}: {attack}", NOW)
    outcomes["postgres"] = Outcome(False, 0.1, long_error, NOW)
    document = view(families, outcomes, config)
    assert "<script" not in document and "<img" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert "hunter2" not in document and "hunter3" not in document
    assert "redis://app:&lt;secret&gt;@cache:6379/0?password=&lt;secret&gt;" in document
    postgres = tables(document)["Collectors"]["postgres"][4]
    assert "x" * 250 in postgres and "x" * 400 not in postgres
    assert 'href="https://grafana.example/d?x=&quot;&gt;&lt;script&gt;"' in document


def test_true_before_the_first_scrape_and_reuses_a_recent_collection() -> None:
    """A page opened before anything scraped runs a collection for itself; a page opened
    right after a scrape shows that scrape's outcome instead of running another."""

    class Counting:
        name = "host"
        runs = 0

        def collect(self) -> list[Metric]:
            Counting.runs += 1
            return [gauge("qatoolbox_host_load1", 0.5)]

    clock = [time.time()]  # the runner stamps its collections with the wall clock
    runner = RecordingRunner([Counting()], timeout=10)
    try:
        landing = LandingPage(runner, WebConfig(), clock=lambda: clock[0])
        document = landing.render().decode()
        assert Counting.runs == 1
        assert states(document) == {"host": OK}
        runner.collect()
        clock[0] += 2
        landing.render()
        assert Counting.runs == 2  # the scrape's collection, 2 s old: reused
        clock[0] += 60
        landing.render()
        assert Counting.runs == 3  # older than MAX_AGE: run again for the page
    finally:
        runner.close()
    plain = ScrapeRunner([Counting()], timeout=10)
    try:
        assert states(LandingPage(plain, WebConfig()).render().decode()) == {"host": OK}
    finally:
        plain.close()


def test_recording_keeps_only_what_the_page_reads() -> None:
    """The runner keeps the families the page reads of a collection, not the whole of it, and
    a page drawn from what it kept is the page drawn from the whole collection."""
    wanted = [
        gauge("qatoolbox_postgres_up", 0),
        gauge("qatoolbox_postgres_connection_error", 1, reason="auth_failed"),
        gauge("qatoolbox_business_up", 1),
        gauge("qatoolbox_business_query_success", 0, query="a"),
        gauge("qatoolbox_business_query_applicable", 1, query="a"),
        gauge("qatoolbox_business_query_last_success_timestamp_seconds", NOW - 90, query="a"),
        gauge("qatoolbox_business_query_duration_seconds", 0.4, query="a"),
        gauge("qatoolbox_business_superuser_refused", 0),
        gauge("qatoolbox_app_multiprocess_dir_up", 1, dir="/srv/app/metrics"),
        gauge("qatoolbox_app_workers", 2, dir="/srv/app/metrics"),
    ]
    noise = [gauge(f"qatoolbox_host_thing_{i}", i) for i in range(50)]
    noise.append(gauge("qatoolbox_http_requests_in_flight", 3))

    class Everything:
        name = "host"

        def collect(self) -> list[Metric]:
            return [*noise[:25], *wanted, *noise[25:]]

    runner = RecordingRunner([Everything()], timeout=10)
    try:
        full = runner.collect()
        last = runner.last_collection()
    finally:
        runner.close()
    assert last is not None
    assert [f.name for f in last[1]] == [f.name for f in wanted]
    assert {f.name for f in [*wanted, *noise]} < {f.name for f in full}  # + the runner's own
    config = every_collector()
    outcomes = {n: ok() for n in COLLECTORS}
    assert view(last[1], outcomes, config) == view(full, outcomes, config)


def test_every_family_the_page_reads_is_kept() -> None:
    """Each metric name the page's code looks up (a literal, or an f-string with a collector
    name in it) is one RecordingRunner keeps: a lookup added without it would fail here."""
    source = Path(landing.__file__).read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(str(part.value) if isinstance(part, ast.Constant) else "postgres"
                           for part in node.values)
        else:
            continue
        if text.startswith("qatoolbox_") and " " not in text and text != "qatoolbox_":
            names.add(text)
    assert len(names) >= 9, names
    assert [n for n in sorted(names) if not read_by_page(n)] == []


# --- rendered by Chromium against real exporters ----------------------------------------------

def render(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra,
                           url], capture_output=True, text=True, timeout=120, check=False)


def dom(url: str, profile: Path) -> str:
    result = render(url, profile, "--dump-dom")
    assert "<h1>qatoolbox-exporter</h1>" in result.stdout, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def profile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "chromium"
    yield path
    shutil.rmtree(path, ignore_errors=True)


OK_QUERIES = [
    {"metric": "landing_relations", "help": "Relations in the catalog.", "interval": "1s",
     "sql": "SELECT count(*) AS value FROM pg_class"},
    {"metric": "landing_roles", "help": "Roles.", "interval": "1s",
     "sql": "SELECT count(*) AS value FROM pg_roles"},
]
FAILING_QUERIES = [
    {"metric": "landing_broken", "help": "Always fails.", "interval": "1s",
     "sql": "SELECT 1/0 AS value"},
    {"metric": "landing_missing", "help": "Reads a table that is not there.", "interval": "1s",
     "sql": "SELECT count(*) AS value FROM no_such_table"},
]


@pytest.fixture
def database(pg_factory: Callable[..., PostgresServer]) -> PostgresServer:
    pg = pg_factory()
    pg.execute("CREATE DATABASE qatoolbox")
    pg.create_exporter_role("qatoolbox")
    return pg


def start(factory: Callable[..., ExporterProcess], pg: PostgresServer, redis: RedisServer,
          queries: list[dict[str, Any]], *, app_dir: Path | None = None,
          env: dict[str, str] | None = None) -> ExporterProcess:
    config: dict[str, Any] = {"business": {"defaults": False, "queries": queries},
                              "web": {"grafana_url": "http://grafana.example:3000/"}}
    if app_dir is not None:
        config["app"] = {"multiprocess_dirs": [str(app_dir)]}
    return factory(config=config, env={**pg.exporter_env("qatoolbox"),
                                       "REDIS_URL": redis.exporter_url(), **(env or {})})


def test_chromium_all_up_then_postgres_stopped(
        database: PostgresServer, redis_server: RedisServer,
        exporter_factory: Callable[..., ExporterProcess], workdir: Path,
        profile: Path) -> None:
    redis_server.create_exporter_user()
    app_dir = workdir / "app-metrics"
    app_dir.mkdir()
    recorder = Recorder(str(app_dir))
    try:
        recorder.request_started()
        recorder.request_finished("rooms/", "GET", 200, 0.02)
        exporter = start(exporter_factory, database, redis_server, OK_QUERIES, app_dir=app_dir)
        # Nothing has scraped: the page runs its own collection and says what it found.
        first = dom(exporter.url + "/", profile)
        first_states = states(first)
        for name in ("host", "process", "postgres", "redis", "app"):
            assert first_states[name] == OK, (name, text_of(first))
        assert first_states["business"] in (OK, NOT_RUN)  # its queries run in the background

        def all_queries_ran() -> bool:
            scrape = exporter.scrape()
            return all(scrape.value("qatoolbox_business_query_success", query=q["metric"]) == 1
                       for q in OK_QUERIES)

        wait_for(all_queries_ran, 60, "the business queries to succeed", interval=0.5)
        document = dom(exporter.url + "/", profile)
        assert states(document) == dict.fromkeys(COLLECTORS, OK), text_of(document)
        found = tables(document)
        assert {row[1] for row in found["Business queries"].values()} == {OK}
        assert found["App metrics folders"][str(app_dir)][1:] == [OK, "1 live worker"]
        text = text_of(document)
        assert f"port {database.port}, database qatoolbox, user qatoolbox_exporter" in text
        assert f"redis://qatoolbox_exporter:<secret>@127.0.0.1:{redis_server.port}" in text
        assert EXPORTER_PASSWORD not in document
        for link in ('href="/metrics"', 'href="/healthz"', 'href="http://grafana.example:3000/"',
                     'href="https://github.com/qatoolbox/qatoolbox-exporter'):
            assert link in document, link
        shot = workdir / "landing.png"
        result = render(exporter.url + "/", profile, "--window-size=800,1100",
                        f"--screenshot={shot}")
        assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
        target = os.environ.get("QATOOLBOX_LANDING_SCREENSHOT")
        if target:  # refresh docs/landing.png: QATOOLBOX_LANDING_SCREENSHOT=docs/landing.png
            from PIL import Image

            with Image.open(shot) as picture:
                small = picture.convert("RGB").quantize(colors=64)
                small.save(ROOT / target, optimize=True)

        database.stop()

        def postgres_failing() -> bool:
            found = states(dom(exporter.url + "/", profile))
            return found["postgres"] == FAILING and found["business"] == FAILING

        wait_for(postgres_failing, 60, "postgres and business failing on the page", interval=1)
        document = dom(exporter.url + "/", profile)
        rows = tables(document)["Collectors"]
        assert "connection refused" in rows["postgres"][4].lower(), rows["postgres"]
        assert states(document)["redis"] == OK
        assert {row[1] for row in tables(document)["Business queries"].values()} == {FAILING}
    finally:
        recorder.close()


def test_chromium_database_missing_and_no_app_folder(
        database: PostgresServer, redis_server: RedisServer,
        exporter_factory: Callable[..., ExporterProcess], profile: Path) -> None:
    redis_server.create_exporter_user()
    exporter = start(exporter_factory, database, redis_server, OK_QUERIES,
                     env={"DB_NAME": "qatoolbox_gone", "DB_USER": "postgres", "DB_PASSWORD": ""})
    document = dom(exporter.url + "/", profile)
    found = states(document)
    assert found["postgres"] == FAILING, text_of(document)
    assert 'database "qatoolbox_gone" does not exist' in tables(document)["Collectors"][
        "postgres"][4]
    assert found["app"] == NOT_CONFIGURED
    assert "app.multiprocess_dirs" in tables(document)["Collectors"]["app"][4]
    assert found["redis"] == OK and found["host"] == OK
    assert "database qatoolbox_gone, user postgres" in text_of(document)


def test_chromium_business_failing_while_postgres_answers(
        database: PostgresServer, redis_server: RedisServer,
        exporter_factory: Callable[..., ExporterProcess], profile: Path) -> None:
    redis_server.create_exporter_user()
    exporter = start(exporter_factory, database, redis_server, FAILING_QUERIES)

    def queries_failed() -> bool:
        return states(dom(exporter.url + "/", profile))["business"] == FAILING

    wait_for(queries_failed, 60, "the business row failing", interval=1)
    document = dom(exporter.url + "/", profile)
    assert states(document)["postgres"] == OK
    assert "all 2 queries that ran failed" in tables(document)["Collectors"]["business"][4]
    queries = tables(document)["Business queries"]
    assert {q: row[1] for q, row in queries.items()} == {
        "landing_broken": FAILING, "landing_missing": FAILING}


def test_chromium_keeps_hostile_text_inert(tmp_path: Path, profile: Path) -> None:
    """The page of the hostile-text test, loaded by a browser: no element from the input."""
    attack = '<img src=x onerror=alert(2)><script>document.title="owned"</script>'
    config = Config(collectors=dict.fromkeys(COLLECTORS, True))
    families: list[Metric] = [gauge("qatoolbox_business_up", 1),
                              gauge("qatoolbox_business_query_success", 0, query=attack),
                              gauge("qatoolbox_business_query_duration_seconds", 1, query=attack)]
    outcomes = {n: Outcome(False, 0.1, attack, NOW) for n in COLLECTORS}
    path = tmp_path / "hostile.html"
    path.write_text(view(families, outcomes, config))
    document = dom(path.as_uri(), profile)
    assert "<img" not in document and "<script" not in document
    assert "<title>qatoolbox-exporter</title>" in document
    assert attack in text_of(document)


@given(st.text())
def test_escaping_is_html_escape(text: str) -> None:
    """The page escapes as html.escape(quote=True) does, without the html package."""
    assert _e(text) == html.escape(text, quote=True)
