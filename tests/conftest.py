"""Fixtures that start real servers on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness import ExporterProcess, PostgresServer, RedisServer, tempdir

S = TypeVar("S", PostgresServer, RedisServer)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory the postgres user can read (pytest's tmp_path is 0700)."""
    with tempdir() as path:
        yield path


@contextmanager
def _servers(kind: type[S], workdir: Path) -> Iterator[Callable[..., S]]:
    """A starter for servers of one kind; every one it started is killed at the end."""
    servers: list[S] = []

    def start(**kwargs: Any) -> S:
        server = kind(workdir, **kwargs).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def pg_factory(workdir: Path) -> Iterator[Callable[..., PostgresServer]]:
    """Start PostgreSQL servers for this test; all are stopped at the end."""
    with _servers(PostgresServer, workdir) as start:
        yield start


@pytest.fixture
def postgres(pg_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """One PostgreSQL server of this test's own (free to stop, kill or pause)."""
    return pg_factory()


@pytest.fixture
def redis_factory(workdir: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start Redis servers for this test; all are stopped at the end."""
    with _servers(RedisServer, workdir) as start:
        yield start


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """One Redis server of this test's own."""
    return redis_factory()


@pytest.fixture
def exporter_factory(workdir: Path) -> Iterator[Callable[..., ExporterProcess]]:
    """Start real exporter processes: exporter_factory(config=..., env=..., args=[...])."""
    started: list[ExporterProcess] = []

    def start(wait: bool = True, **kwargs: Any) -> ExporterProcess:
        process = ExporterProcess(workdir, **kwargs).start(wait=wait)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
