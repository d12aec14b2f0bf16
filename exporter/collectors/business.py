"""Business collector: declarative SQL queries whose rows become metrics, run in the background."""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
from prometheus_client.core import Metric

from exporter import pgconn
from exporter.collectors.business_config import (
    BusinessConfig,
    BusinessQuery,
    fill_placeholders,
    parse_requirement,
)
from exporter.collectors.business_results import (
    MAX_FOLDED_ROWS,
    Connection,
    LabelFolder,
    QueryError,
    Sample,
    capped_rows,
    end_run,
    fetch_rows,
    highest_id,
    is_superuser,
    missing_requirements,
    next_range,
    read_catalog,
    result_samples,
    status_families,
)
from exporter.collectors.postgres_config import PostgresConfig
from exporter.logs import OnChange

log = logging.getLogger("exporter.business")

# The client gives up on a query this long after its statement_timeout should have ended it:
# only a server that stopped answering (paused, partitioned) gets this far.
ABORT_GRACE = 2.0
# A failed query runs again after min(interval, RETRY_AFTER), so recovery shows up quickly.
RETRY_AFTER = 10.0
# After a failed connection attempt, the queries queued with it fail at once instead of each
# waiting for its own connect timeout against a database that is down.
CONNECT_BACKOFF = 1.0
# Each session is read-only from its start packet, not only from psycopg's BEGIN READ ONLY, so
# nothing in a query's text can leave a read-only transaction for a writable one. Standard
# conforming strings are what the load-time check (business_sql) assumes of '' literals.
SESSION_OPTIONS = "-c default_transaction_read_only=on -c standard_conforming_strings=on"
# SET LOCAL: both end with the transaction, like everything else here. A cursor is planned
# for its first rows (cursor_tuple_fraction 0.1); 1 plans it as the plain query is planned.
SET_LOCALS = ("SELECT set_config('statement_timeout', %s, true), "
              "set_config('cursor_tuple_fraction', '1', true)")
CURSOR_NAME = "qatoolbox_business"
SUPERUSER_HINT = ("connect as the least-privilege role of docs/reliability.md "
                  "(DB_USER=qatoolbox_exporter), or set business.allow_superuser: true")

class UnreachableError(QueryError):
    """PostgreSQL could not be reached (or stopped answering): the query did not run, nor
    will any other until it is back; reason is one of pgconn.REASONS."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RefusedError(QueryError):
    """Business queries are not run on this server at all (the role is a superuser)."""


class NotApplicableError(Exception):
    """What the query reads is not in this database (listed in the message): it is not run."""


@dataclass
class _State:
    """What the collector knows of one query, guarded by the collector's lock."""

    query: BusinessQuery
    samples: list[Sample] | None = None  # what is served; None after a failure
    duration: float = 0.0
    last_success: float = 0.0  # wall clock
    due: float = 0.0  # monotonic time after which the next run may start
    queued: bool = False  # waiting for a worker or running
    error: str | None = None
    # The reason (pgconn.REASONS) when the last run failed because PostgreSQL could not be
    # reached: then the collector's summary line says it, not one line per query.
    unreachable: str | None = None
    # When it last failed to reach PostgreSQL (the summary counts failures since the last
    # good connection only, not those of queries that have not run again since).
    unreachable_at: float = -math.inf
    # True, or False while a table or column it requires is missing; None until the
    # catalog was first read for a query that requires something.
    applicable: bool | None = True
    # A watermark query: (counted up to, highest id seen), the folder of its labels and the
    # counter values it serves (never lower than before).
    watermark: tuple[int, int] | None = None
    folder: LabelFolder | None = None
    totals: dict[tuple[str, ...], float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Result:
    """What one run of a query produced: its samples and, for a watermark query, the new
    (counted up to, highest id seen)."""

    samples: list[Sample]
    watermark: tuple[int, int] | None = None


class BusinessCollector:
    """Metrics from SQL queries in the config (QAToolBox's defaults unless replaced), each run
    as the body of a cursor in a read-only transaction on the collector's own read-only
    sessions, every `interval`, in the background: a scrape serves the latest results and
    never waits for a query. Nothing runs as a superuser unless the config allows it.

    qatoolbox_users{state="active"} 1520
    qatoolbox_chat_messages_total{message_type="text"} 88211
    qatoolbox_business_up 1
    qatoolbox_business_superuser_refused 0
    qatoolbox_business_query_success{query="qatoolbox_users"} 1
    qatoolbox_business_query_duration_seconds{query="qatoolbox_users"} 0.0021
    qatoolbox_business_query_last_success_timestamp_seconds{query="qatoolbox_users"} 1.7e+09
    qatoolbox_business_query_applicable{query="qatoolbox_time_capsules"} 0
    """

    name = "business"

    def __init__(
        self,
        cfg: BusinessConfig,
        postgres: PostgresConfig,
        repeat_interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pg = postgres
        self._clock = clock
        self._lock = threading.Lock()
        self._states = [_State(q, applicable=None if q.requires else True)
                        for q in cfg.all_queries()]
        for state in self._states:
            if state.query.watermark:
                state.folder = LabelFolder(state.query)
                state.totals = dict.fromkeys(state.folder.zero_filled, 0.0)
        # Tables and columns that exist, of those the queries require: {table: columns}, read
        # at most every applicability_interval (a migration may add or drop one meanwhile).
        self._requirements = {q.metric: [r for r in map(parse_requirement, q.requires) if r]
                              for q in cfg.all_queries()}
        self._tables = sorted({table for needs in self._requirements.values()
                               for table, _ in needs})
        self._applicability_interval = cfg.applicability_interval
        self._catalog: dict[str, set[str]] | None = None
        self._catalog_at = -math.inf
        self._catalog_lock = threading.Lock()
        self._queue: queue.Queue[_State | None] = queue.Queue()
        self._idle: list[Connection] = []
        # Cuts the connection of a run the server stopped answering (one thread for all).
        self._watchdog = pgconn.Watchdog(name="business-watchdog")
        self._up = False
        # Why PostgreSQL cannot be reached (pgconn.REASONS) while up is 0; None otherwise.
        self._reason: str | None = None
        self._allow_superuser = cfg.allow_superuser
        # (monotonic time, message, seconds) of the last failed or refused connection: the
        # next attempt waits that many seconds, and queries fail at once meanwhile.
        self._connect_failure: tuple[float, str, float, str] | None = None
        self._connected_at = -math.inf  # when a connection last succeeded
        self._refused = False
        # Per query, and for the collector ("unreachable", "superuser"): logged when a failure
        # starts or changes and again after repeat_interval, and on recovery.
        self._query_log = OnChange(repeat_interval, clock)
        self._collector_log = OnChange(repeat_interval, clock)
        self._closed = False
        if cfg.allow_superuser and self._states:
            log.warning("business.allow_superuser is set: business queries run even as a "
                        "PostgreSQL superuser, whom a read-only transaction does not stop "
                        "(pg_terminate_backend, lo_export, pg_read_file)")
        # Daemon threads: a query stuck at exit must not hold the process up.
        self._workers = [
            threading.Thread(target=self._work, name=f"business-{i}", daemon=True)
            for i in range(cfg.concurrency)
        ]
        for worker in self._workers:
            worker.start()
        with self._lock:
            self._schedule(self._clock())

    # --- scrape side: never touches the database ---------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Serve the latest results and queue the queries whose interval has passed."""
        with self._lock:
            self._schedule(self._clock())
            snapshot = [(s.query, s.samples, s.duration, s.last_success, s.applicable)
                        for s in self._states]
            up, refused, reason = self._up, self._refused, self._reason
        yield from status_families(snapshot, up, refused, reason)

    def _schedule(self, now: float) -> None:
        """Queue every due query that is not queued already (caller holds the lock)."""
        if self._closed:
            return
        for state in self._states:
            if not state.queued and now >= state.due:
                state.queued = True
                self._queue.put(state)

    # --- worker side ----------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                state = self._queue.get()
                if state is None or self._closed:
                    return
                self._run(state)
        finally:
            # A bug that escaped _run ends this thread (threading prints the traceback);
            # a replacement keeps the pool at its size.
            if not self._closed and sys.exc_info()[0] is not None:
                threading.Thread(target=self._work, name=threading.current_thread().name,
                                 daemon=True).start()

    def _run(self, state: _State) -> None:
        query = state.query
        started = self._clock()
        result: _Result | None = None
        error: str | None = "internal error (traceback on stderr)"
        quiet = False
        missing: str | None = None
        unreachable: str | None = None
        try:
            result = self._execute(state)
            error = None
        except RefusedError:
            quiet = True  # logged once for the collector, not once per query
        except NotApplicableError as exc:
            missing, error = str(exc), None
        except (psycopg.Error, QueryError) as exc:
            error = pgconn.describe_error(exc, self._pg)
            if isinstance(exc, UnreachableError):
                unreachable = exc.reason
        finally:
            finished = self._clock()
            with self._lock:
                state.queued = False
                state.duration = finished - started
                if missing is not None:
                    if state.applicable is not False:
                        log.info("business query not applicable: not run while what it reads "
                                 "is missing", extra={"query": query.metric, "missing": missing})
                    state.applicable, state.samples, state.error = False, None, None
                    state.unreachable = None
                    self._query_log.clear(query.metric)
                    state.due = finished + self._applicability_interval
                else:
                    if result is not None and state.applicable is False:
                        log.info("business query applicable again",
                                 extra={"query": query.metric})
                    if result is not None:
                        state.applicable = True
                    state.samples = self._served(state, result)
                    if result is not None:
                        state.last_success = time.time()
                        state.due = finished + query.interval
                    else:
                        state.due = finished + min(query.interval, RETRY_AFTER)
                    if not quiet:
                        self._log_outcome(state, error, unreachable)

    @staticmethod
    def _served(state: _State, result: _Result | None) -> list[Sample] | None:
        """What a run leaves to serve (caller holds the lock): its samples, or for a watermark
        query the counters with this run's counts added."""
        if result is None:
            return None
        if not state.query.watermark:
            return result.samples
        for labels, count in result.samples:
            state.totals[labels] = state.totals.get(labels, 0.0) + count
        state.watermark = result.watermark
        return list(state.totals.items())

    def _log_outcome(self, state: _State, error: str | None, unreachable: str | None) -> None:
        """A query's failure is logged when it starts, changes or keeps failing for
        repeat_interval, and its recovery once; a failure to reach PostgreSQL only at debug,
        as the collector logs one summary for all queries (caller holds the lock)."""
        metric = state.query.metric
        was_unreachable = state.unreachable is not None
        state.error, state.unreachable = error, unreachable
        if unreachable is not None:
            state.unreachable_at = self._clock()
        if error is None:
            if self._query_log.clear(metric):
                log.log(logging.DEBUG if was_unreachable else logging.INFO,
                        "business query recovered", extra={"query": metric})
        elif self._query_log.changed(metric, error):
            log.log(logging.DEBUG if unreachable else logging.WARNING,
                    "business query failed", extra={"query": metric, "err": error})
        self._summarise()

    def _summarise(self) -> None:
        """One line for the queries that failed because PostgreSQL could not be reached, once
        none of them is still running: "10 business queries failed: <why>"; again when the
        reason changes or after repeat_interval (caller holds the lock)."""
        failed = [s for s in self._states
                  if s.unreachable is not None and s.unreachable_at >= self._connected_at]
        if not failed or any(s.queued for s in self._states):
            return
        reason = failed[-1].unreachable
        if self._collector_log.changed("unreachable", reason):
            noun = "query" if len(failed) == 1 else "queries"
            log.warning(f"{len(failed)} business {noun} failed: {failed[-1].error}",
                        extra={"reason": reason, "queries": len(failed)})

    def _execute(self, state: _State) -> _Result:
        conn, reused = self._connection()
        try:
            return self._execute_on(conn, state)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
            # A migration may have dropped what the query reads since the catalog was read:
            # read it again now, so a query that no longer applies does not count as failing.
            if not state.query.requires:
                raise
            with self._catalog_lock:
                self._catalog_at = -math.inf
            conn, _ = self._connection()
        except psycopg.OperationalError:
            # A pooled connection may have died while idle (a database restart): that says
            # nothing about the query, so it gets one try on a fresh connection.
            if not (reused and conn.broken):
                raise
            conn, _ = self._connection(fresh=True)
        return self._execute_on(conn, state)

    def _check_applicable(self, conn: Connection, query: BusinessQuery) -> None:
        """Raise NotApplicableError when a table or column the query requires is missing,
        reading the catalog first when the last reading is older than applicability_interval."""
        with self._catalog_lock:
            if self._catalog is None or \
                    self._clock() - self._catalog_at >= self._applicability_interval:
                self._catalog = read_catalog(conn, self._tables, query.timeout)
                self._catalog_at = self._clock()
            catalog = self._catalog
        gaps = missing_requirements(self._requirements[query.metric], catalog)
        if gaps:
            raise NotApplicableError(", ".join(gaps))

    def _execute_on(self, conn: Connection, state: _State) -> _Result:
        query = state.query
        if query.requires:
            try:
                self._check_applicable(conn, query)
            except NotApplicableError:
                self._release(conn, not conn.broken)
                raise
            except psycopg.Error:
                self._release(conn, False)
                raise
        watched = self._watchdog.arm(conn.fileno(), time.monotonic() + query.timeout + ABORT_GRACE)
        reusable = False
        # A named cursor: DECLARE goes through the extended protocol (Parse/Bind/Execute),
        # which refuses a second statement in the text, and PostgreSQL takes nothing but a
        # plain SELECT (no data-modifying WITH, no SELECT INTO) as a cursor's body. Its rows
        # then come FETCH_BATCH at a time instead of all at once.
        cursor = conn.cursor(name=CURSOR_NAME)
        deadline = time.monotonic() + query.timeout
        watermark: tuple[int, int] | None = None
        try:
            conn.execute(SET_LOCALS, [f"{max(1, round(query.timeout * 1000))}ms"])
            text = query.sql
            if query.watermark:
                highest = highest_id(conn, query.watermark)
                after, upto = next_range(state.watermark, highest)
                text = fill_placeholders(text, {"after": str(after), "upto": str(upto)})
                watermark = (upto, highest)
            cursor.execute(text.encode("utf-8"))
            if cursor.description is None:
                raise QueryError("the statement returned no result set")
            columns = [column.name for column in cursor.description]
            if query.label_values:
                rows = capped_rows(fetch_rows(conn, cursor, MAX_FOLDED_ROWS + 1, deadline),
                               MAX_FOLDED_ROWS)
            else:
                rows = fetch_rows(conn, cursor, query.max_rows + 1, deadline)
            samples = result_samples(query, columns, rows, state.folder)
            reusable = end_run(conn)
        except QueryError:  # the server answered; the result does not fit the declaration
            self._set_up(True)
            reusable = end_run(conn)
            raise
        except psycopg.Error as exc:
            if self._watchdog.disarm(watched):
                self._set_up(False, "timeout")
                raise UnreachableError(f"no answer from PostgreSQL within "
                                       f"{query.timeout + ABORT_GRACE:g}s; connection dropped",
                                       "timeout") from exc
            # An SQL error came from a live server; a broken connection means it went away.
            self._set_up(not conn.broken, pgconn.reason(exc))
            if not conn.broken:
                reusable = end_run(conn)
            raise
        finally:
            if self._watchdog.disarm(watched):
                reusable = False  # cut just after the last answer: the connection is gone
            try:
                # After the rollback: closing a cursor of a finished transaction is free.
                cursor.close()
            except psycopg.Error:
                reusable = False
            self._release(conn, reusable)
        self._set_up(True)
        return _Result(samples, watermark)

    def _set_up(self, up: bool, reason: str | None = None) -> None:
        with self._lock:
            self._up = up
            self._reason = None if up else reason

    def _connection(self, fresh: bool = False, retry: bool = True) -> tuple[Connection, bool]:
        """An idle pooled connection (reused True) or a new one. A connection attempt that
        fails after another worker's attempt succeeded (it started while PostgreSQL was not
        answering, and timed out after it came back) is tried once more rather than reported
        as PostgreSQL unreachable."""
        with self._lock:
            if self._idle and not fresh:
                return self._idle.pop(), True
            failure, refused = self._connect_failure, self._refused
        if failure is not None and self._clock() - failure[0] < failure[2]:
            if refused:
                raise RefusedError(failure[1])
            raise UnreachableError(failure[1], failure[3])
        params = pgconn.connect_params(self._pg, "qatoolbox-exporter-business", SESSION_OPTIONS)
        conn: Connection | None = None
        started = self._clock()
        try:
            conn = pgconn.connect(params)
            superuser = is_superuser(conn)
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            message = f"cannot connect: {pgconn.describe_error(exc, self._pg)}"
            reason = pgconn.reason(exc)
            with self._lock:
                stale = retry and self._connected_at > started
                if not stale:
                    self._connect_failure = (self._clock(), message, CONNECT_BACKOFF, reason)
                    self._up, self._reason = False, reason
            if stale:
                return self._connection(fresh, retry=False)
            raise UnreachableError(message, reason) from exc
        if superuser and not self._allow_superuser:
            role = conn.info.user
            conn.close()
            self._refuse(role)
        conn.read_only = True  # every transaction starts with BEGIN READ ONLY too
        with self._lock:
            self._connect_failure = None
            self._connected_at = self._clock()
            if self._refused:
                log.info("business queries run again: the PostgreSQL role is no longer a "
                         "superuser", extra={"user": conn.info.user})
            self._up, self._refused, self._reason = True, False, None
            self._collector_log.clear("superuser")
            if self._collector_log.clear("unreachable"):
                log.info("business queries reach PostgreSQL again")
        return conn, False

    def _refuse(self, role: str) -> None:
        """Refuse to run queries as the superuser role: one error line now and after each
        repeat_interval while it lasts, not one per query; queries fail at once for
        RETRY_AFTER seconds before the next connection checks again."""
        message = f'refused: role "{role}" is a PostgreSQL superuser'
        with self._lock:
            self._connect_failure = (self._clock(), message, RETRY_AFTER, "other")
            self._up, self._refused, self._reason = False, True, None
            if self._collector_log.changed("superuser", role):
                log.error("business queries refused: the PostgreSQL role is a superuser, "
                          "whom a read-only transaction does not stop", extra={
                              "user": role, "hint": SUPERUSER_HINT})
        raise RefusedError(message)

    def _release(self, conn: Connection, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed and not conn.closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self, timeout: float = 0.0) -> None:
        """Stop the workers, cut running queries and close idle connections; wait up to
        timeout seconds for the workers to end (the runner does not wait)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _ in self._workers:
            self._queue.put(None)
        self._watchdog.fire()
        for conn in idle:
            conn.close()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._watchdog.stop()
