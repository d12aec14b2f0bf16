"""The real exporter over HTTP: metrics, formats, landing page, health, errors and promtool."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exporter import __version__
from exporter.collectors import COLLECTORS
from tests.harness import ExporterProcess, Scrape, free_port, tempdir
from tests.test_landing import tables

Factory = Callable[..., ExporterProcess]

HOST_METRICS = (
    "qatoolbox_host_cpu_seconds_total", "qatoolbox_host_load1", "qatoolbox_host_load5",
    "qatoolbox_host_load15", "qatoolbox_host_memory_total_bytes",
    "qatoolbox_host_memory_available_bytes", "qatoolbox_host_memory_free_bytes",
    "qatoolbox_host_memory_cached_bytes", "qatoolbox_host_memory_buffers_bytes",
    "qatoolbox_host_swap_total_bytes", "qatoolbox_host_swap_free_bytes",
    "qatoolbox_host_filesystem_size_bytes", "qatoolbox_host_filesystem_avail_bytes",
    "qatoolbox_host_filesystem_free_bytes", "qatoolbox_host_filesystem_files",
    "qatoolbox_host_filesystem_files_free", "qatoolbox_host_filesystem_readonly",
    "qatoolbox_host_disk_read_bytes_total", "qatoolbox_host_disk_written_bytes_total",
    "qatoolbox_host_disk_reads_completed_total", "qatoolbox_host_disk_writes_completed_total",
    "qatoolbox_host_disk_io_time_seconds_total", "qatoolbox_host_disk_read_time_seconds_total",
    "qatoolbox_host_disk_write_time_seconds_total",
    "qatoolbox_host_network_receive_bytes_total", "qatoolbox_host_network_transmit_bytes_total",
    "qatoolbox_host_network_receive_packets_total",
    "qatoolbox_host_network_transmit_packets_total",
    "qatoolbox_host_network_receive_errors_total", "qatoolbox_host_network_transmit_errors_total",
    "qatoolbox_host_network_receive_drop_total", "qatoolbox_host_network_transmit_drop_total",
    "qatoolbox_host_boot_time_seconds",
)
PROCESS_METRICS = (
    "qatoolbox_process_num_procs", "qatoolbox_process_cpu_seconds_total",
    "qatoolbox_process_resident_memory_bytes", "qatoolbox_process_open_fds",
    "qatoolbox_process_threads",
)


def closed_backends() -> dict[str, str]:
    """PostgreSQL and Redis settings pointing at loopback ports where nothing listens."""
    return {"DB_HOST": "127.0.0.1", "DB_PORT": str(free_port()),
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}


@pytest.fixture(scope="module")
def shared() -> Iterator[ExporterProcess]:
    """One exporter with no config file for the tests that only read from it."""
    with tempdir() as base:
        exporter = ExporterProcess(base, env=closed_backends()).start()
        try:
            yield exporter
        finally:
            exporter.stop()


def success(scrape: Scrape, collector: str) -> float | None:
    return scrape.value("qatoolbox_exporter_collector_success", collector=collector)


def request(exporter: ExporterProcess, path: str, method: str) -> tuple[int, bytes]:
    req = urllib.request.Request(exporter.url + path, method=method,
                                 data=b"x" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_no_config_serves_host_and_process(shared: ExporterProcess) -> None:
    exporter = shared
    scrape = exporter.scrape()
    names = scrape.names()
    for name in HOST_METRICS + PROCESS_METRICS:
        assert name in names, name
    for group in ("web", "celery", "postgres", "redis"):
        assert scrape.value("qatoolbox_process_num_procs", group=group) is not None, group
    assert success(scrape, "host") == 1.0
    assert success(scrape, "process") == 1.0
    assert scrape.value("qatoolbox_exporter_collector_duration_seconds",
                        collector="host") is not None
    build = [labels for name, labels in scrape.series("qatoolbox_exporter_build_info")]
    assert len(build) == 1 and build[0]["version"] == __version__
    assert build[0]["python_version"].count(".") == 2
    # every enabled collector reports its outcome, every scrape
    enabled = {n for n, spec in COLLECTORS.items() if spec.default_enabled}
    reported = {labels["collector"] for _, labels in
                scrape.series("qatoolbox_exporter_collector_success")}
    assert reported == enabled
    # the exporter's own registry: no client-library process_* or python_* series
    assert {n for n in names if not n.startswith("qatoolbox_")} == set()


def test_unreachable_postgres_and_redis_still_answer_fast(exporter_factory: Factory) -> None:
    backends = [n for n in ("postgres", "redis") if n in COLLECTORS]
    exporter = exporter_factory(
        config={"collectors": dict.fromkeys(backends, True), "scrape": {"timeout": "4s"}},
        env=closed_backends())
    for _ in range(2):
        started = time.monotonic()
        scrape = exporter.scrape()
        took = time.monotonic() - started
        assert took < 3, f"scrape took {took:.1f}s with closed backend ports"
        assert success(scrape, "host") == 1.0
        assert success(scrape, "process") == 1.0
        for name in backends:
            # the dependency shows as down one way or the other: `*_up 0` or `success 0`
            up = scrape.value(f"qatoolbox_{name}_up")
            assert 0.0 in (up, success(scrape, name)), (name, up, success(scrape, name))


def test_promtool_check_metrics_is_clean(shared: ExporterProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not installed (apt-get install prometheus)")
    exporter = shared
    exporter.scrape()  # the second scrape has every collector's outcome from a warm start
    status, _, body = exporter.get("/metrics")
    assert status == 200
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                            timeout=30, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, b"")


def test_landing_health_404_and_methods(exporter_factory: Factory) -> None:
    exporter = exporter_factory(env=closed_backends())
    status, headers, body = exporter.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert "qatoolbox-exporter" in page and __version__ in page
    assert 'href="/metrics"' in page
    # True before any scrape: the page runs a collection of its own (tests/test_landing.py).
    rows = tables(page)["Collectors"]
    assert rows["host"][1] == "ok" and rows["process"][1] == "ok", rows
    exporter.scrape()
    rows = tables(exporter.get("/")[2].decode())["Collectors"]
    assert rows["host"][1] == "ok" and rows["host"][3].endswith(" ms"), rows
    if "postgres" in COLLECTORS and COLLECTORS["postgres"].default_enabled:
        assert rows["postgres"][1] == "failing", rows

    assert exporter.get("/healthz")[:1] == (200,)
    assert exporter.get("/nope")[0] == 404
    assert exporter.get("/metrics/extra")[0] == 404
    for method in ("POST", "PUT", "DELETE"):
        assert request(exporter, "/metrics", method)[0] == 405, method
    status, body = request(exporter, "/metrics", "HEAD")
    assert (status, body) == (200, b"")
    assert exporter.get("/metrics?debug=1")[0] == 200


def test_openmetrics_when_asked(shared: ExporterProcess) -> None:
    exporter = shared
    status, headers, body = exporter.get(
        "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE qatoolbox_host_cpu_seconds counter" in text
    # the header Prometheus itself sends
    prometheus_accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                         "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    status, headers, body = exporter.get("/metrics", {"Accept": prometheus_accept})
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    status, headers, body = exporter.get("/metrics")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# EOF" not in body.decode()


def test_gzip_when_accepted(shared: ExporterProcess) -> None:
    exporter = shared
    status, headers, body = exporter.get("/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers.get("Content-Encoding") == "gzip"
    assert int(headers["Content-Length"]) == len(body)
    text = gzip.decompress(body).decode()
    assert "qatoolbox_host_memory_total_bytes" in text
    for accepted in ("deflate, gzip;q=1.0", "br;q=1, GZIP;q=0.5", "x-gzip"):
        headers = exporter.get("/metrics", {"Accept-Encoding": accepted})[1]
        assert headers.get("Content-Encoding") == "gzip", accepted
    for refused in ("identity", "gzip;q=0", "br, gzip; q=0.000", "gzipx"):
        status, headers, body = exporter.get("/metrics", {"Accept-Encoding": refused})
        assert "Content-Encoding" not in headers, refused
        assert b"qatoolbox_host_memory_total_bytes" in body


def test_custom_telemetry_path(exporter_factory: Factory) -> None:
    exporter = exporter_factory(args=["--web.telemetry-path", "/custom"], env=closed_backends())
    status, _, body = exporter.get("/custom")
    assert status == 200 and b"qatoolbox_host_load1" in body
    assert exporter.get("/metrics")[0] == 404
    assert 'href="/custom"' in exporter.get("/")[2].decode()


def test_no_collector_process_removes_process_metrics(exporter_factory: Factory) -> None:
    exporter = exporter_factory(args=["--no-collector.process"], env=closed_backends())
    scrape = exporter.scrape()
    assert not scrape.series("qatoolbox_process_")
    assert success(scrape, "process") is None
    assert success(scrape, "host") == 1.0
    assert "<td>process</td>" not in exporter.get("/")[2].decode()


def test_json_logs_and_sigterm_exit_zero(exporter_factory: Factory) -> None:
    exporter = exporter_factory(args=["--log.format", "json"], env=closed_backends())
    exporter.scrape()
    assert exporter.stop() == 0
    lines = [line for line in exporter.logs().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    messages = [r["msg"] for r in records]
    assert "listening" in messages and "shutting down" in messages
    listening = records[messages.index("listening")]
    assert listening["level"] == "info" and listening["path"] == "/metrics"
    assert records[messages.index("shutting down")]["signal"] == "SIGTERM"


def test_failing_backend_logs_once_not_per_scrape(exporter_factory: Factory) -> None:
    if "redis" not in COLLECTORS:
        pytest.skip("no redis collector in this build")
    exporter = exporter_factory(config={"collectors": {"redis": True}}, env=closed_backends())
    for _ in range(4):
        assert success(exporter.scrape(), "redis") == 0.0
    exporter.stop()
    failed = [line for line in exporter.logs().splitlines()
              if "collector failed" in line and "collector=redis" in line]
    assert len(failed) == 1, exporter.logs()


def test_port_already_in_use_is_one_line_and_exit_1(exporter_factory: Factory) -> None:
    first = exporter_factory(env=closed_backends())
    from tests.harness import run_exporter

    result = run_exporter(["--web.listen-address", f"127.0.0.1:{first.port}"],
                          env=closed_backends())
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{first.port}" in lines[0] and "in use" in lines[0]
    assert "Traceback" not in result.stderr
    assert first.get("/healthz")[0] == 200


def test_log_level_flag(exporter_factory: Factory) -> None:
    quiet = exporter_factory(args=["--log.level", "error"], env=closed_backends())
    chatty = exporter_factory(args=["--log.level", "debug"], env=closed_backends())
    for exporter in (quiet, chatty):
        exporter.get("/healthz")
        assert exporter.stop() == 0
    assert "msg=listening" not in quiet.logs()
    assert "level=info" not in quiet.logs() and "level=debug" not in quiet.logs()
    assert "level=debug" in chatty.logs() and "msg=request" in chatty.logs()
    # logfmt is the default format
    listening = [line for line in chatty.logs().splitlines() if "msg=listening" in line]
    assert len(listening) == 1
    assert "level=info" in listening[0] and "path=/metrics" in listening[0]


def test_prometheus_request_is_served_by_our_encoder_as_prometheus_client_would(
        shared: ExporterProcess) -> None:
    """Prometheus' own request gets OpenMetrics from exporter.textformat: the body parses
    back into families that prometheus_client's encoder writes byte for byte the same."""
    from prometheus_client.openmetrics import exposition
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    prometheus_accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                         "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    status, headers, body = shared.get("/metrics", {"Accept": prometheus_accept,
                                                    "Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert headers["Content-Type"] == ("application/openmetrics-text; version=1.0.0; "
                                       "charset=utf-8; escaping=underscores")
    text = gzip.decompress(body).decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) > 20

    class Parsed:
        def collect(self) -> list[object]:
            return families

    assert exposition.generate_latest(Parsed()).decode() == text


def test_ssl_stays_out_unless_tls_needs_it() -> None:
    """exporter.lean keeps the ssl module (and the system OpenSSL, ~5 MB resident) out of
    psycopg's and asyncio's imports, and the server imports it only for a TLS web config;
    ssl then still works for whoever needs it (a TLS web config, rediss://). psycopg reads
    its version without importlib.metadata (~1.6 MB), and gets the same one."""
    code = """
import sys
import exporter.scrape, exporter.server, exporter.webconfig
import psycopg
assert psycopg.pq.__impl__ in ("binary", "c", "python"), psycopg.pq.__impl__
import asyncio.base_events
assert asyncio.base_events.ssl is None
assert "ssl" not in sys.modules, "ssl imported"
assert "importlib.metadata" not in sys.modules, "importlib.metadata imported"
assert "tempfile" not in sys.modules and "ctypes.util" not in sys.modules, "ctypes.util imported"
assert "typing_extensions" not in sys.modules, "typing_extensions imported"
from exporter.lean import _ctypes_util_stand_in
assert _ctypes_util_stand_in().find_library("c")
import importlib.metadata
assert psycopg.__version__ == importlib.metadata.version("psycopg"), psycopg.__version__
import ssl
assert isinstance(ssl.create_default_context(), ssl.SSLContext)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_typing_extensions_stand_in_gives_what_psycopg_takes() -> None:
    """psycopg takes only TypeVar of typing_extensions on Python 3.11 and 3.12: the stand-in
    makes typing's (default= is for type checkers); any other name comes from the real
    module, loaded aside, so a psycopg that asks for more still imports."""
    import typing

    from exporter.lean import _typing_extensions_stand_in

    stand_in = _typing_extensions_stand_in()
    row = stand_in.TypeVar("Row", covariant=True, default=tuple)
    assert isinstance(row, typing.TypeVar) and row.__covariant__ and row.__name__ == "Row"

    class Box(typing.Generic[row]):  # type: ignore[misc]
        pass

    assert Box[int].__args__ == (int,)  # type: ignore[misc]
    assert stand_in.Protocol.__name__ == "Protocol"  # the real module's, loaded aside
    assert stand_in.Literal is typing.Literal
    with pytest.raises(AttributeError):
        stand_in.__wrapped__  # noqa: B018


def test_psycopg_pure_python_binding_still_finds_libpq() -> None:
    """The ctypes.util stand-in is only for psycopg's C bindings: its ctypes binding
    (PSYCOPG_IMPL=python) looks libpq up with the real find_library."""
    code = """
import exporter.scrape
import psycopg
assert psycopg.pq.__impl__ == "python", psycopg.pq.__impl__
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False, env={**os.environ, "PSYCOPG_IMPL": "python"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_one_off_work_leaves_no_modules_resident() -> None:
    """The listen address check and the Redis client resolve ASCII names as bytes: a str
    makes getaddrinfo load encodings.idna, stringprep and unicodedata (0.4 MB) for good. The
    shipped business queries are read as a plain file: importlib.resources would bring
    tempfile, zipfile, shutil and random (~1 MB)."""
    code = """
import os
import socket, sys
from exporter.checks import listen_problems
from exporter.collectors.business_config import business_defaults
import exporter.landing
assert business_defaults()
from exporter.resp import Connection, RedisError
listen_problems("localhost:0")
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()
try:
    Connection(f"redis://localhost:{port}/0", 2.0).call("PING")
except RedisError:
    pass
assert "encodings.idna" not in sys.modules, "idna loaded"
for name in ("importlib.resources", "tempfile", "zipfile", "html.entities"):
    assert name not in sys.modules, name + " loaded"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_parsing_the_command_line_loads_no_archive_modules() -> None:
    """argparse's help formatter imports shutil for the terminal width at every
    add_argument(), and shutil loads bz2 and lzma with their libraries (0.5 MB resident): the
    exporter's formatter is told the width, and --help comes out as argparse's own would."""
    code = """
import argparse, sys
from exporter.cliflags import build_parser, parse
parse(["--config.file", "x.yml", "--no-collector.redis"])
for name in ("shutil", "bz2", "lzma"):
    assert name not in sys.modules, name + " loaded"
parser = build_parser()
ours = parser.format_help()
parser.formatter_class = argparse.RawDescriptionHelpFormatter
assert ours == parser.format_help()
print(len(ours.splitlines()))
"""
    lines = []
    for columns in ("60", "120"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60, check=False, env={**os.environ, "COLUMNS": columns})
        assert result.returncode == 0, result.stderr[-2000:]
        lines.append(int(result.stdout.strip()))
    assert lines[0] > lines[1]  # wrapped to the width asked for


def test_import_without_is_scoped_to_the_one_import(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """exporter.lean.import_without: the module named gets the stand-in (or an ImportError
    for None) during its own first import only; afterwards the real module imports as usual,
    and a module whose stand-in target is already loaded is imported untouched."""
    import types

    from exporter import lean

    folder = tmp_path
    (folder / "qatb_real_dep.py").write_text("REAL = True\n")
    (folder / "qatb_user.py").write_text(
        "import qatb_real_dep as dep\n"
        "try:\n    import qatb_other_dep\nexcept ImportError:\n    qatb_other_dep = None\n")
    (folder / "qatb_other_dep.py").write_text("OTHER = True\n")
    monkeypatch.syspath_prepend(str(folder))
    stand_in = types.ModuleType("qatb_real_dep")
    try:
        assert lean.import_without("qatb_user", qatb_real_dep=stand_in, qatb_other_dep=None)
        import qatb_user  # type: ignore[import-not-found]

        assert qatb_user.dep is stand_in and qatb_user.qatb_other_dep is None
        assert "qatb_real_dep" not in sys.modules and "qatb_other_dep" not in sys.modules
        import qatb_other_dep  # type: ignore[import-not-found]
        import qatb_real_dep  # type: ignore[import-not-found]

        assert qatb_real_dep.REAL and qatb_other_dep.OTHER
        assert not lean.import_without("qatb_user", qatb_real_dep=None)  # imported already
    finally:
        for name in ("qatb_user", "qatb_real_dep", "qatb_other_dep"):
            sys.modules.pop(name, None)
