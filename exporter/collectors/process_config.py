"""The process collector's configuration section: the named groups of processes it reports."""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.configtypes import Regex, Section, describe_value


@dataclass(frozen=True)
class ProcessGroup:
    """A named set of processes, matched by name or by command line."""

    name: str = ""
    names: tuple[str, ...] = ()
    cmdline: Regex = Regex("")


DEFAULT_PROCESS_GROUPS = (
    ProcessGroup(name="web", names=("gunicorn", "uwsgi", "daphne", "uvicorn")),
    ProcessGroup(name="celery", cmdline=Regex(r"\bcelery\b.*\bworker\b")),
    ProcessGroup(name="postgres", names=("postgres", "postmaster")),
    ProcessGroup(name="redis", names=("redis-server",)),
)


@dataclass(frozen=True)
class ProcessConfig:
    """Process collector settings."""

    groups: tuple[ProcessGroup, ...] = DEFAULT_PROCESS_GROUPS


def check(process: ProcessConfig) -> list[str]:
    """Group names short and distinct, each group matching something."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, group in enumerate(process.groups):
        where = f"process.groups[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", group.name):
            problems.append(f"{where}.name: expected a short name (letters, digits, _ . -), "
                            f"got {describe_value(group.name)}")
        elif group.name in seen:
            problems.append(f"{where}.name: duplicate group \"{group.name}\"")
        seen.add(group.name)
        if not group.names and not group.cmdline:
            problems.append(f"{where}: needs names or cmdline to match processes")
    return problems


def summary(process: ProcessConfig) -> list[str]:
    """The groups, for --config.check."""
    return ["process groups: " + ", ".join(g.name for g in process.groups)]


SECTION = Section(ProcessConfig, check=check, metric_prefixes=("qatoolbox_process_",),
                  summary=summary)
