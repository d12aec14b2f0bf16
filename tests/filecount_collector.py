"""A collector added from outside the package, all in this one module: its config section,
the collector and its row of the collector table (tests/test_collector_plugin.py registers
the row; nothing in exporter/ names it)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors import CollectorSpec
from exporter.config import Config
from exporter.configtypes import Section, describe_value

NAME = "filecount"


@dataclass(frozen=True)
class FilecountConfig:
    """Folders whose entries the collector counts."""

    folders: tuple[str, ...] = ()
    max_folders: int = 10


def check(section: FilecountConfig) -> list[str]:
    """Absolute folders, no more than max_folders of them."""
    problems = [f"filecount.folders[{i}]: expected an absolute path, got {describe_value(folder)}"
                for i, folder in enumerate(section.folders) if not folder.startswith("/")]
    if isinstance(section.max_folders, int) and not 1 <= section.max_folders <= 100:
        problems.append(f"filecount.max_folders: must be between 1 and 100, "
                        f"got {section.max_folders}")
    elif len(section.folders) > section.max_folders:
        problems.append(f"filecount.folders: {len(section.folders)} folders, more than "
                        f"filecount.max_folders ({section.max_folders})")
    return problems


def environment(env: Mapping[str, str], section: dict[str, Any], _errors: list[str]) -> None:
    """FILECOUNT_FOLDERS (colon-separated) where the file names no folders."""
    if "FILECOUNT_FOLDERS" in env and "folders" not in section:
        section["folders"] = env["FILECOUNT_FOLDERS"].split(":")


def summary(section: FilecountConfig) -> list[str]:
    """The folders, for --config.check."""
    return [f"filecount: {', '.join(section.folders) or 'no folders'}"]


class FilecountCollector:
    """Entries in each folder:

        qatoolbox_filecount_entries{folder="/srv/inbox"} 3
    """

    name = NAME

    def __init__(self, config: FilecountConfig) -> None:
        self._folders = config.folders

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("qatoolbox_filecount_entries",
                                   "Entries in each configured folder.", labels=["folder"])
        for folder in self._folders:
            family.add_metric([folder], len(os.listdir(folder)))
        yield family


def _factory(config: Config) -> FilecountCollector:
    return FilecountCollector(config.filecount)


SPEC = CollectorSpec(
    _factory, False, "Entries in folders (the tests' plugin collector).", "host",
    Section(FilecountConfig, check=check, metric_prefixes=("qatoolbox_filecount_",),
            environment=environment, summary=summary),
)
