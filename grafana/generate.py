"""Build the Grafana dashboards in grafana/dashboards/ (the one source of truth for them)."""

# Plain Python on purpose: the dashboards are data, a builder library would add a dependency
# whose Grafana schema lags the Grafana we pin. Run `python grafana/generate.py` after an edit
# and commit the JSON; `--check` exits 1 when the committed JSON differs from what it writes.
# The dashboards are in boards/ (one module each), built from promql.py (queries), panels.py
# (panel types) and dashboard.py (layout, variables, links).

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from boards import DASHBOARDS

OUT_DIR = Path(__file__).resolve().parent / "dashboards"


def render() -> dict[str, str]:
    """{file name: JSON text} for every dashboard."""
    return {f"{name}.json": json.dumps(build().to_json(), indent=2, ensure_ascii=False) + "\n"
            for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboards, or with --check report whether the committed files are current."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if grafana/dashboards/ differs from what this script writes")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            OUT_DIR.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python grafana/generate.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
