"""The RESP2 client: URLs, bounded replies and deadlines against a fake server socket that
sends oversized, garbage or slow replies, and AUTH, SELECT, unix sockets and TLS against real
redis-server processes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.collectors.redis import RedisCollector, RedisUnavailableError
from exporter.collectors.redis_config import RedisConfig
from exporter.config import Secret
from exporter.resp import (
    AuthenticationError,
    ConnectError,
    Connection,
    Limits,
    ProtocolError,
    Reader,
    RedisTimeoutError,
    ServerError,
    TlsError,
    UrlError,
    encode,
)
from exporter.resp_url import Endpoint, parse_url
from tests.harness import RedisServer, free_port, wait_for

# --- a fake server ------------------------------------------------------------------------------

Handler = Callable[[socket.socket], None]


class FakeServer:
    """A loopback listener that runs handler(conn) on each connection in a thread of its own."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture
def fake() -> Iterator[Callable[[Handler], FakeServer]]:
    """fake(handler): a FakeServer closed at the end of the test."""
    servers: list[FakeServer] = []

    def make(handler: Handler) -> FakeServer:
        servers.append(FakeServer(handler))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def answer(reply: bytes) -> Handler:
    """A handler that reads one request, sends reply, then waits for the client to go."""
    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(reply)
        conn.recv(1)
    return handle


def failure(url: str, timeout: float = 5.0, limits: Limits | None = None) -> Exception:
    """What one PING raises on a fresh connection to url."""
    conn = Connection(url, timeout, limits)
    try:
        with pytest.raises(Exception) as caught:
            conn.call("PING")
        return caught.value
    finally:
        conn.close()


# --- hostile or broken replies ----------------------------------------------------------------


@pytest.mark.parametrize(("reply", "words"), [
    (b"$" + str(1 << 30).encode() + b"\r\n", "bulk string of 1073741824 bytes"),
    (b"*2000000\r\n", "array of 2000000 elements"),
    (b"*1\r\n" * 9 + b":1\r\n", "nested more than 8 deep"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "starting with b'H'"),
    (b"+" + b"a" * (200 << 10), "a line longer than"),
    (b":12x\r\n", "not a number"),
    (b"*2\r\n:1\r\n:--5\r\n", "not a number"),
    (b"*1\r\n$-2\r\n", "a length of -2"),
    (b"*-5\r\n", "a length of -5"),
    (b"$" + b"9" * 30 + b"\r\n", "more than 20 characters"),
    (b"$3\r\nabcXY", "not followed by CRLF"),
])
def test_replies_past_the_limits_are_protocol_errors(
        fake: Callable[[Handler], FakeServer], reply: bytes, words: str) -> None:
    server = fake(answer(reply))
    error = failure(server.url)
    assert isinstance(error, ProtocolError), error
    assert error.reason == "protocol_error"
    assert words in str(error), error


def test_nesting_up_to_the_limit_is_read(fake: Callable[[Handler], FakeServer]) -> None:
    server = fake(answer(b"*1\r\n" * 8 + b":7\r\n"))
    conn = Connection(server.url, 5.0)
    try:
        reply = conn.call("PING")
    finally:
        conn.close()
    for _ in range(8):
        assert isinstance(reply, list) and len(reply) == 1
        reply = reply[0]
    assert reply == 7


def test_a_whole_reply_is_bounded(fake: Callable[[Handler], FakeServer]) -> None:
    """Many small elements add up: the reply's budget stops them, not only each one's size."""
    reply = b"*100\r\n" + b"$200\r\n" + b"x" * 200 + b"\r\n"
    server = fake(answer(reply[:6] + reply[6:] * 100))
    limits = Limits(max_reply=10_000)
    error = failure(server.url, limits=limits)
    assert isinstance(error, ProtocolError) and "larger than 10000 bytes" in str(error), error
    conn = Connection(server.url, 5.0, Limits(max_reply=100 * 264 + 64))
    try:
        assert len(conn.call("PING")) == 100  # just within: read whole
    finally:
        conn.close()


def test_a_trickling_server_costs_one_timeout(fake: Callable[[Handler], FakeServer]) -> None:
    """One byte every 0.2 s never lets a per-read timeout of 1 s expire; the exchange's
    deadline still ends it."""
    def trickle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"$1000\r\n")
        for _ in range(600):
            conn.sendall(b"x")
            time.sleep(0.2)

    server = fake(trickle)
    started = time.monotonic()
    error = failure(server.url, timeout=1.0)
    assert isinstance(error, RedisTimeoutError) and error.reason == "timeout", error
    assert time.monotonic() - started < 60  # not the 120 s the trickle would last


def test_silent_server_and_closed_connection(fake: Callable[[Handler], FakeServer]) -> None:
    def silence(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.recv(1)

    silent = fake(silence)
    error = failure(silent.url, timeout=0.5)
    assert isinstance(error, RedisTimeoutError) and error.reason == "timeout", error

    def hang_up(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"$10\r\nabc")
        conn.close()

    closing = fake(hang_up)
    error = failure(closing.url)
    assert isinstance(error, ConnectError) and error.reason == "other", error
    assert "closed by the server" in str(error)


def test_refused_tcp_and_missing_socket(tmp_path: Path) -> None:
    for url in (f"redis://127.0.0.1:{free_port()}/0", f"unix://{tmp_path}/none.sock"):
        error = failure(url)
        assert isinstance(error, ConnectError) and error.reason == "connection_refused", error


def test_unasked_bytes_on_an_idle_connection_mean_a_new_one(
        fake: Callable[[Handler], FakeServer]) -> None:
    """A server that writes while the client is idle (or closed it, as on a restart) is out of
    step: the next call opens a new connection instead of reading those bytes as its reply."""
    connections: list[socket.socket] = []

    def pong_then_junk(conn: socket.socket) -> None:
        connections.append(conn)
        first = len(connections) == 1
        while conn.recv(65536):
            conn.sendall(b"+PONG\r\n")
            if first:
                time.sleep(0.05)
                conn.sendall(b"+JUNK\r\n")
                first = False

    server = fake(pong_then_junk)
    conn = Connection(server.url, 5.0)
    try:
        assert conn.call("PING") == b"PONG"
        time.sleep(0.3)
        assert conn.call("PING") == b"PONG"
        assert server.accepted == 2
        assert conn.call("PING") == b"PONG"  # the new one is in step: kept
        assert server.accepted == 2
    finally:
        conn.close()


def test_collector_reports_a_hostile_server_as_a_protocol_error(
        fake: Callable[[Handler], FakeServer]) -> None:
    server = fake(answer(b"$" + str(1 << 30).encode() + b"\r\n" + b"x" * 65536))
    collector = RedisCollector(RedisConfig(url=Secret(server.url), celery_queues=()), 5.0)
    try:
        with pytest.raises(RedisUnavailableError) as caught:
            collector.collect()
        assert "ProtocolError" in str(caught.value)
        families = {f.name: f for f in collector.failure_metrics()}
        assert [s.value for s in families["qatoolbox_redis_up"].samples] == [0.0]
        assert [(s.labels, s.value) for s in
                families["qatoolbox_redis_connection_error"].samples] == [
            ({"reason": "protocol_error"}, 1.0)]
    finally:
        collector.close()


# --- URLs and encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://h", Endpoint(host="h")),
    ("redis://h:7/3", Endpoint(host="h", port=7, db=3)),
    ("redis://h:7/3?db=4", Endpoint(host="h", port=7, db=4)),
    ("redis://h/notanumber", Endpoint(host="h")),
    ("REDIS://u:p%40ss@[::1]:7/0", Endpoint(host="::1", port=7, username="u", password="p@ss")),
    ("redis://:pw@h?password=other", Endpoint(host="h", password="pw")),
    ("redis://h?password=q&username=me&client_name=exp", Endpoint(
        host="h", password="q", username="me", client_name="exp")),
    ("unix:///run/redis.sock?db=2&password=x", Endpoint(path="/run/redis.sock", db=2,
                                                        password="x")),
    ("rediss://h?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs=/ca.pem",
     Endpoint(host="h", tls=True, ssl_cert_reqs="none", ssl_check_hostname=False,
              ssl_ca_certs="/ca.pem")),
    ("redis://h?socket_timeout=0.5&socket_connect_timeout=2&health_check_interval=3&"
     "retry_on_timeout=yes", Endpoint(host="h", read_timeout=0.5, connect_timeout=2.0)),
])
def test_urls_read_as_redis_py_reads_them(url: str, expected: Endpoint) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(("url", "words"), [
    ("http://h", "expected a redis://"),
    ("redis://h:port/0", "not a valid URL"),
    ("redis://h?db=x", "db: not a number"),
    ("redis://h?Secret-piece=1", "does not know"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("unix://", "socket's path"),
    ("redis://h?socket_timeout=0", "greater than 0"),
])
def test_unusable_urls_name_no_part_of_them(url: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_url(url)
    with pytest.raises(UrlError):  # what the collector catches
        Connection(url, 1.0)
    assert words in str(caught.value)
    assert "Secret" not in str(caught.value)


def _resp(value: object) -> bytes:
    """value in RESP2, written independently of the reader under test."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":" + str(value).encode() + b"\r\n"
    if isinstance(value, bytes):
        return b"$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n"
    assert isinstance(value, list)
    return b"*" + str(len(value)).encode() + b"\r\n" + b"".join(map(_resp, value))


VALUES = st.recursive(st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=40),
                      lambda inner: st.lists(inner, max_size=6), max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(VALUES, min_size=1, max_size=4), st.integers(1, 50))
def test_reader_reads_what_resp2_says_in_any_chunking(values: list[object], chunk: int) -> None:
    """Whatever the values and however the bytes arrive (the fast paths for whole elements
    and the general path for split ones must agree)."""
    data = b"".join(map(_resp, values))
    ours, theirs = socket.socketpair()
    try:
        def send() -> None:
            for i in range(0, len(data), chunk):
                theirs.sendall(data[i: i + chunk])

        sender = threading.Thread(target=send)
        sender.start()
        reader = Reader(ours, Limits())
        got = [reader.read(time.monotonic() + 30) for _ in values]
        sender.join(30)
        assert got == values
        assert not reader.pending()
    finally:
        ours.close()
        theirs.close()


def test_encode() -> None:
    assert encode([("SET", b"k\r\n", 12), ("INFO",)]) == (
        b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n*1\r\n$4\r\nINFO\r\n")


# --- real servers -------------------------------------------------------------------------------


@pytest.mark.integration
def test_pipeline_auth_select_and_name(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    try:
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">pw-A1", "~*", "+@all")
        admin.execute_command("SELECT", 5)
        admin.set("k", "v")
    finally:
        admin.close()
    url = f"redis://alice:pw-A1@127.0.0.1:{redis_server.port}/5?client_name=probe"
    conn = Connection(url, 5.0)
    try:
        replies = conn.pipeline([("GET", "k"), ("LLEN", "k"), ("INFO", "server"),
                                 ("CLIENT", "INFO")])
        assert replies[0] == b"v"
        assert isinstance(replies[1], ServerError) and replies[1].text.startswith("WRONGTYPE")
        assert b"redis_version:" in replies[2]
        client = replies[3].decode()
        assert "db=5" in client and "name=probe" in client and "user=alice" in client, client
        with pytest.raises(ServerError):
            conn.call("LLEN", "k")
        assert conn.call("GET", "k") == b"v"  # an error reply leaves the connection usable
    finally:
        conn.close()
    wrong = failure(f"redis://alice:nope@127.0.0.1:{redis_server.port}/0")
    assert isinstance(wrong, AuthenticationError)
    assert wrong.reason == "authentication_failed" and "WRONGPASS" in str(wrong)


@pytest.mark.integration
def test_password_required_but_not_given(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(extra_args=["--requirepass", "pw-R2"])
    error = failure(server.url)
    assert isinstance(error, ServerError) and error.reason == "authentication_failed", error
    conn = Connection(f"redis://:pw-R2@127.0.0.1:{server.port}/0", 5.0)
    try:
        assert conn.call("PING") == b"PONG"
    finally:
        conn.close()


@pytest.mark.integration
def test_unix_socket(redis_factory: Callable[..., RedisServer], workdir: Path) -> None:
    path = workdir / "r.sock"
    redis_factory(extra_args=["--unixsocket", str(path), "--unixsocketperm", "700"])
    conn = Connection(f"unix://{path}?db=1", 5.0)
    try:
        assert conn.call("SET", "a", "1") == b"OK"
        assert conn.call("DBSIZE") == 1
    finally:
        conn.close()


def _certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.integration
def test_tls(redis_factory: Callable[..., RedisServer], workdir: Path) -> None:
    cert, key = _certificate(workdir)
    port = free_port()
    plain = redis_factory(extra_args=["--tls-port", str(port), "--tls-cert-file", str(cert),
                                      "--tls-key-file", str(key), "--tls-ca-cert-file",
                                      str(cert), "--tls-auth-clients", "no"])
    def listening() -> bool:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True

    wait_for(listening, 15, "the TLS port")
    for url in (f"rediss://localhost:{port}/0?ssl_ca_certs={cert}",
                f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none"):
        conn = Connection(url, 5.0)
        try:
            assert conn.call("PING") == b"PONG", url
            assert conn.call("PING") == b"PONG", url  # kept: TLS records are not "unasked"
        finally:
            conn.close()
    untrusted = failure(f"rediss://localhost:{port}/0")
    assert isinstance(untrusted, TlsError) and untrusted.reason == "tls_failed", untrusted
    assert "certificate verify failed" in str(untrusted)
    # TLS to a plain port: the server waits for the end of a command line that never comes.
    plain_port = failure(f"rediss://127.0.0.1:{plain.port}/0", timeout=0.5)
    assert isinstance(plain_port, RedisTimeoutError | TlsError), plain_port
