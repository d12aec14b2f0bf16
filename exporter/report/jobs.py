"""Running the report's queries: a few at a time on daemon threads, with one progress count
over the whole report, stopping at the first error that no other query would escape."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from exporter.report.promapi import PromError

# Prometheus gone or the credentials refused: every other query would fail the same way.
FATAL = ("unreachable", "auth")

Progress = Callable[[int, int, str], None]
# (label on the progress line, the query, what to do with its answer, what to do with its error)
Job = tuple[str, Callable[[], Any], Callable[[Any], None], Callable[[PromError], None]]


class Runner:
    """Runs lists of jobs on a few daemon threads; the answers and errors are handed on under
    one lock, so what collects them needs none of its own."""

    def __init__(self, parallel: int, progress: Progress | None = None) -> None:
        self.parallel = parallel
        self.progress = progress
        self._lock = threading.Lock()
        self._done = 0
        self._total = 0

    def run(self, jobs: list[Job]) -> None:
        """Run the jobs; a fatal error (Prometheus gone, credentials refused) stops everything
        and is raised. Daemon threads and joins with a timeout let Ctrl-C or SIGTERM end the
        run at once."""
        self._total += len(jobs)
        pending: queue.SimpleQueue[Job] = queue.SimpleQueue()
        for job in jobs:
            pending.put(job)
        fatal: list[PromError] = []

        def worker() -> None:
            while not fatal:
                try:
                    label, call, ok, failed = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = call()
                except PromError as exc:
                    if exc.kind in FATAL:
                        fatal.append(exc)
                        return
                    with self._lock:
                        failed(exc)
                else:
                    with self._lock:
                        ok(result)
                with self._lock:
                    self._done += 1
                    if self.progress is not None:
                        self.progress(self._done, self._total, label)

        threads = [threading.Thread(target=worker, name=f"report-query-{n}", daemon=True)
                   for n in range(min(max(1, self.parallel), max(1, len(jobs))))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
        if fatal:
            raise fatal[0]
