"""A small Redis client: RESP2 over TCP, a unix socket or TLS, with bounded replies.

The exporter sends a handful of commands (INFO, SLOWLOG LEN, LATENCY HISTOGRAM, CONFIG GET,
LLEN, HLEN, SCAN, SSCAN, and AUTH/SELECT/CLIENT SETNAME on connect) on one connection with no
retries. redis-py 8 added 15 MB of RSS at import (its command tables, asyncio, ssl) and reads a
reply of any size or depth; this reads only what it bounds (Limits) and gives each exchange one
deadline, so a hostile, broken or trickling server costs at most one timeout and a bounded
amount of memory. `ssl` is imported only for a rediss:// URL.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exporter.resp_url import Endpoint, parse_url

# Why a connection failed, for qatoolbox_redis_connection_error{reason}.
CONNECTION_REFUSED = "connection_refused"
TIMEOUT = "timeout"
AUTHENTICATION_FAILED = "authentication_failed"
TLS_FAILED = "tls_failed"
PROTOCOL_ERROR = "protocol_error"
OTHER = "other"
REASONS = (CONNECTION_REFUSED, TIMEOUT, AUTHENTICATION_FAILED, TLS_FAILED, PROTOCOL_ERROR, OTHER)

Arg = str | bytes | int | float
# What a reply is: bytes (bulk and simple strings), int, None (nil), a list of replies, or a
# ServerError (an error reply, returned in its place by pipeline()).
Reply = Any


@dataclass(frozen=True)
class Limits:
    """What one reply may hold; more is a protocol error and the connection is dropped."""

    # One bulk string (INFO of a server with 3,000 databases is about 150 kB).
    max_bulk: int = 8 << 20
    # Elements of one array (SCAN returns about COUNT keys; COUNT is at most 100,000 here).
    max_array: int = 1_000_000
    # Arrays within arrays (LATENCY HISTOGRAM nests 4 deep).
    max_depth: int = 8
    # The whole reply, counting each element's data plus ELEMENT_COST for the object holding it.
    max_reply: int = 64 << 20
    # A status, error or length line.
    max_line: int = 64 << 10


ELEMENT_COST = 64
# Text of an error reply kept for messages and logs.
MAX_ERROR_TEXT = 500


class RedisError(Exception):
    """A failed exchange with Redis; reason is one of REASONS."""

    reason = OTHER


class ConnectError(RedisError):
    """The connection could not be opened, or broke."""

    def __init__(self, message: str, reason: str = OTHER) -> None:
        super().__init__(message)
        self.reason = reason


class RedisTimeoutError(RedisError):
    """No complete answer within the timeout."""

    reason = TIMEOUT


class TlsError(RedisError):
    """The TLS handshake or a TLS record failed (certificate, protocol)."""

    reason = TLS_FAILED


class ProtocolError(RedisError):
    """The server sent something that is not RESP2 or is beyond the Limits."""

    reason = PROTOCOL_ERROR


class AuthenticationError(RedisError):
    """AUTH was refused, or the server wants a password the URL does not give."""

    reason = AUTHENTICATION_FAILED


class UrlError(RedisError):
    """The URL names something this client cannot use."""


class ServerError(RedisError):
    """An error reply ("WRONGTYPE ...", "NOPERM ..."): raised by call(), returned in its
    place by pipeline()."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
        if text.startswith(("NOAUTH", "WRONGPASS")):
            self.reason = AUTHENTICATION_FAILED


# --- encoding and decoding ----------------------------------------------------------------------


def encode(commands: Sequence[Sequence[Arg]]) -> bytes:
    """Commands as RESP2 arrays of bulk strings, ready to send in one write."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _error_text(raw: bytes) -> str:
    text = raw[:MAX_ERROR_TEXT].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


class Reader:
    """Reads RESP2 replies from a socket within Limits and a deadline."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self._sock = sock
        self._limits = limits
        self._buf = b""
        self._pos = 0
        self._spent = 0
        self._deadline = 0.0

    def pending(self) -> bool:
        """Whether bytes nobody asked for are buffered (the connection is out of step)."""
        return self._pos < len(self._buf)

    def read(self, deadline: float) -> Reply:
        """One whole reply."""
        self._deadline = deadline
        self._spent = 0
        reply = self._reply(0)
        if self._pos == len(self._buf):  # let go of a large reply's buffer between scrapes
            self._buf, self._pos = b"", 0
        return reply

    def _recv(self, size: int) -> bytes:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise RedisTimeoutError("no complete reply within the timeout")
        self._sock.settimeout(remaining)
        chunk = self._sock.recv(size)
        if not chunk:
            raise ConnectError("connection closed by the server")
        return chunk

    def _line(self) -> bytes:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        while end < 0:
            if len(buf) - pos > self._limits.max_line:
                raise ProtocolError(f"a line longer than {self._limits.max_line} bytes")
            start = max(0, len(buf) - pos - 1)
            buf, pos = buf[pos:] + self._recv(65536), 0
            self._buf, self._pos = buf, 0
            end = buf.find(b"\r\n", start)
        self._pos = end + 2
        return buf[pos:end]

    def _exact(self, size: int) -> bytes:
        """size bytes and the CRLF after them."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < size + 2:
            parts = [buf[pos:]]
            have = len(parts[0])
            while have < size + 2:
                chunk = self._recv(min(max(65536, size + 2 - have), 1 << 20))
                parts.append(chunk)
                have += len(chunk)
            buf, pos = b"".join(parts), 0
            self._buf = buf
        if buf[pos + size: pos + size + 2] != b"\r\n":
            raise ProtocolError("a bulk string not followed by CRLF")
        self._pos = pos + size + 2
        return buf[pos: pos + size]

    def _length(self, body: bytes) -> int:
        if len(body) > 20:
            raise ProtocolError("a length or integer of more than 20 characters")
        try:
            return int(body)
        except ValueError:
            raise ProtocolError("a length or integer that is not a number") from None

    def _bounded(self, body: bytes, limit: int, what: str) -> int | None:
        """A bulk string's or array's length, None for nil (-1); past limit, an error."""
        length = self._length(body)
        if length > limit:
            raise ProtocolError(f"{what.format(length)}, more than {limit}")
        if length < 0 and length != -1:
            raise ProtocolError(f"a length of {length}")
        return None if length == -1 else length

    def _charge(self, size: int) -> None:
        self._spent += size + ELEMENT_COST
        if self._spent > self._limits.max_reply:
            raise ProtocolError(f"a reply larger than {self._limits.max_reply} bytes")

    def _array(self, count: int, depth: int) -> list[Reply]:
        """count replies; bulk strings and integers already whole in the buffer (SCAN's
        keys, nearly always) are taken here without the general path's calls."""
        items: list[Reply] = []
        max_bulk, max_reply = self._limits.max_bulk, self._limits.max_reply
        for _ in range(count):
            buf, pos = self._buf, self._pos
            kind = buf[pos: pos + 1]
            if kind == b":":  # LATENCY HISTOGRAM's counts
                end = buf.find(b"\r\n", pos, pos + 24)
                body = buf[pos + 1: end] if end > 0 else b""
                if body.isdigit() or (body[:1] == b"-" and body[1:].isdigit()):
                    items.append(int(body))
                    self._pos = end + 2
                    continue
            elif kind == b"$":
                end = buf.find(b"\r\n", pos, pos + 24)
                if end > 0:
                    body = buf[pos + 1: end]
                    if body.isdigit():
                        size, start = int(body), end + 2
                        if size <= max_bulk and buf[start + size: start + size + 2] == b"\r\n":
                            self._spent += size + ELEMENT_COST
                            if self._spent > max_reply:
                                raise ProtocolError(f"a reply larger than {max_reply} bytes")
                            items.append(buf[start: start + size])
                            self._pos = start + size + 2
                            continue
            items.append(self._reply(depth))
        return items

    def _reply(self, depth: int) -> Reply:
        line = self._line()
        kind, body = line[:1], line[1:]
        limits = self._limits
        if kind == b"$":
            size = self._bounded(body, limits.max_bulk, "a bulk string of {} bytes")
            if size is None:
                return None
            self._charge(size)
            return self._exact(size)
        if kind == b":":
            return self._length(body)
        if kind == b"*":
            count = self._bounded(body, limits.max_array, "an array of {} elements")
            if count is None:
                return None
            if depth >= limits.max_depth:
                raise ProtocolError(f"arrays nested more than {limits.max_depth} deep")
            self._charge(0)
            return self._array(count, depth + 1)
        if kind == b"+":
            self._charge(len(body))
            return body
        if kind == b"-":
            return ServerError(_error_text(body))
        raise ProtocolError(f"a reply starting with {kind!r}, not RESP2")


# --- the connection -----------------------------------------------------------------------------


class Connection:
    """One lazily opened connection: no retries, a deadline on every exchange.

    Any failure closes it; the next call opens a new one. A connection the server closed or
    wrote to while idle (a restart) is replaced before it is used.
    """

    def __init__(self, url: str, timeout: float, limits: Limits | None = None) -> None:
        try:
            self.endpoint: Endpoint = parse_url(url)
        except ValueError as exc:
            raise UrlError(str(exc)) from None
        self._connect_timeout = self.endpoint.connect_timeout or timeout
        self._timeout = self.endpoint.read_timeout or timeout
        self._limits = limits or Limits()
        self._sock: socket.socket | None = None
        self._reader: Reader | None = None

    def call(self, *args: Arg) -> Reply:
        """One command's reply; an error reply is raised as ServerError."""
        reply = self.pipeline([args])[0]
        if isinstance(reply, ServerError):
            raise reply
        return reply

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """The replies to commands sent in one write, error replies as ServerError values."""
        self._ensure_open()
        try:
            return self._exchange(commands)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the socket (if open)."""
        sock, self._sock, self._reader = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _exchange(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        sock, reader = self._sock, self._reader
        assert sock is not None and reader is not None
        deadline = time.monotonic() + self._timeout
        try:
            sock.settimeout(self._timeout)
            sock.sendall(encode(commands))
            return [reader.read(deadline) for _ in commands]
        except TimeoutError:
            raise RedisTimeoutError("no complete reply within the timeout") from None
        except OSError as exc:
            raise _os_error(exc, "talking to " + self.endpoint.where) from None

    def _ensure_open(self) -> None:
        if self._sock is not None and not self._stale():
            return
        self.close()
        self._sock = self._open()
        self._reader = Reader(self._sock, self._limits)
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _stale(self) -> bool:
        """Whether the idle connection has something to read (EOF after a restart, or bytes
        nobody asked for): then it is not in step with us any more."""
        sock, reader = self._sock, self._reader
        if sock is None or reader is None or reader.pending():
            return True
        pending = getattr(sock, "pending", None)  # TLS: bytes decrypted but not read
        if pending is not None and pending():
            return True
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

    def _open(self) -> socket.socket:
        ep = self.endpoint
        try:
            if ep.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self._connect_timeout)
                    sock.connect(ep.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                # ASCII host as bytes: a str loads the IDNA codec for good (exporter/checks.py)
                host = ep.host.encode() if ep.host.isascii() else ep.host
                sock = socket.create_connection(
                    (host, ep.port), self._connect_timeout)  # type: ignore[arg-type]  # bytes work
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to {ep.where}: timed out") from None
        except OSError as exc:
            raise _os_error(exc, f"connecting to {ep.where}") from None
        if ep.tls:
            return self._wrap_tls(sock)
        return sock

    def _wrap_tls(self, sock: socket.socket) -> socket.socket:
        import ssl

        ep = self.endpoint
        try:
            context = ssl.create_default_context(cafile=ep.ssl_ca_certs or None,
                                                 capath=ep.ssl_ca_path or None)
            verify = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                      "required": ssl.CERT_REQUIRED}[ep.ssl_cert_reqs]
            context.check_hostname = ep.ssl_check_hostname and verify != ssl.CERT_NONE
            context.verify_mode = verify
            if ep.ssl_certfile:
                context.load_cert_chain(ep.ssl_certfile, ep.ssl_keyfile or None,
                                        ep.ssl_password or None)
            sock.settimeout(self._connect_timeout)
            return context.wrap_socket(sock, server_hostname=None if ep.path else ep.host)
        except TimeoutError:
            sock.close()
            raise RedisTimeoutError(f"TLS handshake with {ep.where}: timed out") from None
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            sock.close()
            raise TlsError(f"TLS with {ep.where}: {exc}") from None

    def _handshake(self) -> None:
        ep = self.endpoint
        commands: list[tuple[Arg, ...]] = []
        if ep.username or ep.password:
            commands.append(("AUTH", ep.username, ep.password) if ep.username
                            else ("AUTH", ep.password))
        if ep.db:
            commands.append(("SELECT", ep.db))
        if ep.client_name:
            commands.append(("CLIENT", "SETNAME", ep.client_name))
        if not commands:
            return
        replies = self._exchange(commands)
        first = replies[0]
        if ep.username and commands[0][0] == "AUTH" and isinstance(first, ServerError) \
                and "wrong number of arguments" in first.text:
            # A server older than 6.0 takes a password only.
            replies = self._exchange([("AUTH", ep.password), *commands[1:]])
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ServerError):
                if command[0] == "AUTH":
                    raise AuthenticationError(reply.text)
                raise ServerError(f"{reply.text} (on {command[0]!s})")


def _os_error(exc: OSError, doing: str) -> RedisError:
    """The RedisError for an OSError (its text is the OS's, never the URL's)."""
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return TlsError(f"{doing}: {exc}")
    reason = CONNECTION_REFUSED if isinstance(exc, (ConnectionRefusedError,
                                                    FileNotFoundError)) else OTHER
    text = exc.strerror or str(exc) or type(exc).__name__
    return ConnectError(f"{doing}: {text}", reason)
