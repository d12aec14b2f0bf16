"""HTTP server: the metrics path, a landing page and /healthz."""

from __future__ import annotations

import gzip
import html
import logging
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.config import WebConfig, split_listen_address
from exporter.scrape import ScrapeRunner

log = logging.getLogger("exporter.server")


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


class _Handler(BaseHTTPRequestHandler):
    server: ExporterHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"qatoolbox-exporter/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # A slow or silent client cannot hold a thread longer than the read timeout.
        self.connection.settimeout(self.server.web.read_timeout)

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

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def _serve(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"OK\n", "text/plain; charset=utf-8", head)
            return
        if not self.server.slots.acquire(blocking=False):
            self._send(503, b"Too many concurrent requests\n", "text/plain; charset=utf-8", head,
                       {"Retry-After": "1"})
            return
        try:
            if path == self.server.web.telemetry_path:
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
        try:
            body = encoder(self.server.registry)
        except Exception:
            log.exception("scrape failed")
            self._send(500, b"Scrape failed\n", "text/plain; charset=utf-8", head)
            return
        headers = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, head, headers)


class ExporterHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the runner, registry and web settings."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, web: WebConfig, runner: ScrapeRunner) -> None:
        host, port = split_listen_address(web.listen_address)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.web = web
        self.runner = runner
        self.registry = make_registry(runner)
        self.slots = threading.BoundedSemaphore(web.max_requests)
        super().__init__((host or self._any_address(), port), _Handler)

    @staticmethod
    def _any_address() -> str:
        return "0.0.0.0"

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
