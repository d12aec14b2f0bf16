"""Memory over time: the exporter's RSS while Prometheus-style scrapes come in, for a bounded time.

    .venv/bin/python bench/memory.py                          # an hour, a scrape every 15 s
    .venv/bin/python bench/memory.py --duration 600 --interval 1
    .venv/bin/python bench/memory.py --variant this=. --variant main=/tmp/main-export@15
    .venv/bin/python bench/memory.py --variant inst=. --variant dev=. --from-checkout dev

It starts the demo stack (as bench/compare.py does: PostgreSQL with the QAToolBox schema and
seed data, Redis, the demo app under gunicorn and Celery recording through exporter.instrument)
and keeps light loadgen traffic going on the app for the whole run, so the app collector's
files grow as in production. Each variant is an exporter with the default configuration (all
collectors on; only where things are: DB_*, REDIS_URL, app.multiprocess_dirs), connected as
docs/reliability.md's least-privilege role and ACL user, installed from its own checkout as
`pip install .` installs it (a wheel's files, compiled; no editable-install finder) in a
virtual environment of its own with this one's dependencies, and started by its
`qatoolbox-exporter` script (a variant is NAME=CHECKOUT[@INTERVAL]; `--from-checkout NAME` runs
it from the checkout in this environment instead, as the benchmarks before 5 December did).
Every exporter gets the request Prometheus sends (bench/scrape.py, PROMETHEUS_HEADERS) every
INTERVAL seconds; after each scrape its RSS, anonymous and file-backed resident memory are read
from /proc/<pid>/status.

It prints, per variant, the RSS at checkpoints (1, 5, 10, 15, 30, 45, 60 minutes and the end),
the peak (VmHWM), failed scrapes, and at the end the largest mappings of /proc/<pid>/smaps.
`--csv PATH` writes every sample. Everything listens on 127.0.0.1; the run stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.compare import (  # noqa: E402
    LOADGEN,
    Demo,
    start_demo,
    up_pattern,
    wait_scrape,
    wait_settled,
)
from bench.scrape import compile_package, fetch, install_package  # noqa: E402
from tests.harness import free_port, stop_process, tempdir  # noqa: E402

CHECKPOINTS_MIN = (1, 5, 10, 15, 30, 45, 60, 90, 120)
TARGET_MB = 40.0


@dataclass
class Sample:
    """One reading after a scrape."""

    seconds: float
    scrapes: int
    rss_kb: int
    anon_kb: int
    file_kb: int


@dataclass
class Variant:
    """One exporter under watch."""

    name: str
    checkout: Path
    interval: float
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    samples: list[Sample] = field(default_factory=list)
    scrapes: int = 0
    failed: int = 0
    next_at: float = 0.0
    peak_kb: int = 0


def parse_variant(text: str, default_interval: float) -> Variant:
    """NAME=CHECKOUT[@INTERVAL] (CHECKOUT "." is this one)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant: expected NAME=CHECKOUT[@INTERVAL], got {text!r}")
    path, at, interval = rest.partition("@")
    checkout = ROOT if path in ("", ".") else Path(path).resolve()
    if not (checkout / "exporter" / "__main__.py").exists():
        raise SystemExit(f"--variant {name}: {checkout} is not a checkout of this exporter")
    try:
        seconds = float(interval) if at else default_interval
    except ValueError:
        raise SystemExit(f"--variant {name}: interval {interval!r} is not a number") from None
    return Variant(name, checkout, seconds)


def status_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def smaps_top(pid: int, count: int = 12) -> list[tuple[str, int]]:
    """Resident kB by mapping (file path, [heap], or anonymous), largest first."""
    sizes: dict[str, int] = {}
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            fields = line.split()
            name = fields[5] if len(fields) > 5 else "[anonymous]"
        elif first == "Rss:":
            sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    return sorted(sizes.items(), key=lambda item: -item[1])[:count]


def start_variant(variant: Variant, demo: Demo, from_checkout: bool) -> None:
    """The exporter of a checkout, default config, waiting until every collector succeeds:
    installed as `pip install .` installs it, or (from_checkout) run from the checkout in this
    environment (the development venv's editable-install finder loaded)."""
    port = free_port()
    config = demo.base / f"memory-{variant.name}.yml"
    config.write_text(yaml.safe_dump({"app": {"multiprocess_dirs": [
        str(d) for d in demo.app.metrics_dirs]}}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DB_", "REDIS_", "PROMETHEUS_MULTIPROC", "PYTHON"))}
    env.update(demo.env)
    if from_checkout:
        env["PYTHONPATH"] = str(variant.checkout)
        compile_package(variant.checkout)
        command = [sys.executable, "-m", "exporter"]
        cwd = variant.checkout
    else:
        command = install_package(variant.checkout, demo.base / f"install-{variant.name}")
        cwd = demo.base
    log_file = (demo.base / f"memory-{variant.name}.log").open("ab")
    variant.proc = subprocess.Popen(
        [*command, "--web.listen-address", f"127.0.0.1:{port}", "--config.file", str(config)],
        cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    variant.url = f"http://127.0.0.1:{port}/metrics"
    poll = variant.proc.poll
    wait_scrape(variant.url, poll, up_pattern("qatoolbox_postgres_up"), 60)
    wait_scrape(variant.url, poll, up_pattern("qatoolbox_redis_up"), 60)
    wait_settled(variant.url, poll)


def scrape_once(variant: Variant, started: float) -> None:
    """One Prometheus-style scrape and the memory reading after it."""
    assert variant.proc is not None
    try:
        body = fetch(variant.url).body
        if any(line.startswith(b"qatoolbox_exporter_collector_success{")
               and line.endswith(b" 0.0") for line in body.splitlines()):
            variant.failed += 1
    except OSError:
        variant.failed += 1
    variant.scrapes += 1
    fields = status_kb(variant.proc.pid)
    variant.peak_kb = fields.get("VmHWM", 0)
    variant.samples.append(Sample(time.monotonic() - started, variant.scrapes,
                                  fields.get("VmRSS", 0), fields.get("RssAnon", 0),
                                  fields.get("RssFile", 0)))


def at_minute(samples: Sequence[Sample], minute: float) -> Sample | None:
    """The last sample at or before a minute mark."""
    found = None
    for sample in samples:
        if sample.seconds <= minute * 60 + 1:
            found = sample
    return found


def report(variants: Sequence[Variant], duration: float) -> str:
    """Markdown: RSS (anon / file) at each checkpoint, per variant."""
    marks = [m for m in CHECKPOINTS_MIN if m * 60 <= duration]
    head = ["variant (interval)", *(f"{m} min" for m in marks), "end", "peak (VmHWM)",
            "scrapes", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [f"{v.name} ({v.interval:g} s)"]
        for sample in [at_minute(v.samples, m) for m in marks] + [
                v.samples[-1] if v.samples else None]:
            cells.append(f"{sample.rss_kb / 1000:.1f} ({sample.anon_kb / 1000:.1f} / "
                         f"{sample.file_kb / 1000:.1f})" if sample else "-")
        cells += [f"{v.peak_kb / 1000:.1f}", str(v.scrapes), str(v.failed)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"RSS MB (anonymous / file-backed MB); target {TARGET_MB:g} MB after an hour.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=3600, help="seconds (default 3600)")
    parser.add_argument("--interval", type=float, default=15,
                        help="seconds between scrapes of a variant (default 15, Prometheus')")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=CHECKOUT[@INTERVAL], repeatable (default: this=.)")
    parser.add_argument("--traffic-rate", type=float, default=5,
                        help="loadgen requests per second on the demo app during the run")
    parser.add_argument("--csv", type=Path, help="write every sample here")
    parser.add_argument("--from-checkout", action="append", default=[], metavar="NAME",
                        help="run variant NAME from its checkout in this environment instead of "
                        "installing it as pip does (the editable-install finder then loads); "
                        "repeatable")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 4 * 3600 or args.interval <= 0:
        parser.error("--duration must be in (0, 14400] and --interval above 0")
    variants = [parse_variant(v, args.interval) for v in args.variant or ["this=."]]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # A SIGTERM stops the run as Ctrl-C does: everything it started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempdir() as base:
        demo = start_demo(base, 15, log)
        traffic: subprocess.Popen[bytes] | None = None
        try:
            for variant in variants:
                log(f"starting {variant.name} from {variant.checkout}")
                start_variant(variant, demo, variant.name in args.from_checkout)
            traffic = subprocess.Popen(
                [sys.executable, str(LOADGEN), "--url", demo.app.url, "--rate",
                 str(args.traffic_rate), "--duration", str(args.duration + 60), "--seed", "2"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            log(f"scraping for {args.duration:.0f} s")
            started = time.monotonic()
            for variant in variants:
                variant.next_at = started
            next_mark = 0
            marks = [m for m in CHECKPOINTS_MIN if m * 60 <= args.duration]
            while time.monotonic() - started < args.duration:
                due = min(variants, key=lambda v: v.next_at)
                time.sleep(max(0.0, due.next_at - time.monotonic()))
                scrape_once(due, started)
                due.next_at += due.interval
                if next_mark < len(marks) and time.monotonic() - started >= marks[next_mark] * 60:
                    log(" ".join(f"{v.name}: {v.samples[-1].rss_kb / 1000:.1f} MB"
                                 for v in variants if v.samples) + f" at {marks[next_mark]} min")
                    next_mark += 1
            print(report(variants, args.duration))
            for variant in variants:
                assert variant.proc is not None
                print(f"\n{variant.name}: largest resident mappings (kB)")
                for name, kb in smaps_top(variant.proc.pid):
                    print(f"  {kb:8d}  {name}")
            if args.csv:
                with args.csv.open("w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(["variant", "seconds", "scrapes", "rss_kb", "anon_kb",
                                     "file_kb"])
                    for variant in variants:
                        for s in variant.samples:
                            writer.writerow([variant.name, f"{s.seconds:.1f}", s.scrapes,
                                             s.rss_kb, s.anon_kb, s.file_kb])
        finally:
            if traffic is not None and traffic.poll() is None:
                traffic.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    traffic.wait(10)
            for variant in variants:
                if variant.proc is not None:
                    stop_process(variant.proc)
            demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
