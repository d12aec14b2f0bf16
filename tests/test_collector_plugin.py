"""Adding a collector is one module and one table row: tests/filecount_collector.py, which
nothing in exporter/ names, registered at test time, is configured from YAML and the
environment, gets its flags, its --config.check problems and its metrics on a scrape."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter import collectors
from exporter.cliflags import build_parser, parse
from exporter.config import Config, ConfigError, compose, load_config
from exporter.scrape import ScrapeRunner
from exporter.server import ExporterHTTPServer
from tests import filecount_collector
from tests.test_cli import run_in_process

NAME = filecount_collector.NAME


@pytest.fixture
def plugin() -> Iterator[None]:
    collectors.register(NAME, filecount_collector.SPEC)
    try:
        yield
    finally:
        collectors.unregister(NAME)


def write(folder: Path, text: str) -> str:
    path = folder / "config.yml"
    path.write_text(text)
    return str(path)


def only_plugin(folder: Path, section: str) -> str:
    """A config file that turns every other collector off and gives the plugin's section."""
    others = "".join(f"  {name}: false\n" for name in collectors.COLLECTORS if name != NAME)
    return write(folder, f"collectors:\n{others}  {NAME}: true\n{NAME}:\n{section}")


def test_configured_from_yaml_and_environment(plugin: None, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    path = only_plugin(tmp_path, f"  folders: [{inbox}]\n  max_folders: 3\n")
    config = load_config(path, {}, collectors.DEFAULTS)
    assert config.enabled(NAME) and not config.enabled("host")
    assert config.filecount == filecount_collector.FilecountConfig(folders=(str(inbox),),
                                                                   max_folders=3)
    # Off by default as its row says; its environment variable fills what the file leaves out.
    config = load_config(None, {"FILECOUNT_FOLDERS": "/a:/b"}, collectors.DEFAULTS)
    assert not config.enabled(NAME)
    assert config.filecount.folders == ("/a", "/b")
    assert config.filecount.max_folders == 10


def test_flags_come_from_its_row(plugin: None) -> None:
    text = " ".join(build_parser().format_help().split())  # unwrapped
    assert f"--collector.{NAME}" in text and f"--no-collector.{NAME}" in text
    assert "enable the filecount collector (off by default): Entries in folders" in text
    assert "host (host, process, app, filecount) or service" in text  # --collectors.scope
    _, _, switches = parse([f"--collector.{NAME}", "--no-collector.host"])
    assert switches == {NAME: True, "host": False}


def test_config_check_reports_its_problems_one_line_each(
        plugin: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = only_plugin(tmp_path, "  folders: [relative/inbox]\n  colour: blue\n")
    result = run_in_process(["--config.file", path, "--config.check"], capsys, monkeypatch)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[1:] == [
        "  filecount.colour: unknown key",
        '  filecount.folders[0]: expected an absolute path, got "relative/inbox"',
    ]
    path = only_plugin(tmp_path, "  max_folders: 0\n")
    result = run_in_process(["--config.file", path, "--config.check"], capsys, monkeypatch)
    assert result.returncode == 2
    assert "  filecount.max_folders: must be between 1 and 100, got 0" in result.stderr
    # Fine: the summary names it and its section says what it would read.
    path = only_plugin(tmp_path, "  folders: [/srv/inbox]\n")
    result = run_in_process(["--config.file", path, "--config.check"], capsys, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert "  collector filecount: enabled" in result.stdout.splitlines()
    assert "  filecount: /srv/inbox" in result.stdout.splitlines()


def test_its_metrics_on_a_scrape(plugin: None, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a", "b", "c"):
        (inbox / name).touch()
    path = only_plugin(tmp_path, f"  folders: ['{inbox}']\n")
    config = load_config(path, {}, collectors.DEFAULTS,
                         overrides={"web.listen_address": "127.0.0.1:0"})
    runner = ScrapeRunner(collectors.build(config), config.scrape.timeout)
    server = ExporterHTTPServer(config.web, runner)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        runner.close()
    lines = text.splitlines()
    assert f'qatoolbox_filecount_entries{{folder="{inbox}"}} 3.0' in lines, text
    assert 'qatoolbox_exporter_collector_success{collector="filecount"} 1.0' in lines, text
    assert not any(line.startswith("qatoolbox_host_") for line in lines)


def test_its_metric_prefix_is_reserved_while_it_is_in_the_table(tmp_path: Path) -> None:
    """The prefixes a business query may not use are the table's: the plugin's while it is
    registered, and its section is a key of the configuration only then."""
    path = write(tmp_path, "business:\n  queries:\n  - metric: qatoolbox_filecount_mine\n"
                           "    help: Mine.\n    sql: SELECT 1 AS value\n"
                           f"{NAME}:\n  folders: [/srv]\n")
    with pytest.raises(ConfigError) as unknown:
        load_config(path, {}, collectors.DEFAULTS)
    assert unknown.value.problems == [f"{NAME}: unknown key"]
    collectors.register(NAME, filecount_collector.SPEC)
    try:
        assert "qatoolbox_filecount_" in collectors.reserved_metric_prefixes()
        with pytest.raises(ConfigError) as reserved:
            load_config(path, {}, collectors.DEFAULTS)
        [problem] = reserved.value.problems
        assert problem.startswith("business.queries[0] (qatoolbox_filecount_mine).metric: the "
                                  "prefix is reserved"), problem
        with pytest.raises(ValueError, match="already in the table"):
            collectors.register(NAME, filecount_collector.SPEC)
        with pytest.raises(ValueError, match="would hide the config section"):
            collectors.register("web", filecount_collector.SPEC)
    finally:
        collectors.unregister(NAME)
    # Out of the table, everything is as before: the same Config class, no trace of it.
    assert compose() is Config
    assert NAME not in collectors.DEFAULTS and NAME not in collectors.SCOPES


def test_the_config_loads_no_collector_nor_client_library() -> None:
    """The sections are light: building and checking the whole configuration imports no
    collector module (they load when built, if enabled) and no psycopg."""
    code = ("import sys; from exporter.collectors import DEFAULTS; "
            "from exporter.config import load_config, summary; "
            "summary(load_config(None, {}, DEFAULTS)); "
            "print(sorted(m for m in sys.modules if m in ('psycopg', 'exporter.collectors.host', "
            "'exporter.collectors.process', 'exporter.collectors.postgres', "
            "'exporter.collectors.business', 'exporter.collectors.redis', "
            "'exporter.collectors.app')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
