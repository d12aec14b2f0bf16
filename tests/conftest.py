"""Fixtures that start real servers on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ExporterProcess, PostgresServer, RedisServer, tempdir


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory the postgres user can read (pytest's tmp_path is 0700)."""
    with tempdir() as path:
        yield path


@pytest.fixture
def pg_factory(workdir: Path) -> Iterator[Callable[..., PostgresServer]]:
    """Start PostgreSQL servers for this test; all are stopped at the end."""
    servers: list[PostgresServer] = []

    def start(**kwargs: Any) -> PostgresServer:
        server = PostgresServer(workdir, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def postgres(pg_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """One PostgreSQL server of this test's own (free to stop, kill or pause)."""
    return pg_factory()


@pytest.fixture
def redis_factory(workdir: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start Redis servers for this test; all are stopped at the end."""
    servers: list[RedisServer] = []

    def start(**kwargs: Any) -> RedisServer:
        server = RedisServer(workdir, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


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
