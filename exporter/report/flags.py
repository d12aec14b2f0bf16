"""The flags of `qatoolbox-exporter report` and `export`: argparse definitions only; settings.py
turns them into values."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from exporter import __version__

DEFAULT_URL = "http://localhost:9090"


class UsageError(Exception):
    """A bad flag value: exit 2."""


class Parser(argparse.ArgumentParser):
    """Raises UsageError where argparse would print its usage and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def connection_flags(parser: argparse.ArgumentParser) -> None:
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


def period_flags(parser: argparse.ArgumentParser, default_range: str | None) -> None:
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


def report_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qatoolbox-exporter report",
                    description="Build the operations report (HTML with charts, CSV, JSON) "
                                "for a period from Prometheus' HTTP API, and optionally mail "
                                "it or post a summary to DingTalk.")
    connection_flags(parser)
    period_flags(parser, "7d")
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


def export_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qatoolbox-exporter export",
                    description="Write a PromQL range query's result as CSV (RFC 4180): one "
                                "row per step, one column per series.")
    parser.add_argument("--query", required=True, metavar="PROMQL",
                        help="the expression to evaluate at every step")
    connection_flags(parser)
    period_flags(parser, None)
    parser.add_argument("--step", default="60s", metavar="DURATION",
                        help="resolution (default 60s)")
    parser.add_argument("--out", default="-", metavar="FILE",
                        help="CSV file to write (default - : standard output)")
    parser.add_argument("--quiet", action="store_true", help="no progress even on a terminal")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser
