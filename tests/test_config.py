"""load_config: defaults, YAML sections, environment, precedence, secrets and every error kind."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from exporter.collectors.process_config import DEFAULT_PROCESS_GROUPS
from exporter.config import (
    SECRET_FILE_LIMIT,
    YAML_MAX_DEPTH,
    YAML_MAX_NODES,
    YAML_MAX_NUMBER_LENGTH,
    Config,
    ConfigError,
    FileReadError,
    describe_value,
    format_duration,
    load_config,
    parse_duration,
    read_file,
    read_yaml,
    split_listen_address,
    summary,
)
from exporter.redact import redact_url, scrub, url_secrets

KNOWN = {"host": True, "process": True, "postgres": False, "redis": False}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)


def problems_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env or {}, KNOWN)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- defaults and YAML sections ----------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    config = load_config(None, {}, KNOWN)
    assert config.web.listen_address == ":9786"
    assert config.web.telemetry_path == "/metrics"
    assert config.log.level == "info"
    assert config.log.format == "logfmt"
    assert 0 < config.scrape.timeout < 10
    assert dict(config.collectors) == KNOWN
    assert config.enabled("host") and config.enabled("process")
    assert not config.enabled("postgres") and not config.enabled("nosuch")
    pg = config.postgres
    assert (pg.dbname, pg.user, pg.password, pg.host, pg.port) == (
        "qatoolbox", "postgres", "", "localhost", 5432)
    assert config.redis.url == "redis://127.0.0.1:6379"
    assert [g.name for g in config.process.groups] == ["web", "celery", "postgres", "redis"]
    web = next(g for g in config.process.groups if g.name == "web")
    assert set(web.names) == {"gunicorn", "uwsgi", "daphne", "uvicorn"}


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}, KNOWN) == load_config(None, {}, KNOWN)
    assert load_config(write(tmp_path, "# only a comment\n"), {}, KNOWN) == load_config(
        None, {}, KNOWN)


def test_yaml_sections(tmp_path: Path) -> None:
    path = write(tmp_path, """
web:
  listen_address: "127.0.0.1:9999"
  telemetry_path: /custom
  max_requests: 7
  read_timeout: 500ms
log:
  level: debug
  format: json
  repeat_interval: 1m
scrape:
  timeout: 1h30m
collectors:
  process: false
  postgres: true
host:
  proc_path: /hostproc
  filesystem:
    mount_points_exclude: "^/boot"
    fs_types_include: "^(ext4|xfs)$"
  disk:
    include: "^sd"
  network:
    exclude: "^lo$"
process:
  groups:
    - name: workers
      names: [rq, huey]
    - name: beat
      cmdline: 'celery\\b.*\\bbeat'
postgres:
  host: db.internal
  port: 6432
  timeout: 2500ms
redis:
  url: redis://cache:6380/1
""")
    config = load_config(path, {}, KNOWN)
    assert config.web.listen_address == "127.0.0.1:9999"
    assert config.web.telemetry_path == "/custom"
    assert config.web.max_requests == 7
    assert config.web.read_timeout == 0.5
    assert (config.log.level, config.log.format, config.log.repeat_interval) == ("debug", "json",
                                                                                60.0)
    assert config.scrape.timeout == 5400.0
    assert dict(config.collectors) == {"host": True, "process": False, "postgres": True,
                                       "redis": False}
    assert config.host.proc_path == "/hostproc"
    assert config.host.filesystem.mount_points_exclude == "^/boot"
    assert config.host.filesystem.fs_types_include == "^(ext4|xfs)$"
    # keys not written keep their defaults, even inside a written section
    assert config.host.filesystem.fs_types_exclude == Config().host.filesystem.fs_types_exclude
    assert config.host.disk.include == "^sd"
    assert config.host.network.exclude == "^lo$"
    assert [(g.name, g.names, g.cmdline) for g in config.process.groups] == [
        ("workers", ("rq", "huey"), ""), ("beat", (), r"celery\b.*\bbeat")]
    assert (config.postgres.host, config.postgres.port, config.postgres.timeout) == (
        "db.internal", 6432, 2.5)
    assert config.postgres.dbname == "qatoolbox"
    assert config.redis.url == "redis://cache:6380/1"


def test_config_is_frozen() -> None:
    config = load_config(None, {}, KNOWN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.web = config.web  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.collectors["host"] = False  # type: ignore[index]


# --- errors ----------------------------------------------------------------------------------


def test_bad_duration_exact_message(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "postgres:\n  timeout: fast\n") == [
        'postgres.timeout: expected a duration like "2s", got "fast"']


@pytest.mark.parametrize(("text", "expected"), [
    ("scrape:\n  timeout: 5\n", 'scrape.timeout: expected a duration like "2s", got 5'),
    ("scrape:\n  timeout: 5 s\n", 'scrape.timeout: expected a duration like "2s", got "5 s"'),
    ("log:\n  repeat_interval: [1s]\n",
     'log.repeat_interval: expected a duration like "2s", got a list'),
    ("scrape:\n  timeout: 0s\n", "scrape.timeout: must be greater than 0"),
])
def test_other_bad_durations(tmp_path: Path, text: str, expected: str) -> None:
    assert problems_of(tmp_path, text) == [expected]


@pytest.mark.parametrize(("text", "expected"), [
    ("webb:\n  listen_address: ':1'\n", "webb: unknown key"),
    ("web:\n  listen_adress: ':1'\n", "web.listen_adress: unknown key"),
    ("host:\n  filesystem:\n    mount_point_exclude: x\n",
     "host.filesystem.mount_point_exclude: unknown key"),
    ("process:\n  groups:\n    - name: a\n      nmes: [x]\n",
     "process.groups[0].nmes: unknown key"),
    ("postgres:\n  pasword: x\n", "postgres.pasword: unknown key"),
])
def test_unknown_keys_at_any_depth(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems_of(tmp_path, text)


@pytest.mark.parametrize(("text", "expected"), [
    ("web:\n  max_requests: many\n", 'web.max_requests: expected a whole number, got "many"'),
    ("web:\n  max_requests: true\n", "web.max_requests: expected a whole number, got True"),
    ("web:\n  listen_address: [1, 2]\n", "web.listen_address: expected a string, got a list"),
    ("log:\n  level: loud\n",
     'log.level: expected one of debug, info, warning, error, got "loud"'),
    ("log:\n  format: xml\n", 'log.format: expected one of logfmt, json, got "xml"'),
    ("host: yes please\n", 'host: expected a mapping, got "yes please"'),
    ("host:\n  disk: 3\n", "host.disk: expected a mapping, got 3"),
    ("process:\n  groups: web\n", 'process.groups: expected a list, got "web"'),
    ("process:\n  groups:\n    - name: a\n      names: gunicorn\n",
     'process.groups[0].names: expected a list, got "gunicorn"'),
    ("postgres:\n  port: high\n", 'postgres.port: expected a whole number, got "high"'),
    ("postgres:\n  port: 70000\n", "postgres.port: expected a port number, got 70000"),
    ("collectors:\n  host: maybe\n", 'collectors.host: expected true or false, got "maybe"'),
    ("collectors: [host]\n", "collectors: expected a mapping of collector names to true/false, "
                             "got a list"),
])
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems_of(tmp_path, text)


def test_bad_regex_names_key(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, "host:\n  disk:\n    exclude: '^(sd'\n")
    assert problem.startswith("host.disk.exclude: invalid regular expression: ")
    (problem,) = problems_of(tmp_path, "process:\n  groups:\n    - {name: x, cmdline: '[a'}\n")
    assert problem.startswith("process.groups[0].cmdline: invalid regular expression: ")


def test_unknown_collector(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path, "collectors:\n  postgress: true\n")
    assert problem.startswith("collectors.postgress: unknown collector (known: ")
    assert "postgres" in problem


def test_cross_field_checks(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
web:
  telemetry_path: /healthz
  listen_address: nonsense
  max_requests: 0
redis:
  url: http://cache
process:
  groups:
    - {name: web, names: [a]}
    - {name: web, names: [b]}
    - {name: "bad name", names: [c]}
    - {name: empty}
""")
    assert sorted(problems) == sorted([
        'web.telemetry_path: must start with "/" and not be "/" or "/healthz", got "/healthz"',
        'web.listen_address: expected "host:port" or ":port", got "nonsense"',
        "web.max_requests: must be at least 1, got 0",
        "redis.url: expected a redis://, rediss:// or unix:// URL",
        'process.groups[1].name: duplicate group "web"',
        'process.groups[2].name: expected a short name (letters, digits, _ . -), got "bad name"',
        "process.groups[3]: needs names or cmdline to match processes",
    ])


def test_all_problems_listed_at_once(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
webb: {}
web:
  max_requests: lots
log:
  level: loud
postgres:
  timeout: fast
host:
  network:
    include: '('
collectors:
  nosuch: true
""", env={"DB_PORT": "abc"})
    assert len(problems) == 7, problems
    for key in ("webb:", "web.max_requests:", "log.level:", "postgres.timeout:",
                "host.network.include:", "collectors.nosuch:", "DB_PORT:"):
        assert any(p.startswith(key) for p in problems), (key, problems)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yml")
    with pytest.raises(ConfigError) as info:
        load_config(missing, {}, KNOWN)
    assert info.value.problems == [f"config file {missing}: cannot read: No such file or directory"]
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {}, KNOWN)
    assert info.value.problems == [
        f"config file {tmp_path}: cannot read: not a regular file (a directory)"]


def test_bad_yaml_gives_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "web:\n  listen_address: ':1'\n  telemetry_path: [/m\nlog: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, KNOWN)
    (problem,) = info.value.problems
    assert problem.startswith(f"config file {path}: invalid YAML (line 4, column ")
    path = write(tmp_path, "web:\n\tlisten_address: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, KNOWN)
    assert "invalid YAML (line 2, column 1)" in info.value.problems[0]


@pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "a list"), ("just text\n",
                                                                     '"just text"')])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, KNOWN)
    assert info.value.problems == [
        f"config file {path}: expected a mapping at the top level, got {got}"]


# --- environment and precedence ----------------------------------------------------------------

ENV = {"DB_NAME": "qa", "DB_USER": "qauser", "DB_PASSWORD": "envpass", "DB_HOST": "10.1.2.3",
       "DB_PORT": "6543", "REDIS_URL": "redis://cache.local:6390/2"}


def test_environment_configures_database_and_cache() -> None:
    config = load_config(None, ENV, KNOWN)
    pg = config.postgres
    assert (pg.dbname, pg.user, pg.password, pg.host, pg.port) == (
        "qa", "qauser", "envpass", "10.1.2.3", 6543)
    assert config.redis.url == "redis://cache.local:6390/2"


def test_partial_environment_keeps_other_defaults() -> None:
    config = load_config(None, {"DB_HOST": "db"}, KNOWN)
    assert (config.postgres.host, config.postgres.port, config.postgres.dbname) == (
        "db", 5432, "qatoolbox")
    assert config.redis.url == "redis://127.0.0.1:6379"


def test_bad_db_port_in_environment() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"DB_PORT": "five"}, KNOWN)
    assert info.value.problems == ['DB_PORT: expected a port number, got "five"']


def test_file_wins_over_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "postgres:\n  host: filehost\n  password: filepass\n"
                           "redis:\n  url: redis://filecache:1/0\n")
    config = load_config(path, ENV, KNOWN)
    assert config.postgres.host == "filehost"
    assert config.postgres.password == "filepass"
    assert config.postgres.port == 6543  # the file is silent on the port: the environment serves
    assert config.postgres.user == "qauser"
    assert config.redis.url == "redis://filecache:1/0"


def test_flags_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "web:\n  listen_address: ':1111'\n  telemetry_path: /file\n"
                           "scrape:\n  timeout: 3s\ncollectors:\n  process: false\n  host: true\n")
    config = load_config(
        path, {}, KNOWN,
        overrides={"web.listen_address": ":2222", "scrape.timeout": "1s", "log.format": "json"},
        collector_flags={"process": True, "host": False},
    )
    assert config.web.listen_address == ":2222"
    assert config.web.telemetry_path == "/file"
    assert config.scrape.timeout == 1.0
    assert config.log.format == "json"
    assert config.enabled("process") and not config.enabled("host")


def test_flag_values_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, KNOWN, overrides={"scrape.timeout": "soon", "log.level": "loud"})
    assert sorted(info.value.problems) == [
        'log.level: expected one of debug, info, warning, error, got "loud"',
        'scrape.timeout: expected a duration like "2s", got "soon"',
    ]


def test_password_file_from_environment(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-from-file\n")
    config = load_config(None, {"DB_PASSWORD_FILE": str(secret), "DB_PASSWORD": "other"}, KNOWN)
    assert config.postgres.password == "s3cret-from-file"


def test_password_file_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"DB_PASSWORD_FILE": str(missing)}, KNOWN)
    assert info.value.problems == [
        f"postgres.password_file: cannot read {missing}: No such file or directory"]


def test_password_in_file_wins_over_password_file_in_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "postgres:\n  password: frompath\n")
    config = load_config(path, {"DB_PASSWORD_FILE": str(tmp_path / "missing")}, KNOWN)
    assert config.postgres.password == "frompath"


def test_passwords_never_in_summary_or_repr(tmp_path: Path) -> None:
    secret = tmp_path / "redispw"
    secret.write_text("redis-secret-42")
    path = write(tmp_path, f"collectors:\n  postgres: true\n  redis: true\n"
                           f"redis:\n  password_file: {secret}\n")
    env = {**ENV, "DB_PASSWORD": "pg-secret-17", "REDIS_URL": "redis://app@cache:6379/0"}
    config = load_config(path, env, KNOWN)
    assert config.postgres.password == "pg-secret-17"
    assert "redis-secret-42" in config.redis.url
    text = "\n".join(summary(config))
    for shown in (text, repr(config), str(config), repr(config.postgres), repr(config.redis)):
        assert "pg-secret-17" not in shown
        assert "redis-secret-42" not in shown
    assert "password set" in text
    assert "redis://app:<secret>@cache:6379/0" in text
    assert "collector postgres: enabled" in text


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:<secret>@h:1/0"
    assert redact_url("redis://u:p@ss@h:1/0") == "redis://u:<secret>@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


# (URL, what is shown): the secrets are SECRET, pw, P1 and P2 in every form.
REDACTED_URLS = [
    ("redis://:pw@host/0?password=SECRET", "redis://:<secret>@host/0?password=<secret>"),
    ("unix:///tmp/x.sock?password=SECRET&db=0", "unix:///tmp/x.sock?password=<secret>&db=0"),
    ("unix://:SECRET@/tmp/x.sock?db=0", "unix://:<secret>@/tmp/x.sock?db=0"),
    ("unix://app:SECRET@localhost/tmp/x.sock", "unix://app:<secret>@localhost/tmp/x.sock"),
    ("redis://app:SECRET@h:6379/0?password=P2", "redis://app:<secret>@h:6379/0?password=<secret>"),
    ("rediss://h:6380/0?ssl_password=SECRET&ssl_cert_reqs=required",
     "rediss://h:6380/0?ssl_password=<secret>&ssl_cert_reqs=required"),
    # Names are decoded as redis-py decodes them; an unknown parameter is hidden too.
    ("redis://h/0?pass%77ord=SECRET&db=1", "redis://h/0?pass%77ord=<secret>&db=1"),
    ("redis://h/0?token=SECRET&username=app", "redis://h/0?token=<secret>&username=app"),
    ("redis://h/0?SECRET", "redis://h/0?<secret>"),
    ("redis://h/0#SECRET", "redis://h/0#<secret>"),
    # A password holding unescaped delimiters runs to the last "@".
    ("redis://:SE/CR?ET#x@h:1/0", "redis://:<secret>@h:1/0"),
    ("redis://u:SE@CR@ET@h:1/0", "redis://u:<secret>@h:1/0"),
    ("unix:///tmp/x.sock?password=SECRET&client_name=a@b", "unix://<secret>@b"),
    ("redis://[::1]:6379/0?password=SE%26CRET", "redis://[::1]:6379/0?password=<secret>"),
    ("not a url SECRET", "<secret>"),
]


@pytest.mark.parametrize(("url", "shown"), REDACTED_URLS)
def test_redact_url_hides_every_secret_part(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for secret in ("SECRET", "SE%26CRET", "SE&CRET", "pw", "P2", "ET#x", "SE/CR"):
        assert secret not in redact_url(url)


def test_url_secrets_cover_what_a_client_library_may_quote() -> None:
    secrets = url_secrets("redis://:SE%2FCR@h:1/0?password=P2&db=3&ssl_password=P%263")
    assert secrets == sorted(secrets, key=lambda s: (-len(s), s))
    # As written and decoded; settings like db are not secrets.
    for secret in ("SE%2FCR", "SE/CR", "P2", "P%263", "P&3"):
        assert secret in secrets
    assert "3" not in secrets and "h" not in secrets
    # A mangled URL: redis-py would take "12" for the port and quote it in its error.
    assert {"12/ss", "12", "ss"} <= set(url_secrets("redis://:12/ss@h"))
    assert scrub("Error connecting to localhost:12. P2 P&3 SE/CR", url_secrets(
        "redis://:12/ss@h?password=P2&x=P%263")) == (
        "Error connecting to localhost:<secret>. <secret> <secret> SE/CR")
    # One pass: a short secret does not match inside a marker already put in.
    assert scrub("abc e", ["abc", "e"]) == "<secret> <secret>"


def test_summary_hides_a_password_in_the_url_query() -> None:
    for url in ("redis://:pw-1@cache/0?password=SECRET", "unix:///run/r.sock?password=SECRET&db=0"):
        config = load_config(None, {"REDIS_URL": url}, {**KNOWN, "redis": True})
        text = "\n".join(summary(config))
        assert "SECRET" not in text and "pw-1" not in text
        assert "password=<secret>" in text


def test_password_file_keeps_an_ipv6_host(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("p@ss\n")
    config = load_config(None, {"REDIS_URL": "redis://app:old@[::1]:6390/2",
                                "REDIS_PASSWORD_FILE": str(secret)}, KNOWN)
    assert config.redis.url == "redis://app:p%40ss@[::1]:6390/2"


@pytest.mark.parametrize("text", ["postgres: {password: !!binary U0VDUkVUMQ==}\n",
                                  "postgres: {password: 2024-01-02}\n",
                                  "redis: {url: !!binary U0VDUkVUMQ==}\n"])
def test_a_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path, text: str) -> None:
    (problem,) = problems_of(tmp_path, text)
    assert problem.endswith(": expected a string, got something else (not shown: a secret)")
    assert "SECRET1" not in problem and "2024" not in problem


def test_describe_shortens_every_value() -> None:
    assert describe_value(b"x" * 10**6) == "b'" + "x" * 55 + "..."
    assert len(describe_value(b"x" * 10**6)) == 60


# --- files read with a cap, regular files only ------------------------------------------------


def test_read_file_caps_and_kinds(tmp_path: Path) -> None:
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * 4096)
    assert read_file(str(exact), 4096) == b"x" * 4096
    over = tmp_path / "over"
    over.write_bytes(b"x" * 4097)
    with pytest.raises(FileReadError, match=r"^larger than the 4 KiB limit \(4097 bytes\)$"):
        read_file(str(over), 4096)
    # A regular file whose size says 0 but that has content (a /proc file) is still capped.
    with pytest.raises(FileReadError, match="larger than the 4 KiB limit"):
        read_file("/proc/self/maps", 4096)
    link = tmp_path / "link"
    link.symlink_to(exact)
    assert read_file(str(link), 4096) == b"x" * 4096
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory"),
                       (Path("/dev/null"), "a character device")):
        with pytest.raises(FileReadError, match=rf"^not a regular file \({kind}\)$"):
            read_file(str(path), 4096)
    with pytest.raises(FileReadError, match=r"^No such file or directory$"):
        read_file(str(tmp_path / "missing"), 4096)
    with pytest.raises(FileReadError, match=r"^not a valid file name$"):
        read_file("a\0b", 4096)


def test_secret_file_limits(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s" * (SECRET_FILE_LIMIT - 1) + "\n")
    assert load_config(None, {"DB_PASSWORD_FILE": str(secret)}, KNOWN).postgres.password == (
        "s" * (SECRET_FILE_LIMIT - 1))
    secret.write_text("s" * SECRET_FILE_LIMIT + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REDIS_PASSWORD_FILE": str(secret)}, KNOWN)
    assert info.value.problems == [f"redis.password_file: cannot read {secret}: larger than the "
                                   f"4 KiB limit ({SECRET_FILE_LIMIT + 1} bytes)"]


def _values(n: int) -> str:
    """A document of exactly n YAML nodes: the top mapping, the key, the list, n - 3 items."""
    return "process: [" + ", ".join(["1"] * (n - 3)) + "]\n"


def test_yaml_value_count_limit(tmp_path: Path) -> None:
    path = write(tmp_path, _values(YAML_MAX_NODES))
    assert read_yaml(path) == {"process": [1] * (YAML_MAX_NODES - 3)}
    path = write(tmp_path, _values(YAML_MAX_NODES + 1))
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert info.value.problems == [
        f"config file {path}: invalid YAML (line 1, column {11 + 3 * (YAML_MAX_NODES - 3)}): "
        f"more than {YAML_MAX_NODES} values (an alias counts as many as it refers to)"]


def test_yaml_aliases_count_what_they_expand_to(tmp_path: Path) -> None:
    # The mapping, key a, its list of 1000, key b, its list of n aliases: 1005 + 1001 * n
    # nodes; n = 18 fits, n = 19 does not.
    items = ", ".join(["1"] * 1000)
    for n, fits in ((18, True), (19, False)):
        path = write(tmp_path, f"a: &a [{items}]\nb: [" + ", ".join(["*a"] * n) + "]\n")
        if fits:
            assert len(read_yaml(path)["b"]) == n
        else:
            with pytest.raises(ConfigError, match="more than 20000 values"):
                read_yaml(path)
    # Merge keys are aliases too.
    text = "a0: &a0 {k: 1}\n" + "".join(f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}\n"
                                        for i in range(1, 20))
    with pytest.raises(ConfigError, match="more than 20000 values"):
        read_yaml(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"\(line 1, column 11\): an alias inside the value"):
        read_yaml(write(tmp_path, "a: &x [1, *x]\n"))


def test_yaml_depth_and_number_limits(tmp_path: Path) -> None:
    # The document is one level, the mapping value the second.
    fits = "a: " + "[" * (YAML_MAX_DEPTH - 1) + "]" * (YAML_MAX_DEPTH - 1) + "\n"
    assert read_yaml(write(tmp_path, fits)) is not None
    deeper = "a: " + "[" * YAML_MAX_DEPTH + "]" * YAML_MAX_DEPTH + "\n"
    with pytest.raises(ConfigError, match=rf"nested too deeply \(more than {YAML_MAX_DEPTH}"):
        read_yaml(write(tmp_path, deeper))
    longest = "1" * YAML_MAX_NUMBER_LENGTH
    assert read_yaml(write(tmp_path, f"a: 0x{longest[2:]}\n")) == {"a": int(longest[2:], 16)}
    for number in ("1" * (YAML_MAX_NUMBER_LENGTH + 1), "1" + ":1" * 60, "!!int " + "1" * 101,
                   "1." + "0" * 100):
        with pytest.raises(ConfigError, match="a number longer than 100 characters"):
            read_yaml(write(tmp_path, f"a: {number}\n"))
    # Strings of any length are strings.
    assert read_yaml(write(tmp_path, f"a: '{'1' * 5000}'\n")) == {"a": "1" * 5000}


def test_summary_lists_what_would_run() -> None:
    config = load_config(None, {}, KNOWN, collector_flags={"process": False})
    lines = summary(config)
    assert "listen on :9786, metrics at /metrics" in lines
    assert "collector host: enabled" in lines
    assert "collector process: disabled" in lines
    assert not any(line.startswith("process groups") for line in lines)


def test_default_groups_are_the_documented_ones() -> None:
    assert {g.name for g in DEFAULT_PROCESS_GROUPS} == {"web", "celery", "postgres", "redis"}


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1d", 86400.0),
    ("1h30m", 5400.0), ("1m30s", 90.0), ("1.5s", 1.5), ("0s", 0.0), (" 5s ", 5.0),
    ("1s500ms", 1.5),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "5", "s", "2 s", "-1s", "1x", "1.s", "2s fast",
                                  "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "500ms"), (2.0, "2s"), (90.0, "90s"),
                                               (0.0, "0s")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(("address", "parts"), [
    (":9786", ("", 9786)), ("127.0.0.1:9000", ("127.0.0.1", 9000)), ("[::1]:80", ("::1", 80)),
    ("[::]:9786", ("::", 9786)), ("localhost:0", ("localhost", 0)),
])
def test_split_listen_address(address: str, parts: tuple[str, int]) -> None:
    assert split_listen_address(address) == parts


@pytest.mark.parametrize("address", ["9786", "host:", "host:port", ":70000", ":-1", ""])
def test_split_listen_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        split_listen_address(address)


def test_empty_sections_keep_the_environment(tmp_path: Path) -> None:
    # A section whose keys are all commented out is null in YAML: not a reason to drop DB_*.
    path = write(tmp_path, "postgres:\n  # host: commented out\nredis:\n")
    config = load_config(path, ENV, KNOWN)
    assert (config.postgres.host, config.postgres.port) == ("10.1.2.3", 6543)
    assert config.redis.url == "redis://cache.local:6390/2"


def test_section_of_wrong_type_is_an_error_not_the_environment(tmp_path: Path) -> None:
    assert problems_of(tmp_path, "postgres: db.example\n", env=ENV) == [
        'postgres: expected a mapping, got "db.example"']
