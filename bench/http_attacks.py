"""HTTP attack benchmark: this exporter's HTTP server and a Go one (Prometheus), side by side.

The findings of the outside attack (issues 14 and 22), replayed against both: 100 quick
connections in a row (the listen backlog), probes answered while 100 idle connections or a
slowloris of 100 are held, RSS and threads with 1,000 idle connections, and the log lines
that 1,000 malformed requests write. Prometheus is the anchor: a Go net/http server, as every
Go exporter has.

Examples:
    .venv/bin/python -m bench.http_attacks
    .venv/bin/python -m bench.http_attacks --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.scrape import _free_port, _wait_up
from exporter.collectors import COLLECTORS

ROOT = Path(__file__).resolve().parent.parent
MALFORMED = [
    b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=abc\r\n"
    b"Connection: close\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0.1\r\n"
    b" X-Injected: yes\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 25\r\n\r\n",
    b"GARBAGE\r\n\r\n",
]


@dataclass
class Server:
    """A running server: its port, the paths a probe asks for, its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    paths: tuple[str, str]
    log: Path

    def probe(self, path: str) -> int | str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=5) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError as exc:
            return type(exc).__name__

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0


@contextlib.contextmanager
def exporter(workdir: Path) -> Iterator[Server]:
    port = _free_port()
    log = workdir / "exporter.log"
    flags = [f"--collector.{n}" if n == "host" else f"--no-collector.{n}" for n in COLLECTORS]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "--web.listen-address",
                                 f"127.0.0.1:{port}", *flags], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        yield Server("qatoolbox-exporter", proc, port, ("/healthz", "/metrics"), log)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def prometheus(workdir: Path) -> Iterator[Server]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus not installed (apt-get install prometheus): the Go anchor")
    port = _free_port()
    config = workdir / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1h}\nscrape_configs: []\n")
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_up(f"http://127.0.0.1:{port}/-/healthy", proc)
        yield Server("prometheus (Go)", proc, port, ("/-/healthy", "/metrics"), log)
    finally:
        proc.terminate()
        proc.wait(30)


def quick_connections(server: Server, count: int = 100) -> dict[str, object]:
    """count connections opened in a row, each sending a request; answers read afterwards."""
    socks: list[socket.socket] = []
    slow = 0
    started = time.monotonic()
    try:
        for _ in range(count):
            began = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            socks.append(sock)
            slow += time.monotonic() - began > 0.9  # a SYN retransmit: the backlog was full
            sock.sendall(f"GET {server.paths[0]} HTTP/1.1\r\nHost: x\r\n"
                         "Connection: close\r\n\r\n".encode())
        ok = 0
        for sock in socks:
            with contextlib.suppress(OSError):
                ok += sock.recv(12) == b"HTTP/1.1 200"
        return {"seconds": round(time.monotonic() - started, 2), "slow_connects": slow, "ok": ok}
    finally:
        for sock in socks:
            sock.close()


def idle_crowd(server: Server, count: int = 100, probes: int = 12) -> str:
    """Probes answered 200 while count idle connections are held (opened 20 ms apart)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            time.sleep(0.02)
        answers = [server.probe(server.paths[i % 2]) for i in range(probes)]
        return f"{answers.count(200)} of {probes}"
    finally:
        for sock in held:
            sock.close()


def slowloris(server: Server, count: int = 100, probes: int = 50) -> str:
    """Probes answered 200 while count clients trickle a header, a byte each per 0.5 s."""
    stop = threading.Event()

    def trickle() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            kept = []
            for sock in socks:
                try:
                    sock.sendall(b"a")
                    kept.append(sock)
                except OSError:
                    sock.close()
            while len(kept) < count and not stop.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
                    sock.sendall(b"GET / HTTP/1.1\r\nX-a: ")
                    kept.append(sock)
                    time.sleep(0.01)
                except OSError:
                    break
            socks = kept
            stop.wait(0.5)
        for sock in socks:
            sock.close()

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(2)
        answers = []
        for i in range(probes):
            answers.append(server.probe(server.paths[i % 2]))
            time.sleep(0.1)
        return f"{answers.count(200)} of {probes}"
    finally:
        stop.set()
        thread.join(30)


def idle_thousand(server: Server) -> dict[str, object]:
    """RSS and threads with 1,000 idle connections held, and whether a probe is answered."""
    before = server.status("VmRSS")
    held: list[socket.socket] = []
    try:
        for _ in range(1000):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        time.sleep(1)
        return {"rss_mb": f"{before // 1024} -> {server.status('VmRSS') // 1024}",
                "threads": server.status("Threads"), "probe": server.probe(server.paths[1])}
    finally:
        for sock in held:
            sock.close()


def log_flood(server: Server, count: int = 1000) -> str:
    """Log lines (and bytes) written for count malformed requests, and how many of them kept
    their connection open for 2 s (the server waiting for more)."""
    time.sleep(0.5)
    start = server.log.read_bytes()
    held = 0
    for number in range(count):
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            sock.sendall(MALFORMED[number % len(MALFORMED)])
            try:
                while sock.recv(65536):
                    pass
            except TimeoutError:
                held += 1
            except OSError:
                pass
    time.sleep(0.5)
    new = server.log.read_bytes()[len(start):]
    lines = new.count(b"\n")
    return f"{lines} lines, {len(new)} bytes; {held} connections held"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, object]] = {}
    for start in (exporter, prometheus):
        with tempfile.TemporaryDirectory() as tmp, start(Path(tmp)) as server:
            results: dict[str, object] = {}
            # First, while no earlier client error has started a log interval.
            results["log for 1,000 malformed requests"] = log_flood(server)
            results["100 quick connections"] = quick_connections(server)
            results["probes 200 under 100 idle"] = idle_crowd(server)
            results["probes 200 under slowloris of 100"] = slowloris(server)
            results["1,000 idle connections"] = idle_thousand(server)
            rows[server.name] = results
            print(server.name, results, file=sys.stderr)
    names = list(rows)

    def cell(value: object) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items())
        return str(value)

    if args.markdown:
        print("| | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        for key in rows[names[0]]:
            print(f"| {key} | " + " | ".join(cell(rows[n][key]) for n in names) + " |")
    else:
        for key in rows[names[0]]:
            print(f"{key}: " + "; ".join(f"{n}: {cell(rows[n][key])}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
