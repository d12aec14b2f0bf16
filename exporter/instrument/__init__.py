"""What the application imports to record its requests and tasks (needs prometheus-client only).

Each worker process records into its own files under PROMETHEUS_MULTIPROC_DIR; the exporter's
`app` collector merges them. Without that variable the values stay in memory and `collector()`
serves them from the process itself (single-process mode).
"""

from __future__ import annotations

import math
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter.instrument.fileformat import mmap_key
from exporter.instrument.merge import Merger, format_le
from exporter.instrument.store import ENV_DIR, Store, ValueFile

__all__ = [
    "DB_QUERY_BUCKETS",
    "DB_SECONDS_BUCKETS",
    "DURATION_BUCKETS",
    "TASK_BUCKETS",
    "Recorder",
    "collector",
    "normalize_method",
    "recorder",
    "shutdown",
]

# Dense between 50 ms and 5 s, where QAToolBox's thresholds (2 s slow, 5 s alert) sit, so that
# p95/p99 interpolate within a narrow bucket there.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, math.inf)
# 50 queries in one request is QAToolBox's alert line; 50 is a bucket bound.
DB_QUERY_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0,
                    math.inf)
# 1 s of DB time in one request is QAToolBox's alert line.
DB_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      math.inf)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                600.0, 1800.0, 3600.0, math.inf)

STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
UNMATCHED = "<unmatched>"
# Past this many (route, method) pairs, or (route, method, status) triples, new ones are
# recorded under route "<other>": a guard against a route function that leaks raw paths.
MAX_SERIES = 2000
OVERFLOW = "<other>"
_K = TypeVar("_K")
_V = TypeVar("_V")

_HTTP_DURATION = ("qatoolbox_http_request_duration_seconds",
                  "Time from the request reaching the application to its response, in seconds.")
_HTTP_REQUESTS = ("qatoolbox_http_requests", "HTTP requests answered, by route, method and status.")
_HTTP_IN_FLIGHT = ("qatoolbox_http_requests_in_flight",
                   "HTTP requests being handled right now, across live workers.")
_HTTP_EXCEPTIONS = ("qatoolbox_http_request_exceptions",
                    "HTTP requests whose handler raised an exception.")
_HTTP_DB_QUERIES = ("qatoolbox_http_request_db_queries",
                    "Database queries run while handling one HTTP request.")
_HTTP_DB_SECONDS = ("qatoolbox_http_request_db_seconds",
                    "Time spent in database queries while handling one HTTP request, in seconds.")
_TASK_DURATION = ("qatoolbox_celery_task_duration_seconds",
                  "Run time of a Celery task, in seconds.")
_TASKS = ("qatoolbox_celery_tasks", "Celery task runs finished, by task and outcome.")


def _observe(file: ValueFile, series: _Histogram, bounds: Sequence[float], value: float) -> None:
    """One histogram observation: its bucket and the sum (caller holds the lock)."""
    doubles = file.doubles
    doubles[series.buckets[bisect_left(bounds, value)]] += 1.0
    doubles[series.sum] += value


def normalize_method(method: str) -> str:
    """The method label: a standard verb, or "other" (clients can send any token)."""
    return method if method in STANDARD_METHODS else "other"



def _capped(table: dict[_K, _V], key: _K, overflow: _K, make: Callable[[_K], _V]) -> _V:
    """table's entry for key, made while the table holds fewer than MAX_SERIES; past that, a
    new key shares overflow's entry (its route or task named OVERFLOW), so a flood of distinct
    routes or task names cannot grow the files without bound."""
    entry = table.get(key)
    if entry is None:
        if len(table) >= MAX_SERIES:
            key = overflow
            entry = table.get(key)
        if entry is None:
            entry = table[key] = make(key)
    return entry

class _Histogram:
    """Slot indexes of one labelled histogram series: one per bucket, then the sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self, store: Store, spec: tuple[str, str], labels: dict[str, str],
                 bounds: Sequence[float]) -> None:
        name, help_text = spec
        file = store.histograms
        self.buckets = [
            file.slot(mmap_key(name, f"{name}_bucket", {**labels, "le": format_le(b)}, help_text))
            for b in bounds
        ]
        self.sum = file.slot(mmap_key(name, f"{name}_sum", labels, help_text))


class _Route:
    """The histogram series of one (route, method)."""

    __slots__ = ("db_queries", "db_seconds", "duration", "exceptions", "method", "route",
                 "statuses")

    def __init__(self, store: Store, route: str, method: str) -> None:
        self.route, self.method = route, method
        labels = {"route": route, "method": method}
        self.duration = _Histogram(store, _HTTP_DURATION, labels, DURATION_BUCKETS)
        self.db_queries: _Histogram | None = None
        self.db_seconds: _Histogram | None = None
        self.exceptions = -1
        self.statuses: dict[int, int] = {}


class Recorder:
    """Records requests and tasks into this process's Store; safe to call from many threads."""

    def __init__(self, directory: str | None) -> None:
        self.store = Store(directory)
        self._lock = self.store.lock
        # The files themselves never change (their views do, when they grow): one hop less
        # on every request.
        self._gauges, self._counters, self._histograms = (
            self.store.gauges, self.store.counters, self.store.histograms)
        self._routes: dict[tuple[str, str], _Route] = {}
        self._tasks: dict[tuple[str, str], tuple[_Histogram, int]] = {}
        self._counter_series = 0
        name, help_text = _HTTP_IN_FLIGHT
        self._in_flight = self.store.gauges.slot(mmap_key(name, name, {}, help_text))

    @property
    def multiprocess(self) -> bool:
        """Whether values go to files for the exporter."""
        return self.store.directory is not None

    def _route(self, route: str, method: str) -> _Route:
        return _capped(self._routes, (route, method), (OVERFLOW, method),
                       lambda key: _Route(self.store, *key))

    # request_started and request_finished run on every request of the application: they
    # take the lock with acquire/release (half the cost of a with block) and have _observe
    # written out (a call is a tenth of the whole). bench/app_overhead.py measures them.

    def request_started(self) -> None:
        """One more request in flight."""
        lock = self._lock
        lock.acquire()
        try:
            self._gauges.doubles[self._in_flight] += 1.0
        finally:
            lock.release()

    def request_finished(self, route: str, method: str, status: int, seconds: float, *,
                         db_queries: int | None = None, db_seconds: float = 0.0) -> None:
        """A request answered (also ends its in-flight count); db_queries None: not measured."""
        lock = self._lock
        lock.acquire()
        try:
            self._gauges.doubles[self._in_flight] -= 1.0
            slots = self._routes.get((route, method)) or self._route(route, method)
            index = slots.statuses.get(status, -1)
            if index < 0:
                index = self._status_slot(slots, status)
            self._counters.doubles[index] += 1.0
            if db_queries is not None and slots.db_queries is None:
                self._db_slots(slots)  # before taking the view: it may grow the file
            doubles = self._histograms.doubles
            series = slots.duration
            doubles[series.buckets[bisect_left(DURATION_BUCKETS, seconds)]] += 1.0
            doubles[series.sum] += seconds
            if db_queries is not None:
                series = slots.db_queries  # type: ignore[assignment]  # set just above
                doubles[series.buckets[bisect_left(DB_QUERY_BUCKETS, db_queries)]] += 1.0
                doubles[series.sum] += db_queries
                series = slots.db_seconds  # type: ignore[assignment]
                doubles[series.buckets[bisect_left(DB_SECONDS_BUCKETS, db_seconds)]] += 1.0
                doubles[series.sum] += db_seconds
        finally:
            lock.release()

    def request_exception(self, route: str, method: str) -> None:
        """The handler of a request raised."""
        with self._lock:
            slots = self._route(route, method)
            if slots.exceptions < 0:
                name, help_text = _HTTP_EXCEPTIONS
                slots.exceptions = self.store.counters.slot(mmap_key(
                    name, f"{name}_total", {"route": slots.route, "method": slots.method},
                    help_text))
            self.store.counters.add(slots.exceptions, 1.0)

    def _status_slot(self, slots: _Route, status: int) -> int:
        name, help_text = _HTTP_REQUESTS
        if self._counter_series >= MAX_SERIES:
            status = 0
            if status in slots.statuses:
                return slots.statuses[status]
        self._counter_series += 1
        labels = {"route": slots.route, "method": slots.method,
                  "status": str(status) if status else "other"}
        index = self.store.counters.slot(mmap_key(name, f"{name}_total", labels, help_text))
        slots.statuses[status] = index
        return index

    def _db_slots(self, slots: _Route) -> tuple[_Histogram, _Histogram]:
        route = slots.route
        # The DB histograms are per route only; methods of one route share them.
        first = next((s for (r, _), s in self._routes.items()
                      if r == route and s.db_queries is not None), None)
        if first is not None and first.db_queries is not None and first.db_seconds is not None:
            slots.db_queries, slots.db_seconds = first.db_queries, first.db_seconds
        else:
            labels = {"route": route}
            slots.db_queries = _Histogram(self.store, _HTTP_DB_QUERIES, labels, DB_QUERY_BUCKETS)
            slots.db_seconds = _Histogram(self.store, _HTTP_DB_SECONDS, labels,
                                          DB_SECONDS_BUCKETS)
        return slots.db_queries, slots.db_seconds

    def task_finished(self, task: str, state: str, seconds: float | None) -> None:
        """A Celery task run ended in state (succeeded, failed, retried, ...)."""
        with self._lock:
            hist, counter = _capped(self._tasks, (task, state), (OVERFLOW, state),
                                    self._task_entry)
            self.store.counters.add(counter, 1.0)
            if seconds is not None:
                _observe(self.store.histograms, hist, TASK_BUCKETS, seconds)

    def _task_entry(self, key: tuple[str, str]) -> tuple[_Histogram, int]:
        """A task's duration histogram (one per task, shared by its states) and the counter
        of one of its states."""
        task, state = key
        hist = next((h for (t, _), (h, _) in self._tasks.items() if t == task), None)
        if hist is None:
            hist = _Histogram(self.store, _TASK_DURATION, {"task": task}, TASK_BUCKETS)
        name, help_text = _TASKS
        counter = self.store.counters.slot(mmap_key(
            name, f"{name}_total", {"task": task, "state": state}, help_text))
        return hist, counter

    def collect(self) -> list[Metric]:
        """This process's metrics as families (for single-process mode)."""
        merger = Merger()
        with self._lock:
            for prefix, file in self.store.files().items():
                merger.add(prefix, file.entries())
        return merger.families()

    def close(self) -> None:
        """Stop writing and release the lock file: the exporter folds this process's files."""
        with self._lock:
            self.store.close()


class _State:
    """The process-wide recorder (a holder object rather than module globals)."""

    current: Recorder | None = None
    create_lock = threading.Lock()


def recorder() -> Recorder:
    """This process's recorder, created on first use (after any fork)."""
    rec = _State.current
    if rec is None:
        with _State.create_lock:
            rec = _State.current
            if rec is None:
                rec = _State.current = Recorder(os.environ.get(ENV_DIR) or None)
    return rec


def shutdown() -> None:
    """Close this process's files (worker exit); a later record starts new ones."""
    with _State.create_lock:
        rec, _State.current = _State.current, None
    if rec is not None:
        rec.close()


def _after_fork_in_child() -> None:
    # The child shares the parent's mappings: writing through them would corrupt the parent's
    # values. Drop them (closing our copies of the fds leaves the parent's lock in place) and
    # start fresh files under the child's own identity on first use.
    rec, _State.current = _State.current, None
    _State.create_lock = threading.Lock()
    if rec is not None:
        rec.store.close()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ProcessCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        return recorder().collect()


def collector() -> Collector:
    """A prometheus_client collector serving this process's own values (single-process mode)."""
    return _ProcessCollector()

