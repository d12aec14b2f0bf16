"""Encoder benchmark: CPU to encode the demo stack's metric families in each format.

    .venv/bin/python bench/encoders.py                    # starts the demo stack (~1-2 min)
    .venv/bin/python bench/encoders.py --url http://127.0.0.1:9786/metrics

Captures one scrape of this exporter on the demo stack (PostgreSQL with QAToolBox's schema and
seed data, Redis, the demo app's worker files; bench/compare.py's setup) or of a running
exporter, parses it back into metric families, then encodes them with exporter.textformat's
text and OpenMetrics encoders and prometheus_client's, interleaved round by round, in thread
CPU time (time descheduled on a busy machine is left out); also gzip at the level the server
uses. Prints the median and p10 per encoder and the ratios.

The same families come back every round, so this exporter's encoders reuse every line (the
best case: on the demo stack ~82% of the values are unchanged after 15 s); the "nothing
remembered" rows use a new encoder each time (the worst case: every name and line rendered
again).
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client.exposition import generate_latest as their_text  # noqa: E402
from prometheus_client.openmetrics.exposition import (  # noqa: E402
    generate_latest as their_openmetrics,
)

from bench.scrape import families, fetch  # noqa: E402
from exporter import textformat  # noqa: E402


class Captured:
    """A registry that serves the same families on every collect()."""

    def __init__(self, fams: Sequence[Any]) -> None:
        self.families = list(fams)

    def collect(self) -> list[Any]:
        return self.families


def capture_demo(log: Callable[[str], None]) -> bytes:
    """One scrape of this exporter on the demo stack, decoded."""
    from bench.compare import start_demo, start_ours
    from tests.harness import tempdir

    with tempdir() as base:
        demo = start_demo(base, 6, log)
        try:
            ours = start_ours(base, demo.env, demo.app.metrics_dirs)
            try:
                return fetch(ours.target.url).body
            finally:
                ours.stop()
        finally:
            demo.stop()


def cold_openmetrics(registry: Any) -> bytes:
    """A new encoder, so nothing is remembered from an earlier encoding."""
    return textformat.OpenMetricsEncoder()(registry)


def timed(encoders: dict[str, Callable[[Any], bytes]], registry: Captured, rounds: int
          ) -> dict[str, list[float]]:
    """Thread CPU seconds of each encoder, interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(5):
        for encode in encoders.values():
            encode(registry)
    for _ in range(rounds):
        for name, encode in encoders.items():
            started = time.thread_time()
            encode(registry)
            times[name].append(time.thread_time() - started)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="capture from this running exporter instead")
    parser.add_argument("--rounds", type=int, default=300, help="encodings per encoder")
    args = parser.parse_args(argv)
    if not 10 <= args.rounds <= 100_000:
        parser.error("--rounds must be between 10 and 100000")
    body = fetch(args.url).body if args.url else capture_demo(print)
    registry = Captured(families(body))
    samples = sum(len(f.samples) for f in registry.families)
    plain = textformat.generate_latest(registry)
    encoders: dict[str, Callable[[Any], bytes]] = {
        "exporter.textformat text 0.0.4": textformat.generate_latest,
        "exporter.textformat OpenMetrics 1.0.0": textformat.generate_openmetrics,
        "exporter.textformat OpenMetrics 1.0.0, nothing remembered":
            cold_openmetrics,
        "prometheus_client text 0.0.4": their_text,
        "prometheus_client OpenMetrics 1.0.0": their_openmetrics,
        "gzip level 1 of the text body": lambda _: gzip.compress(plain, compresslevel=1),
    }
    for name, encode in encoders.items():
        if name.startswith("exporter.textformat"):
            theirs = their_text if "text 0.0.4" in name else their_openmetrics
            assert encode(registry) == theirs(registry), f"{name}: not the same bytes"
    times = timed(encoders, registry, args.rounds)
    print(f"{len(registry.families)} families, {samples} samples, {len(plain):,} bytes of "
          f"text; {args.rounds} rounds, thread CPU time\n")
    print("| encoder | median ms | p10 ms |")
    print("|---|---:|---:|")
    for name, values in times.items():
        ordered = sorted(values)
        print(f"| {name} | {statistics.median(values) * 1000:.2f} | "
              f"{ordered[len(ordered) // 10] * 1000:.2f} |")
    median = {name: statistics.median(values) for name, values in times.items()}
    print()
    pairs = (("exporter.textformat text 0.0.4", "prometheus_client text 0.0.4"),
             ("exporter.textformat OpenMetrics 1.0.0", "prometheus_client OpenMetrics 1.0.0"),
             ("exporter.textformat OpenMetrics 1.0.0, nothing remembered",
              "prometheus_client OpenMetrics 1.0.0"),
             ("exporter.textformat OpenMetrics 1.0.0", "exporter.textformat text 0.0.4"),
             ("prometheus_client OpenMetrics 1.0.0", "exporter.textformat text 0.0.4"))
    for numerator, denominator in pairs:
        print(f"{numerator} / {denominator}: {median[numerator] / median[denominator]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
