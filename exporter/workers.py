"""Worker threads for the HTTP server: started on demand up to a limit, idle ones exit."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("exporter.server")

WORKER_IDLE = 30.0  # a worker thread with nothing to do for this long exits


Job = Callable[[], "Callable[[], None] | None"]


class Pool:
    """Worker threads, started on demand up to a limit; a thread idle for WORKER_IDLE exits,
    so a quiet exporter keeps few threads.

    A job returns what to do after it (handing the answer to the selector), and that runs
    only once the worker is counted idle: the client cannot see its answer, and send the
    next request, before a worker is free for it, so sequential requests never start a
    second thread."""

    class _Worker:
        __slots__ = ("job", "wake")

        def __init__(self) -> None:
            self.job: Job | None = None
            self.wake = threading.Event()

    def __init__(self, limit: int, idle: float = WORKER_IDLE) -> None:
        self.limit = limit
        self.idle = idle
        self._lock = threading.Lock()
        self._threads = 0
        self._waiting: list[Pool._Worker] = []
        self._backlog: collections.deque[Job] = collections.deque()
        self._closed = False

    def submit(self, job: Job) -> None:
        """Run job on an idle worker, a new one, or (all busy at the limit) the next free."""
        with self._lock:
            if self._waiting:
                worker = self._waiting.pop()
                worker.job = job
                worker.wake.set()
            elif self._threads < self.limit:
                self._threads += 1
                threading.Thread(target=self._run, args=(job,), name="http-worker",
                                 daemon=True).start()
            else:
                self._backlog.append(job)

    def threads(self) -> int:
        """Worker threads alive."""
        with self._lock:
            return self._threads

    def close(self) -> None:
        """Let every idle worker exit now, and busy ones after their job."""
        with self._lock:
            self._closed = True
            for worker in self._waiting:
                worker.wake.set()
            self._waiting.clear()

    def _run(self, job: Job | None) -> None:
        me = Pool._Worker()
        try:
            while job is not None:
                then: Callable[[], None] | None = None
                try:
                    then = job()
                except Exception:  # jobs handle their own errors; this is a last resort
                    log.exception("request handler failed")
                job = self._next(me, then)
        finally:
            with self._lock:
                self._threads -= 1

    def _next(self, me: Pool._Worker, then: Callable[[], None] | None) -> Job | None:
        with self._lock:
            job = self._backlog.popleft() if self._backlog else None
            idle = job is None and not self._closed
            if idle:
                me.job = None
                me.wake.clear()
                self._waiting.append(me)
        if then is not None:
            then()
        if not idle:
            return job
        # Returns at once if a job was handed over while `then` ran.
        me.wake.wait(self.idle)
        with self._lock:
            # A job handed over just as the wait timed out is still this worker's.
            if me.job is None and me in self._waiting:
                self._waiting.remove(me)
            return me.job
