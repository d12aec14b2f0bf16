"""`qatoolbox-exporter export`: one PromQL range query written as CSV, and why it came back
empty when it did."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from datetime import tzinfo
from pathlib import Path
from typing import Any, TextIO

from exporter.report.console import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Progress,
    fail,
    terminate_as_interrupt,
)
from exporter.report.flags import UsageError, export_parser
from exporter.report.promapi import Client, PromError, SettingsError
from exporter.report.settings import export_settings
from exporter.report.times import human

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan", "atan2", "start", "end"}


def query_metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects by bare name (a best effort: enough to
    tell an unknown metric from an empty range)."""
    text = _STRINGS.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    found = [t for t in _IDENT.findall(text) if t.lower() not in _KEYWORDS]
    return list(dict.fromkeys(found))


def run_export(argv: Sequence[str], stdout: Any = None, stderr: TextIO | None = None) -> int:
    prog = "qatoolbox-exporter export"
    stderr = stderr or sys.stderr
    try:
        args = export_parser().parse_args(argv)
        settings = export_settings(args)
    except (UsageError, SettingsError) as exc:
        return fail(prog, str(exc), EXIT_USAGE)
    client, tz, start, end, step = (settings.client, settings.tz, settings.start, settings.end,
                                    settings.step)

    from exporter.report.output import OutputError, publish_file
    from exporter.report.render_csv import export_csv

    progress = Progress(stderr.isatty() and not args.quiet, stderr)
    try:
        with terminate_as_interrupt():
            try:
                series = client.range(args.query, start, end, step,
                                      progress=lambda d, t: progress(d, t, "querying"))
            except PromError as exc:
                progress.clear()
                if exc.kind == "bad_query":
                    return fail(prog, f"--query rejected by Prometheus: {exc}", EXIT_USAGE)
                return fail(prog, str(exc), EXIT_RUNTIME)
            progress.clear()
            if not series:
                return fail(prog, _why_empty(client, args.query, start, end, tz),
                            EXIT_RUNTIME)
            data = export_csv(series, start, end, step, tz)
            if args.out == "-":
                stream = stdout if stdout is not None else sys.stdout.buffer
                stream.write(data)
                stream.flush()
            else:
                try:
                    publish_file(Path(args.out), data)
                except OutputError as exc:
                    return fail(prog, str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        progress.clear()
        return fail(prog, "interrupted; nothing written", EXIT_INTERRUPTED)
    except BrokenPipeError:
        return EXIT_RUNTIME
    return EXIT_OK


def _why_empty(client: Client, expr: str, start: int, end: int, tz: tzinfo) -> str:
    span = f"between {human(start, tz)} and {human(end, tz)}"
    unknown = []
    for name in query_metric_names(expr)[:10]:
        try:
            if not client.metric_names(f'{{__name__="{name}"}}', 0, time.time() + 86400):
                unknown.append(name)
        except PromError:
            break
    if unknown:
        return (f"unknown metric {', '.join(unknown)}: Prometheus has no series of that name "
                "(check the spelling, and that the collector exposing it is on)")
    return f"no data: the query returned no series {span}"
