"""The command line's flags: the parser (flags generated from the collector table) and what
parsing gives the configuration.

Start-up work only: exporter.cli imports this module to parse the flags and the exporter lets
go of it, argparse and gettext once serving (exporter.lean.release_modules), so what parse()
returns holds nothing of theirs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from exporter import __version__
from exporter.collectors import COLLECTORS, SCOPES
from exporter.config import Config, Duration, format_duration

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


def parse(argv: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, bool]]:
    """Parse flags into their values (by dest, a plain dict: nothing of argparse's is kept),
    config overrides and collector switches."""
    values = dict(vars(build_parser().parse_args(argv)))
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
    return values, overrides, switches
