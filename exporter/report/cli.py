"""`qatoolbox-exporter report` and `qatoolbox-exporter export`: flags, progress on a terminal,
one-line errors and exit codes (0 done, 1 runtime failure, 2 bad flags or query, 3 report
written but some of its queries failed)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import tzinfo
from pathlib import Path
from typing import Any, NoReturn, TextIO

from exporter import __version__
from exporter.report.promapi import (
    Client,
    HttpSettings,
    PromError,
    SettingsError,
    load_http_config,
)
from exporter.report.times import iso, nice_step, parse_span, parse_time, zone

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
FORMATS = ("html", "csv", "json")
MAX_EXPORT_POINTS = 1_000_000
DEFAULT_URL = "http://localhost:9090"


class UsageError(Exception):
    """A bad flag value: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class Progress:
    """One self-overwriting status line on a terminal; nothing at all in a pipe."""

    def __init__(self, enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self._shown = False

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        self.stream.write(f"\r\033[K[{done}/{total}] {label[:70]}")
        self.stream.flush()
        self._shown = True

    def say(self, text: str) -> None:
        if self.enabled:
            self.clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Prometheus connection")
    group.add_argument("--prometheus", metavar="URL",
                       default=os.environ.get("PROMETHEUS_URL") or DEFAULT_URL,
                       help="Prometheus (or VictoriaMetrics, Thanos Query, Mimir's Prometheus "
                            f"API) base URL; default $PROMETHEUS_URL or {DEFAULT_URL}")
    group.add_argument("--http.config.file", dest="http_config", metavar="PATH",
                       help="HTTP client settings in Prometheus' http_config format "
                            "(basic_auth, authorization, bearer_token_file, tls_config), as "
                            "promtool takes them")
    group.add_argument("--basic-auth.username", dest="basic_user", metavar="USER",
                       help="basic auth user (flags override the HTTP config file)")
    group.add_argument("--basic-auth.password-file", dest="basic_password_file",
                       metavar="PATH", help="file holding the basic auth password")
    group.add_argument("--bearer-token-file", dest="bearer_token_file", metavar="PATH",
                       help="file holding a bearer token")
    group.add_argument("--tls.ca-file", dest="ca_file", metavar="PATH",
                       help="CA certificates to verify an https:// Prometheus with")
    group.add_argument("--tls.cert-file", dest="cert_file", metavar="PATH",
                       help="client certificate (with --tls.key-file)")
    group.add_argument("--tls.key-file", dest="key_file", metavar="PATH",
                       help="client certificate's key")
    group.add_argument("--tls.insecure-skip-verify", dest="insecure", action="store_true",
                       help="do not verify the server certificate")
    group.add_argument("--timeout", default="60s", metavar="DURATION",
                       help="time limit of each query (default 60s)")


def _period_flags(parser: argparse.ArgumentParser, default_range: str | None) -> None:
    group = parser.add_argument_group("period")
    group.add_argument("--range", metavar="DURATION",
                       help=f"length of the period ending at --to (default {default_range})"
                       if default_range else "length of the period ending at --to")
    group.add_argument("--from", dest="start", metavar="TIME",
                       help="start: RFC 3339, a date, Unix seconds")
    group.add_argument("--to", dest="end", default="now", metavar="TIME",
                       help='end: "now" (default), "midnight", RFC 3339, a date, Unix seconds')
    group.add_argument("--timezone", metavar="NAME",
                       help="IANA zone for dates and days (default: the machine's)")


def _settings(args: argparse.Namespace) -> HttpSettings:
    base = load_http_config(args.http_config) if args.http_config else HttpSettings()
    username, password, token = base.username, base.password, base.bearer_token
    if args.basic_user is not None:
        username = args.basic_user
    if args.basic_password_file:
        password = _read_text(args.basic_password_file, "--basic-auth.password-file")
    if args.bearer_token_file:
        token = _read_text(args.bearer_token_file, "--bearer-token-file")
    if (username or password) and token:
        raise SettingsError("basic auth and a bearer token are mutually exclusive")
    return HttpSettings(username, password, token, args.ca_file or base.ca_file,
                        args.cert_file or base.cert_file, args.key_file or base.key_file,
                        args.insecure or base.insecure_skip_verify)


def _read_text(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise SettingsError(f"{what}: {path} is empty")
    return value


def _client(args: argparse.Namespace) -> Client:
    try:
        timeout = parse_span(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    return Client(args.prometheus, _settings(args), float(timeout))


def _period(args: argparse.Namespace, tz: tzinfo, default_range: str | None) -> tuple[int, int]:
    try:
        end = parse_time(args.end, tz)
    except ValueError as exc:
        raise UsageError(f"--to: {exc}") from None
    if args.start is not None:
        if args.range is not None:
            raise UsageError("--range and --from exclude each other")
        try:
            start = parse_time(args.start, tz)
        except ValueError as exc:
            raise UsageError(f"--from: {exc}") from None
    else:
        text = args.range or default_range
        if text is None:
            raise UsageError("give --range or --from")
        try:
            start = end - parse_span(text)
        except ValueError as exc:
            raise UsageError(f"--range: {exc}") from None
    if start >= end:
        raise UsageError("the period is empty: --from must be before --to")
    return start, end


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a stopped systemd unit or Kubernetes job) unwinds like Ctrl-C, so temporary
    output is removed on the way out."""
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


# --- report ----------------------------------------------------------------------------------


def report_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qatoolbox-exporter report",
                     description="Build the operations report (HTML with charts, CSV, JSON) "
                                 "for a period from Prometheus' HTTP API, and optionally mail "
                                 "it or post a summary to DingTalk.")
    _connection_flags(parser)
    _period_flags(parser, "7d")
    parser.add_argument("--compare", choices=("previous", "none"), default="previous",
                        help="compare with the same span just before (default) or not")
    parser.add_argument("--out", metavar="DIR", default="qatoolbox-report-%Y-%m-%d",
                        help="directory to write; strftime fields take the period's end "
                             "(default qatoolbox-report-%%Y-%%m-%%d)")
    parser.add_argument("--format", default="html,csv,json",
                        help="comma-separated: html, csv, json (default all)")
    parser.add_argument("--selector", default='job="qatoolbox"',
                        help='label matchers of the exporter\'s series (default job="qatoolbox")')
    parser.add_argument("--title", default="QAToolBox operations report",
                        help="heading of the report and subject of the mail")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="rows of the per-route, per-task and per-table lists in the HTML")
    parser.add_argument("--step", metavar="DURATION",
                        help="chart resolution (default: about 336 points over the period)")
    parser.add_argument("--parallel", type=int, default=4, metavar="N",
                        help="queries in flight at once (default 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress even on a terminal")
    mail = parser.add_argument_group("delivery")
    mail.add_argument("--mail.config.file", dest="mail_config", metavar="PATH",
                      help="mail the HTML: YAML with Alertmanager's email_config keys (to, "
                           "from, smarthost, auth_username, auth_password_file, require_tls, "
                           "tls_config, headers)")
    mail.add_argument("--mail.to", dest="mail_to", action="append", default=[],
                      metavar="ADDRESS", help="another recipient (repeatable)")
    mail.add_argument("--dingtalk.url-file", dest="dingtalk_url_file", metavar="PATH",
                      help="post a summary to this DingTalk robot webhook (file holding the URL "
                           "with its access token; or $DINGTALK_WEBHOOK_URL)")
    mail.add_argument("--dingtalk.secret-file", dest="dingtalk_secret_file", metavar="PATH",
                      help="the robot's signing secret (or $DINGTALK_SECRET)")
    mail.add_argument("--link", metavar="URL",
                      help="where readers find the published report, for the summary")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run_report(argv: Sequence[str], stderr: TextIO | None = None) -> int:
    prog = "qatoolbox-exporter report"
    stderr = stderr or sys.stderr
    began = time.monotonic()
    try:
        args = report_parser().parse_args(argv)
        formats = [f.strip() for f in args.format.split(",") if f.strip()]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise UsageError(f"--format: expected some of html, csv, json, got {args.format!r}")
        if args.top < 1 or args.parallel < 1:
            raise UsageError("--top and --parallel must be at least 1")
        try:
            tz = zone(args.timezone)
        except ValueError as exc:
            raise UsageError(f"--timezone: {exc}") from None
        start, end = _period(args, tz, "7d")
        step = nice_step(end - start)
        if args.step:
            try:
                step = parse_span(args.step)
            except ValueError as exc:
                raise UsageError(f"--step: {exc}") from None
        client = _client(args)
        mail = None
        if args.mail_config or args.mail_to:
            from exporter.report.deliver import DeliveryConfigError, load_mail_config

            if not args.mail_config:
                raise UsageError("--mail.to needs --mail.config.file (the SMTP settings)")
            try:
                mail = load_mail_config(args.mail_config, args.mail_to)
            except DeliveryConfigError as exc:
                raise UsageError(str(exc)) from None
        ding_url = ding_secret = ""
        if args.dingtalk_url_file:
            ding_url = _read_text(args.dingtalk_url_file, "--dingtalk.url-file")
        elif os.environ.get("DINGTALK_WEBHOOK_URL"):
            ding_url = os.environ["DINGTALK_WEBHOOK_URL"].strip()
        if args.dingtalk_secret_file:
            ding_secret = _read_text(args.dingtalk_secret_file, "--dingtalk.secret-file")
        elif ding_url and os.environ.get("DINGTALK_SECRET"):
            ding_secret = os.environ["DINGTALK_SECRET"].strip()
        if "html" in formats or mail is not None:
            from exporter.report import charts

            try:
                charts.check()
            except charts.ChartsUnavailableError as exc:
                raise UsageError(str(exc)) from None
        try:
            out = Path(_strftime(args.out, end, tz))
        except ValueError as exc:
            raise UsageError(f"--out: {exc}") from None
    except UsageError as exc:
        return _fail(prog, str(exc), EXIT_USAGE)
    except SettingsError as exc:
        return _fail(prog, str(exc), EXIT_USAGE)

    from exporter.report import render_csv
    from exporter.report.build import Builder, NoDataError
    from exporter.report.dataset import to_json
    from exporter.report.output import OutputError, publish_dir
    from exporter.report.plan import Options

    progress = Progress(stderr.isatty() and not args.quiet, stderr)
    options = Options(args.selector, start, end, args.compare == "previous", step, args.top,
                      tz, args.timezone or _zone_name(tz), args.title, args.parallel)
    try:
        with _terminate_as_interrupt():
            try:
                report = Builder(client, options, progress).build()
            except PromError as exc:
                progress.clear()
                return _fail(prog, str(exc), EXIT_USAGE if exc.kind == "bad_query"
                             else EXIT_RUNTIME)
            except NoDataError as exc:
                progress.clear()
                return _fail(prog, str(exc), EXIT_RUNTIME)
            files: dict[str, bytes] = {}
            html = ""
            if "html" in formats or mail is not None:
                from exporter.report import charts, render_html

                images: dict[str, bytes] = {}
                drawn = [(s, c) for s in report.sections for c in s.charts]
                for number, (section, chart) in enumerate(drawn, 1):
                    progress(number, len(drawn), f"drawing {chart.title}")
                    png = charts.render(chart, tz, start, end)
                    images[f"{section.key}.{chart.key}"] = png
                    chart.image = f"charts/{section.key}-{chart.key}.png"
                    files[chart.image] = png
                html = render_html.render(report, images, tz)
                if "html" in formats:
                    files["report.html"] = html.encode("utf-8")
            if "csv" in formats:
                files.update(render_csv.report_files(report, tz))
            if "json" in formats:
                files["report.json"] = to_json(report, lambda ts: iso(ts, tz)).encode()
            progress.clear()
            try:
                publish_dir(out, files)
            except OutputError as exc:
                return _fail(prog, str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        progress.clear()
        return _fail(prog, "interrupted; nothing written", 130)

    problems = []
    if report.gaps:
        problems.append(f"{len(report.gaps)} data gap(s)")
    if report.problems:
        problems.append(f"{len(report.problems)} missing or failed figure group(s)")
    if problems:
        print(f"{prog}: warning: partial report ({', '.join(problems)}); the report marks "
              "them", file=sys.stderr)
    delivered = _deliver(prog, report, html, tz, mail=mail, ding_url=ding_url,
                         ding_secret=ding_secret, link=args.link or "", out=out)
    progress.say(f"wrote {out} ({', '.join(formats)}) in {time.monotonic() - began:.1f} s")
    if not delivered:
        return EXIT_RUNTIME
    return EXIT_PARTIAL if report.failed_queries else EXIT_OK


def _zone_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or tz.tzname(None) or "local")


def _strftime(pattern: str, ts: float, tz: tzinfo) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts, tz).strftime(pattern)


def _deliver(prog: str, report: Any, html: str, tz: tzinfo, *, mail: Any, ding_url: str,
             ding_secret: str, link: str, out: Path) -> bool:
    """Mail and post; False (after a one-line error each) when something failed."""
    if mail is None and not ding_url:
        return True
    from exporter.report import deliver

    ok = True
    if mail is not None:
        text = "\n".join(deliver.summary_lines(report, tz))
        if link:
            text += f"\n\nFull report: {link}"
        subject = (f"{report.title}: {_strftime('%Y-%m-%d', report.start, tz)} to "
                   f"{_strftime('%Y-%m-%d', report.end, tz)}")
        try:
            deliver.send_mail(mail, deliver.mail_message(mail, subject, html, text))
        except (deliver.DeliveryError, deliver.DeliveryConfigError) as exc:
            print(f"{prog}: report written to {out}, but mailing it failed: {exc}",
                  file=sys.stderr)
            ok = False
    if ding_url:
        title, text = deliver.dingtalk_text(report, tz, link)
        try:
            deliver.post_dingtalk(ding_url, ding_secret, title, text)
        except (deliver.DeliveryError, deliver.DeliveryConfigError) as exc:
            print(f"{prog}: report written to {out}, but the DingTalk post failed: {exc}",
                  file=sys.stderr)
            ok = False
    return ok


# --- export ----------------------------------------------------------------------------------


def export_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qatoolbox-exporter export",
                     description="Write a PromQL range query's result as CSV (RFC 4180): one "
                                 "row per step, one column per series.")
    parser.add_argument("--query", required=True, metavar="PROMQL",
                        help="the expression to evaluate at every step")
    _connection_flags(parser)
    _period_flags(parser, None)
    parser.add_argument("--step", default="60s", metavar="DURATION",
                        help="resolution (default 60s)")
    parser.add_argument("--out", default="-", metavar="FILE",
                        help="CSV file to write (default - : standard output)")
    parser.add_argument("--quiet", action="store_true", help="no progress even on a terminal")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


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
        try:
            tz = zone(args.timezone)
        except ValueError as exc:
            raise UsageError(f"--timezone: {exc}") from None
        start, end = _period(args, tz, None)
        try:
            step = parse_span(args.step)
        except ValueError as exc:
            raise UsageError(f"--step: {exc}") from None
        points = (end - start) // step + 1
        if points > MAX_EXPORT_POINTS:
            raise UsageError(f"--step: {points:,} rows per series is too many (at most "
                             f"{MAX_EXPORT_POINTS:,}); use a larger --step")
        if not args.query.strip():
            raise UsageError("--query: empty")
        client = _client(args)
    except (UsageError, SettingsError) as exc:
        return _fail(prog, str(exc), EXIT_USAGE)

    from exporter.report.output import OutputError, publish_file
    from exporter.report.render_csv import export_csv

    progress = Progress(stderr.isatty() and not args.quiet, stderr)
    try:
        with _terminate_as_interrupt():
            try:
                series = client.range(args.query, start, end, step,
                                      progress=lambda d, t: progress(d, t, "querying"))
            except PromError as exc:
                progress.clear()
                if exc.kind == "bad_query":
                    return _fail(prog, f"--query rejected by Prometheus: {exc}", EXIT_USAGE)
                return _fail(prog, str(exc), EXIT_RUNTIME)
            progress.clear()
            if not series:
                return _fail(prog, _why_empty(client, args.query, start, end, tz),
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
                    return _fail(prog, str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        progress.clear()
        return _fail(prog, "interrupted; nothing written", 130)
    except BrokenPipeError:
        return EXIT_RUNTIME
    return EXIT_OK


def _why_empty(client: Client, expr: str, start: int, end: int, tz: tzinfo) -> str:
    from exporter.report.times import human

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


def main(argv: Sequence[str]) -> int:
    """Dispatch `report ...` or `export ...` (argv[0] is the subcommand)."""
    command, rest = argv[0], list(argv[1:])
    if command == "report":
        return run_report(rest)
    return run_export(rest)
