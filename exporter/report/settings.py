"""The subcommands' flags turned into what they run with: the Prometheus client with its
credentials, the period, the step, the report's formats, output and delivery. Every bad value
is a UsageError or SettingsError naming its flag."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.report.flags import UsageError
from exporter.report.promapi import Client, HttpSettings, SettingsError, load_http_config
from exporter.report.times import local, nice_step, parse_span, parse_time, zone

if TYPE_CHECKING:  # deliver (ssl, smtplib, email) is imported only when mailing
    from exporter.report.deliver import MailSettings

FORMATS = ("html", "csv", "json")
MAX_EXPORT_POINTS = 1_000_000


def _read_text(path: str, what: str) -> str:
    """A secret or URL kept in a file, stripped; what names the flag in errors."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise SettingsError(f"{what}: {path} is empty")
    return value


def _http_settings(args: argparse.Namespace) -> HttpSettings:
    """The HTTP config file, with the flags overriding it."""
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


def _span_flag(flag: str, text: str) -> int:
    try:
        return parse_span(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _time_flag(flag: str, text: str, tz: tzinfo) -> int:
    try:
        return parse_time(text, tz)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _zone_flag(args: argparse.Namespace) -> tzinfo:
    try:
        return zone(args.timezone)
    except ValueError as exc:
        raise UsageError(f"--timezone: {exc}") from None


def _api_client(args: argparse.Namespace) -> Client:
    timeout = _span_flag("--timeout", args.timeout)
    return Client(args.prometheus, _http_settings(args), float(timeout))


def _period(args: argparse.Namespace, tz: tzinfo, default_range: str | None) -> tuple[int, int]:
    """(start, end) from --from/--to or --range/--to."""
    end = _time_flag("--to", args.end, tz)
    if args.start is not None:
        if args.range is not None:
            raise UsageError("--range and --from exclude each other")
        start = _time_flag("--from", args.start, tz)
    else:
        text = args.range or default_range
        if text is None:
            raise UsageError("give --range or --from")
        start = end - _span_flag("--range", text)
    if start >= end:
        raise UsageError("the period is empty: --from must be before --to")
    return start, end


@dataclass(frozen=True)
class ReportSettings:
    formats: list[str]
    tz: tzinfo
    start: int
    end: int
    step: int
    client: Client
    mail: MailSettings | None
    ding_url: str
    ding_secret: str
    out: Path


def report_settings(args: argparse.Namespace) -> ReportSettings:
    """Everything `report` needs checked before it asks Prometheus anything."""
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"--format: expected some of html, csv, json, got {args.format!r}")
    if args.top < 1 or args.parallel < 1:
        raise UsageError("--top and --parallel must be at least 1")
    tz = _zone_flag(args)
    start, end = _period(args, tz, "7d")
    step = _span_flag("--step", args.step) if args.step else nice_step(end - start)
    prometheus = _api_client(args)
    mail: MailSettings | None = None
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
        out = Path(local(end, tz).strftime(args.out))
    except ValueError as exc:
        raise UsageError(f"--out: {exc}") from None
    return ReportSettings(formats, tz, start, end, step, prometheus, mail, ding_url,
                          ding_secret, out)


@dataclass(frozen=True)
class ExportSettings:
    tz: tzinfo
    start: int
    end: int
    step: int
    client: Client


def export_settings(args: argparse.Namespace) -> ExportSettings:
    """Everything `export` needs checked before it asks Prometheus anything."""
    tz = _zone_flag(args)
    start, end = _period(args, tz, None)
    step = _span_flag("--step", args.step)
    points = (end - start) // step + 1
    if points > MAX_EXPORT_POINTS:
        raise UsageError(f"--step: {points:,} rows per series is too many (at most "
                         f"{MAX_EXPORT_POINTS:,}); use a larger --step")
    if not args.query.strip():
        raise UsageError("--query: empty")
    return ExportSettings(tz, start, end, step, _api_client(args))
