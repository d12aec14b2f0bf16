"""bench/compare_scrape.py: sample keys of an exposition (values dropped), their difference,
and the snapshot and diff commands' files and exit codes."""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from bench.compare_scrape import (
    EXIT_DIFFERENT,
    EXIT_SAME,
    EXIT_USAGE,
    difference,
    main,
    sample_keys,
)

TEXT = b"""\
# HELP qatoolbox_host_load1 1-minute load average.
# TYPE qatoolbox_host_load1 gauge
qatoolbox_host_load1 0.42
# HELP qatoolbox_app_http_requests_total Requests.
# TYPE qatoolbox_app_http_requests_total counter
qatoolbox_app_http_requests_total{route="/a",method="GET",status="200"} 7
qatoolbox_app_http_requests_total{method="POST",route="/a",status="500"} 1
# HELP qatoolbox_app_http_request_duration_seconds Latency.
# TYPE qatoolbox_app_http_request_duration_seconds histogram
qatoolbox_app_http_request_duration_seconds_bucket{route="/a",le="0.1"} 3
qatoolbox_app_http_request_duration_seconds_bucket{route="/a",le="+Inf"} 8
qatoolbox_app_http_request_duration_seconds_sum{route="/a"} 1.5
qatoolbox_app_http_request_duration_seconds_count{route="/a"} 8
# HELP qatoolbox_odd_info Odd label values.
# TYPE qatoolbox_odd_info gauge
qatoolbox_odd_info{text="a \\"quoted\\"\\nline"} 1
"""


def test_sample_keys_drop_values_and_sort_labels() -> None:
    assert sample_keys(TEXT) == [
        'qatoolbox_app_http_request_duration_seconds_bucket{le="+Inf",route="/a"}',
        'qatoolbox_app_http_request_duration_seconds_bucket{le="0.1",route="/a"}',
        'qatoolbox_app_http_request_duration_seconds_count{route="/a"}',
        'qatoolbox_app_http_request_duration_seconds_sum{route="/a"}',
        'qatoolbox_app_http_requests_total{method="GET",route="/a",status="200"}',
        'qatoolbox_app_http_requests_total{method="POST",route="/a",status="500"}',
        "qatoolbox_host_load1",
        'qatoolbox_odd_info{text="a \\"quoted\\"\\nline"}',
    ]
    # Other values, same keys.
    assert sample_keys(TEXT.replace(b" 7\n", b" 9\n").replace(b"0.42", b"3")) == sample_keys(TEXT)


def test_openmetrics_is_parsed_as_openmetrics() -> None:
    body = (b"# TYPE qatoolbox_up gauge\nqatoolbox_up{server=\"db\"} 1\n"
            b"# TYPE qatoolbox_jobs counter\nqatoolbox_jobs_total 3\n# EOF\n")
    assert sample_keys(body) == ["qatoolbox_jobs_total", 'qatoolbox_up{server="db"}']


def test_difference_names_what_each_side_lacks() -> None:
    before = sample_keys(TEXT)
    after = sample_keys(TEXT.replace(b'status="500"', b'status="503"')
                        .replace(b"qatoolbox_host_load1 0.42\n", b""))
    removed, added = difference(before, after)
    assert removed == ['qatoolbox_app_http_requests_total{method="POST",route="/a",status="500"}',
                       "qatoolbox_host_load1"]
    assert added == ['qatoolbox_app_http_requests_total{method="POST",route="/a",status="503"}']
    assert difference(before, list(reversed(before))) == ([], [])
    # A sample emitted twice is a difference from one emitted once.
    assert difference(["a", "a"], ["a"]) == (["a"], [])


def test_diff_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("a\nb{x=\"1\"}\n")
    two.write_text("a\nb{x=\"2\"}\n")
    assert main(["diff", str(one), str(one)]) == EXIT_SAME
    assert "same 2 samples" in capsys.readouterr().out
    assert main(["diff", str(one), str(two)]) == EXIT_DIFFERENT
    out = capsys.readouterr().out
    assert '- b{x="1"}\n+ b{x="2"}\n' in out and "1 samples only in" in out
    assert main(["diff", str(one), str(tmp_path / "missing.txt")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.txt" in err and "Traceback" not in err


class _Handler(http.server.BaseHTTPRequestHandler):
    accept: ClassVar[list[str]] = []  # the Accept header of each request

    def do_GET(self) -> None:
        type(self).accept.append(self.headers.get("Accept", ""))
        body = gzip.compress(TEXT)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def exposition_url() -> Iterator[str]:
    """A server answering TEXT, gzipped, on a free loopback port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_snapshot_scrapes_as_prometheus_does(exposition_url: str, tmp_path: Path) -> None:
    out = tmp_path / "snap.txt"
    _Handler.accept.clear()
    assert main(["snapshot", exposition_url, str(out), "--timeout", "10"]) == EXIT_SAME
    assert out.read_text().splitlines() == sample_keys(TEXT)
    assert _Handler.accept and _Handler.accept[0].startswith("application/openmetrics-text")
    assert main(["diff", str(out), str(out)]) == EXIT_SAME


def test_snapshot_of_nothing_is_one_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    assert main(["snapshot", f"http://127.0.0.1:{port}/metrics", str(tmp_path / "x"),
                 "--timeout", "5"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("compare_scrape: cannot scrape") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
