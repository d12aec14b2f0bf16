"""What the report asks of Prometheus: its options, and one section's queries gathered as jobs
before they run together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from exporter.report import queries as q
from exporter.report.jobs import Job
from exporter.report.promapi import Client, PromError


@dataclass(frozen=True)
class Options:
    selector: str
    start: int
    end: int
    compare: bool
    step: int
    top: int
    tz: tzinfo
    timezone: str
    title: str
    parallel: int = 4
    peak: int = 60  # resolution of peaks over sums and of the coverage check


class Plan:
    """One section's queries: the jobs to run, the failures they met, and the series names
    they need that Prometheus does not have for the period."""

    def __init__(self, client: Client, options: Options, fill: Callable[[str], str],
                 known: set[str] | None) -> None:
        self.client = client
        self.o = options
        self.window = options.end - options.start
        self.fill = fill
        self.known = known  # None where the names are unknown: everything is assumed present
        self.jobs: list[Job] = []
        self.failures: list[tuple[str, PromError, str]] = []
        self.missing: set[str] = set()

    def lacks(self, expr: str) -> bool:
        """Whether expr reads series that Prometheus lacks (they are noted, the query left
        out)."""
        missing = set() if self.known is None else q.names(expr) - self.known
        self.missing.update(missing)
        return bool(missing)

    def add(self, label: str, call: Callable[[], Any], ok: Callable[[Any], None], what: str,
            query: str) -> None:
        """A job; its error is kept with what it was for and its query."""
        def failed(exc: PromError) -> None:
            self.failures.append((what, exc, query))

        self.jobs.append((label, call, ok, failed))
