"""Delivery of a finished report: the HTML by SMTP (settings as Alertmanager's email receiver
takes them) or a short summary with a link to a DingTalk robot webhook."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import smtplib
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import tzinfo
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, cast

import yaml

from exporter.report import fmt
from exporter.report.dataset import Report
from exporter.report.times import format_span, human
from exporter.report.tlsclient import client_context

TIMEOUT = 30.0


class DeliveryError(Exception):
    """Mail or webhook delivery failed (one line, no secrets)."""


class DeliveryConfigError(ValueError):
    """A bad mail or DingTalk setting."""


# --- the summary both channels share ---------------------------------------------------------


def summary_lines(report: Report, tz: tzinfo) -> list[str]:
    """The report in a few lines: period, traffic, errors, latency, alerts, SLOs, capacity."""
    lines = [f"{human(report.start, tz)} to {human(report.end, tz)}"]

    def pick(section: str, key: str) -> None:
        for s in report.sections:
            for f in s.figures:
                if s.key == section and f.key == key and f.value is not None:
                    lines.append(fmt.figure_line(f, tz))

    pick("http", "requests")
    pick("http", "error_ratio")
    pick("http", "p95")
    pick("alerts", "episodes")
    pick("alerts", "critical")
    pick("business", "active_users_7d")
    pick("business", "messages")
    for s in report.sections:
        if s.key == "slo" and s.tables:
            for row in s.tables[0].rows:
                lines.append(f"SLO {row.labels.get('sloth_slo', '')}: attainment "
                             f"{fmt.value(row.values.get('attainment'), 'ratio')} of "
                             f"{fmt.value(row.values.get('objective'), 'ratio')}, error budget "
                             f"left {fmt.value(row.values.get('budget_remaining'), 'ratio')}")
        if s.key == "host":
            for table in s.tables:
                if table.key != "filesystems":
                    continue
                soon = [r for r in table.rows if (r.values.get("full_in") or 1e12) < 30 * 86400]
                for r in soon:
                    lines.append(f"disk {r.labels.get('mountpoint', '')} on "
                                 f"{r.labels.get('instance', '')} full in about "
                                 f"{format_span(r.values['full_in'] or 0)}")
    if report.partial:
        lost = sum(g.seconds for g in report.gaps)
        parts = []
        if report.gaps:
            parts.append(f"data gaps of {format_span(lost)}")
        if report.problems:
            parts.append(f"{len(report.problems)} missing or failed figure groups")
        lines.append("PARTIAL: " + ", ".join(parts))
    return lines


# --- SMTP ------------------------------------------------------------------------------------

_MAIL_KEYS = {"to", "from", "smarthost", "hello", "auth_username", "auth_password",
              "auth_password_file", "require_tls", "tls_config", "headers"}


@dataclass(frozen=True)
class MailSettings:
    """Alertmanager's email_config keys (the subset that applies to one message)."""

    to: list[str]
    sender: str
    host: str
    port: int
    hello: str = "localhost"
    username: str = ""
    password: str = field(default="", repr=False)
    require_tls: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def load_mail_config(path: str, extra_to: list[str]) -> MailSettings:
    """Read a YAML file with Alertmanager email_config keys (to, from, smarthost, hello,
    auth_username, auth_password(_file), require_tls, tls_config, headers)."""
    where = f"--mail.config.file {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DeliveryConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise DeliveryConfigError(f"{where}: not valid YAML") from None
    if not isinstance(doc, dict):
        raise DeliveryConfigError(f"{where}: expected a mapping of email_config keys")
    unknown = sorted(set(doc) - _MAIL_KEYS)
    if unknown:
        raise DeliveryConfigError(f"{where}: unknown key {unknown[0]} (supported: "
                                  f"{', '.join(sorted(_MAIL_KEYS))})")

    def text(key: str, default: str = "") -> str:
        value = doc.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise DeliveryConfigError(f"{where}: {key}: expected a string")
        return value

    recipients = [a.strip() for a in text("to").split(",") if a.strip()] + extra_to
    if not recipients:
        raise DeliveryConfigError(f"{where}: to: no recipient (set it or pass --mail.to)")
    sender = text("from")
    if not sender:
        raise DeliveryConfigError(f"{where}: from: required")
    smarthost = text("smarthost")
    match = re.fullmatch(r"\[?([^\]]+?)\]?:(\d{1,5})", smarthost)
    if match is None:
        raise DeliveryConfigError(f"{where}: smarthost: expected host:port, got {smarthost!r}")
    password = text("auth_password")
    if doc.get("auth_password_file"):
        try:
            password = Path(text("auth_password_file")).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise DeliveryConfigError(f"{where}: auth_password_file: cannot read it: "
                                      f"{exc.strerror or exc}") from None
    require_tls = doc.get("require_tls", True)
    if not isinstance(require_tls, bool):
        raise DeliveryConfigError(f"{where}: require_tls: expected true or false")
    tls = doc.get("tls_config") or {}
    if not isinstance(tls, dict) or set(tls) - {"ca_file", "cert_file", "key_file",
                                                "insecure_skip_verify"}:
        raise DeliveryConfigError(f"{where}: tls_config: supported keys are ca_file, cert_file, "
                                  "key_file, insecure_skip_verify")
    headers = doc.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise DeliveryConfigError(f"{where}: headers: expected a mapping of strings")
    if any("\n" in v or "\r" in v for v in [*headers.values(), sender, *recipients]):
        raise DeliveryConfigError(f"{where}: line breaks are not allowed in addresses and "
                                  "headers")
    return MailSettings(recipients, sender, match.group(1), int(match.group(2)),
                        text("hello", "localhost"), text("auth_username"), password,
                        require_tls, str(tls.get("ca_file", "")), str(tls.get("cert_file", "")),
                        str(tls.get("key_file", "")), bool(tls.get("insecure_skip_verify", False)),
                        dict(headers))


def mail_message(settings: MailSettings, subject: str, html: str, text: str) -> EmailMessage:
    """multipart/alternative: the summary as text, and the HTML whose data: images become
    related parts referenced by cid: (mail clients show those; many block data: URIs)."""
    images: list[tuple[str, bytes]] = []

    def to_cid(match: re.Match[str]) -> str:
        cid = make_msgid(f"chart{len(images)}", domain="qatoolbox.report")
        images.append((cid, base64.b64decode(match.group(1))))
        return f'src="cid:{cid[1:-1]}"'

    html_cid = re.sub(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', to_cid, html)
    message = EmailMessage()
    message["Subject"] = settings.headers.get("Subject", subject)
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.to)
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain="qatoolbox.report")
    for name, value in settings.headers.items():
        if name.lower() not in ("subject", "from", "to", "date", "message-id"):
            message[name] = value
    message.set_content(text)
    message.add_alternative(html_cid, subtype="html")
    html_part = cast(EmailMessage, message.get_payload()[1])  # type: ignore[index]
    for number, (cid, data) in enumerate(images):
        html_part.add_related(data, maintype="image", subtype="png", cid=cid,
                              filename=f"chart{number}.png")
    return message


def _tls_context(settings: MailSettings) -> ssl.SSLContext:
    try:
        return client_context(settings.ca_file, settings.cert_file, settings.key_file,
                              settings.insecure_skip_verify)
    except ValueError as exc:
        raise DeliveryConfigError(f"mail tls_config: {exc}") from None


def send_mail(settings: MailSettings, message: EmailMessage) -> None:
    """Deliver as Alertmanager does: implicit TLS on port 465, else STARTTLS when offered
    (required unless require_tls is false), then AUTH when a username is set."""
    where = f"{settings.host}:{settings.port}"
    context = _tls_context(settings)
    try:
        client: smtplib.SMTP
        if settings.port == 465:
            client = smtplib.SMTP_SSL(settings.host, settings.port, settings.hello,
                                      timeout=TIMEOUT, context=context)
        else:
            client = smtplib.SMTP(settings.host, settings.port, settings.hello,
                                  timeout=TIMEOUT)
        with client:
            client.ehlo(settings.hello)
            if settings.port != 465:
                if client.has_extn("starttls"):
                    client.starttls(context=context)
                    client.ehlo(settings.hello)
                elif settings.require_tls:
                    raise DeliveryError(f"mail server {where} does not offer STARTTLS and "
                                        "require_tls is true")
            if settings.username:
                client.login(settings.username, settings.password)
            client.send_message(message, settings.sender, settings.to)
    except DeliveryError:
        raise
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryError(f"mail server {where} refused the credentials ({exc.smtp_code})"
                            ) from None
    except smtplib.SMTPResponseException as exc:
        detail = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) \
            else str(exc.smtp_error)
        raise DeliveryError(f"mail server {where} answered {exc.smtp_code}: "
                            f"{' '.join(detail.split())[:200]}") from None
    except smtplib.SMTPRecipientsRefused:
        raise DeliveryError(f"mail server {where} refused every recipient") from None
    except smtplib.SMTPException as exc:
        raise DeliveryError(f"mail to {where} failed: {' '.join(str(exc).split())[:200]}"
                            ) from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DeliveryError(f"cannot reach mail server {where}: {reason}") from None


# --- DingTalk --------------------------------------------------------------------------------


def dingtalk_text(report: Report, tz: tzinfo, link: str) -> tuple[str, str]:
    """(title, markdown) for a DingTalk markdown message."""
    title = report.title
    lines = summary_lines(report, tz)
    text = f"### {title}\n\n{lines[0]}\n\n" + "\n".join(f"- {line}" for line in lines[1:])
    if link:
        text += f"\n\n[Open the full report]({link})"
    return title, text[:18000]


def sign_url(url: str, secret: str, now_ms: int | None = None) -> str:
    """The webhook URL with DingTalk's signature for robots with "additional signature"
    security: HMAC-SHA256 of "timestamp\\nsecret" keyed with the secret, base64, URL-encoded."""
    stamp = str(now_ms if now_ms is not None else int(time.time() * 1000))
    digest = hmac.new(secret.encode(), f"{stamp}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    joiner = "&" if urllib.parse.urlsplit(url).query else "?"
    return f"{url}{joiner}timestamp={stamp}&sign={sign}"


def post_dingtalk(url: str, secret: str, title: str, text: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    where = f"{parsed.scheme}://{parsed.hostname or ''}"  # the access token stays out of errors
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DeliveryConfigError("DingTalk webhook: expected an https:// URL")
    target = sign_url(url, secret) if secret else url
    body = json.dumps({"msgtype": "markdown",
                       "markdown": {"title": title, "text": text}}).encode()
    request = urllib.request.Request(target, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            raw = response.read(65536)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DeliveryError(f"DingTalk webhook at {where} answered HTTP {exc.code}") from None
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        reason: Any = getattr(exc, "reason", exc)
        raise DeliveryError(f"cannot reach the DingTalk webhook at {where}: "
                            f"{getattr(reason, 'strerror', None) or reason}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise DeliveryError(f"DingTalk webhook at {where} did not answer with JSON") from None
    if not isinstance(answer, dict) or answer.get("errcode") != 0:
        code = answer.get("errcode") if isinstance(answer, dict) else None
        message = str(answer.get("errmsg", "")) if isinstance(answer, dict) else ""
        raise DeliveryError(f"DingTalk refused the message: errcode {code}: "
                            f"{' '.join(message.split())[:200]}")
