"""The exporter's HTTP server: the metrics path, a landing page and /healthz.

The transport (connections, TLS, deadlines, the strict HTTP/1.1 parser) is exporter.httploop's
and exporter.httpmessage's; this module decides what each request gets: the web config's rate
limit and basic auth, a bounded number of requests in progress, and the metrics body, in the
format the scraper negotiates (exporter.textformat, the one negotiation and the encoders),
shared by every scrape that waits on the same collection.
"""

from __future__ import annotations

import gzip
import logging
import math
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from exporter import textformat
from exporter.config import WebConfig, split_listen_address
from exporter.httpconn import IDLE_TIMEOUT, IN_WORKER, Conn, connection_limit, listen_backlog
from exporter.httploop import ConnectionLoop
from exporter.httpmessage import (
    MAX_HEADER_BYTES,
    MAX_REQUEST_LINE,
    Request,
    Response,
    accepts_gzip,
    head,
    plain,
)
from exporter.landing import LandingPage
from exporter.logs import Throttled
from exporter.scrape import ScrapeRunner, SingleFlight
from exporter.webconfig import WebConfigFile, WebSecurity
from exporter.webconfig_auth import AuthGuard
from exporter.workers import Pool

# Re-exported: the parser's limits are read from here (tests, docs).
__all__ = ["MAX_HEADER_BYTES", "MAX_REQUEST_LINE", "ExporterHTTPServer"]

log = logging.getLogger("exporter.server")

_LANDING_TYPE = "text/html; charset=utf-8"


class _RunnerCollector:
    """The scrape runner as the encoders' source: anything with collect() will do, so no
    prometheus_client registry (and none of its package) is needed on the serving path."""

    def __init__(self, runner: ScrapeRunner) -> None:
        self._runner = runner

    def collect(self) -> Iterable[Any]:
        return self._runner.collect()


class ExporterHTTPServer(ConnectionLoop):
    """The exporter's HTTP server: knows the runner and the web settings."""

    def __init__(self, web: WebConfig, runner: ScrapeRunner,
                 security: WebConfigFile | None = None, *,
                 max_connections: int | None = None, idle_timeout: float = IDLE_TIMEOUT,
                 auth_guard: AuthGuard | None = None) -> None:
        host, port = split_listen_address(web.listen_address)
        self.web = web
        self.runner = runner
        self.source: textformat.Source = _RunnerCollector(runner)
        self.landing = LandingPage(runner, web)  # cli.py gives it the whole config
        self.security = security
        self.header_timeout = min(float(web.header_timeout), float(web.read_timeout))
        self.idle_timeout = idle_timeout
        self.auth_guard = auth_guard or AuthGuard()
        self.max_connections = max(
            max_connections if max_connections is not None else connection_limit(),
            web.max_requests + self.auth_guard.capacity + 8)
        self.request_queue_size = listen_backlog()
        self._expositions: SingleFlight[tuple[str, bool], bytes] = SingleFlight()
        self._slots_lock = threading.Lock()
        self._in_progress = 0
        self._pool = Pool(web.max_requests + self.auth_guard.capacity)
        self._busy = Throttled(log, logging.WARNING,
                               "web.max_requests requests in progress; answering 503")
        self._guessing = Throttled(log, logging.WARNING,
                                   "too many failed basic auth attempts; answering 429")
        self._start_loop(host, port)
        self._throttles += (self._busy, self._guessing)

    def set_runner(self, runner: ScrapeRunner) -> None:
        """Serve this runner's collections from now on (set before serve_forever)."""
        self.runner = runner
        self.source = _RunnerCollector(runner)
        self.landing = LandingPage(runner, self.web)

    def security_settings(self) -> WebSecurity:
        """The web config in force (empty without --web.config.file)."""
        return self.security.current() if self.security is not None else _NO_SECURITY

    def _pool_close(self) -> None:
        self._pool.close()

    def requests_in_progress(self) -> int:
        """Requests holding one of the web.max_requests slots."""
        with self._slots_lock:
            return self._in_progress

    def worker_threads(self) -> int:
        """Worker threads alive."""
        return self._pool.threads()

    # --- the metrics body ---

    def exposition(self, content_type: str, gzipped: bool) -> bytes:
        """The metrics body in one format. Requests that arrive while it is being built (all
        the scrapes queued behind a stuck collector) share that body: one encoding and one
        compression for all of them, not one each, so a burst of waiting scrapes does not
        raise the exporter's memory high-water mark."""

        encoder = textformat.encoder_for(content_type)

        def build() -> bytes:
            try:
                body = encoder(self.source)
            except Exception:
                log.exception("scrape failed")
                raise
            return gzip.compress(body, compresslevel=1) if gzipped else body

        return self._expositions.run((content_type, gzipped), build)

    # --- what each request gets ---

    def _dispatch(self, conn: Conn, request: Request) -> None:
        conn.requests += 1
        security = conn.security = self.security_settings()
        if request.method not in ("GET", "HEAD"):
            self._log_request(conn, request, 405)
            self._answer(conn, request, plain(405, "Method Not Allowed\n",
                                              ("Allow", "GET, HEAD")))
            return
        if request.path == "/healthz":
            self._log_request(conn, request, 200)
            self._answer(conn, request, plain(200, "OK\n"))
            return
        limiter = security.rate_limiter
        if limiter is not None and not limiter.allow():
            # Before the credentials check too: it also slows down password guessing.
            self._log_request(conn, request, 429)
            self._answer(conn, request, plain(
                429, "Too Many Requests\n",
                ("Retry-After", str(max(1, math.ceil(limiter.interval))))))
            return
        credentials: bytes | None = None
        if security.authenticator is not None:
            verdict = security.authenticator.precheck(request.header("authorization"))
            if verdict is False:
                self._log_request(conn, request, 401)
                self._answer(conn, request, _unauthorized())
                return
            if isinstance(verdict, bytes):
                refusal = self.auth_guard.admit(conn.client)
                if refusal is not None:
                    status, retry = refusal
                    if status == 429:
                        self._guessing(conn.client)
                    self._log_request(conn, request, status)
                    self._answer(conn, request, plain(
                        status, HTTPStatus(status).phrase + "\n",
                        ("Retry-After", str(max(1, math.ceil(retry))))))
                    return
                credentials = verdict
        if credentials is None and not self._take_slot():
            self._refuse_busy(conn, request)
            return
        self._handoff(conn, request, security, credentials)

    def _take_slot(self) -> bool:
        with self._slots_lock:
            if self._in_progress >= self.web.max_requests:
                return False
            self._in_progress += 1
            return True

    def _release_slot(self) -> None:
        with self._slots_lock:
            self._in_progress -= 1

    def _refuse_busy(self, conn: Conn, request: Request) -> None:
        self._busy(conn.client, max_requests=self.web.max_requests)
        self._log_request(conn, request, 503)
        self._answer(conn, request, plain(503, "Too many concurrent requests\n",
                                          ("Retry-After", "1")))

    def _handoff(self, conn: Conn, request: Request, security: WebSecurity,
                 credentials: bytes | None) -> None:
        self._want(conn, 0)
        self._waiting.pop(conn, None)
        conn.state = IN_WORKER
        self._pool.submit(lambda: self._work(conn, request, security, credentials))

    def _work(self, conn: Conn, request: Request, security: WebSecurity,
              credentials: bytes | None) -> Callable[[], None]:
        """In a worker: the request's bcrypt check if it needs one, then its answer, which
        the selector writes (the slot is held until it is written, so the bodies in memory
        stay bounded by web.max_requests, while a slow reader holds no thread)."""
        close = not request.keep_alive
        slot = credentials is None  # the selector took it
        data: tuple[bytes, ...] = ()
        try:
            if credentials is not None and security.authenticator is not None:
                ok = self.auth_guard.verify(security.authenticator, credentials, conn.client)
                if ok is None:
                    response = plain(503, "Service Unavailable\n", ("Retry-After", "1"))
                elif not ok:
                    response = _unauthorized()
                elif not self._take_slot():
                    self._busy(conn.client, max_requests=self.web.max_requests)
                    response = plain(503, "Too many concurrent requests\n",
                                     ("Retry-After", "1"))
                else:
                    slot = True
                    response = self._respond(request)
            else:
                response = self._respond(request)
            self._log_request(conn, request, response.status)
            close = close or response.close
            data_head = head(response, security, close, request)
            data = (data_head,) if request.method == "HEAD" else (data_head, response.body)
        except Exception:
            log.exception("request handler failed", extra={"client": conn.client})
            data = ()
        conn.slot = slot and bool(data)
        if slot and not data:
            self._release_slot()
        return lambda: self._give_back(conn, data, close)

    def _respond(self, request: Request) -> Response:
        path = request.path
        if path == self.web.telemetry_path:
            content_type, _ = textformat.negotiate(request.joined("accept"))
            gzipped = accepts_gzip(request.joined("accept-encoding"))
            try:
                body = self.exposition(content_type, gzipped)
            except Exception:
                return plain(500, "Scrape failed\n")
            return Response(200, body, content_type,
                            [("Content-Encoding", "gzip")] if gzipped else [])
        if path == "/":
            return Response(200, self.landing.render(), _LANDING_TYPE)
        return plain(404, "Not Found\n")

    def _log_request(self, conn: Conn, request: Request, status: int) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"client": conn.client, "method": request.method,
                                        "path": request.path[:200], "status": status})


def _unauthorized() -> Response:
    return plain(401, "Unauthorized\n",
                 ("WWW-Authenticate", 'Basic realm="qatoolbox-exporter", charset="UTF-8"'))


_NO_SECURITY = WebSecurity()
