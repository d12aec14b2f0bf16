"""The HTTP server's connection loop: one selector thread for every connection.

One selector thread accepts connections, runs TLS handshakes and reads request headers for all
of them, without blocking; it answers cheap requests itself (/healthz, errors, 405, 429, 503)
and hands the rest, complete, to a bounded pool of worker threads. A connection costs a file
descriptor and a few hundred bytes until it has sent a whole request header, so idle and slow
clients cannot take what a scrape needs: they are closed at the header deadline, and when the
connection limit is reached the oldest of them make room for new ones.

ConnectionLoop is the transport; what a request gets (exporter.server) is its subclass's.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from http import HTTPStatus
from typing import Any

from exporter.config import WebConfig
from exporter.httpconn import (
    ACCEPTS_PER_WAKEUP,
    HANDSHAKE,
    IN_WORKER,
    LINGER,
    LINGER_TIMEOUT,
    READ_CHUNK,
    READING,
    REQUESTS_PER_TURN,
    SWEEP_INTERVAL,
    WRITE_CHUNK,
    WRITING,
    Conn,
    client_address,
    listen_socket,
    tls_wants,
)
from exporter.httpmessage import (
    TLS_RECORD,
    Request,
    RequestError,
    Response,
    head,
    next_request,
    plain,
)
from exporter.logs import Throttled
from exporter.webconfig import WebSecurity

log = logging.getLogger("exporter.server")


class ConnectionLoop:
    """Connections, deadlines and the selector; a subclass decides what a request gets
    (_dispatch), which web config applies (security_settings) and owns request slots
    (_release_slot)."""

    web: WebConfig
    header_timeout: float
    idle_timeout: float
    max_connections: int
    request_queue_size: int

    def _start_loop(self, host: str, port: int) -> None:
        """Listen on host:port; the loop's own state."""
        self._conns: set[Conn] = set()
        # Connections the selector owns, oldest wait first: the order of eviction.
        self._waiting: collections.OrderedDict[Conn, None] = collections.OrderedDict()
        # From workers: (connection, answer to write (head, body), close after it).
        self._returned: collections.deque[tuple[Conn, tuple[bytes, ...], bool]] = \
            collections.deque()
        self._ready: collections.deque[Conn] = collections.deque()  # more to read, its turn
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
        self._no_fds = Throttled(log, logging.WARNING,
                                 "cannot accept connections: out of file descriptors")
        self._throttles: tuple[Throttled, ...] = (self._malformed, self._tls_on_plain,
                                                   self._evicted, self._no_fds)
        self.socket = listen_socket(host, port, self.request_queue_size)
        self.server_address = self.socket.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    # --- what the subclass decides ---

    def security_settings(self) -> WebSecurity:
        """The web config in force."""
        raise NotImplementedError

    def _dispatch(self, conn: Conn, request: Request) -> None:
        raise NotImplementedError

    def _release_slot(self) -> None:
        raise NotImplementedError

    def _pool_close(self) -> None:
        """Let the worker threads go (server_close)."""

    def connection_count(self) -> int:
        """Open client connections (read by tests from another thread: a snapshot)."""
        return len(self._conns)

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
        self._pool_close()
        for conn in list(self._conns):
            if conn.state != IN_WORKER:
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
            if conn.state == HANDSHAKE:
                log.debug("TLS handshake failed", extra={"client": conn.client,
                                                         "err": "TimeoutError"})
            elif conn.state == READING and not conn.idle:
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
            client = client_address(address)
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
        conn = Conn(conn_sock, client, security, time.monotonic() + self.header_timeout,
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

    def _give_back(self, conn: Conn, data: tuple[bytes, ...], close: bool) -> None:
        """From a worker: the connection is the selector's again, with an answer to write
        (empty: close it)."""
        self._returned.append((conn, data, close))
        if self._closed:
            self._close_returned()
        else:
            self._wake()

    def _on_event(self, conn: Conn, mask: int) -> None:
        if conn.state == HANDSHAKE:
            self._handshake(conn)
        elif conn.state == LINGER:
            self._drain(conn)
        elif conn.state == WRITING:
            self._flush(conn, resume=True)
        elif conn.state == READING:
            self._pump(conn)

    def _want(self, conn: Conn, events: int) -> None:
        if events == conn.events or self._closed:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: Conn) -> None:
        self._want(conn, 0)
        self._conns.discard(conn)
        self._waiting.pop(conn, None)
        self._answered(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _finish(self, conn: Conn) -> None:
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
        conn.state = LINGER
        conn.buf = bytearray()
        conn.deadline = time.monotonic() + LINGER_TIMEOUT
        self._waiting[conn] = None
        self._want(conn, selectors.EVENT_READ)

    def _drain(self, conn: Conn) -> None:
        try:
            while conn.sock.recv(READ_CHUNK):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)

    def _handshake(self, conn: Conn) -> None:
        sock: Any = conn.sock  # an ssl.SSLSocket
        try:
            sock.do_handshake()
        except OSError as exc:
            wants = tls_wants(exc)
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
        conn.state = READING
        self._pump(conn)

    def _await_request(self, conn: Conn) -> None:
        """After a request: the next one's deadline, from now if its bytes are here."""
        self._waiting.move_to_end(conn)
        conn.idle = not conn.buf
        conn.deadline = time.monotonic() + (self.idle_timeout if conn.idle
                                            else self.header_timeout)

    def _read(self, conn: Conn) -> bool | None:
        """Read what is there: True if bytes came, False at the end of the stream or on an
        error (the connection is closed or answered), None when nothing is there yet."""
        try:
            data = conn.sock.recv(READ_CHUNK)
        except BlockingIOError:
            self._want(conn, selectors.EVENT_READ)
            return None
        except OSError as exc:
            wants = tls_wants(exc) if conn.tls else 0
            if wants:
                self._want(conn, wants)
                return None
            log.debug("connection error", extra={"client": conn.client,
                                                 "err": type(exc).__name__})
            self._close(conn)
            return False
        if not data:
            if conn.buf and not conn.buf.startswith(bytes(TLS_RECORD)):
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

    def _pump(self, conn: Conn) -> None:
        """Take requests from the connection's input until it has none complete (or has had
        its turn: a client pipelining without end must not hold the loop)."""
        for _ in range(REQUESTS_PER_TURN):
            if conn.state != READING:
                return
            try:
                request = next_request(conn.buf, not conn.tls and conn.requests == 0)
            except RequestError as reject:
                self._reject(conn, reject)
                return
            if request is not None:
                self._dispatch(conn, request)
                continue
            if self._read(conn) is not True:
                return
        if conn.state == READING:
            self._want(conn, 0)
            self._ready.append(conn)

    def _reject(self, conn: Conn, reject: RequestError) -> None:
        if not reject.answer:
            self._tls_on_plain(conn.client)
            log.debug("request refused", extra={"client": conn.client, "reason": reject.reason})
            self._close(conn)
            return
        self._malformed(conn.client, status=reject.status, reason=reject.reason)
        log.debug("request", extra={"client": conn.client, "status": reject.status,
                                    "reason": reject.reason})
        self._answer(conn, None, plain(reject.status, HTTPStatus(reject.status).phrase + "\n",
                                       close=True))

    def _answer(self, conn: Conn, request: Request | None, response: Response) -> None:
        """An answer the selector writes itself (small: errors, /healthz, refusals)."""
        close = response.close or request is None or not request.keep_alive
        head_only = request is not None and request.method == "HEAD"
        data = head(response, conn.security, close, request)
        if not head_only:
            data += response.body
        self._write(conn, close, data)
        self._flush(conn, resume=False)

    def _write(self, conn: Conn, close: bool, *parts: bytes) -> None:
        # Views, not copies: a body shared by waiting scrapes stays one object in memory.
        for part in parts:
            view = memoryview(part)
            conn.out.extend(view[i:i + WRITE_CHUNK] for i in range(0, len(view), WRITE_CHUNK))
        conn.closing = close
        conn.state = WRITING
        conn.deadline = time.monotonic() + float(self.web.read_timeout)

    def _answered(self, conn: Conn) -> None:
        """The answer of a request that held a slot is written (or never will be)."""
        if conn.slot:
            conn.slot = False
            self._release_slot()

    def _flush(self, conn: Conn, resume: bool) -> None:
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
                wants = tls_wants(exc) if conn.tls else 0
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
        conn.state = READING
        self._await_request(conn)
        if resume:
            self._pump(conn)
