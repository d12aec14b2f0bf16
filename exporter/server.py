"""HTTP server: the metrics path, a landing page and /healthz."""

from __future__ import annotations

import gzip
import html
import io
import logging
import math
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, generate_latest

from exporter import __version__, textformat
from exporter.config import WebConfig, split_listen_address
from exporter.scrape import ScrapeRunner, SingleFlight
from exporter.webconfig import WebConfigFile, WebSecurity

log = logging.getLogger("exporter.server")

# A scraper's request is a few hundred bytes: anything near these limits is not one.
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 8192
_PLAIN_503_HEAD = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                   b"Content-Length: 29\r\nRetry-After: 1\r\nConnection: close\r\n")
_PLAIN_503_BODY = b"\r\nToo many concurrent requests\n"


class _RunnerCollector:
    """Adapts the scrape runner to a prometheus_client registry."""

    def __init__(self, runner: ScrapeRunner) -> None:
        self._runner = runner

    def describe(self) -> Iterable[Metric]:
        # Nothing at registration: describing would run every collector (and hit PostgreSQL).
        return []

    def collect(self) -> Iterable[Metric]:
        return self._runner.collect()


def make_registry(runner: ScrapeRunner) -> CollectorRegistry:
    """The exporter's own registry, holding only the scrape runner."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RunnerCollector(runner))
    return registry


def _landing_page(runner: ScrapeRunner, telemetry_path: str) -> bytes:
    outcomes = runner.outcomes()
    rows = []
    for name in runner.names:
        outcome = outcomes.get(name)
        if outcome is None:
            state, took = "not run yet", ""
        else:
            state = "ok" if outcome.success else "failed: " + outcome.error
            took = f"{outcome.duration * 1000:.1f} ms"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(state)}</td><td>{took}</td></tr>"
        )
    path = html.escape(telemetry_path)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>qatoolbox-exporter</title></head>
<body>
<h1>qatoolbox-exporter</h1>
<p>Version {html.escape(__version__)}</p>
<p><a href="{path}">Metrics</a> &middot; <a href="/healthz">Health</a></p>
<table border="1" cellpadding="4">
<tr><th>Collector</th><th>Last run</th><th>Duration</th></tr>
{''.join(rows)}
</table>
</body></html>
"""
    return page.encode()


class _DeadlineReader(io.RawIOBase):
    """Socket reads that must all finish by one deadline, so a client trickling bytes
    (slowloris) cannot hold a worker longer than the read timeout."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within the read timeout")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: ExporterHTTPServer
    protocol_version = "HTTP/1.1"
    # Errors found before the version is parsed still get a status line (not a bare body).
    default_request_version = "HTTP/1.1"
    server_version = f"qatoolbox-exporter/{__version__}"
    sys_version = ""

    def version_string(self) -> str:
        # The base class appends " " + sys_version: a trailing space in every Server header.
        return self.server_version

    def setup(self) -> None:
        super().setup()
        # A slow or silent client cannot hold a thread longer than the read timeout.
        self.connection.settimeout(self.server.web.read_timeout)
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self.security = self.server.security_settings()

    def handle_one_request(self) -> None:
        """One request, with size limits and a single deadline for its line and headers;
        every method other than GET and HEAD gets 405 (the base class answers 501)."""
        self._reader.deadline = time.monotonic() + self.server.web.read_timeout
        self.security = self.server.security_settings()
        self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.close_connection = True
                self.send_error(414)
                return
            block = self._header_block()
            if block is None:
                self.close_connection = True
                self.send_error(431)
                return
            rfile, self.rfile = self.rfile, io.BytesIO(block)
            try:
                parsed = self.parse_request()
            finally:
                self.rfile = rfile
            if not parsed:
                self.close_connection = True
                return
            # The response gets the whole read timeout for itself.
            self.connection.settimeout(self.server.web.read_timeout)
            if self.headers.get("Content-Length", "0").strip() not in ("", "0") or \
                    "Transfer-Encoding" in self.headers:
                # A body is never read: the connection cannot carry another request after it.
                self.close_connection = True
            if self.command in ("GET", "HEAD"):
                self._serve(head=self.command == "HEAD")
            else:
                self._not_allowed()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True

    def _header_block(self) -> bytes | None:
        """The raw header lines up to the blank line, or None when over MAX_HEADER_BYTES."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_BYTES - size + 1)
            size += len(line)
            if size > MAX_HEADER_BYTES:
                return None
            lines.append(line)
            if line in (b"\r\n", b"\n", b""):
                return b"".join(lines)

    def end_headers(self) -> None:
        for name, value in self.security.headers:
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("request", extra={"client": self.client_address[0], "line": format % args})

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._send(405, b"Method Not Allowed\n", "text/plain; charset=utf-8",
                   headers={"Allow": "GET, HEAD"})

    def _serve(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"OK\n", "text/plain; charset=utf-8", head)
            return
        limiter = self.security.rate_limiter
        if limiter is not None and not limiter.allow():
            # Before the credentials check too: it also slows down password guessing.
            self._send(429, b"Too Many Requests\n", "text/plain; charset=utf-8", head,
                       {"Retry-After": str(max(1, math.ceil(limiter.interval)))})
            return
        if not self.server.slots.acquire(blocking=False):
            self._send(503, b"Too many concurrent requests\n", "text/plain; charset=utf-8", head,
                       {"Retry-After": "1"})
            return
        try:
            authenticator = self.security.authenticator
            # Inside the slot: bcrypt work for bad credentials is bounded like any request.
            if authenticator is not None and \
                    not authenticator.check_header(self.headers.get("Authorization")):
                self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", head,
                           {"WWW-Authenticate": 'Basic realm="qatoolbox-exporter", '
                                                'charset="UTF-8"'})
            elif path == self.server.web.telemetry_path:
                self._metrics(head)
            elif path == "/":
                body = _landing_page(self.server.runner, self.server.web.telemetry_path)
                self._send(200, body, "text/html; charset=utf-8", head)
            else:
                self._send(404, b"Not Found\n", "text/plain; charset=utf-8", head)
        finally:
            self.server.slots.release()

    def _metrics(self, head: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        if encoder is generate_latest:
            encoder = textformat.generate_latest  # same bytes, a fraction of the time
        gzipped = _accepts_gzip(self.headers.get("Accept-Encoding", ""))
        try:
            body = self.server.exposition(encoder, gzipped)
        except Exception:
            self._send(500, b"Scrape failed\n", "text/plain; charset=utf-8", head)
            return
        self._send(200, body, content_type, head, {"Content-Encoding": "gzip"} if gzipped else {})


def _accepts_gzip(header: str) -> bool:
    """Whether Accept-Encoding lists gzip with a non-zero quality (codings ignore case)."""
    for item in header.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if coding.lower() not in ("gzip", "x-gzip"):
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        return quality > 0
    return False


class ExporterHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the runner, registry and web settings."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, web: WebConfig, runner: ScrapeRunner,
                 security: WebConfigFile | None = None) -> None:
        host, port = split_listen_address(web.listen_address)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.web = web
        self.runner = runner
        self.registry = make_registry(runner)
        self.slots = threading.BoundedSemaphore(web.max_requests)
        self._expositions: SingleFlight[tuple[object, bool], bytes] = SingleFlight()
        self.security = security
        # Idle keep-alive and slow clients hold a thread each: bound them too.
        self.max_connections = 2 * web.max_requests
        self._connections = 0
        self._connections_lock = threading.Lock()
        super().__init__((host or self._any_address(), port), _Handler)

    def set_runner(self, runner: ScrapeRunner) -> None:
        """Serve this runner's collections from now on (set before serve_forever)."""
        self.runner = runner
        self.registry = make_registry(runner)

    def exposition(self, encoder: Callable[[CollectorRegistry], bytes], gzipped: bool) -> bytes:
        """The metrics body in one format. Requests that arrive while it is being built (all
        the scrapes queued behind a stuck collector) share that body: one encoding and one
        compression for all of them, not one each, so a burst of waiting scrapes does not
        raise the exporter's memory high-water mark."""

        def build() -> bytes:
            try:
                body = encoder(self.registry)
            except Exception:
                log.exception("scrape failed")
                raise
            return gzip.compress(body, compresslevel=1) if gzipped else body

        return self._expositions.run((encoder, gzipped), build)

    def security_settings(self) -> WebSecurity:
        """The web config in force (empty without --web.config.file)."""
        return self.security.current() if self.security is not None else _NO_SECURITY

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._connections_lock:
                self._connections -= 1
            raise

    def _refuse(self, request: socket.socket) -> None:
        # In the accept loop: never block here, a full send buffer just loses the message.
        security = self.security_settings()
        if security.ssl_context is None:
            # The web config's headers go on this answer too, like on every other one.
            extra = "".join(f"{name}: {value}\r\n" for name, value in security.headers)
            try:
                request.setblocking(False)
                request.send(_PLAIN_503_HEAD + extra.encode("latin-1", "replace") + _PLAIN_503_BODY)
            except OSError:
                pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections -= 1

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread: a slow TLS handshake blocks only itself.
        security = self.security_settings()
        context = security.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.web.read_timeout)
        try:
            conn = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake failed", extra={"client": client_address[0],
                                                     "err": type(exc).__name__})
            return
        try:
            if not security.client_allowed(conn.getpeercert()):
                log.debug("client certificate names no allowed SAN",
                          extra={"client": client_address[0]})
                return
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and broken pipes are the client's business: one debug line, no traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            log.debug("connection error", extra={"client": client_address[0],
                                                 "err": type(exc).__name__})
            return
        log.exception("request handler failed", extra={"client": client_address[0]})

    @staticmethod
    def _any_address() -> str:
        return "0.0.0.0"

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


_NO_SECURITY = WebSecurity()
