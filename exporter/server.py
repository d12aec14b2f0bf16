"""HTTP server: the metrics path, a landing page and /healthz, behind a strict HTTP/1.1 parser.

One selector thread accepts connections, runs TLS handshakes and reads request headers for all
of them, without blocking; it answers cheap requests itself (/healthz, errors, 405, 429, 503)
and hands the rest, complete, to a bounded pool of worker threads. A connection costs a file
descriptor and a few hundred bytes until it has sent a whole request header, so idle and slow
clients cannot take what a scrape needs: they are closed at the header deadline, and when the
connection limit is reached the oldest of them make room for new ones.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gzip
import html
import ipaddress
import logging
import math
import re
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from exporter import __version__, textformat
from exporter.config import WebConfig, split_listen_address
from exporter.logs import Throttled
from exporter.scrape import ScrapeRunner, SingleFlight
from exporter.webconfig import AuthGuard, WebConfigFile, WebSecurity

log = logging.getLogger("exporter.server")

# A scraper's request is a few hundred bytes: anything near these limits is not one.
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 100
# Open connections at most (fewer when the file descriptor limit is lower); past it the oldest
# idle or incomplete connection is closed for each new one.
MAX_CONNECTIONS = 1024
FD_HEADROOM = 128  # descriptors kept for PostgreSQL, Redis, /proc and the log
MIN_BACKLOG = 128
# A keep-alive connection may wait this long for its next request: longer than any usual
# scrape interval, so Prometheus keeps its connection (and its TLS session) between scrapes.
IDLE_TIMEOUT = 120.0
# After the last answer on a connection, its unread input is drained this long before the
# close, so that the close does not reset the connection under the answer.
LINGER_TIMEOUT = 1.0
WORKER_IDLE = 30.0  # a worker thread with nothing to do for this long exits
READ_CHUNK = 16384
WRITE_CHUNK = 65536
SWEEP_INTERVAL = 0.1  # how often deadlines are looked at
ACCEPTS_PER_WAKEUP = 64
REQUESTS_PER_TURN = 16

MAX_ACCEPT_ITEMS = 32
_QVALUE = re.compile(r"0(?:\.\d{0,3})?|1(?:\.0{0,3})?")

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
# Control characters (HTAB allowed), which covers CR, LF and NUL, and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f]")
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)
_DIGITS = re.compile(r"[0-9]{1,18}")
_TLS_RECORD = (0x16, 0x03)  # a TLS handshake record: content type 22, version 3.x

_LANDING_TYPE = "text/html; charset=utf-8"
_PLAIN_TYPE = "text/plain; charset=utf-8"
_SERVER = f"qatoolbox-exporter/{__version__}"


class _RunnerCollector:
    """The scrape runner as the encoders' source: anything with collect() will do, so no
    prometheus_client registry (and none of its package) is needed on the serving path."""

    def __init__(self, runner: ScrapeRunner) -> None:
        self._runner = runner

    def collect(self) -> Iterable[Any]:
        return self._runner.collect()


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


# --- the HTTP/1.1 message parser ---------------------------------------------------------------


class RequestError(Exception):
    """A request the parser refuses: the status to answer and why (our words, never the
    client's bytes). answer=False closes the connection without a word."""

    def __init__(self, status: int, reason: str, answer: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.answer = answer


@dataclass
class Request:
    """One parsed request head."""

    method: str
    path: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: dict[str, list[str]] = field(default_factory=dict)  # lower-case names
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        """The first value of a header."""
        values = self.headers.get(name)
        return values[0] if values else None

    def joined(self, name: str) -> str:
        """A list-valued header's values as one comma-separated value."""
        return ", ".join(self.headers.get(name, ()))


def request_path(target: bytes) -> str:
    """The path of an origin-form (/metrics?x) or absolute-form (http://host/metrics) request
    target, which RFC 9112 says a server must accept; anything else is a 400."""
    if _TARGET_FORBIDDEN.search(target):
        raise RequestError(400, "control character in the request target")
    if target.startswith(b"/"):
        return target.split(b"?", 1)[0].decode("latin-1")
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None or match.group(1).lower() not in (b"http", b"https"):
        raise RequestError(400, "invalid request target")
    authority, rest = match.group(2), match.group(3)
    if not authority or b"@" in authority:
        raise RequestError(400, "invalid request target")
    path = rest.split(b"?", 1)[0] or b"/"
    if not path.startswith(b"/"):
        raise RequestError(400, "invalid request target")
    return path.decode("latin-1")


def parse_request_line(line: bytes) -> tuple[str, bytes, str]:
    """(method, target, version) of `method SP target SP HTTP/1.x`, single spaces only."""
    parts = line.split(b" ")
    if len(parts) == 2:
        raise RequestError(400, "request line without an HTTP version (HTTP/0.9)")
    if len(parts) != 3 or not parts[1]:
        raise RequestError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise RequestError(400, "invalid method")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise RequestError(400, "malformed HTTP version")
    if match.group(1) != b"1":
        raise RequestError(505, "HTTP version not supported")
    return method.decode("ascii"), target, "HTTP/1.0" if match.group(2) == b"0" else "HTTP/1.1"


def parse_headers(block: bytes) -> dict[str, list[str]]:
    """Header lines (each ending in LF, optionally CRLF) into lower-case names and values."""
    lines = block.split(b"\n")[:-1]
    if len(lines) > MAX_HEADERS:
        raise RequestError(431, "too many header fields")
    headers: dict[str, list[str]] = {}
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            raise RequestError(400, "obsolete line folding in a header")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise RequestError(400, "malformed header line")
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise RequestError(400, "control character in a header value")
        headers.setdefault(name.decode("ascii").lower(), []).append(value.decode("latin-1"))
    return headers


def _tokens(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


def finish_request(method: str, target: bytes, version: str,
                   headers: dict[str, list[str]]) -> Request:
    """The request, after the checks that need all its headers: message framing (RFC 9112
    section 6: conflicting lengths are how requests get smuggled) and connection reuse."""
    if len(headers.get("host", ())) > 1:
        raise RequestError(400, "more than one Host header")
    lengths = {value.strip() for value in headers.get("content-length", ())}
    if len(lengths) > 1:
        raise RequestError(400, "conflicting Content-Length headers")
    if lengths and not _DIGITS.fullmatch(next(iter(lengths))):
        raise RequestError(400, "invalid Content-Length")
    body = bool(lengths) and int(next(iter(lengths))) > 0
    if "transfer-encoding" in headers:
        if lengths:
            raise RequestError(400, "Content-Length together with Transfer-Encoding")
        if version == "HTTP/1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in ",".join(headers["transfer-encoding"]).split(",")]
        if codings != ["chunked"]:
            raise RequestError(501, "unsupported Transfer-Encoding")
        body = True
    if method in ("GET", "HEAD"):
        path = request_path(target)
    else:
        try:
            path = request_path(target)  # for the log line only: the answer is a 405
        except RequestError:
            path = ""
    connection = _tokens(",".join(headers.get("connection", ())))
    keep_alive = ("keep-alive" in connection if version == "HTTP/1.0"
                  else "close" not in connection)
    # A body is never read: the connection cannot carry another request after it.
    return Request(method, path, version, headers, keep_alive and not body)


def accepts_gzip(header: str) -> bool:
    """Whether Accept-Encoding lists gzip with a non-zero quality (codings ignore case)."""
    for item in header.split(",")[:MAX_ACCEPT_ITEMS]:
        coding, *params = (part.strip() for part in item.split(";"))
        if coding.lower() not in ("gzip", "x-gzip"):
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                quality = float(value) if _QVALUE.fullmatch(value) else 0.0
        return quality > 0
    return False


# --- responses ----------------------------------------------------------------------------------


@dataclass
class Response:
    """What to answer; the head is built by the server (status line, Date, framing, the web
    config's headers), from our own strings only."""

    status: int
    body: bytes = b""
    content_type: str = _PLAIN_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def _plain(status: int, text: str, *headers: tuple[str, str], close: bool = False) -> Response:
    return Response(status, text.encode(), _PLAIN_TYPE, list(headers), close)


_date_cache: list[tuple[int, str]] = [(0, "")]
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: int) -> str:
    """RFC 9110's IMF-fixdate, in English whatever the locale (email.utils, which does the
    same, costs 0.3 MB of imports for this one line)."""
    t = time.gmtime(seconds)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def _http_date() -> str:
    now = int(time.time())
    cached = _date_cache[0]
    if cached[0] != now:
        cached = _date_cache[0] = (now, http_date(now))
    return cached[1]


def _head(response: Response, security: WebSecurity, close: bool,
          request: Request | None = None) -> bytes:
    # A HEAD answer has the same head as the GET's, Content-Length included.
    lines = [f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
             f"Server: {_SERVER}", f"Date: {_http_date()}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines += [f"{name}: {value}" for name, value in security.headers]
    if close:
        lines.append("Connection: close")
    elif request is not None and request.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")  # an HTTP/1.0 client closes without it
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- connections and workers --------------------------------------------------------------------

_HANDSHAKE, _READING, _WRITING, _WORKER, _LINGER = range(5)


class _Conn:
    """One client connection, owned by the selector thread or (during a request) a worker."""

    __slots__ = ("buf", "client", "closing", "deadline", "events", "idle", "out", "requests",
                 "security", "slot", "sock", "state", "tls")

    def __init__(self, sock: socket.socket, client: str, security: WebSecurity,
                 deadline: float, tls: bool = False) -> None:
        self.sock = sock
        self.client = client
        self.security = security
        self.tls = tls
        self.state = _HANDSHAKE if self.tls else _READING
        self.buf = bytearray()
        # The answer being written, in chunks; a chunk stays the same object until all of it
        # is sent (OpenSSL wants a write it refused retried with the same buffer).
        self.out: collections.deque[memoryview] = collections.deque()
        self.slot = False  # holds a web.max_requests slot until its answer is written
        self.closing = False
        self.deadline = deadline
        self.idle = False  # a keep-alive connection waiting for its next request
        self.events = 0
        self.requests = 0


Job = Callable[[], "Callable[[], None] | None"]


class _Pool:
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
        self._waiting: list[_Pool._Worker] = []
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
        me = _Pool._Worker()
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

    def _next(self, me: _Pool._Worker, then: Callable[[], None] | None) -> Job | None:
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


def _tls_wants(exc: OSError) -> int:
    """The event a TLS socket's error waits for (ssl's want-read or want-write), 0 for a real
    error. ssl is imported only with a TLS web config, and a TLS socket means it was."""
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        if isinstance(exc, ssl.SSLWantReadError):
            return selectors.EVENT_READ
        if isinstance(exc, ssl.SSLWantWriteError):
            return selectors.EVENT_WRITE
    return 0


def _client_address(address: object) -> str:
    """The peer's IP as text; an IPv4 client of a dual-stack socket without its ::ffff:."""
    host = str(address[0]) if isinstance(address, tuple) and address else str(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


def _backlog() -> int:
    """The listen backlog Go uses: the system's somaxconn (at least MIN_BACKLOG)."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as handle:
            value = int(handle.read().strip())
    except (OSError, ValueError):
        value = MIN_BACKLOG
    return max(MIN_BACKLOG, min(value, 65535))


def _connection_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - FD_HEADROOM))


class ExporterHTTPServer:
    """The exporter's HTTP server: knows the runner and the web settings."""

    def __init__(self, web: WebConfig, runner: ScrapeRunner,
                 security: WebConfigFile | None = None, *,
                 max_connections: int | None = None, idle_timeout: float = IDLE_TIMEOUT,
                 auth_guard: AuthGuard | None = None) -> None:
        host, port = split_listen_address(web.listen_address)
        self.web = web
        self.runner = runner
        self.source = _RunnerCollector(runner)
        self.security = security
        self.header_timeout = min(float(web.header_timeout), float(web.read_timeout))
        self.idle_timeout = idle_timeout
        self.auth_guard = auth_guard or AuthGuard()
        self.max_connections = max(
            max_connections if max_connections is not None else _connection_limit(),
            web.max_requests + self.auth_guard.capacity + 8)
        self.request_queue_size = _backlog()
        self._expositions: SingleFlight[tuple[str, bool], bytes] = SingleFlight()
        self._slots_lock = threading.Lock()
        self._in_progress = 0
        self._pool = _Pool(web.max_requests + self.auth_guard.capacity)
        self._conns: set[_Conn] = set()
        # Connections the selector owns, oldest wait first: the order of eviction.
        self._waiting: collections.OrderedDict[_Conn, None] = collections.OrderedDict()
        # From workers: (connection, answer to write (head, body), close after it).
        self._returned: collections.deque[tuple[_Conn, tuple[bytes, ...], bool]] = \
            collections.deque()
        self._ready: collections.deque[_Conn] = collections.deque()  # more to read, its turn
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._running = False
        self._stopped = threading.Event()
        self._accept_paused_until = 0.0
        self._next_sweep = 0.0
        self._malformed = Throttled(log, logging.WARNING, "malformed HTTP request")
        self._tls_on_plain = Throttled(log, logging.WARNING,
                                       "TLS handshake on the plain HTTP port; closed")
        self._evicted = Throttled(log, logging.WARNING,
                                  "connection limit reached; closing the oldest idle or "
                                  "incomplete connections")
        self._busy = Throttled(log, logging.WARNING,
                               "web.max_requests requests in progress; answering 503")
        self._guessing = Throttled(log, logging.WARNING,
                                   "too many failed basic auth attempts; answering 429")
        self._no_fds = Throttled(log, logging.WARNING,
                                 "cannot accept connections: out of file descriptors")
        self._throttles = (self._malformed, self._tls_on_plain, self._evicted, self._busy,
                           self._guessing, self._no_fds)
        self.socket = self._listen(host, port)
        self.server_address = self.socket.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    def _listen(self, host: str, port: int) -> socket.socket:
        """The listening socket: an empty host (":9786") is IPv6 and IPv4 on one socket where
        the host has IPv6, IPv4 alone where it has not; "0.0.0.0" is IPv4 only; "::" both."""
        if host == "":
            try:
                return self._bind(socket.AF_INET6, "::", port)
            except OSError as exc:
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL,
                                     errno.EPROTONOSUPPORT):
                    raise
            return self._bind(socket.AF_INET, "0.0.0.0", port)
        return self._bind(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port)

    def _bind(self, family: socket.AddressFamily, host: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(self.request_queue_size)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def set_runner(self, runner: ScrapeRunner) -> None:
        """Serve this runner's collections from now on (set before serve_forever)."""
        self.runner = runner
        self.source = _RunnerCollector(runner)

    def security_settings(self) -> WebSecurity:
        """The web config in force (empty without --web.config.file)."""
        return self.security.current() if self.security is not None else _NO_SECURITY

    def requests_in_progress(self) -> int:
        """Requests holding one of the web.max_requests slots."""
        with self._slots_lock:
            return self._in_progress

    def connection_count(self) -> int:
        """Open client connections (read by tests from another thread: a snapshot)."""
        return len(self._conns)

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

    # --- the selector loop ---

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown() is called."""
        self._running = True
        self._stopped.clear()
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= self._next_sweep:
                    self._sweep(now)
                    self._next_sweep = now + SWEEP_INTERVAL
                timeout = min(poll_interval, SWEEP_INTERVAL) if self._waiting else poll_interval
                if self._ready:
                    timeout = 0
                for key, mask in self._selector.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._take_returned()
                    else:
                        self._on_event(key.data, mask)
                for _ in range(len(self._ready)):
                    conn = self._ready.popleft()
                    if conn in self._conns:
                        self._pump(conn)
        finally:
            self._running = False
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has returned."""
        self._stopping = True
        self._wake()
        if self._running:
            self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and every connection (those in a worker when it is
        done with them)."""
        self._stopping = True
        self._closed = True
        self._pool.close()
        for conn in list(self._conns):
            if conn.state != _WORKER:
                self._close(conn)
        self._close_returned()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def _close_returned(self) -> None:
        while True:
            try:
                conn, _, _ = self._returned.popleft()
            except IndexError:
                return
            self._conns.discard(conn)
            conn.sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _sweep(self, now: float) -> None:
        for throttle in self._throttles:
            throttle.flush()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        for conn in [c for c in self._waiting if c.deadline <= now]:
            if conn.state == _HANDSHAKE:
                log.debug("TLS handshake failed", extra={"client": conn.client,
                                                         "err": "TimeoutError"})
            elif conn.state == _READING and not conn.idle:
                log.debug("request header not received in time", extra={"client": conn.client})
            self._close(conn)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._no_fds(err=errno.errorcode.get(exc.errno or 0, "?"),
                                 connections=len(self._conns))
                    if not self._evict_oldest():
                        # Nothing to give up: stop accepting for a moment, not a busy loop.
                        self._selector.unregister(self.socket)
                        self._accept_paused_until = time.monotonic() + SWEEP_INTERVAL
                        return
                    continue
                log.debug("accept failed", extra={"err": type(exc).__name__})
                continue
            client = _client_address(address)
            if len(self._conns) >= self.max_connections:
                self._evict_oldest()
            self._open(sock, client)

    def _evict_oldest(self) -> bool:
        """Close the connection that has waited longest without a complete request (an
        answer being written, whose request holds a slot, is not touched)."""
        oldest = next((c for c in self._waiting if not c.slot), None)
        if oldest is None:
            return False
        if self._evicted.quiet():
            # Counted only for the line that is written: a flood evicts on every accept.
            self._evicted(oldest.client, limit=self.max_connections,
                          clients=len({c.client for c in self._conns}))
        else:
            self._evicted(oldest.client)
        self._close(oldest)
        return True

    def _open(self, sock: socket.socket, client: str) -> None:
        security = self.security_settings()
        conn_sock = sock
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if security.ssl_context is not None:
                conn_sock = security.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:  # ssl.SSLError is one
            log.debug("connection setup failed", extra={"client": client,
                                                        "err": type(exc).__name__})
            sock.close()
            return
        conn = _Conn(conn_sock, client, security, time.monotonic() + self.header_timeout,
                     tls=conn_sock is not sock)
        self._conns.add(conn)
        self._waiting[conn] = None
        if conn.tls:
            self._handshake(conn)
        else:
            self._pump(conn)

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while self._returned:
            conn, data, close = self._returned.popleft()
            self._waiting[conn] = None
            if not data or self._stopping:
                self._finish(conn)
                continue
            self._write(conn, close, *data)
            self._flush(conn, resume=True)

    def _give_back(self, conn: _Conn, data: tuple[bytes, ...], close: bool) -> None:
        """From a worker: the connection is the selector's again, with an answer to write
        (empty: close it)."""
        self._returned.append((conn, data, close))
        if self._closed:
            self._close_returned()
        else:
            self._wake()

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.state == _HANDSHAKE:
            self._handshake(conn)
        elif conn.state == _LINGER:
            self._drain(conn)
        elif conn.state == _WRITING:
            self._flush(conn, resume=True)
        elif conn.state == _READING:
            self._pump(conn)

    def _want(self, conn: _Conn, events: int) -> None:
        if events == conn.events or self._closed:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        self._want(conn, 0)
        self._conns.discard(conn)
        self._waiting.pop(conn, None)
        self._answered(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _finish(self, conn: _Conn) -> None:
        """The last answer is out: close, after draining what the client still sends (a
        close with unread input resets the connection, and the answer can be lost)."""
        self._answered(conn)
        if conn.tls:
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = _LINGER
        conn.buf = bytearray()
        conn.deadline = time.monotonic() + LINGER_TIMEOUT
        self._waiting[conn] = None
        self._want(conn, selectors.EVENT_READ)

    def _drain(self, conn: _Conn) -> None:
        try:
            while conn.sock.recv(READ_CHUNK):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)

    def _handshake(self, conn: _Conn) -> None:
        sock: Any = conn.sock  # an ssl.SSLSocket
        try:
            sock.do_handshake()
        except OSError as exc:
            wants = _tls_wants(exc)
            if wants:
                self._want(conn, wants)
                return
            log.debug("TLS handshake failed", extra={"client": conn.client,
                                                     "err": type(exc).__name__})
            self._close(conn)
            return
        if not conn.security.client_allowed(sock.getpeercert()):
            log.debug("client certificate names no allowed SAN", extra={"client": conn.client})
            self._close(conn)
            return
        conn.state = _READING
        self._pump(conn)

    def _await_request(self, conn: _Conn) -> None:
        """After a request: the next one's deadline, from now if its bytes are here."""
        self._waiting.move_to_end(conn)
        conn.idle = not conn.buf
        conn.deadline = time.monotonic() + (self.idle_timeout if conn.idle
                                            else self.header_timeout)

    def _read(self, conn: _Conn) -> bool | None:
        """Read what is there: True if bytes came, False at the end of the stream or on an
        error (the connection is closed or answered), None when nothing is there yet."""
        try:
            data = conn.sock.recv(READ_CHUNK)
        except BlockingIOError:
            self._want(conn, selectors.EVENT_READ)
            return None
        except OSError as exc:
            wants = _tls_wants(exc) if conn.tls else 0
            if wants:
                self._want(conn, wants)
                return None
            log.debug("connection error", extra={"client": conn.client,
                                                 "err": type(exc).__name__})
            self._close(conn)
            return False
        if not data:
            if conn.buf and not conn.buf.startswith(bytes(_TLS_RECORD)):
                # Half a request, then the end: say so, as Go does (the client may still read).
                self._reject(conn, RequestError(400, "request incomplete at the end of the stream"))
            else:
                self._close(conn)
            return False
        if conn.idle:
            # The first byte of the next request: its header deadline starts now.
            conn.idle = False
            conn.deadline = time.monotonic() + self.header_timeout
        conn.buf += data
        return True

    def _pump(self, conn: _Conn) -> None:
        """Take requests from the connection's input until it has none complete (or has had
        its turn: a client pipelining without end must not hold the loop)."""
        for _ in range(REQUESTS_PER_TURN):
            if conn.state != _READING:
                return
            try:
                request = self._parse(conn)
            except RequestError as reject:
                self._reject(conn, reject)
                return
            if request is not None:
                self._dispatch(conn, request)
                continue
            if self._read(conn) is not True:
                return
        if conn.state == _READING:
            self._want(conn, 0)
            self._ready.append(conn)

    def _parse(self, conn: _Conn) -> Request | None:
        """The next complete request in conn.buf (consumed), or None until more is read."""
        buf = conn.buf
        start = 0
        # RFC 9112 section 2.2: empty lines before a request line are ignored.
        while buf.startswith(b"\n", start) or buf.startswith(b"\r\n", start):
            start += 1 if buf[start] == 0x0A else 2
        if start:
            del buf[:start]
        if not buf:
            return None
        if not conn.tls and conn.requests == 0 and buf[0] == _TLS_RECORD[0]:
            if len(buf) == 1:
                return None
            if buf[1] == _TLS_RECORD[1]:
                raise RequestError(400, "TLS handshake on the plain HTTP port", answer=False)
        line_end = buf.find(b"\n")
        if line_end < 0:
            if len(buf) > MAX_REQUEST_LINE:
                raise RequestError(414, "request line too long")
            space = buf.find(b" ")
            start_of_line = bytes(buf[:space] if space >= 0 else buf.rstrip(b"\r"))
            if start_of_line and not _TOKEN.fullmatch(start_of_line):
                raise RequestError(400, "invalid method")
            return None
        line = bytes(buf[:line_end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_REQUEST_LINE:
            raise RequestError(414, "request line too long")
        method, target, version = parse_request_line(line)
        ends = [i for i in (buf.find(b"\n\r\n", line_end), buf.find(b"\n\n", line_end))
                if i >= 0]
        if not ends:
            if len(buf) - line_end - 1 > MAX_HEADER_BYTES:
                raise RequestError(431, "request header too large")
            if buf.count(b"\n", line_end + 1) > MAX_HEADERS:
                raise RequestError(431, "too many header fields")
            return None
        end = min(ends)
        block = bytes(buf[line_end + 1:end + 1])
        if len(block) > MAX_HEADER_BYTES:
            raise RequestError(431, "request header too large")
        del buf[:end + (3 if buf[end + 1] == 0x0D else 2)]
        return finish_request(method, target, version, parse_headers(block))

    def _reject(self, conn: _Conn, reject: RequestError) -> None:
        if not reject.answer:
            self._tls_on_plain(conn.client)
            log.debug("request refused", extra={"client": conn.client, "reason": reject.reason})
            self._close(conn)
            return
        self._malformed(conn.client, status=reject.status, reason=reject.reason)
        log.debug("request", extra={"client": conn.client, "status": reject.status,
                                    "reason": reject.reason})
        self._answer(conn, None, _plain(reject.status, HTTPStatus(reject.status).phrase + "\n",
                                        close=True))

    def _answer(self, conn: _Conn, request: Request | None, response: Response) -> None:
        """An answer the selector writes itself (small: errors, /healthz, refusals)."""
        close = response.close or request is None or not request.keep_alive
        head_only = request is not None and request.method == "HEAD"
        data = _head(response, conn.security, close, request)
        if not head_only:
            data += response.body
        self._write(conn, close, data)
        self._flush(conn, resume=False)

    def _write(self, conn: _Conn, close: bool, *parts: bytes) -> None:
        # Views, not copies: a body shared by waiting scrapes stays one object in memory.
        for part in parts:
            view = memoryview(part)
            conn.out.extend(view[i:i + WRITE_CHUNK] for i in range(0, len(view), WRITE_CHUNK))
        conn.closing = close
        conn.state = _WRITING
        conn.deadline = time.monotonic() + float(self.web.read_timeout)

    def _answered(self, conn: _Conn) -> None:
        """The answer of a request that held a slot is written (or never will be)."""
        if conn.slot:
            conn.slot = False
            self._release_slot()

    def _flush(self, conn: _Conn, resume: bool) -> None:
        """Write what is pending; once done, on to the next request (read by the caller's
        loop when resume is False: no recursion through pipelined requests)."""
        while conn.out:
            chunk = conn.out[0]
            try:
                sent = conn.sock.send(chunk)
            except BlockingIOError:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except OSError as exc:
                wants = _tls_wants(exc) if conn.tls else 0
                if wants:
                    self._want(conn, wants)
                    return
                log.debug("connection error", extra={"client": conn.client,
                                                     "err": type(exc).__name__})
                self._close(conn)
                return
            if sent < len(chunk):
                conn.out[0] = chunk[sent:]  # a plain socket's partial write; TLS sends all
            else:
                conn.out.popleft()
        self._answered(conn)
        if conn.closing:
            self._finish(conn)
            return
        conn.state = _READING
        self._await_request(conn)
        if resume:
            self._pump(conn)

    # --- what each request gets ---

    def _dispatch(self, conn: _Conn, request: Request) -> None:
        conn.requests += 1
        security = conn.security = self.security_settings()
        if request.method not in ("GET", "HEAD"):
            self._log_request(conn, request, 405)
            self._answer(conn, request, _plain(405, "Method Not Allowed\n",
                                               ("Allow", "GET, HEAD")))
            return
        if request.path == "/healthz":
            self._log_request(conn, request, 200)
            self._answer(conn, request, _plain(200, "OK\n"))
            return
        limiter = security.rate_limiter
        if limiter is not None and not limiter.allow():
            # Before the credentials check too: it also slows down password guessing.
            self._log_request(conn, request, 429)
            self._answer(conn, request, _plain(
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
                    self._answer(conn, request, _plain(
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

    def _refuse_busy(self, conn: _Conn, request: Request) -> None:
        self._busy(conn.client, max_requests=self.web.max_requests)
        self._log_request(conn, request, 503)
        self._answer(conn, request, _plain(503, "Too many concurrent requests\n",
                                           ("Retry-After", "1")))

    def _handoff(self, conn: _Conn, request: Request, security: WebSecurity,
                 credentials: bytes | None) -> None:
        self._want(conn, 0)
        self._waiting.pop(conn, None)
        conn.state = _WORKER
        self._pool.submit(lambda: self._work(conn, request, security, credentials))

    def _work(self, conn: _Conn, request: Request, security: WebSecurity,
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
                    response = _plain(503, "Service Unavailable\n", ("Retry-After", "1"))
                elif not ok:
                    response = _unauthorized()
                elif not self._take_slot():
                    self._busy(conn.client, max_requests=self.web.max_requests)
                    response = _plain(503, "Too many concurrent requests\n",
                                      ("Retry-After", "1"))
                else:
                    slot = True
                    response = self._respond(request)
            else:
                response = self._respond(request)
            self._log_request(conn, request, response.status)
            close = close or response.close
            head = _head(response, security, close, request)
            data = (head,) if request.method == "HEAD" else (head, response.body)
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
                return _plain(500, "Scrape failed\n")
            return Response(200, body, content_type,
                            [("Content-Encoding", "gzip")] if gzipped else [])
        if path == "/":
            return Response(200, _landing_page(self.runner, self.web.telemetry_path),
                            _LANDING_TYPE)
        return _plain(404, "Not Found\n")

    def _log_request(self, conn: _Conn, request: Request, status: int) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request", extra={"client": conn.client, "method": request.method,
                                        "path": request.path[:200], "status": status})


def _unauthorized() -> Response:
    return _plain(401, "Unauthorized\n",
                  ("WWW-Authenticate", 'Basic realm="qatoolbox-exporter", charset="UTF-8"'))


_NO_SECURITY = WebSecurity()
