"""HTTP robustness: methods, size limits, read deadlines, concurrency and connection bounds."""

from __future__ import annotations

import functools
import gzip
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.config import Duration, WebConfig
from exporter.scrape import ScrapeRunner
from exporter.server import MAX_HEADER_BYTES, MAX_REQUEST_LINE, ExporterHTTPServer
from exporter.webconfig import WebConfigFile
from tests.harness import ExporterProcess, wait_for


class GateCollector:
    """A collector that blocks until the test opens the gate."""

    name = "gate"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.collections = 0

    def collect(self) -> Iterable[Metric]:
        self.collections += 1
        self.entered.set()
        self.gate.wait(30)
        family = GaugeMetricFamily("qatoolbox_test_gate", "A gate for tests.")
        family.add_metric([], 1.0)
        return [family]



def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)

class Server:
    """An in-process exporter HTTP server on a free port."""

    def __init__(self, max_requests: int = 4, read_timeout: float = 1.0,
                 header_timeout: float = 5.0, listen_address: str = "127.0.0.1:0",
                 security: WebConfigFile | None = None, **options: Any) -> None:
        self.collector = GateCollector()
        self.runner = ScrapeRunner([self.collector], timeout=30)
        web = WebConfig(listen_address=listen_address, max_requests=max_requests,
                        read_timeout=Duration(read_timeout),
                        header_timeout=Duration(header_timeout))
        self.httpd = ExporterHTTPServer(web, self.runner, security, **options)
        try:
            self.port = self.httpd.server_address[1]
            self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                           daemon=True)
            self.thread.start()
        except BaseException:
            self.httpd.server_close()
            self.runner.close()
            raise

    def close(self) -> None:
        self.collector.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.runner.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=20) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send data, read until the server closes the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return read_until_closed(sock)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("method", [b"FOO", b"PROPFIND", b"POST", b"PUT", b"DELETE", b"PATCH",
                                    b"OPTIONS", b"TRACE", b"CONNECT", b"get"])
def test_methods_other_than_get_and_head_get_405(server: Server, method: bytes) -> None:
    for path in (b"/metrics", b"/", b"/healthz", b"/nowhere"):
        response = server.raw(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")
        assert status_of(response) == 405, (method, path)
        assert b"\r\nAllow: GET, HEAD\r\n" in response


def test_paths(server: Server) -> None:
    assert server.get("/metrics")[0] == 200
    assert server.get("/metrics?name[]=x&debug=1")[0] == 200
    assert server.get("/")[0] == 200
    assert server.get("/healthz")[0] == 200
    for path in ("/metrics/", "/metricsx", "/favicon.ico", "/%2e%2e/etc/passwd", "/healthz/x"):
        assert server.get(path)[0] == 404, path
    response = server.raw(b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert response.endswith(b"\r\n\r\n")  # headers only


def test_request_line_limit(server: Server) -> None:
    path = b"/metrics?" + b"a" * MAX_REQUEST_LINE
    assert status_of(server.raw(b"GET " + path + b" HTTP/1.1\r\n\r\n")) == 414
    # Just under the limit is fine.
    fits = b"/metrics?" + b"a" * (MAX_REQUEST_LINE - 40)
    assert status_of(server.raw(b"GET " + fits + b" HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200


def test_header_limits(server: Server) -> None:
    big = b"X-Big: " + b"b" * MAX_HEADER_BYTES + b"\r\n"
    assert status_of(server.raw(b"GET /metrics HTTP/1.1\r\n" + big + b"\r\n")) == 431
    many = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(1000))
    assert len(many) > MAX_HEADER_BYTES
    assert status_of(server.raw(b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n")) == 431
    # More than 100 headers within the byte budget: still refused (the stdlib's count limit).
    counted = b"".join(b"X%d: 1\r\n" % i for i in range(150))
    assert len(counted) < MAX_HEADER_BYTES
    assert status_of(server.raw(b"GET /metrics HTTP/1.1\r\n" + counted + b"\r\n")) == 431
    assert server.get("/healthz")[0] == 200


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /metrics HTTP/9.9\r\n\r\n", 505),
    (b"GET /metrics HTTX/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9 style: a 400 and the connection closed
    (b"GET /\xff\xfe HTTP/1.1\r\nConnection: close\r\n\r\n", 404),
    (b"GET /metrics HTTP/1.1\r\nBad header line\r\nConnection: close\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX : y\r\n\r\n", 400),  # space before the colon
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),  # two spaces
    (b"GET /metrics\tHTTP/1.1\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\n\r\n", 400),
    (b"GET ftp://host/metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET http://user@host/metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /metrics HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", 400),
])
def test_malformed_requests_get_a_status(server: Server, request_bytes: bytes,
                                         expected: int) -> None:
    response = server.raw(request_bytes)
    assert status_of(response) == expected
    if expected != 404:
        assert b"\r\nConnection: close\r\n" in response.split(b"\r\n\r\n")[0] + b"\r\n"


def test_keep_alive_pipelining_and_bodies(server: Server) -> None:
    two = b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
    response = server.raw(two)
    assert response.count(b"HTTP/1.1 200 OK") == 2
    # A body that is never read must not be parsed as the next request.
    smuggled = (b"GET /healthz HTTP/1.1\r\nContent-Length: 27\r\n\r\n"
                b"POST /metrics HTTP/1.1\r\n\r\n")
    response = server.raw(smuggled)
    assert response.count(b"HTTP/1.1 ") == 1
    assert status_of(response) == 200
    # HTTP/1.0 keeps the connection only when asked, and is told so.
    response = server.raw(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                          b"HEAD /healthz HTTP/1.0\r\n\r\n")
    first, second = response.split(b"OK\n", 1)
    assert b"\r\nConnection: keep-alive\r\n" in first
    assert second.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in second
    assert second.endswith(b"\r\n\r\n")  # HEAD: no body


def test_silent_and_slow_clients_are_cut_off(server: Server) -> None:
    # read_timeout is 1 s: a silent connection is closed by the server.
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as silent:
        silent.sendall(b"GET /metr")
        started = time.monotonic()
        assert silent.recv(100) == b""
        assert time.monotonic() - started < 10
    # A client trickling a byte every 100 ms never finishes: one deadline covers the request.
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as slow:
        started = time.monotonic()
        closed = False
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 200:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            slow.setblocking(False)
            try:
                if slow.recv(100) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                slow.setblocking(True)
        assert closed
        assert time.monotonic() - started < 10
    # Meanwhile and afterwards, the server answers.
    assert server.get("/metrics")[0] == 200


def test_max_requests_answers_503_beyond_the_limit() -> None:
    srv = Server(max_requests=2, read_timeout=10)
    try:
        srv.collector.gate.clear()
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(srv.get("/metrics")[0]))
                   for _ in range(2)]
        threads[0].start()
        assert srv.collector.entered.wait(10)
        threads[1].start()
        # Both slots taken (the second request waits on the first one's collection). Polling
        # with requests could itself take the second slot just as the second scrape arrives.
        wait_for(lambda: srv.httpd.requests_in_progress() == 2, 10, "two scrapes in flight")
        assert srv.get("/")[0] == 503
        status, headers, _ = srv.get("/metrics")
        assert status == 503 and headers["Retry-After"] == "1"
        assert srv.get("/healthz")[0] == 200  # liveness is not counted
        srv.collector.gate.set()
        for thread in threads:
            thread.join(20)
        assert results == [200, 200]
        assert srv.get("/")[0] == 200
    finally:
        srv.close()


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed the connection nor sent anything on it yet."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
    return False


def test_idle_connections_are_evicted_and_threads_stay_bounded() -> None:
    """Past the connection limit, each new connection closes the oldest idle or incomplete
    one: an idle crowd costs no thread and cannot keep requests out (it used to get 503s)."""
    with Server(max_requests=2, read_timeout=30, header_timeout=30,
                max_connections=20) as srv:
        limit = srv.httpd.max_connections
        assert limit == 20
        # This server's own threads only: the process's thread count also moves with what
        # earlier tests left behind (idle workers of their servers exit on their own time) and
        # with the machine's load, which made a whole-process count flaky.
        idle: list[socket.socket] = []
        try:
            for _ in range(limit + 10):
                idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
            wait_for(lambda: not still_open(idle[9]), 30, "the oldest idle connections closed")
            assert srv.httpd.connection_count() <= limit
            assert srv.httpd.worker_threads() == 0  # no thread per connection
            for _ in range(25):
                assert srv.get("/metrics")[0] == 200
                assert srv.get("/healthz")[0] == 200
            # Each request made room by closing the oldest idle connection, never a new one.
            assert still_open(idle[-1])
            assert srv.httpd.connection_count() <= limit
            # Sequential requests reuse one worker; the pool's bound holds in any case.
            assert 1 <= srv.httpd.worker_threads() <= (srv.httpd.web.max_requests
                                                       + srv.httpd.auth_guard.capacity)
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: srv.httpd.connection_count() == 0, 30, "closed connections dropped")


@pytest.mark.integration
def test_real_exporter_survives_a_malformed_request_barrage(exporter_factory) -> None:
    process = exporter_factory(args=["--collector.host", "--no-collector.process"]
                               + [f"--no-collector.{n}" for n in _others("host")])
    port = process.port
    barrage = [
        b"\x00" * 5000, b"GET " + b"/" * 20000 + b" HTTP/1.1\r\n\r\n", b"\r\n" * 1000,
        b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /metrics HTTP/1.1\r\nAccept: " + b"text/plain;q=" * 500 + b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip, gzip;q=x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: \xff\xff\r\nAuthorization: Basic ????\r\n\r\n",
    ]
    for data in barrage:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    assert process.proc.poll() is None
    assert process.get("/healthz")[0] == 200
    assert process.scrape().value("qatoolbox_exporter_collector_success", collector="host") == 1
    assert_no_failure_logged(process.logs())


# A logfmt line at error level (exporter/logs.py writes `level=error`; a logged exception shows
# as `error=<message>`, never as a traceback).
ERROR_LINE = re.compile(r"^.*(?:^| )level=error(?: |$).*$", re.MULTILINE)


def assert_no_failure_logged(logs: str) -> None:
    """No error-level line ("request handler failed", "scrape failed", ...) and no traceback
    (an exception that escaped a thread is printed by threading, not logged)."""
    assert not ERROR_LINE.findall(logs), ERROR_LINE.findall(logs)[:5]
    assert "Traceback" not in logs, logs[-3000:]


@pytest.mark.integration
def test_broken_web_config_on_reload_never_fails_a_request(
        exporter_factory: Callable[..., ExporterProcess], workdir: Path) -> None:
    """A web config file that breaks in any way while the exporter runs (nested too deeply for
    the YAML parser, a NUL byte in a certificate path, a date that does not exist) is logged
    once, and every request is still answered with the previous settings."""
    import base64

    import bcrypt

    path = workdir / "web.yml"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"basic_auth_users: {{alice: '{hashed}'}}\n")
    process = exporter_factory(args=["--web.config.file", str(path), "--collector.host"]
                               + [f"--no-collector.{n}" for n in _others("host")]
                               + ["--no-collector.process"])
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    assert process.get("/metrics", headers=good)[0] == 200
    assert process.get("/metrics")[0] == 401
    broken = ["[" * 5000,
              'tls_server_config: {cert_file: "a\\0b.pem", key_file: b.key}\n',
              "rate_limit: {interval: 2001-13-01}\n"]
    for number, text in enumerate(broken, start=1):
        path.write_text(text)
        time.sleep(1.1)  # the file is looked at, at most once a second, on a request
        for _ in range(2):
            assert process.get("/metrics", headers=good)[0] == 200, text[:40]
            assert process.get("/")[0] == 401, text[:40]
            time.sleep(0.6)
        invalid = [line for line in process.logs().splitlines()
                   if "web config file invalid; keeping the previous settings" in line]
        assert len(invalid) == number, invalid  # once per broken version, not once a second
    assert "request handler failed" not in process.logs()
    path.write_text("{}\n")
    wait_for(lambda: process.get("/metrics")[0] == 200, 10, "the fixed file in force")
    # Only the three "invalid" lines are errors.
    errors = ERROR_LINE.findall(process.logs())
    assert len(errors) == 3 and all("web config file invalid" in line for line in errors), errors


def _others(keep: str) -> list[str]:
    from exporter.collectors import COLLECTORS

    return [name for name in COLLECTORS if name not in (keep, "process")]


class CountingSource:
    """Stands in for the server's source of families: counts encodings (each one collects
    once) and passes the families through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.encodings = 0

    def collect(self) -> Iterable[Metric]:
        self.encodings += 1
        return list(self.inner.collect())


def test_waiting_scrapes_share_one_encoded_body(server: Server) -> None:
    """Scrapes queued behind a stuck collection get one body, encoded and compressed once
    per format, not once each: a burst of waiters must not multiply the exporter's memory."""
    source = server.httpd.source = CountingSource(server.httpd.source)
    server.collector.gate.clear()
    bodies: list[tuple[int, str, bytes]] = []

    def scrape(gzipped: bool) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics",
                                     headers={"Accept-Encoding": "gzip"} if gzipped else {})
        with urllib.request.urlopen(req, timeout=20) as response:
            bodies.append((response.status, response.headers.get("Content-Encoding", ""),
                           response.read()))

    first = threading.Thread(target=scrape, args=(True,))
    first.start()
    assert server.collector.entered.wait(10)
    rest = [threading.Thread(target=scrape, args=(i % 2 == 0,)) for i in range(3)]
    for thread in rest:
        thread.start()
    # All of them wait on the stuck collection (each holds a request slot while it waits).
    wait_for(lambda: server.httpd.requests_in_progress() == 4, 10, "four scrapes waiting")
    server.collector.gate.set()
    for thread in [first, *rest]:
        thread.join(20)
    assert len(bodies) == 4 and {status for status, _, _ in bodies} == {200}
    zipped = [body for _, coding, body in bodies if coding == "gzip"]
    plain = [body for _, coding, body in bodies if coding == ""]
    assert len(zipped) == 3 and len(plain) == 1
    assert len(set(zipped)) == 1
    assert gzip.decompress(zipped[0]) == plain[0]
    # One encoding for the gzip flight, one for the plain request that joined the collection.
    assert source.encodings == 2
    assert server.collector.collections == 1


PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"


@pytest.mark.parametrize("gzipped", [True, False])
def test_concurrent_prometheus_scrapes_share_one_openmetrics_body(gzipped: bool) -> None:
    """Prometheus' own request, sent five times at once while the collection is stuck: the
    five share one collection, one encoding (with our OpenMetrics encoder) and one gzip,
    because the shared body is keyed on the content type and compression (prometheus_client's
    choose_encoder made a new partial per request, so a key on the encoder never matched)."""
    with Server(max_requests=8) as srv:
        source = srv.httpd.source = CountingSource(srv.httpd.source)
        srv.collector.gate.clear()
        results: list[tuple[int, str, str, bytes]] = []
        headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip" if gzipped else ""}

        def scrape() -> None:
            req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/metrics",
                                         headers=headers)
            with urllib.request.urlopen(req, timeout=20) as response:
                results.append((response.status, response.headers["Content-Type"],
                                response.headers.get("Content-Encoding", ""), response.read()))

        threads = [threading.Thread(target=scrape) for _ in range(5)]
        try:
            for thread in threads:
                thread.start()
            wait_for(lambda: srv.httpd.requests_in_progress() == 5, 10,
                     "five scrapes waiting on one collection")
        finally:
            srv.collector.gate.set()
            for thread in threads:
                thread.join(20)
        assert len(results) == 5
        assert {(status, ctype, coding) for status, ctype, coding, _ in results} == {
            (200, PROMETHEUS_TYPE, "gzip" if gzipped else "")}
        assert len({body for *_, body in results}) == 1
        body = gzip.decompress(results[0][3]) if gzipped else results[0][3]
        assert body.endswith(b"# EOF\n") and b"qatoolbox_test_gate 1.0\n" in body
        assert srv.collector.collections == 1
        assert source.encodings == 1


def test_worker_pool_runs_every_job_once_and_reuses_an_idle_worker() -> None:
    from exporter.workers import Pool

    pool = Pool(limit=4, idle=10)
    try:
        # One after another: a job's answer goes out only once its worker is idle again, so
        # the next request finds that worker (no second thread for sequential scrapes).
        for _ in range(50):
            answered = threading.Event()
            pool.submit(functools.partial(lambda event: event.set, answered))
            assert answered.wait(10)
        assert pool.threads() == 1
        # Many at once, with workers going idle while jobs arrive: each runs exactly once.
        ran: list[int] = []
        lock = threading.Lock()

        def job(number: int) -> Callable[[], None]:
            def then() -> None:
                with lock:
                    ran.append(number)
            return then

        def submit(base: int) -> None:
            for number in range(base, base + 250):
                pool.submit(functools.partial(job, number))

        submitters = [threading.Thread(target=submit, args=(base,))
                      for base in range(0, 1000, 250)]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join(20)
        wait_for(lambda: len(ran) == 1000, 20, "every job run")
        assert sorted(ran) == list(range(1000))
        assert pool.threads() <= 4
    finally:
        pool.close()
    wait_for(lambda: pool.threads() == 0, 10, "workers gone after close")
