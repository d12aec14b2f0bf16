"""The scrape runner: runs the enabled collectors concurrently, timed and isolated."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

# First: it makes prometheus_client import without its package __init__ (exporter/lean.py).
from exporter import lean  # noqa: F401

# isort: split
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter import __version__
from exporter.logs import OnChange

log = logging.getLogger("exporter.scrape")

_Timed = tuple[list[Metric], float]
# Collectors start one after another: the next when the one before has finished, or STAGGER
# seconds after it started, whichever comes first. Quick collectors (all of them, most of the
# time) then never compete for the GIL: six threads handing it to each other cost 10-14% more
# CPU per scrape than the same work in turn (docs/benchmarks.md). A slow or stuck one delays
# each later start by STAGGER at most.
STAGGER = 0.05
_K = TypeVar("_K", bound=Hashable)
_T = TypeVar("_T")


class SingleFlight(Generic[_K, _T]):
    """Concurrent calls with the same key share one run of the work and its result.

    A caller that arrives while a run is under way waits for it instead of starting its own,
    so fifty scrapes waiting on a stuck collector cost one collection (and one encoded body),
    not fifty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[_K, Future[_T]] = {}

    def run(self, key: _K, work: Callable[[], _T]) -> _T:
        """work()'s result (or exception), from this call or from the one already running."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leader:
            return flight.result()
        try:
            result = work()
            flight.set_result(result)
            return result
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._flights[key]


class Collector(Protocol):
    """What the runner needs of a collector."""

    name: str

    def collect(self) -> Iterable[Metric]:
        """Build this scrape's metric families."""


@runtime_checkable
class FailureAware(Protocol):
    """A collector that still has something to say when it fails (an `up 0`)."""

    def failure_metrics(self) -> Iterable[Metric]:
        """Families served instead of collect()'s when it raised or ran out of time."""


@runtime_checkable
class Closable(Protocol):
    """A collector holding connections to release at shutdown."""

    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class Outcome:
    """The result of one collector's last run."""

    success: bool
    duration: float
    error: str
    finished_at: float


class ScrapeRunner:
    """Runs collectors on demand; concurrent callers share one collection."""

    def __init__(
        self,
        collectors: Sequence[Collector],
        timeout: float,
        repeat_interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._collectors = list(collectors)
        self._timeout = timeout
        self._clock = clock
        # One run per collector at most is ever in flight, so this many threads always suffice.
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(self._collectors)), thread_name_prefix="collector"
        )
        self._running: dict[str, Future[_Timed]] = {}
        # A collector's failure is logged once, again when the error changes or after a
        # quiet repeat_interval, and its recovery once.
        self._failure_log = OnChange(repeat_interval, clock)
        self._outcomes: dict[str, Outcome] = {}
        self._flight: SingleFlight[None, list[Metric]] = SingleFlight()

    @property
    def names(self) -> list[str]:
        """The enabled collectors' names, in table order."""
        return [c.name for c in self._collectors]

    def outcomes(self) -> dict[str, Outcome]:
        """Each collector's last outcome (absent before its first run)."""
        return dict(self._outcomes)

    def collect(self) -> list[Metric]:
        """Run every collector once, or join the collection already under way."""
        return self._flight.run(None, self._run_all)

    def _run_all(self) -> list[Metric]:
        started = self._clock()
        deadline = time.monotonic() + self._timeout
        futures: dict[str, Future[_Timed]] = {}
        busy: set[str] = set()
        queue: list[tuple[Collector, Future[_Timed]]] = []
        for collector in self._collectors:
            previous = self._running.get(collector.name)
            if previous is not None and not previous.done():
                # A run stuck past its budget (a paused server): don't pile up threads behind it.
                busy.add(collector.name)
                continue
            run: Future[_Timed] = Future()
            futures[collector.name] = self._running[collector.name] = run
            queue.append((collector, run))
        if queue:
            _Chain(queue, self._timed, self._pool.submit).run(deadline)

        families: list[Metric] = []
        duration = GaugeMetricFamily(
            "qatoolbox_exporter_collector_duration_seconds",
            "Time the collector took in the last scrape.",
            labels=["collector"],
        )
        success = GaugeMetricFamily(
            "qatoolbox_exporter_collector_success",
            "Whether the collector succeeded in the last scrape (1) or failed (0).",
            labels=["collector"],
        )
        for collector in self._collectors:
            name = collector.name
            future = futures.get(name)
            if (future is not None and future.done() and not future.cancelled()
                    and future.exception() is None):
                produced, elapsed = future.result()
                families.extend(produced)
                outcome = Outcome(True, elapsed, "", time.time())
                if self._failure_log.clear(name):
                    log.info("collector recovered", extra={"collector": name})
            else:
                timed_out = f"timed out after {self._timeout:g}s"
                logged = None
                if future is None and name in busy:
                    error = "previous run still in progress"
                    # Still the run that timed out: the same failure, not a new one to log.
                    logged = timed_out
                elif future is not None and future.done() and not future.cancelled():
                    exc = future.exception()
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    error = timed_out
                outcome = Outcome(False, self._clock() - started, error, time.time())
                if self._failure_log.changed(name, logged or error):
                    log.warning("collector failed",
                                extra={"collector": name, "err": logged or error})
                families.extend(self._fallback(collector))
            self._outcomes[name] = outcome
            duration.add_metric([name], outcome.duration)
            success.add_metric([name], 1.0 if outcome.success else 0.0)
        # The budget itself, so that a rule can tell a collector nearing it (any scrape.timeout).
        budget = GaugeMetricFamily(
            "qatoolbox_exporter_scrape_timeout_seconds",
            "Time budget each collector runs under in a scrape (scrape.timeout).",
            value=self._timeout,
        )
        families.extend([duration, success, budget, _build_info()])
        return families

    def _timed(self, collector: Collector) -> _Timed:
        started = self._clock()
        result = list(collector.collect())
        return result, self._clock() - started

    def _fallback(self, collector: Collector) -> list[Metric]:
        if not isinstance(collector, FailureAware):
            return []
        try:
            return list(collector.failure_metrics())
        except Exception:
            log.exception("failure_metrics raised", extra={"collector": collector.name})
            return []

    def close(self) -> None:
        """Stop the pool without waiting for stuck runs, then release collectors' connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for collector in self._collectors:
            if isinstance(collector, Closable):
                try:
                    collector.close()
                except Exception:
                    log.exception("close failed", extra={"collector": collector.name})


class _Chain:
    """One collection's collectors, run one after another by as few threads as can be.

    A pool thread takes the next collector as soon as the one before is done, so quick
    collectors (all of them, most of the time) run back to back on one thread, handed over
    once, and the caller is woken once, when the last is done (a hand-over per collector cost
    the serving thread 0.6 ms per scrape in thread switches). When the collector running has
    run for STAGGER with others still waiting (a slow or stuck one), the caller starts
    another thread on the next: a collector stuck on a paused server holds only its own
    thread, and delays each later start by STAGGER at most.
    """

    def __init__(self, queue: list[tuple[Collector, Future[_Timed]]],
                 timed: Callable[[Collector], _Timed],
                 submit: Callable[[Callable[[], None]], object]) -> None:
        self._queue = queue
        self._timed = timed
        self._submit = submit
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next collector to take
        self._done = 0
        self._taken_at = 0.0  # when the last collector was taken
        self._starting = 0  # threads submitted that have not taken a collector yet

    def run(self, deadline: float) -> None:
        """Run every collector, or return at the deadline with those running still running
        (the ones not started by then are cancelled: they count as timed out)."""
        cond = self._cond
        queue = self._queue
        with cond:
            self._start()
            while self._done < len(queue):
                now = time.monotonic()
                if now >= deadline:
                    for _, future in queue[self._next:]:
                        future.cancel()
                    self._next = len(queue)
                    return
                wait = deadline - now
                if self._next < len(queue):
                    # Woken at least every STAGGER while collectors wait to be taken.
                    stalled_for = now - self._taken_at
                    if stalled_for >= STAGGER and not self._starting:
                        self._start()
                        continue
                    wait = min(wait, STAGGER - stalled_for if stalled_for < STAGGER else STAGGER)
                cond.wait(wait)

    def _start(self) -> None:
        """Another thread for the chain (the lock held)."""
        self._starting += 1
        self._submit(self._work)

    def _work(self) -> None:
        cond = self._cond
        queue = self._queue
        starting = True
        while True:
            with cond:
                if starting:
                    self._starting -= 1
                    starting = False
                if self._next >= len(queue):
                    return
                collector, future = queue[self._next]
                self._next += 1
                self._taken_at = time.monotonic()
            if future.set_running_or_notify_cancel():
                try:
                    result = self._timed(collector)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with cond:
                self._done += 1
                if self._done == len(queue):
                    cond.notify_all()


def _build_info() -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "qatoolbox_exporter_build_info",
        "Version of the exporter and of the Python it runs on; always 1.",
        labels=["version", "python_version"],
    )
    # What platform.python_version() says, without the platform module (~0.15 MB resident).
    info.add_metric([__version__, sys.version.split()[0]], 1.0)
    return info
