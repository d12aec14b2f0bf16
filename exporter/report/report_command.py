"""`qatoolbox-exporter report`: build the report, write it in its formats in one step, then
mail it and post its summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from exporter.report.console import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Progress,
    fail,
    terminate_as_interrupt,
)
from exporter.report.flags import UsageError, report_parser
from exporter.report.promapi import PromError, SettingsError
from exporter.report.settings import report_settings
from exporter.report.times import iso, local

if TYPE_CHECKING:  # deliver (ssl, smtplib, email) is imported only when delivering
    from exporter.report.dataset import Report
    from exporter.report.deliver import MailSettings

def run_report(argv: Sequence[str], stderr: TextIO | None = None) -> int:
    prog = "qatoolbox-exporter report"
    stderr = stderr or sys.stderr
    began = time.monotonic()
    try:
        args = report_parser().parse_args(argv)
        settings = report_settings(args)
    except (UsageError, SettingsError) as exc:
        return fail(prog, str(exc), EXIT_USAGE)
    formats, tz, start, end, mail, out = (settings.formats, settings.tz, settings.start,
                                          settings.end, settings.mail, settings.out)

    from exporter.report import render_csv
    from exporter.report.build import Builder, NoDataError
    from exporter.report.dataset import to_json
    from exporter.report.output import OutputError, publish_dir
    from exporter.report.plan import Options

    progress = Progress(stderr.isatty() and not args.quiet, stderr)
    options = Options(args.selector, start, end, args.compare == "previous", settings.step,
                      args.top, tz, args.timezone or _zone_name(tz), args.title, args.parallel)
    try:
        with terminate_as_interrupt():
            try:
                report = Builder(settings.client, options, progress).build()
            except PromError as exc:
                progress.clear()
                return fail(prog, str(exc), EXIT_USAGE if exc.kind == "bad_query"
                            else EXIT_RUNTIME)
            except NoDataError as exc:
                progress.clear()
                return fail(prog, str(exc), EXIT_RUNTIME)
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
                return fail(prog, str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        progress.clear()
        return fail(prog, "interrupted; nothing written", EXIT_INTERRUPTED)

    problems = []
    if report.gaps:
        problems.append(f"{len(report.gaps)} data gap(s)")
    if report.problems:
        problems.append(f"{len(report.problems)} missing or failed figure group(s)")
    if problems:
        print(f"{prog}: warning: partial report ({', '.join(problems)}); the report marks "
              "them", file=sys.stderr)
    delivered = _deliver(prog, report, html, tz, mail=mail, ding_url=settings.ding_url,
                         ding_secret=settings.ding_secret, link=args.link or "", out=out)
    progress.say(f"wrote {out} ({', '.join(formats)}) in {time.monotonic() - began:.1f} s")
    if not delivered:
        return EXIT_RUNTIME
    return EXIT_PARTIAL if report.failed_queries else EXIT_OK


def _zone_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or tz.tzname(None) or "local")


def _deliver(prog: str, report: Report, html: str, tz: tzinfo, *, mail: MailSettings | None,
             ding_url: str, ding_secret: str, link: str, out: Path) -> bool:
    """Mail and post; False (after a one-line error each) when something failed."""
    if mail is None and not ding_url:
        return True
    from exporter.report import deliver

    ok = True
    if mail is not None:
        text = "\n".join(deliver.summary_lines(report, tz))
        if link:
            text += f"\n\nFull report: {link}"
        subject = (f"{report.title}: {local(report.start, tz).strftime('%Y-%m-%d')} to "
                   f"{local(report.end, tz).strftime('%Y-%m-%d')}")
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
