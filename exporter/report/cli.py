"""`qatoolbox-exporter report` and `qatoolbox-exporter export`: the dispatch to each. Both show
progress on a terminal, give one-line errors and exit 0 done, 1 runtime failure, 2 bad flags or
query, 3 report written but some of its queries failed (console.py)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """Dispatch `report ...` or `export ...` (argv[0] is the subcommand)."""
    command, rest = argv[0], list(argv[1:])
    if command == "report":
        from exporter.report.report_command import run_report

        return run_report(rest)
    from exporter.report.export_command import run_export

    return run_export(rest)
