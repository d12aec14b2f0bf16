"""The collector table: every collector's name, factory, scope and whether it runs by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exporter.config import Config
from exporter.scrape import Collector


@dataclass(frozen=True)
class CollectorSpec:
    """One row of the table."""

    factory: Callable[[Config], Collector]
    default_enabled: bool
    help: str


# Each factory imports its module when called: a disabled collector's client library
# (psycopg, redis-py) is never loaded, which keeps a host-only exporter's memory small.


def _host(c: Config) -> Collector:
    from exporter.collectors.host import HostCollector

    return HostCollector(c.host)


def _process(c: Config) -> Collector:
    from exporter.collectors.process import ProcessCollector

    return ProcessCollector(c.process)


def _postgres(c: Config) -> Collector:
    from exporter.collectors.postgres import PostgresCollector

    return PostgresCollector(c.postgres, c.scrape.timeout)


def _business(c: Config) -> Collector:
    from exporter.collectors.business import BusinessCollector

    return BusinessCollector(c.business, c.postgres, c.log.repeat_interval)


def _redis(c: Config) -> Collector:
    from exporter.collectors.redis import RedisCollector

    return RedisCollector(c.redis, c.scrape.timeout)


def _app(c: Config) -> Collector:
    from exporter.collectors.app import AppCollector

    # The business queries' families are the exporter's too: the app's files may not use them.
    queries = c.business.all_queries() if c.enabled("business") else ()
    return AppCollector(c.app, reserved_names={n for q in queries for n in (q.metric, q.family)})


COLLECTORS: dict[str, CollectorSpec] = {
    "host": CollectorSpec(_host, True, "CPU, memory, file systems, disks, network."),
    "process": CollectorSpec(_process, True, "Process groups (web, celery, ...)."),
    "postgres": CollectorSpec(
        _postgres, True,
        "PostgreSQL activity, locks, throughput, replication, statements, tables.",
    ),
    "business": CollectorSpec(
        _business, True,
        "Business metrics from SQL queries (QAToolBox users, chat, time capsules).",
    ),
    "redis": CollectorSpec(
        _redis, True, "Redis memory, clients, hit ratio, latency, key groups and Celery queues."
    ),
    "app": CollectorSpec(
        _app, True,
        "App requests and Celery tasks merged from the workers' files (app.multiprocess_dirs).",
    ),
}

DEFAULTS: dict[str, bool] = {name: spec.default_enabled for name, spec in COLLECTORS.items()}

# The scope of each collector (collectors.scope, docs/scaling.md): "host" reads the machine the
# exporter runs on, "service" a server that many hosts share (one exporter per server).
SCOPES: dict[str, str] = {
    "host": "host", "process": "host", "app": "host",
    "postgres": "service", "business": "service", "redis": "service",
}


def build(config: Config) -> list[Collector]:
    """Instantiate the enabled collectors, in table order; service collectors' samples carry
    the `server` label (exporter/fleet.py)."""
    from exporter.fleet import with_server_label

    return [with_server_label(name, spec.factory(config), config)
            for name, spec in COLLECTORS.items() if config.enabled(name)]
