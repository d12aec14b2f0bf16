"""The command line: --config.check, bad config and flags, collector flags, entry points."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter import __version__
from exporter.cli import main
from exporter.collectors import COLLECTORS
from exporter.logs import JsonFormatter, LogfmtFormatter
from tests.harness import ExporterProcess, run_exporter, wait_for


def write(workdir: Path, text: str) -> str:
    path = workdir / "config.yml"
    path.write_text(text)
    return str(path)


def assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def run_in_process(args: list[str], capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """main() in this interpreter: the same code path as the process, without its start-up."""
    import os

    for key in list(os.environ):
        if key.startswith(("DB_", "REDIS_")):
            monkeypatch.delenv(key)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_config_check_without_file_prints_summary() -> None:
    result = run_exporter(["--config.check"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert lines[0] == "configuration ok"
    assert "listen on :9786, metrics at /metrics" in lines
    assert "collector host: enabled" in lines
    assert "collector process: enabled" in lines
    assert "process groups: web, celery, postgres, redis" in lines


def test_config_check_reads_file_and_environment(workdir: Path) -> None:
    path = write(workdir, "web:\n  listen_address: '127.0.0.1:9999'\ncollectors:\n"
                          "  process: false\n")
    env = {"DB_HOST": "db.example", "DB_PORT": "6543", "DB_USER": "qa",
           "DB_PASSWORD": "hunter2-pg", "REDIS_URL": "redis://:hunter2-redis@cache:6379/0"}
    result = run_exporter(["--config.file", path, "--config.check"], env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "listen on 127.0.0.1:9999" in out
    assert "collector process: disabled" in out
    assert "hunter2" not in out + result.stderr
    if "postgres" in COLLECTORS and COLLECTORS["postgres"].default_enabled:
        assert "qa@db.example:6543" in out
    if "redis" in COLLECTORS and COLLECTORS["redis"].default_enabled:
        assert "redis://:<secret>@cache:6379/0" in out


# Redis URLs with a password in the query (redis-py honours it; a unix:// socket has no other
# place for it) or in the userinfo, and what --config.check and the log show instead.
SECRET_URLS = [
    ("redis://:pw-SECRET-1@cache:6379/0?password=SECRET-2",
     "redis://:<secret>@cache:6379/0?password=<secret>"),
    ("unix:///tmp/x.sock?password=SECRET-2&db=0", "unix:///tmp/x.sock?password=<secret>&db=0"),
    ("unix://app:SECRET-1@localhost/tmp/x.sock?db=0",
     "unix://app:<secret>@localhost/tmp/x.sock?db=0"),
    ("redis://app:SECRET-1@cache:6379/0", "redis://app:<secret>@cache:6379/0"),
    ("rediss://cache:6380/0?ssl_password=SECRET-2", "rediss://cache:6380/0?ssl_password=<secret>"),
]


@pytest.mark.parametrize(("url", "shown"), SECRET_URLS)
def test_config_check_hides_every_password_in_the_redis_url(url: str, shown: str) -> None:
    result = run_exporter(["--config.check", "--collector.redis"], env={"REDIS_URL": url})
    assert result.returncode == 0, result.stderr
    assert "SECRET" not in result.stdout + result.stderr
    assert f"redis: {shown}" in result.stdout


@pytest.mark.parametrize(("url", "needle"), [
    ("redis://:SECRET-1@cache:6379/0?bogus=1", "a query parameter the client does not know"),
    ("redis://cache:6379/0?socket_timeout=0&password=SECRET-2", "socket timeouts"),
])
def test_config_check_refuses_a_redis_url_the_client_would(url: str, needle: str) -> None:
    """What the Redis client refuses at every scrape (`up 0`, reason other) is an exit 2 with
    one line at --config.check and start-up, the URL redacted."""
    for args in (["--config.check"], ["--web.listen-address", "127.0.0.1:0"]):
        result = run_exporter([*args, "--collector.redis"], env={"REDIS_URL": url})
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert any("redis.url:" in line and needle in line for line in lines), result.stderr
        assert "SECRET" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


def test_redis_target_log_line_hides_every_password(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    """The info-level `redis target` line of a running exporter, and everything else it shows,
    for each URL (nothing listens on port 1: the collector fails, and says so)."""
    only_redis = [f"--collector.{n}" if n == "redis" else f"--no-collector.{n}"
                  for n in COLLECTORS]
    for written, shown in SECRET_URLS:
        url = re.sub(r"cache:\d+", "127.0.0.1:1", written)
        exporter = exporter_factory(env={"REDIS_URL": url}, args=only_redis)
        try:
            scrape = exporter.scrape()
            assert scrape.value("qatoolbox_redis_up") == 0
            landing = exporter.get("/")[2].decode()
            wait_for(lambda exporter=exporter: "collector failed" in exporter.logs(), 10,
                     "the collector's failure in the log")
            logs = exporter.logs()
            target = [line for line in logs.splitlines() if "redis target" in line]
            expected = re.sub(r"cache:\d+", "127.0.0.1:1", shown)
            assert len(target) == 1 and expected in target[0], (target, expected)
            for text in (logs, scrape.text, landing):
                assert "SECRET" not in text, text[-2000:]
        finally:
            exporter.stop()


def test_problems_shown_are_capped(workdir: Path) -> None:
    """A hostile file with 3,000 unknown keys: the first 100 problems, then a count."""
    path = write(workdir, "".join(f"k{i}: 1\n" for i in range(3000)))
    result = run_exporter(["--config.file", path, "--config.check"])
    assert_usage_error(result, "k0: unknown key", "k99: unknown key",
                       "... and 2900 more problems")
    assert "k100: unknown key" not in result.stderr
    assert len(result.stderr.splitlines()) == 102


def test_config_check_flags_override_file(workdir: Path) -> None:
    path = write(workdir, "web:\n  telemetry_path: /fromfile\n")
    result = run_exporter(["--config.file", path, "--config.check",
                           "--web.telemetry-path", "/fromflag", "--no-collector.host"])
    assert result.returncode == 0, result.stderr
    assert "metrics at /fromflag" in result.stdout
    assert "collector host: disabled" in result.stdout


def test_bad_config_lists_every_problem_and_exits_2(workdir: Path) -> None:
    path = write(workdir, "postgres:\n  timeout: fast\nwebb: {}\nlog:\n  level: loud\n"
                          "host:\n  disk:\n    exclude: '('\n")
    result = run_exporter(["--config.file", path, "--config.check"])
    assert_usage_error(
        result,
        'postgres.timeout: expected a duration like "2s", got "fast"',
        "webb: unknown key",
        "log.level: expected one of debug, info, warning, error",
        "host.disk.exclude: invalid regular expression",
    )
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "qatoolbox-exporter: invalid configuration:"
    assert len(lines) == 5


def test_bad_config_stops_start_up_too(workdir: Path) -> None:
    path = write(workdir, "scrape:\n  timeout: soon\n")
    result = run_exporter(["--config.file", path, "--web.listen-address", "127.0.0.1:0"])
    assert_usage_error(result, 'scrape.timeout: expected a duration like "2s", got "soon"')


@pytest.mark.parametrize(("text", "needle"), [
    ("web:\n  telemetry_path: [/m\nlog: {}\n", "invalid YAML (line 3, column"),
    ("- just\n- a list\n", "expected a mapping at the top level, got a list"),
    ("web:\n  max_requests: many\n", 'web.max_requests: expected a whole number, got "many"'),
    ("collectors:\n  nosuch: true\n", "collectors.nosuch: unknown collector"),
])
def test_bad_config_kinds(workdir: Path, text: str, needle: str,
                          capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_in_process(["--config.file", write(workdir, text), "--config.check"], capsys,
                            monkeypatch)
    assert_usage_error(result, needle)


def test_unreadable_config_file(workdir: Path) -> None:
    missing = workdir / "missing.yml"
    result = run_exporter(["--config.file", str(missing), "--config.check"])
    assert_usage_error(result, f"config file {missing}: cannot read: No such file or directory")


def test_environment_problems_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_exporter(["--config.check"], env={"DB_PORT": "five"})
    assert_usage_error(result, 'DB_PORT: expected a port number, got "five"')
    result = run_in_process(["--config.check"], capsys, monkeypatch,
                            env={"DB_PASSWORD_FILE": str(workdir / "no-such-secret")})
    assert_usage_error(result, "postgres.password_file: cannot read")


def test_password_file_from_environment_is_used_not_shown(workdir: Path) -> None:
    secret = workdir / "pw"
    secret.write_text("hunter2-file\n")
    result = run_exporter(["--config.check"], env={"DB_PASSWORD_FILE": str(secret)})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    if "postgres" in COLLECTORS and COLLECTORS["postgres"].default_enabled:
        assert "(password set)" in result.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["--scrape.timeout", "fast"], 'scrape.timeout: expected a duration like "2s", got "fast"'),
    (["--log.level", "loud"], "log.level: expected one of"),
    (["--log.format", "xml"], 'log.format: expected one of logfmt, json, got "xml"'),
    (["--web.listen-address", "nonsense"], "web.listen_address: expected \"host:port\""),
    (["--web.telemetry-path", "metrics"], "web.telemetry_path: must start with \"/\""),
    (["--web.max-requests", "0"], "web.max_requests: must be at least 1, got 0"),
])
def test_bad_flag_values(args: list[str], needle: str, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert_usage_error(run_in_process([*args, "--config.check"], capsys, monkeypatch), needle)


def test_unknown_flag_prints_usage_and_exits_2() -> None:
    result = run_exporter(["--web.listen-adress", ":1"])
    assert_usage_error(result, "usage: qatoolbox-exporter", "unrecognized arguments")


def test_unknown_collector_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_exporter(["--collector.nosuch", "--config.check"])
    assert_usage_error(result, "usage: qatoolbox-exporter", "--collector.nosuch")
    result = run_in_process(["--no-collector.nosuch", "--config.check"], capsys, monkeypatch)
    assert_usage_error(result, "usage: qatoolbox-exporter", "--no-collector.nosuch")


def test_collector_flags_come_from_the_table() -> None:
    result = run_exporter(["--help"])
    assert result.returncode == 0
    for name in COLLECTORS:
        assert f"--collector.{name}" in result.stdout
        assert f"--no-collector.{name}" in result.stdout
    for flag in ("--web.listen-address", "--web.telemetry-path", "--log.level", "--log.format",
                 "--config.file", "--config.check"):
        assert flag in result.stdout
    every_off = [f"--no-collector.{name}" for name in COLLECTORS]
    result = run_exporter([*every_off, "--collector.host", "--config.check"])
    assert result.returncode == 0, result.stderr
    for name in COLLECTORS:
        state = "enabled" if name == "host" else "disabled"
        assert f"collector {name}: {state}" in result.stdout


def test_version_and_console_script() -> None:
    result = run_exporter(["--version"])
    assert (result.returncode, result.stdout.strip()) == (0, f"qatoolbox-exporter {__version__}")
    script = Path(sys.executable).parent / "qatoolbox-exporter"
    if not script.exists():
        found = shutil.which("qatoolbox-exporter")
        assert found, "console script qatoolbox-exporter not installed"
        script = Path(found)
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, f"qatoolbox-exporter {__version__}")


def make_record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("exporter.scrape", logging.WARNING, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_logfmt_quotes_and_escapes() -> None:
    line = LogfmtFormatter().format(make_record(
        "collector failed", collector="redis", err='bad "x" = y\nnext', empty=""))
    assert "\n" not in line
    assert line.startswith("ts=")
    assert " level=warning logger=exporter.scrape " in line
    assert 'msg="collector failed"' in line
    assert "collector=redis" in line
    assert r'err="bad \"x\" = y\nnext"' in line
    assert 'empty=""' in line


def test_json_lines_with_extras_and_exceptions() -> None:
    try:
        raise ValueError("no such table")
    except ValueError:
        record = make_record("query failed", query="users", took=0.5)
        record.exc_info = sys.exc_info()
    fields = json.loads(JsonFormatter().format(record))
    assert fields["level"] == "warning" and fields["msg"] == "query failed"
    assert fields["query"] == "users" and fields["took"] == 0.5
    assert fields["error"] == "no such table"
    assert fields["ts"].endswith("Z")


# --- what start-up would reject, caught by --config.check too --------------------------------


@pytest.mark.parametrize(("address", "needle"), [
    ("999.1.1.1:9787", 'web.listen_address: cannot resolve "999.1.1.1"'),
    ("no-such-host.invalid:9787", 'web.listen_address: cannot resolve "no-such-host.invalid"'),
    ("192.0.2.1:9787", 'web.listen_address: "192.0.2.1" is not an address of this machine'),
])
def test_listen_address_check_and_start_up_agree(address: str, needle: str) -> None:
    """The issue's example: `999.1.1.1:9787` was "configuration ok", then start-up failed
    with exit 1. Now both exit 2 with the same one line."""
    for args in (["--config.check"], ["--no-collector.postgres", "--no-collector.business",
                                      "--no-collector.redis"]):
        result = run_exporter([*args, "--web.listen-address", address])
        assert_usage_error(result, needle)
        assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
        assert result.stdout == ""


def test_listen_address_on_this_machine_passes(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for address in ("127.0.0.1:9786", "localhost:9786", ":9786", "0.0.0.0:1"):
        result = run_in_process(["--config.check", "--web.listen-address", address], capsys,
                                monkeypatch)
        assert result.returncode == 0, (address, result.stderr)


@pytest.mark.parametrize("url", ["javascript:alert(1)", "grafana.example:3000",
                                 "http://", "https://graf ana/"])
def test_grafana_url_must_be_http(url: str, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_in_process(["--config.check", "--web.grafana-url", url], capsys, monkeypatch)
    assert_usage_error(result, "web.grafana_url: expected an http:// or https:// URL")
    ok = run_in_process(["--config.check", "--web.grafana-url", "https://grafana.example/d/x"],
                        capsys, monkeypatch)
    assert ok.returncode == 0, ok.stderr


def test_config_check_warns_of_what_will_not_work(workdir: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing app folder is accepted (the workers may create it later), but said."""
    missing = workdir / "not-yet"
    path = write(workdir, f"app:\n  multiprocess_dirs: ['{missing}']\n")
    result = run_in_process(["--config.file", path, "--config.check"], capsys, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert f'warning: app.multiprocess_dirs[0]: "{missing}" is not a folder' in result.stdout
    missing.mkdir()
    result = run_in_process(["--config.file", path, "--config.check"], capsys, monkeypatch)
    assert "warning" not in result.stdout


def test_tls_files_are_loaded_by_the_check(workdir: Path) -> None:
    """A web config naming a key that does not load fails the check as it fails start-up."""
    cert = workdir / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    web = workdir / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {workdir / 'no.key'}\n")
    for args in (["--config.check"], ["--no-collector.postgres", "--no-collector.business",
                                      "--no-collector.redis", "--web.listen-address",
                                      "127.0.0.1:0"]):
        result = run_exporter([*args, "--web.config.file", str(web)])
        assert_usage_error(result, "invalid web configuration", str(web))


def test_help_says_what_each_value_is_and_lists_environment_and_exit_codes() -> None:
    result = run_exporter(["--help"])
    assert result.returncode == 0
    out = result.stdout
    assert "VALUE" not in out
    for flag, metavar in (("--web.listen-address", "ADDRESS"), ("--config.file", "PATH"),
                          ("--web.config.file", "PATH"), ("--scrape.timeout", "DURATION"),
                          ("--web.grafana-url", "URL"), ("--log.level", "LEVEL")):
        assert f"{flag} {metavar}" in out, flag
    # Defaults come from the config's own (a changed default cannot leave --help behind).
    assert "(default :9786)" in out and "(default 4s)" in out and "(default 40)" in out
    for variable in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD_FILE",
                     "DB_PASSWORD", "REDIS_URL", "REDIS_PASSWORD_FILE"):
        assert variable in out, variable
    assert "exit codes:" in out
    for code in ("0  ok", "1  runtime failure", "2  bad flags or configuration"):
        assert code in out, code


def test_every_environment_variable_read_is_in_help() -> None:
    """The variables the configuration reads (config.py and the collectors' sections), found
    in their source: none missing from --help."""
    package = Path(__file__).resolve().parent.parent / "exporter"
    source = "".join(p.read_text() for p in [package / "config.py",
                                              *package.glob("collectors/*_config.py")])
    read = set(re.findall(r'"((?:DB|REDIS)_[A-Z_]+)"', source))
    assert read >= {"DB_HOST", "REDIS_URL"}, read
    out = run_exporter(["--help"]).stdout
    assert {v for v in read if v not in out} == set()


# --- :port listens on IPv4 and IPv6 --------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_port_only_address_answers_on_ipv4_and_ipv6(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    """`:port` (the default's form) is one dual-stack socket: 127.0.0.1 and [::1] both answer
    (issue 20 point 3; the server's _listen)."""
    import urllib.request

    from tests.harness import free_port

    if not _has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback")
    port = free_port()
    exporter = exporter_factory(wait=False, port=port,
                                args=["--web.listen-address", f":{port}",
                                      "--no-collector.postgres", "--no-collector.business",
                                      "--no-collector.redis"])
    wait_for(lambda: exporter.get("/healthz")[0] == 200, 20, "the exporter on 127.0.0.1")
    for host in ("127.0.0.1", "[::1]"):
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=20) as response:
            assert response.status == 200, host


# --- scripts/stack keeps its logs -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("clean", [False, True])
def test_stack_keeps_its_logs_unless_clean(clean: bool) -> None:
    """The stack's folder held the logs and was deleted on exit, the moment an operator wants
    to read them: now the logs stay (the data goes) and the folder is printed; --clean
    deletes everything."""
    from tests.harness import free_port
    from tests.stack import PROMETHEUS_BIN

    if shutil.which(PROMETHEUS_BIN) is None:
        pytest.skip(f"{PROMETHEUS_BIN} is not installed (./scripts/test installs it as root)")
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "tests.stack", "--no-alertmanager", "--duration", "2",
            "--exporter-port", str(free_port()), "--prometheus-port", str(free_port())]
    result = subprocess.run([*args, *(["--clean"] if clean else [])], cwd=root,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    base = Path(re.findall(r"^  logs +(\S+)$", result.stdout, re.M)[0])
    try:
        if clean:
            assert not base.exists()
            assert "logs kept" not in result.stdout
        else:
            assert f"logs kept in {base}" in result.stdout
            kept = sorted(p.name for p in base.iterdir())
            assert kept and all(name.endswith(".log") for name in kept), kept
            exporter_log = next(p for p in base.iterdir() if p.name.startswith("exporter-"))
            assert "listening" in exporter_log.read_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)


_RELEASE_PROBE = """
import gc, json, sys, weakref
from exporter import cli, lean

WATCHED = ("argparse", "gettext", "yaml", "exporter.cliflags", "exporter.yamlload")
refs = {}
release = lean.release_modules


def recording(*names):
    for name in WATCHED:
        if name in sys.modules:
            refs[name] = weakref.ref(sys.modules[name])
    return release(*names)


def serve(config, security=None):
    gc.collect()
    print(json.dumps({"alive": sorted(n for n, ref in refs.items() if ref() is not None),
                      "loaded": sorted(n for n in WATCHED if n in sys.modules),
                      "watched": sorted(refs)}))
    return 0


lean.release_modules = recording
cli.serve = serve
sys.exit(cli.main(sys.argv[1:]))
"""


def test_startup_modules_are_let_go_once_serving(tmp_path: Path) -> None:
    """argparse (with gettext) and PyYAML are start-up work: once the exporter serves, they
    are gone from sys.modules and freed (nothing keeps a reference), unless a web config file
    may be re-read, which keeps PyYAML."""
    config = tmp_path / "config.yml"
    config.write_text("scrape:\n  timeout: 3s\n")
    web = tmp_path / "web.yml"
    web.write_text("http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    found = []
    for extra in ([], ["--web.config.file", str(web)]):
        result = subprocess.run(
            [sys.executable, "-c", _RELEASE_PROBE, "--config.file", str(config),
             "--web.listen-address", "127.0.0.1:0", *extra],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        found.append(json.loads(result.stdout.strip().splitlines()[-1]))
    plain, with_web = found
    assert {"argparse", "yaml", "exporter.cliflags", "exporter.yamlload"} <= set(plain["watched"])
    assert plain["alive"] == [] and plain["loaded"] == []
    assert with_web["alive"] == with_web["loaded"] == ["exporter.yamlload", "yaml"]
