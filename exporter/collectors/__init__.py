"""The collector table: every collector's name, factory, scope, default and config section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

# The sections are light (dataclasses and checks): the table imports them all, so the config
# can be built and checked without loading any collector or its client library.
from exporter.collectors import (
    app_config,
    business_config,
    host_config,
    postgres_config,
    process_config,
    redis_config,
)
from exporter.configtypes import Section

# Imported here as it always was: exporter.scrape imports exporter.lean, which must come before
# prometheus_client, and the config (which imports this table) is among the first imports.
from exporter.scrape import Collector

if TYPE_CHECKING:
    from exporter.config import Config


@dataclass(frozen=True)
class CollectorSpec:
    """One row of the table."""

    factory: Callable[[Config], Collector]
    default_enabled: bool
    help: str
    # "host": it reads the machine the exporter runs on; "service": a server that many hosts
    # share, one exporter per server (collectors.scope, docs/scaling.md).
    scope: str
    # Its part of the configuration, under the collector's name (config.<name>).
    section: Section[Any]
    # The `server` label value of a service collector's samples: the server it reads, named
    # as exporter/fleet.py names servers; None for one that reads this host.
    server: Callable[[Config], str] | None = None


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


def _postgres_server(c: Config) -> str:
    from exporter.fleet import postgres_server

    return postgres_server(c.postgres.host, c.postgres.port)


def _redis_server(c: Config) -> str:
    from exporter.fleet import redis_server

    return redis_server(c.redis.url)


def _app(c: Config) -> Collector:
    from exporter.collectors.app import AppCollector

    # The business queries' families are the exporter's too: the app's files may not use them.
    queries = c.business.all_queries() if c.enabled("business") else ()
    return AppCollector(c.app, reserved_names={n for q in queries for n in (q.metric, q.family)},
                        repeat_interval=c.log.repeat_interval)


COLLECTORS: dict[str, CollectorSpec] = {
    "host": CollectorSpec(_host, True, "CPU, memory, file systems, disks, network.", "host",
                          host_config.SECTION),
    "process": CollectorSpec(_process, True, "Process groups (web, celery, ...).", "host",
                             process_config.SECTION),
    "postgres": CollectorSpec(
        _postgres, True,
        "PostgreSQL activity, locks, throughput, replication, statements, tables.", "service",
        postgres_config.SECTION, _postgres_server,
    ),
    "business": CollectorSpec(
        _business, True,
        "Business metrics from SQL queries (QAToolBox users, chat, time capsules).", "service",
        business_config.SECTION, _postgres_server,
    ),
    "redis": CollectorSpec(
        _redis, True, "Redis memory, clients, hit ratio, latency, key groups and Celery queues.",
        "service", redis_config.SECTION, _redis_server,
    ),
    "app": CollectorSpec(
        _app, True,
        "App requests and Celery tasks merged from the workers' files (app.multiprocess_dirs).",
        "host", app_config.SECTION,
    ),
}

# Views of the table that the command line passes to load_config; register() keeps them true.
DEFAULTS: dict[str, bool] = {name: spec.default_enabled for name, spec in COLLECTORS.items()}
SCOPES: dict[str, str] = {name: spec.scope for name, spec in COLLECTORS.items()}

# Families the exporter makes itself, whichever collectors run (the scrape runner's).
EXPORTER_METRIC_PREFIX = "qatoolbox_exporter_"


def reserved_metric_prefixes() -> tuple[str, ...]:
    """The prefixes of the families the exporter and its collectors emit: a business query
    may not use them."""
    owned = (p for spec in COLLECTORS.values() for p in spec.section.metric_prefixes)
    return tuple(dict.fromkeys((EXPORTER_METRIC_PREFIX, *owned)))


def register(name: str, spec: CollectorSpec) -> None:
    """Add a row to the table (a collector that lives elsewhere, as the tests' plugin does)."""
    from exporter.config import ConfigBase  # here: exporter.config imports this table

    if name in COLLECTORS:
        raise ValueError(f"collector {name} is already in the table")
    if name in {f.name for f in fields(ConfigBase)}:
        raise ValueError(f"collector {name} would hide the config section of the same name")
    COLLECTORS[name] = spec
    DEFAULTS[name] = spec.default_enabled
    SCOPES[name] = spec.scope


def unregister(name: str) -> None:
    """Remove a row that register() added."""
    del COLLECTORS[name], DEFAULTS[name], SCOPES[name]


def build(config: Config) -> list[Collector]:
    """Instantiate the enabled collectors, in table order; service collectors' samples carry
    the `server` label (exporter/fleet.py)."""
    from exporter.fleet import with_server_label

    return [with_server_label(spec.factory(config), spec.server and spec.server(config))
            for name, spec in COLLECTORS.items() if config.enabled(name)]
