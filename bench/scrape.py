"""Scrape benchmark: latency, series, bytes, CPU and peak RSS of exporters, side by side.

Every scrape here, and in the other bench/ scripts, is the request Prometheus sends: its
Accept header (OpenMetrics first, text 0.0.4 as the fallback) and Accept-Encoding gzip; the
body is decompressed to count its series.

Examples:
    .venv/bin/python bench/scrape.py                      # this exporter vs node_exporter
    .venv/bin/python bench/scrape.py --scrapes 500 --markdown
    .venv/bin/python bench/scrape.py --target other=http://127.0.0.1:9100/metrics,4242

Contenders are scraped in turn, run by run (A, B, A, B, ...), so drift on a noisy machine
hits all of them alike; compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")

# The headers of a Prometheus 2.x scrape (scrape/scrape.go: acceptHeader, and gzip), sent to
# this exporter and to the anchors alike: what is measured is the path Prometheus takes.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_HEADERS = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}


@dataclass
class Target:
    """One exporter to measure: its metrics URL and (optionally) its pid for CPU and RSS."""

    name: str
    url: str
    pid: int | None = None
    latencies: list[float] = field(default_factory=list)
    series: int = 0
    body_bytes: int = 0
    wire_bytes: int = 0
    content_type: str = ""
    cpu_start: float = 0.0
    cpu_end: float = 0.0


def compile_package(checkout: Path = ROOT) -> None:
    """Write the exporter's .pyc files, as pip install does. Started from a checkout without
    them (or with stale ones, and PYTHONDONTWRITEBYTECODE set, as on this machine), the exporter
    compiles its modules at every start, which costs CPU and resident memory that an installed
    one does not pay."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "exporter")],
                   check=True, stdout=subprocess.DEVNULL)


def install_package(checkout: Path, into: Path) -> list[str]:
    """Install a checkout as a user's `pip install .` does (a wheel's files and their .pyc, no
    editable-install finder) into a fresh virtual environment at `into`, whose dependencies
    are this environment's; return the command that starts its `qatoolbox-exporter` script.

    The development .venv is an editable install: every interpreter it starts imports
    setuptools' finder (pathlib, importlib.util, urllib.parse ...) from a .pth file, which the
    Docker image and the systemd unit's `pip install` do not have."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(into)], check=True)
    site = next((into / "lib").glob("python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--target", str(site),
                    str(checkout)], check=True, stdout=subprocess.DEVNULL)
    # The dependencies (prometheus-client, psycopg, PyYAML) from this environment: a path line
    # in a .pth file adds the folder without running that folder's own .pth files.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_bench_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return [str(into / "bin" / "python"), str(site / "bin" / "qatoolbox-exporter")]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class Response:
    """One scrape as Prometheus makes it: seconds until the last byte, the decoded body, the
    bytes on the wire and the content type served."""

    seconds: float
    body: bytes
    wire_bytes: int
    content_type: str


def fetch(url: str, timeout: float = 30) -> Response:
    """GET url with Prometheus' headers; the body decompressed when it came gzipped (after
    the clock stops: decompressing is the scraper's work, not the exporter's)."""
    request = urllib.request.Request(url, headers=PROMETHEUS_HEADERS)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
        seconds = time.perf_counter() - started
        gzipped = (response.headers.get("Content-Encoding") or "").lower() == "gzip"
        content_type = response.headers.get("Content-Type") or ""
    return Response(seconds, gzip.decompress(raw) if gzipped else raw, len(raw), content_type)


def scrape(url: str) -> tuple[float, bytes]:
    """One scrape with Prometheus' headers: seconds taken and the decoded body."""
    response = fetch(url)
    return response.seconds, response.body


def families(body: bytes) -> list[Metric]:
    """The metric families of a decoded body, with the parser of the format it is in."""
    text = body.decode()
    if text.endswith("# EOF\n"):
        return list(openmetrics_families(text))
    return list(text_families(text))


def count_series(body: bytes) -> int:
    """Samples in an exposition, text or OpenMetrics (lines that are not comments or blank;
    OpenMetrics' `# EOF` is a comment)."""
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def measure(targets: Sequence[Target], scrapes: int, warmup: int = 5, interval: float = 0.0,
            on_body: Callable[[Target, bytes], None] | None = None) -> None:
    """Scrape every target scrapes times, interleaved, recording latency and CPU; with an
    interval, one round (every target once) starts at most that often; on_body sees every
    measured response."""
    for _ in range(warmup):
        for target in targets:
            scrape(target.url)
    for target in targets:
        target.cpu_start = cpu_seconds(target.pid) if target.pid else 0.0
    for _ in range(scrapes):
        round_started = time.monotonic()
        for target in targets:
            response = fetch(target.url)
            target.latencies.append(response.seconds)
            target.series = count_series(response.body)
            target.body_bytes = len(response.body)
            target.wire_bytes = response.wire_bytes
            target.content_type = response.content_type
            if on_body is not None:
                on_body(target, response.body)
        if interval:
            time.sleep(max(0.0, interval - (time.monotonic() - round_started)))
    for target in targets:
        target.cpu_end = cpu_seconds(target.pid) if target.pid else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def content_format(content_type: str) -> str:
    """A short name for the format served: "OpenMetrics 1.0.0", "text 0.0.4"."""
    kind, *params = (part.strip() for part in content_type.split(";"))
    version = next((p.split("=", 1)[1] for p in params if p.startswith("version=")), "?")
    name = {"application/openmetrics-text": "OpenMetrics", "text/plain": "text"}.get(kind, kind)
    return f"{name} {version}" if name else "?"


def report(targets: Sequence[Target], scrapes: int, markdown: bool) -> str:
    """A table of the figures, plus ratios of the first target to each other one."""
    header = ["target", "median ms", "p95 ms", "series", "bytes", "gzip bytes",
              "CPU s/1000 scrapes", "peak RSS MB", "format"]
    rows = []
    for t in targets:
        cpu = (t.cpu_end - t.cpu_start) / scrapes * 1000 if t.pid else float("nan")
        rss = peak_rss_bytes(t.pid) / 1e6 if t.pid else float("nan")
        rows.append([t.name, f"{statistics.median(t.latencies) * 1000:.2f}",
                     f"{percentile(t.latencies, 95) * 1000:.2f}", str(t.series),
                     str(t.body_bytes), str(t.wire_bytes), f"{cpu:.2f}", f"{rss:.1f}",
                     content_format(t.content_type)])
    lines = []
    if markdown:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    first = targets[0]
    for other in targets[1:]:
        ratio = statistics.median(first.latencies) / statistics.median(other.latencies)
        lines.append(f"\nmedian latency ratio {first.name}/{other.name}: {ratio:.2f}")
    return "\n".join(lines)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            scrape(url)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within 20 s")


def main(argv: Sequence[str] | None = None) -> int:
    """Start this exporter (and node_exporter unless told otherwise) and compare them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes per target")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--no-node-exporter", action="store_true",
                        help="don't start prometheus-node-exporter beside this exporter")
    parser.add_argument("--exporter-arg", action="append", default=[],
                        help="extra flag for this exporter (repeatable)")
    parser.add_argument("--target", action="append", default=[],
                        help="another exporter to measure: NAME=URL[,PID] (repeatable)")
    args = parser.parse_args(argv)
    if not 1 <= args.scrapes <= 100_000:
        parser.error("--scrapes must be between 1 and 100000")

    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    try:
        port = _free_port()
        compile_package()
        env = {**os.environ, "DB_PORT": "1", "REDIS_URL": "redis://127.0.0.1:1/0"}
        ours = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}",
             *args.exporter_arg],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ours)
        targets.append(Target("qatoolbox-exporter", f"http://127.0.0.1:{port}/metrics", ours.pid))
        _wait_up(targets[0].url, ours)
        node = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
        if not args.no_node_exporter:
            if node is None:
                parser.error("prometheus-node-exporter not found (apt-get install "
                             "prometheus-node-exporter) or pass --no-node-exporter")
            node_port = _free_port()
            node_proc = subprocess.Popen([node, f"--web.listen-address=127.0.0.1:{node_port}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(node_proc)
            targets.append(Target("node_exporter", f"http://127.0.0.1:{node_port}/metrics",
                                  node_proc.pid))
            _wait_up(targets[-1].url, node_proc)
        for spec in args.target:
            name, _, rest = spec.partition("=")
            url, _, pid = rest.partition(",")
            if not name or not url:
                parser.error(f"--target: expected NAME=URL[,PID], got {spec!r}")
            targets.append(Target(name, url, int(pid) if pid else None))
        measure(targets, args.scrapes)
        print(report(targets, args.scrapes, args.markdown))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
