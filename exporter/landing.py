"""The landing page: each collector's state, its targets, and where to go next, in one page."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from exporter import __version__
from exporter.config import Config, WebConfig
from exporter.redact import redact_url, scrub, url_secrets
from exporter.scrape import Outcome, ScrapeRunner

log = logging.getLogger("exporter.landing")

# A collection older than this is run again for the page (within the scrape budget, and
# shared with any scrape under way): a page opened just after a scrape shows that scrape, any
# other shows the present. Longer, and a page opened on an exporter nobody scrapes would show
# a state that is no longer true (the business queries are scheduled by collections, too).
MAX_AGE = 5.0
# An error from a library (a libpq message, a traceback's last line) can be long: the page
# shows this much, wrapped, and the log has the rest.
ERROR_CHARS = 300
DOCS_URL = "https://github.com/qatoolbox/qatoolbox-exporter/blob/main/README.md"

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
NOT_CONFIGURED, NOT_APPLICABLE, DISABLED, NOT_RUN = (
    "not configured", "not applicable", "disabled", "not run yet")
_STATE_CLASS = {OK: "ok", DEGRADED: "warn", FAILING: "bad", NOT_RUN: "wait"}

# (family name without the sample suffix, labels, value): what the page reads of a collection.
Samples = dict[str, list[tuple[dict[str, str], float]]]


# The families the page reads (besides each collector's qatoolbox_<name>_up and
# qatoolbox_<name>_connection_error).
PAGE_FAMILIES = frozenset((
    "qatoolbox_business_query_success", "qatoolbox_business_query_applicable",
    "qatoolbox_business_query_last_success_timestamp_seconds",
    "qatoolbox_business_query_duration_seconds", "qatoolbox_business_superuser_refused",
    "qatoolbox_app_multiprocess_dir_up", "qatoolbox_app_workers"))


def read_by_page(name: str) -> bool:
    """Whether the page reads the family of this name."""
    return name in PAGE_FAMILIES or (name.startswith("qatoolbox_")
                                     and name.endswith(("_up", "_connection_error")))


class RecordingRunner(ScrapeRunner):
    """The scrape runner, keeping what the landing page reads of its last collection.

    Only those families are kept: the whole collection (1,400 samples on the demo stack,
    about 1 MB) held until the next one would be alive beside the next one as it is built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last: tuple[float, list[Metric]] | None = None

    def collect(self) -> list[Metric]:
        """Run every collector once (or join the run under way) and remember what the page
        reads of the result."""
        families = super().collect()
        self._last = (time.time(), [f for f in families if read_by_page(f.name)])
        return families

    def last_collection(self) -> tuple[float, list[Metric]] | None:
        """(wall time, families) of the last collection, None before the first."""
        return self._last


def index(families: Iterable[Metric]) -> Samples:
    """Samples by name, labels without `server` (one exporter reads one server of each kind)."""
    found: Samples = {}
    for family in families:
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "server"}
            found.setdefault(sample.name, []).append((labels, float(sample.value)))
    return found


@dataclass
class Row:
    """One line of a table: a name, its state, and what to say about it."""

    name: str
    state: str
    details: list[str] = field(default_factory=list)
    last_run: str = ""
    duration: str = ""


def format_age(seconds: float) -> str:
    """'3 s ago', '4 min ago', '2 h ago' ('just now' under a second)."""
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def format_duration(seconds: float) -> str:
    """'12.3 ms' or '1.25 s'."""
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def shorten(text: str, limit: int = ERROR_CHARS) -> str:
    """text on one line, cut to limit characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def _reasons(samples: Samples, name: str) -> list[str]:
    """The reasons of a qatoolbox_<name>_connection_error{reason} at 1, in words."""
    return [f"reason: {labels.get('reason', '?').replace('_', ' ')}"
            for labels, value in samples.get(f"qatoolbox_{name}_connection_error", [])
            if value == 1]


def _values(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {labels.get(label, ""): value for labels, value in samples.get(name, [])}


def business_rows(samples: Samples, now: float) -> list[Row]:
    """One row per business query, from qatoolbox_business_query_* (table order)."""
    success = _values(samples, "qatoolbox_business_query_success", "query")
    applicable = _values(samples, "qatoolbox_business_query_applicable", "query")
    last = _values(samples, "qatoolbox_business_query_last_success_timestamp_seconds", "query")
    took = _values(samples, "qatoolbox_business_query_duration_seconds", "query")
    rows = []
    for query in dict.fromkeys([*success, *applicable]):
        if applicable.get(query) == 0:
            rows.append(Row(query, NOT_APPLICABLE, ["its tables or columns are not in this "
                                                    "database"]))
            continue
        ran = last.get(query, 0.0)
        if success.get(query) == 1:
            state = OK
        elif ran == 0 and took.get(query, 0.0) == 0:
            state = NOT_RUN
        else:
            state = FAILING
        rows.append(Row(query, state,
                        last_run=f"succeeded {format_age(now - ran)}" if ran > 0 else "",
                        duration=format_duration(took[query]) if took.get(query) else ""))
    return rows


def app_rows(samples: Samples, dirs: Sequence[str]) -> list[Row]:
    """One row per app metrics folder: readable or not, and its live workers."""
    up = _values(samples, "qatoolbox_app_multiprocess_dir_up", "dir")
    workers = _values(samples, "qatoolbox_app_workers", "dir")
    rows = []
    for directory in dict.fromkeys([*dirs, *up]):
        if directory not in up:
            rows.append(Row(directory, NOT_RUN))
        elif up[directory] == 1:
            count = int(workers.get(directory, 0))
            rows.append(Row(directory, OK, [f"{count} live worker{'s' if count != 1 else ''}"]))
        else:
            rows.append(Row(directory, FAILING, ["cannot be read in full (see the log)"]))
    return rows


def collector_row(name: str, outcome: Outcome | None, samples: Samples,
                  config: Config | None, now: float) -> Row:
    """The state of one collector: never ok for something failing or not configured."""
    if config is not None and not config.enabled(name):
        return Row(name, DISABLED)
    if config is not None and name == "app" and not config.app.multiprocess_dirs:
        return Row(name, NOT_CONFIGURED, ["no app.multiprocess_dirs: set them to the folders "
                                          "the application's workers write metrics to"])
    if config is not None and name == "business" and not config.business.all_queries():
        return Row(name, NOT_CONFIGURED, ["no business queries (business.defaults is off and "
                                          "business.queries is empty)"])
    if outcome is None:
        return Row(name, NOT_RUN)
    row = Row(name, OK, last_run=format_age(now - outcome.finished_at),
              duration=format_duration(outcome.duration))
    if not outcome.success:
        row.state = FAILING
        row.details.append(outcome.error)
    up = samples.get(f"qatoolbox_{name}_up", [])
    if any(value == 0 for _, value in up):
        row.state = FAILING
        if outcome.success:
            row.details.append(f"its server was not reached (qatoolbox_{name}_up 0)")
    if row.state == FAILING:
        row.details.extend(_reasons(samples, name))
    if name == "business":
        _business_state(row, samples, now, outcome.success)
    elif name == "app":
        _app_state(row, samples)
    return row


def _business_state(row: Row, samples: Samples, now: float, ran_ok: bool) -> None:
    refused = any(v == 1 for _, v in samples.get("qatoolbox_business_superuser_refused", []))
    if refused:
        row.state = FAILING
        row.details.append("queries refused: the role is a PostgreSQL superuser "
                           "(business.allow_superuser)")
    queries = business_rows(samples, now)
    states = [q.state for q in queries]
    if queries and all(s == NOT_RUN for s in states) and ran_ok and not refused:
        # The background queries have not run yet (up is 0 until the first connection):
        # neither ok nor failing.
        row.state, row.details = NOT_RUN, ["the queries have not run yet"]
        return
    ran = [s for s in states if s in (OK, FAILING)]
    failing = states.count(FAILING)
    if queries and not ran and NOT_APPLICABLE in states and row.state == OK:
        row.state = NOT_APPLICABLE
        row.details.append("none of the queries' tables are in this database")
    elif failing and failing == len(ran):
        row.state = FAILING
        row.details.append(f"all {failing} queries that ran failed")
    elif failing:
        row.state = FAILING if row.state == FAILING else DEGRADED
        row.details.append(f"{failing} of {len(ran)} queries failed")


def _app_state(row: Row, samples: Samples) -> None:
    up = [value for _, value in samples.get("qatoolbox_app_multiprocess_dir_up", [])]
    down = up.count(0)
    if up and down == len(up):
        row.state = FAILING
        row.details.append("no metrics folder can be read")
    elif down:
        row.state = FAILING if row.state == FAILING else DEGRADED
        row.details.append(f"{down} of {len(up)} metrics folders cannot be read")


@dataclass
class View:
    """Everything the page shows, as plain data (rendered by page())."""

    collected_at: float | None
    now: float
    collectors: list[Row]
    queries: list[Row]
    folders: list[Row]
    targets: list[tuple[str, str]]
    links: list[tuple[str, str]]
    telemetry_path: str = "/metrics"
    note: str = ""


def build_view(names: Sequence[str], outcomes: Mapping[str, Outcome],
               families: Iterable[Metric] | None, web: WebConfig, config: Config | None, *,
               collected_at: float | None, now: float,
               all_names: Sequence[str] = ()) -> View:
    """The page's content from the runner's outcomes, a collection's families and the
    config (None: only what the runner knows)."""
    samples = index(families or [])
    shown = list(dict.fromkeys([*names, *all_names]))
    secrets: list[str] = []
    if config is not None:
        secrets = url_secrets(config.redis.url)
        if config.postgres.password:
            secrets = sorted({*secrets, config.postgres.password}, key=lambda s: (-len(s), s))
    collectors = []
    for name in shown:
        row = collector_row(name, outcomes.get(name), samples, config, now)
        row.details = [shorten(scrub(d, secrets)) for d in row.details]
        collectors.append(row)
    queries = business_rows(samples, now) if "business" in names else []
    dirs = config.app.multiprocess_dirs if config is not None else ()
    folders = app_rows(samples, dirs) if "app" in names else []
    targets: list[tuple[str, str]] = []
    if config is not None:
        pg = config.postgres
        if config.enabled("postgres") or config.enabled("business"):
            targets.append(("PostgreSQL", f"host {pg.host}, port {pg.port}, database "
                                          f"{pg.dbname}, user {pg.user} (password "
                                          f"{'set' if pg.password else 'not set'})"))
        if config.enabled("redis"):
            targets.append(("Redis", redact_url(config.redis.url)))
    links = [("Metrics", web.telemetry_path), ("Health", "/healthz"), ("Docs", DOCS_URL)]
    grafana = getattr(web, "grafana_url", "")
    if grafana.startswith(("http://", "https://")):
        links.append(("Grafana", grafana))
    return View(collected_at, now, collectors, queries, folders, targets, links,
                web.telemetry_path)


_CSS = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#fff;--mute:#5b636e;--line:#d8dde3;
--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--wait:#57606a}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--mute:#9198a1;
--line:#30363d;--ok:#3fb950;--warn:#d29922;--bad:#f85149;--wait:#9198a1}}
*{box-sizing:border-box}
body{margin:0 auto;max-width:60rem;padding:1rem;font:15px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
p{margin:.3rem 0}.mute{color:var(--mute)}
nav a{margin-right:1rem}a{color:inherit}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;border-bottom:1px solid var(--line)}
th{font-weight:600;color:var(--mute)}
td{overflow-wrap:anywhere}
.state{font-weight:600;white-space:nowrap}
.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}.wait,.off{color:var(--wait)}
ul{margin:0;padding-left:1.1rem}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;margin:0}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
@media (max-width:40rem){thead{display:none}tr{display:block;padding:.4rem 0;
border-bottom:1px solid var(--line)}td{display:block;border:0;padding:.1rem 0}td:empty{display:none}
td[data-label="Name"],td[data-label="State"]{display:inline-block;margin-right:.7rem}
td[data-label="Last run"]::before,td[data-label="Duration"]::before{content:attr(data-label) ": ";
color:var(--mute)}}
"""


# What html.escape(text, quote=True) replaces, in one pass: the html package also loads
# html.entities' 2,000-entry tables, resident for the exporter's life (~0.2 MB).
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"})


def _e(text: str) -> str:
    return text.translate(_ESCAPES)


def _table(title: str, rows: list[Row], columns: Sequence[str]) -> str:
    """A section with a table of rows: name, state, and the columns asked for."""
    if not rows:
        return ""
    head = "".join(f"<th>{_e(c)}</th>" for c in ("Name", "State", *columns))
    body = []
    for row in rows:
        state = f'<span class="state {_STATE_CLASS.get(row.state, "off")}">{_e(row.state)}</span>'
        cells = [f'<td data-label="Name"><b>{_e(row.name)}</b></td>',
                 f'<td data-label="State">{state}</td>']
        for column in columns:
            if column == "Last run":
                value = _e(row.last_run)
            elif column == "Duration":
                value = _e(row.duration)
            else:
                value = ("<ul>" + "".join(f"<li>{_e(d)}</li>" for d in row.details) + "</ul>"
                         if row.details else "")
            cells.append(f'<td data-label="{_e(column)}">{value}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h2>{_e(title)}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>"
            + "\n".join(body) + "</tbody></table>\n")


def page(view: View) -> str:
    """The HTML of the page: self-contained, inline CSS, no script, every value escaped."""
    counts: dict[str, int] = {}
    for row in view.collectors:
        counts[row.state] = counts.get(row.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no collectors enabled"
    if view.collected_at is None:
        when = "No collection has completed yet."
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.collected_at))
        when = (f"Collected {stamp} ({format_age(max(0.0, view.now - view.collected_at))}; "
                f"collectors: {summary}).")
    links = "".join(f'<a href="{_e(url)}">{_e(name)}</a>' for name, url in view.links)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>qatoolbox-exporter</title><style>{_CSS}</style></head><body>",
        f"<header><h1>qatoolbox-exporter</h1><p class=\"mute\">Version {_e(__version__)}. "
        f"{_e(when)}</p>",
        f"<nav>{links}</nav></header>",
    ]
    if view.note:
        parts.append(f'<p class="bad">{_e(view.note)}</p>')
    parts.append(_table("Collectors", view.collectors,
                        ("Last run", "Duration", "Details")))
    parts.append(_table("Business queries", view.queries, ("Last run", "Duration")))
    parts.append(_table("App metrics folders", view.folders, ("Details",)))
    if view.targets:
        items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in view.targets)
        parts.append(f"<h2>Targets</h2><dl>{items}</dl>")
    parts.append(f'<p class="mute" style="margin-top:1.5rem">Prometheus scrapes '
                 f'<a href="{_e(view.telemetry_path)}">{_e(view.telemetry_path)}</a>; '
                 f"this page is for people and may change.</p></body></html>\n")
    return "\n".join(p for p in parts if p)


class LandingPage:
    """Renders the page for the server: from the runner's last collection when it is recent,
    else from one run for the page (within the scrape budget)."""

    def __init__(self, runner: ScrapeRunner, web: WebConfig, config: Config | None = None, *,
                 all_names: Sequence[str] = (), clock: Callable[[], float] = time.time,
                 max_age: float = MAX_AGE) -> None:
        self.runner = runner
        self._web = web
        self._config = config
        self._all_names = list(all_names)
        self._clock = clock
        self._max_age = max_age

    def _collection(self) -> tuple[float | None, list[Metric] | None, str]:
        last = self.runner.last_collection() if isinstance(self.runner,
                                                           RecordingRunner) else None
        if last is not None and self._clock() - last[0] <= self._max_age:
            return last[0], last[1], ""
        try:
            families = self.runner.collect()
        except Exception:  # the page must still answer, and say so
            log.exception("collection for the landing page failed")
            if last is not None:
                return last[0], last[1], "The collection for this page failed (see the log)."
            return None, None, "The collection for this page failed (see the log)."
        return self._clock(), families, ""

    def render(self) -> bytes:
        """The page, encoded."""
        collected_at, families, note = self._collection()
        now = self._clock()
        view = build_view(self.runner.names, self.runner.outcomes(), families, self._web,
                          self._config, collected_at=collected_at, now=now,
                          all_names=self._all_names)
        view.note = note
        return page(view).encode()
