"""The `server` label: which PostgreSQL or Redis server a service collector's samples describe."""

# On a fleet, several exporters may read the same database: every host's exporter with the
# default configuration, or a service-scope exporter and an old host that still has postgres
# on. Their samples then differ only by `instance`, the exporter's address, which says nothing
# about the database. A `server` label on every sample of the service collectors names the
# server itself, so rules and dashboards aggregate by (cluster, server) and one database down
# fires one PostgresDown, whatever the number of exporters watching it.
#
# The label is added here, around the collectors, rather than in each of them: one place, the
# same rule for every service collector, and the collectors stay unaware of fleets. Which
# collectors are service collectors, and which server each reads, is the collector table's
# `server` (exporter/collectors/__init__.py).

from __future__ import annotations

import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from prometheus_client.core import Metric

from exporter.scrape import Collector

SERVER_LABEL = "server"
# A label of the same name from elsewhere (a business query's column) is kept under this name,
# as Prometheus keeps a scraped label that clashes with a target label.
CLASHING_LABEL = "exported_server"
_LOOPBACK_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "::1"}


def _local(host: str) -> bool:
    """Whether host names this machine: loopback, or a Unix socket's directory or path."""
    host = host.lower().strip("[]")
    return host in _LOOPBACK_NAMES or host.startswith(("127.", "/", "@"))


def _join(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def postgres_server(host: str, port: int, hostname: str | None = None) -> str:
    """The server a PostgreSQL connection reaches, as `host:port`. A loopback address or a
    socket directory names the server on this machine, whose identity is the machine's name:
    three hosts each with their own local database are three servers, three hosts pointed at
    db.internal one."""
    if _local(host):
        return _join(hostname or socket.gethostname(), port)
    return _join(host.lower(), port)


def redis_server(url: str, hostname: str | None = None) -> str:
    """The server a redis://, rediss:// or unix:// URL reaches, without its credentials or
    database number."""
    parts = urlsplit(url)
    local = hostname or socket.gethostname()
    if parts.scheme == "unix":
        return f"{local}:{parts.path}"
    try:
        port = parts.port or 6379
    except ValueError:  # config.py refuses such a URL; never quote it (it may hold a password)
        port = 6379
    host = parts.hostname or ""
    return _join(local, port) if _local(host) else _join(host.lower(), port)


def _labelled(families: Iterable[Metric], server: str) -> list[Metric]:
    """families with `server` on every sample, set in the samples' own label dicts.

    In place: copying every sample of the service collectors was an eighth of a scrape's CPU.
    A collector may serve the same families again (postgres' cached families), or one dict
    for several samples; a dict whose `server` is this very string object has been labelled
    already, so a clashing label is moved to `exported_server` once, never our own value."""
    out = families if isinstance(families, list) else list(families)
    for family in out:
        for sample in family.samples:
            labels = sample.labels
            current = labels.get(SERVER_LABEL)
            if current is server:
                continue
            if current is not None:
                labels[CLASHING_LABEL] = labels.pop(SERVER_LABEL)
            labels[SERVER_LABEL] = server
    return out


class ServerLabelled:
    """A collector whose samples, including those it serves when it fails, carry `server`."""

    def __init__(self, inner: Collector, server: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.server = server

    def collect(self) -> list[Metric]:
        """The inner collector's families, each sample labelled."""
        return _labelled(self.inner.collect(), self.server)

    def failure_metrics(self) -> list[Metric]:
        """The inner collector's failure families (its `up 0`), labelled; none if it has none."""
        failure = getattr(self.inner, "failure_metrics", None)
        return _labelled(failure(), self.server) if failure is not None else []

    def close(self) -> None:
        """Release the inner collector's connections."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def with_server_label(collector: Collector, server: str | None) -> Collector:
    """collector itself for a host collector (server None), or wrapped so that its samples
    name the server (the collector table's `server` says which)."""
    return collector if server is None else ServerLabelled(collector, server)
