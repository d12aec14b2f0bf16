"""Command line: flags to a validated Config, then run or check it."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from exporter import __version__, checks, lean, logs
from exporter.collectors import COLLECTORS, DEFAULTS, SCOPES, build
from exporter.config import (
    Config,
    ConfigError,
    load_config,
    summary,
)
from exporter.landing import LandingPage, RecordingRunner
from exporter.redact import redact_url
from exporter.scrape import ScrapeRunner

if TYPE_CHECKING:
    from exporter.webconfig import WebConfigFile

log = logging.getLogger("exporter")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

# Modules only start-up uses (the flags, PyYAML for the files), let go of once serving; PyYAML is
# kept while a web config file may be re-read.
STARTUP_MODULES = ("exporter.cliflags", "argparse", "gettext", "locale")
YAML_MODULES = ("exporter.yamlload", "yaml")

# A hostile file can hold thousands of unknown keys: the first problems say what is wrong.
MAX_PROBLEMS_SHOWN = 100


def _invalid(what: str, exc: ConfigError) -> int:
    """Print the problems of a rejected configuration; return the usage exit code."""
    print(f"qatoolbox-exporter: invalid {what}:", file=sys.stderr)
    for problem in exc.problems[:MAX_PROBLEMS_SHOWN]:
        print(f"  {problem}", file=sys.stderr)
    if len(exc.problems) > MAX_PROBLEMS_SHOWN:
        print(f"  ... and {len(exc.problems) - MAX_PROBLEMS_SHOWN} more problems",
              file=sys.stderr)
    return EXIT_USAGE


def _parse_flags(argv: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Any],
                                                      dict[str, bool]]:
    """exporter.cliflags.parse, imported here so that nothing of it stays referenced."""
    from exporter.cliflags import parse

    return parse(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter (or check its config); return the exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in ("report", "export"):  # loaded only then: the exporter stays small
        from exporter.report.cli import main as report_main

        return report_main(words)
    values, overrides, switches = _parse_flags(argv)
    try:
        config = load_config(values["config_file"], os.environ, DEFAULTS, overrides, switches,
                             collector_scopes=SCOPES)
    except ConfigError as exc:
        return _invalid("configuration", exc)
    security = None
    if config.web.config_file:
        from exporter.webconfig import WebConfigFile

        try:
            security = WebConfigFile(config.web.config_file)
        except ConfigError as exc:
            return _invalid("web configuration", exc)
        except Exception as exc:  # a loader bug: still one line and exit 2, no traceback
            return _invalid("web configuration", ConfigError([
                f"web config file {config.web.config_file}: cannot load: {type(exc).__name__}"]))
    problems = checks.problems(config)
    if problems:
        # One line each: what start-up would meet when it binds and serves.
        for problem in problems:
            print(f"qatoolbox-exporter: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if values["config_check"]:
        print("configuration ok")
        for line in summary(config):
            print(f"  {line}")
        if security is not None:
            print(f"  {security.summary()}")
        for warning in checks.warnings(config):
            print(f"  warning: {warning}")
        return EXIT_OK
    logs.setup(config.log.level, config.log.format)
    # Parsing the flags and the YAML files is done: let go of argparse, gettext and (unless
    # the web config file is re-read on change) PyYAML, 0.3 MB resident.
    lean.release_modules(*STARTUP_MODULES, *(() if security is not None else YAML_MODULES))
    return serve(config, security)


def serve(config: Config, security: WebConfigFile | None = None) -> int:
    """Start the HTTP server and block until SIGTERM or SIGINT."""
    from exporter.server import ExporterHTTPServer

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("PROMETHEUS_MULTIPROC_DIR is set in the exporter's environment; ignored: "
                    "the exporter's own metrics never use multiprocess mode")
    try:
        server = ExporterHTTPServer(config.web, ScrapeRunner([], config.scrape.timeout), security)
    except OSError as exc:
        print(f"qatoolbox-exporter: cannot listen on {config.web.listen_address}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        # Checked before (checks.py), but a name can stop resolving in between: still 2.
        usage = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
        return EXIT_USAGE if usage else EXIT_RUNTIME
    # Collectors are built once the port is ours: some start background work (and log) at once.
    runner = RecordingRunner(build(config), config.scrape.timeout, config.log.repeat_interval)
    server.set_runner(runner)
    server.landing = LandingPage(runner, config.web, config, all_names=list(COLLECTORS))
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    log.info("listening", extra={"address": config.web.listen_address,
                                 "path": config.web.telemetry_path,
                                 "collectors": ",".join(runner.names),
                                 "version": __version__})
    if config.enabled("redis"):
        log.info("redis target", extra={"url": redact_url(config.redis.url)})
    stop.wait()
    server.shutdown()
    server.server_close()
    runner.close()
    return EXIT_OK
