"""One client connection of the HTTP server, and the listening socket."""

from __future__ import annotations

import collections
import errno
import ipaddress
import resource
import selectors
import socket
import sys

from exporter.webconfig import WebSecurity

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
READ_CHUNK = 16384
WRITE_CHUNK = 65536
SWEEP_INTERVAL = 0.1  # how often deadlines are looked at
ACCEPTS_PER_WAKEUP = 64
REQUESTS_PER_TURN = 16


HANDSHAKE, READING, WRITING, IN_WORKER, LINGER = range(5)


class Conn:
    """One client connection, owned by the selector thread or (during a request) a worker."""

    __slots__ = ("buf", "client", "closing", "deadline", "events", "idle", "out", "requests",
                 "security", "slot", "sock", "state", "tls")

    def __init__(self, sock: socket.socket, client: str, security: WebSecurity,
                 deadline: float, tls: bool = False) -> None:
        self.sock = sock
        self.client = client
        self.security = security
        self.tls = tls
        self.state = HANDSHAKE if self.tls else READING
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


def tls_wants(exc: OSError) -> int:
    """The event a TLS socket's error waits for (ssl's want-read or want-write), 0 for a real
    error. ssl is imported only with a TLS web config, and a TLS socket means it was."""
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        if isinstance(exc, ssl.SSLWantReadError):
            return selectors.EVENT_READ
        if isinstance(exc, ssl.SSLWantWriteError):
            return selectors.EVENT_WRITE
    return 0


def client_address(address: object) -> str:
    """The peer's IP as text; an IPv4 client of a dual-stack socket without its ::ffff:."""
    host = str(address[0]) if isinstance(address, tuple) and address else str(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


def listen_backlog() -> int:
    """The listen backlog Go uses: the system's somaxconn (at least MIN_BACKLOG)."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as handle:
            value = int(handle.read().strip())
    except (OSError, ValueError):
        value = MIN_BACKLOG
    return max(MIN_BACKLOG, min(value, 65535))


def connection_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - FD_HEADROOM))


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket: an empty host (":9786") is IPv6 and IPv4 on one socket where
    the host has IPv6, IPv4 alone where it has not; "0.0.0.0" is IPv4 only; "::" both."""
    if host == "":
        try:
            return _bind(socket.AF_INET6, "::", port, backlog)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL,
                                 errno.EPROTONOSUPPORT):
                raise
        return _bind(socket.AF_INET, "0.0.0.0", port, backlog)
    return _bind(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port, backlog)

def _bind(family: socket.AddressFamily, host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
