"""The collector table: every collector's name, factory and whether it runs by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exporter.collectors.app import AppCollector
from exporter.collectors.business import BusinessCollector
from exporter.collectors.host import HostCollector
from exporter.collectors.postgres import PostgresCollector
from exporter.collectors.process import ProcessCollector
from exporter.collectors.redis import RedisCollector
from exporter.config import Config
from exporter.scrape import Collector


@dataclass(frozen=True)
class CollectorSpec:
    """One row of the table."""

    factory: Callable[[Config], Collector]
    default_enabled: bool
    help: str


COLLECTORS: dict[str, CollectorSpec] = {
    "host": CollectorSpec(
        lambda c: HostCollector(c.host), True, "CPU, memory, file systems, disks, network."
    ),
    "process": CollectorSpec(
        lambda c: ProcessCollector(c.process), True, "Process groups (web, celery, ...)."
    ),
    "postgres": CollectorSpec(
        lambda c: PostgresCollector(c.postgres, c.scrape.timeout), True,
        "PostgreSQL activity, locks, throughput, replication, statements, tables.",
    ),
    "business": CollectorSpec(
        lambda c: BusinessCollector(c.business, c.postgres, c.log.repeat_interval), True,
        "Business metrics from SQL queries (QAToolBox users, chat, time capsules).",
    ),
    "redis": CollectorSpec(
        lambda c: RedisCollector(c.redis, c.scrape.timeout), True,
        "Redis memory, clients, hit ratio, latency, key groups and Celery queues.",
    ),
    "app": CollectorSpec(
        lambda c: AppCollector(c.app), True,
        "App requests and Celery tasks merged from the workers' files (app.multiprocess_dirs).",
    ),
}

DEFAULTS: dict[str, bool] = {name: spec.default_enabled for name, spec in COLLECTORS.items()}


def build(config: Config) -> list[Collector]:
    """Instantiate the enabled collectors, in table order."""
    return [spec.factory(config) for name, spec in COLLECTORS.items() if config.enabled(name)]
