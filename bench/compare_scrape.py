"""Scrape-output identity check: the sample names and label sets of a scrape, and their diff.

A refactoring must leave what Prometheus stores unchanged. `snapshot` scrapes a running
exporter with Prometheus' request (bench/scrape.py, PROMETHEUS_HEADERS) and writes one line per
sample, `name{label="value",...}` with the labels sorted and the value dropped, the lines
sorted; `diff` compares two such files and prints the lines only one of them has (exit 1 if
there are any, 0 if none, 2 on bad input).

Examples:
    .venv/bin/python bench/compare_scrape.py snapshot http://127.0.0.1:9786/metrics before.txt
    (change the code, restart the exporter on the same stack)
    .venv/bin/python bench/compare_scrape.py snapshot http://127.0.0.1:9786/metrics after.txt
    .venv/bin/python bench/compare_scrape.py diff before.txt after.txt

Take both snapshots the same way (same format, same stack, every collector succeeded): a
series that comes and goes with the data (a new route, a query that started failing) shows
up as a difference too, which is what to look at.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scrape import families, fetch  # noqa: E402  (the request Prometheus sends)

EXIT_SAME, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2


def _escape(value: str) -> str:
    # As in the exposition formats, so that every sample stays on one line.
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample_key(name: str, labels: Mapping[str, str]) -> str:
    """One sample without its value: `name{a="1",b="2"}`, labels sorted (`name` alone if none)."""
    if not labels:
        return name
    pairs = ",".join(f'{key}="{_escape(labels[key])}"' for key in sorted(labels))
    return f"{name}{{{pairs}}}"


def sample_keys(body: bytes) -> list[str]:
    """The sorted sample keys of an exposition (text 0.0.4 or OpenMetrics); ValueError when it
    does not parse."""
    return sorted(sample_key(sample.name, sample.labels)
                  for family in families(body) for sample in family.samples)


def difference(before: Iterable[str], after: Iterable[str]) -> tuple[list[str], list[str]]:
    """The keys only before has and only after has, sorted (a key twice counts twice)."""
    old, new = Counter(before), Counter(after)
    return sorted((old - new).elements()), sorted((new - old).elements())


def _read(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line for line in handle.read().splitlines() if line]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    snapshot = commands.add_parser("snapshot", help="scrape URL, write its sample keys to FILE")
    snapshot.add_argument("url")
    snapshot.add_argument("file")
    snapshot.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    diff = commands.add_parser("diff", help="compare two snapshots; exit 1 if they differ")
    diff.add_argument("before")
    diff.add_argument("after")
    args = parser.parse_args(argv)
    prog = "compare_scrape"
    if args.command == "snapshot":
        try:
            keys = sample_keys(fetch(args.url, timeout=args.timeout).body)
        except (OSError, ValueError) as exc:  # ValueError: not an exposition
            print(f"{prog}: cannot scrape {args.url}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            Path(args.file).write_text("".join(f"{key}\n" for key in keys), encoding="utf-8")
        except OSError as exc:
            print(f"{prog}: cannot write {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{len(keys)} samples written to {args.file}")
        return EXIT_SAME
    snapshots = []
    for path in (args.before, args.after):
        try:
            snapshots.append(_read(path))
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not a snapshot
            print(f"{prog}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return EXIT_USAGE
    before, after = snapshots
    removed, added = difference(before, after)
    for key in removed:
        print(f"- {key}")
    for key in added:
        print(f"+ {key}")
    if removed or added:
        print(f"{len(removed)} samples only in {args.before}, {len(added)} only in {args.after}")
        return EXIT_DIFFERENT
    print(f"same {len(before)} samples")
    return EXIT_SAME


if __name__ == "__main__":
    sys.exit(main())
