"""Command line: flags to a validated Config, then run or check it."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from exporter import __version__, checks, logs
from exporter.collectors import COLLECTORS, DEFAULTS, SCOPES, build
from exporter.config import (
    Config,
    ConfigError,
    Duration,
    format_duration,
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

# flag -> (dotted config key it overrides, help); the default shown in --help is read from the
# config's own defaults, so the two cannot drift apart.
VALUE_FLAGS = {
    "--web.listen-address": ("web.listen_address",
                             "host:port or :port to listen on; :port is IPv6 and IPv4 where the "
                             "host has both"),
    "--web.telemetry-path": ("web.telemetry_path", "path of the metrics"),
    "--web.max-requests": ("web.max_requests", "concurrent requests before 503"),
    "--web.config.file": ("web.config_file", "exporter-toolkit web config file: TLS, basic "
                          "auth, headers (re-read when it changes)"),
    "--web.grafana-url": ("web.grafana_url", "Grafana to link from the landing page"),
    "--log.level": ("log.level", "debug, info, warning or error"),
    "--log.format": ("log.format", "logfmt or json"),
    "--scrape.timeout": ("scrape.timeout", "time budget of each collector, e.g. 500ms, 4s, 1m"),
    "--collectors.scope": ("collectors.scope",
                           "which collectors run by default: all, host ({host}) or service "
                           "({service}); --collector.* still win"),
}
# What each flag's value is, for --help (argparse's default would be the flag's dest).
METAVARS = {
    "--web.listen-address": "ADDRESS", "--web.telemetry-path": "URL_PATH",
    "--web.max-requests": "COUNT", "--web.config.file": "PATH", "--web.grafana-url": "URL",
    "--log.level": "LEVEL", "--log.format": "FORMAT", "--scrape.timeout": "DURATION",
    "--collectors.scope": "SCOPE",
}

# After the environment variables the collectors' config sections read (environment_help).
EPILOG = """\
  The configuration file wins over the environment, flags win over both.

exit codes:
  0  ok (or --config.check found nothing wrong)
  1  runtime failure (e.g. the port is in use)
  2  bad flags or configuration, each problem on one line

The landing page (/) shows each collector's state, its targets and links.
Documentation: README.md and docs/ in the source tree.
"""


def _default(key: str) -> str:
    """The config's default for a dotted key, as the config file writes it."""
    if key == "collectors.scope":
        return str(Config().scope)
    section, name = key.split(".", 1)
    value = getattr(getattr(Config(), section), name)
    if isinstance(value, Duration):
        return format_duration(value)
    return str(value)


def _environment_help() -> str:
    """The environment variables each collector reads, one aligned line (or more) each."""
    lines = ["environment:"]
    for spec in COLLECTORS.values():
        for variables, meaning in spec.section.environment_help:
            first, *more = meaning.split("\n")
            lines.append(f"  {variables:<37}{first}")
            lines.extend(f"  {'':<37}{line}" for line in more)
    return "\n".join(lines) + "\n"


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, then standard
    output's terminal, else 80), without importing shutil: argparse's help formatter does at
    every add_argument(), and shutil's archive support loads bz2 and lzma with their libraries
    into an exporter that never prints help."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's raw-description formatter, told the width (see _columns)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _columns() - 2 if width is None else width)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; collector flags and the environment help come from the collector
    table."""
    parser = argparse.ArgumentParser(
        prog="qatoolbox-exporter",
        description="Prometheus exporter for QAToolBox: host, processes, PostgreSQL, Redis,\n"
        "application and business metrics.",
        epilog=_environment_help() + EPILOG, formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config.file", dest="config_file", metavar="PATH",
                        help="YAML configuration file (optional)")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the configuration as start-up would (files, TLS, the "
                        "listen address), print a summary and exit: 0 if fine, 2 if not")
    # Which collectors each scope holds, from the table (for --collectors.scope).
    scopes = {scope: ", ".join(n for n, s in SCOPES.items() if s == scope)
              for scope in ("host", "service")}
    for flag, (key, template) in VALUE_FLAGS.items():
        help_text = template.format_map(scopes)
        default = _default(key)
        shown = f"{help_text} (default {default})" if default else help_text
        parser.add_argument(flag, dest=key, metavar=METAVARS[flag], help=shown)
    group = parser.add_argument_group("collectors")
    for name, spec in COLLECTORS.items():
        state = "on" if spec.default_enabled else "off"
        group.add_argument(f"--collector.{name}", dest=f"collector.{name}",
                           action="store_const", const=True,
                           help=f"enable the {name} collector ({state} by default): {spec.help}")
        group.add_argument(f"--no-collector.{name}", dest=f"collector.{name}",
                           action="store_const", const=False,
                           help=f"disable the {name} collector")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, Any], dict[str, bool]]:
    """Parse flags into the namespace, config overrides and collector switches."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    overrides: dict[str, Any] = {}
    for key, _ in VALUE_FLAGS.values():
        if values.get(key) is not None:
            raw = values[key]
            overrides[key] = int(raw) if key == "web.max_requests" and raw.isdigit() else raw
    switches = {
        name: values[f"collector.{name}"]
        for name in COLLECTORS
        if values.get(f"collector.{name}") is not None
    }
    return args, overrides, switches


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter (or check its config); return the exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in ("report", "export"):  # loaded only then: the exporter stays small
        from exporter.report.cli import main as report_main

        return report_main(words)
    args, overrides, switches = parse(argv)
    try:
        config = load_config(args.config_file, os.environ, DEFAULTS, overrides, switches,
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
    if args.config_check:
        print("configuration ok")
        for line in summary(config):
            print(f"  {line}")
        if security is not None:
            print(f"  {security.summary()}")
        for warning in checks.warnings(config):
            print(f"  warning: {warning}")
        return EXIT_OK
    logs.setup(config.log.level, config.log.format)
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
