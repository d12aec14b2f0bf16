"""Secrets: no password reaches /metrics, the landing page, logs or config errors, ever."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.collectors import COLLECTORS
from tests.harness import (
    ExporterProcess,
    PostgresServer,
    RedisServer,
    free_port,
    run_exporter,
    wait_for,
)
from tests.test_business_demo import manage

# Characters that DSN and URL builders must quote: a leak in any quoted form is caught too.
DB_SECRET = "Pg-s3cret w'ith=odd\\chars@x"
REDIS_SECRET = "Rd-s3cret/with:odd@chars%"


def forms(secret: str) -> list[str]:
    """The secret as it could show up: raw, URL-quoted, libpq-quoted, repr-escaped."""
    return sorted({secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret),
                   urllib.parse.quote_plus(secret), secret.replace("\\", "\\\\"),
                   secret.replace("'", "\\'"), repr(secret)[1:-1],
                   secret.split(" ", maxsplit=1)[0], secret.split("/", maxsplit=1)[0]})


def assert_absent(secret: str, *texts: str | bytes) -> None:
    for text in texts:
        body = text.decode(errors="replace") if isinstance(text, bytes) else text
        for form in forms(secret):
            assert form not in body, f"secret form {form!r} leaked: ...{body[:300]}..."


def only(*names: str) -> list[str]:
    return [f"--collector.{n}" if n in names else f"--no-collector.{n}" for n in COLLECTORS]


def everything_shown(process: ExporterProcess) -> list[str | bytes]:
    """/metrics, the landing page and the log so far."""
    scrape = process.scrape()
    landing = process.get("/")[2]
    return [scrape.text, landing, process.logs()]


def _scrapes(process: ExporterProcess, n: int = 3) -> None:
    for _ in range(n):
        process.scrape()


@pytest.fixture
def restricted_pg(postgres: PostgresServer) -> PostgresServer:
    """The exporter's own role, with a password, as docs/reliability.md sets it up."""
    postgres.execute("CREATE ROLE qatoolbox_exporter LOGIN PASSWORD 'the-right-one' "
                     "IN ROLE pg_monitor")
    postgres.execute("CREATE DATABASE qatoolbox")
    return postgres


@pytest.mark.integration
def test_postgres_wrong_password_and_server_down(
        restricted_pg: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
        workdir: Path) -> None:
    env = restricted_pg.env(dbname="qatoolbox", user="qatoolbox_exporter", password=DB_SECRET)
    process = exporter_factory(env=env, args=[*only("postgres", "business"), "--log.level",
                                              "debug"])
    scrape = process.scrape()
    assert scrape.value("qatoolbox_postgres_up") == 0
    assert scrape.value("qatoolbox_exporter_collector_success", collector="postgres") in (0, 1)
    _scrapes(process)
    # Now the server goes away entirely.
    restricted_pg.stop()
    _scrapes(process)
    shown = everything_shown(process)
    assert "password authentication failed" in process.logs() or \
        "password" in process.logs().lower()  # the failure is logged, the password is not
    assert_absent(DB_SECRET, *shown)


@pytest.mark.integration
def test_postgres_password_file_right_then_wrong(
        restricted_pg: PostgresServer, exporter_factory: Callable[..., ExporterProcess],
        workdir: Path) -> None:
    secret_file = workdir / "db-password"
    secret_file.write_text("the-right-one\n")
    env = restricted_pg.env(dbname="qatoolbox", user="qatoolbox_exporter")
    env.pop("DB_PASSWORD")
    env["DB_PASSWORD_FILE"] = str(secret_file)
    process = exporter_factory(env=env, args=[*only("postgres"), "--log.level", "debug"])
    # As the restricted role (pg_monitor, no superuser) the collector works.
    wait_for(lambda: process.scrape().value("qatoolbox_postgres_up") == 1, 20,
             "postgres up as qatoolbox_exporter")
    # The password is changed under the exporter's feet: it fails, and says nothing more.
    restricted_pg.execute("ALTER ROLE qatoolbox_exporter PASSWORD 'rotated-elsewhere'")
    restricted_pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename = 'qatoolbox_exporter'")
    wait_for(lambda: process.scrape().value("qatoolbox_postgres_up") == 0, 20,
             "postgres down after the password change")
    assert_absent("the-right-one", *everything_shown(process))
    assert_absent("rotated-elsewhere", *everything_shown(process))


DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def documented_block(marker: str) -> str:
    """The fenced block that follows <!-- marker --> in docs/reliability.md."""
    text = DOC.read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def redis_acl_rules(password: str) -> list[str]:
    """The documented ACL SETUSER arguments after the user name, with the password set."""
    words = documented_block("least-privilege-redis").split()
    assert words[:3] == ["ACL", "SETUSER", "qatoolbox_exporter"]
    return [f">{password}" if w == ">change-me" else w for w in words[3:]]


@pytest.mark.integration
def test_redis_wrong_password_acl_user_and_down(
        redis_factory: Callable[..., RedisServer],
        exporter_factory: Callable[..., ExporterProcess], workdir: Path) -> None:
    server = redis_factory()
    # Set at run time: the harness waits for an unauthenticated PING at start.
    with server.client() as first:
        first.config_set("requirepass", "right-default-pw")
    with server.client(password="right-default-pw") as admin:
        admin.execute_command("ACL", "SETUSER", "qatoolbox_exporter",
                              *redis_acl_rules("acl-user-pw"))
    quoted = urllib.parse.quote(REDIS_SECRET, safe="")
    for url in (f"redis://:{quoted}@127.0.0.1:{server.port}/0",
                f"redis://qatoolbox_exporter:{quoted}@127.0.0.1:{server.port}/0"):
        process = exporter_factory(env={"REDIS_URL": url},
                                   args=[*only("redis"), "--log.level", "debug"])
        _scrapes(process)
        assert process.scrape().value("qatoolbox_redis_up") == 0
        assert_absent(REDIS_SECRET, *everything_shown(process))
        process.stop()
    # The right password from a file, as the documented ACL user; then the server dies.
    secret_file = workdir / "redis-password"
    secret_file.write_text("acl-user-pw\n")
    process = exporter_factory(
        env={"REDIS_URL": f"redis://qatoolbox_exporter@127.0.0.1:{server.port}/0",
             "REDIS_PASSWORD_FILE": str(secret_file)},
        args=[*only("redis"), "--log.level", "debug"])
    wait_for(lambda: process.scrape().value("qatoolbox_redis_up") == 1, 20,
             "redis up as the documented ACL user")
    assert "NOPERM" not in process.logs() and "refused" not in process.logs()
    import redis

    limited = server.client(username="qatoolbox_exporter", password="acl-user-pw")
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.set("k", "v")
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.get("k")
    limited.close()
    server.kill()
    _scrapes(process)
    assert process.scrape().value("qatoolbox_redis_up") == 0
    assert_absent("acl-user-pw", *everything_shown(process))
    assert_absent("right-default-pw", *everything_shown(process))


@pytest.fixture
def demo_db(postgres: PostgresServer) -> PostgresServer:
    """A qatoolbox database migrated by the demo application (QAToolBox's real tables)."""
    postgres.execute("CREATE DATABASE qatoolbox")
    manage(postgres, "migrate", "--verbosity", "0")
    return postgres


@pytest.mark.integration
def test_documented_postgres_grants_are_enough_and_no_more(
        demo_db: PostgresServer, exporter_factory: Callable[..., ExporterProcess]) -> None:
    import psycopg

    sql = documented_block("least-privilege-sql").replace("'change-me'", "'grant-test-pw'")
    for statement in sql.split(";"):
        lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
        if "".join(lines).strip():
            demo_db.execute("\n".join(lines), dbname="qatoolbox")
    env = demo_db.env(dbname="qatoolbox", user="qatoolbox_exporter", password="grant-test-pw")
    process = exporter_factory(env=env, args=[*only("postgres", "business"),
                                              "--log.level", "debug"])

    def all_queries_succeed() -> bool:
        scrape = process.scrape()
        results = [v for (name, _), v in scrape.samples.items()
                   if name == "qatoolbox_business_query_success"]
        return (scrape.value("qatoolbox_postgres_up") == 1
                and scrape.value("qatoolbox_business_up") == 1
                and len(results) >= 10 and all(v == 1 for v in results))

    wait_for(all_queries_succeed, 30, "every business query succeeding as qatoolbox_exporter")
    assert "permission denied" not in process.logs()
    with psycopg.connect(demo_db.dsn("qatoolbox", "qatoolbox_exporter", "grant-test-pw"),
                         autocommit=True) as conn:
        for forbidden in ("SELECT password FROM auth_user",
                          "SELECT email FROM auth_user",
                          "SELECT * FROM tools_chatmessage",
                          "INSERT INTO tools_chatroom (id) VALUES (1)",
                          "UPDATE auth_user SET is_active = false",
                          "CREATE TABLE sneaky (id int)"):
            with pytest.raises((psycopg.errors.InsufficientPrivilege,
                                psycopg.errors.ReadOnlySqlTransaction)):
                conn.execute(forbidden)
    assert_absent("grant-test-pw", *everything_shown(process))


@pytest.mark.parametrize(("config", "env"), [
    ({"postgres": {"password": DB_SECRET, "port": "not-a-port"}}, {}),
    ({"postgres": {"password": DB_SECRET, "timeout": "soon"}}, {}),
    ({"redis": {"url": f"redis://:{DB_SECRET}@127.0.0.1:1/0", "timeout": "x"}}, {}),
    ({"redis": {"url": f"http://:{DB_SECRET}@127.0.0.1:6379/0"}}, {}),
    ({"redis": {"url": f"redis://:{urllib.parse.quote(DB_SECRET, safe='')}@h:1/0", "bogus": 1}},
     {}),
    ({"web": {"listen_address": "nowhere"}}, {"DB_PASSWORD": DB_SECRET,
                                               "REDIS_URL": f"redis://:{DB_SECRET}@h:1/0"}),
    ({"postgres": {"password_file": "/nonexistent/pw"}}, {"DB_PASSWORD": DB_SECRET}),
    (None, {"DB_PASSWORD": DB_SECRET, "DB_PORT": "x"}),
    (None, {"DB_PASSWORD_FILE": "/nonexistent/pw", "REDIS_URL": f"redis://:{DB_SECRET}@h:x/0",
            "REDIS_PASSWORD_FILE": "/nonexistent/redis-pw"}),
])
def test_bad_config_never_echoes_a_secret(workdir: Path, config: dict[str, object] | None,
                                          env: dict[str, str]) -> None:
    import yaml

    args = ["--config.check"]
    if config is not None:
        path = workdir / "config.yml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config.file", str(path)]
    result = run_exporter(args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid configuration" in result.stderr
    assert_absent(DB_SECRET, result.stdout, result.stderr)


def test_config_check_summary_hides_secrets(workdir: Path) -> None:
    secret_file = workdir / "redis-pw"
    secret_file.write_text(REDIS_SECRET)
    first_word = DB_SECRET.split(" ", maxsplit=1)[0]
    result = run_exporter(["--config.check"], env={
        "DB_PASSWORD": DB_SECRET, "REDIS_URL": f"redis://user:{first_word}@h:1/0",
        "DB_HOST": "127.0.0.1", "DB_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr
    assert "password set" in result.stdout
    assert_absent(DB_SECRET, result.stdout, result.stderr)
    result = run_exporter(["--config.check"], env={
        "REDIS_URL": "redis://127.0.0.1:1/0", "REDIS_PASSWORD_FILE": str(secret_file)})
    assert result.returncode == 0, result.stderr
    assert_absent(REDIS_SECRET, result.stdout, result.stderr)
