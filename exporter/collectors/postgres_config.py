"""The postgres collector's configuration section, which the business collector connects
with too: the server, the role, timeouts and how much it reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.configfile import read_secret
from exporter.configtypes import Duration, Secret, Section, describe_value, format_duration


@dataclass(frozen=True)
class PostgresConfig:
    """PostgreSQL connection and collector settings (DB_* environment variables as defaults)."""

    host: str = "localhost"
    port: int = 5432
    dbname: str = "qatoolbox"
    user: str = "postgres"
    password: Secret = field(default=Secret(""), repr=False)
    password_file: str = ""
    sslmode: str = "prefer"
    connect_timeout: Duration = Duration(2.0)
    # Server-side statement_timeout of every query the collector runs.
    timeout: Duration = Duration(2.0)
    # Active queries running longer than this count as slow (QAToolBox's monitor used 5 s).
    slow_query_threshold: Duration = Duration(5.0)
    # Database sizes, table and statement statistics are re-read at most this often.
    cache_interval: Duration = Duration(60.0)
    top_tables: int = 50
    top_statements: int = 50


def environment(env: Mapping[str, str], section: dict[str, Any], errors: list[str]) -> None:
    """Fill the postgres section from QAToolBox's DB_* variables where the file is silent."""
    for var, key in (("DB_NAME", "dbname"), ("DB_USER", "user"), ("DB_HOST", "host")):
        if var in env and key not in section:
            section[key] = env[var]
    if "DB_PORT" in env and "port" not in section:
        try:
            section["port"] = int(env["DB_PORT"])
        except ValueError:
            errors.append(f'DB_PORT: expected a port number, got "{env["DB_PORT"]}"')
    if "password" not in section and "password_file" not in section:
        if "DB_PASSWORD_FILE" in env:
            section["password_file"] = env["DB_PASSWORD_FILE"]
        elif "DB_PASSWORD" in env:
            section["password"] = env["DB_PASSWORD"]


def resolve(pg: PostgresConfig, errors: list[str]) -> PostgresConfig:
    """The password read from password_file, when one is named."""
    if not pg.password_file:
        return pg
    return dataclasses.replace(
        pg, password=read_secret(pg.password_file, "postgres.password_file", errors))


def check(pg: PostgresConfig) -> list[str]:
    """Port, sslmode, timeouts and top N within what libpq and the collector accept."""
    problems: list[str] = []
    if isinstance(pg.port, int) and not 0 < pg.port < 65536:
        problems.append(f"postgres.port: expected a port number, got {pg.port}")
    sslmodes = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    if pg.sslmode not in sslmodes:
        problems.append(f"postgres.sslmode: expected one of {', '.join(sslmodes)}, "
                        f"got {describe_value(pg.sslmode)}")
    # libpq counts connect_timeout in whole seconds (and psycopg raises anything below 2 to 2).
    if not 1 <= pg.connect_timeout <= 300:
        problems.append(f"postgres.connect_timeout: must be between 1s and 300s, "
                        f"got {format_duration(pg.connect_timeout)}")
    if not 0.001 <= pg.timeout <= 300:
        problems.append(f"postgres.timeout: must be between 1ms and 300s, "
                        f"got {format_duration(pg.timeout)}")
    if pg.slow_query_threshold <= 0:
        problems.append("postgres.slow_query_threshold: must be greater than 0")
    if not 0 <= pg.cache_interval <= 86400:
        problems.append(f"postgres.cache_interval: must be between 0s and 1d, "
                        f"got {format_duration(pg.cache_interval)}")
    for key, top in (("top_tables", pg.top_tables), ("top_statements", pg.top_statements)):
        # Bounded cardinality is the point of top N: more than 1000 would defeat it.
        if isinstance(top, int) and not 0 <= top <= 1000:
            problems.append(f"postgres.{key}: must be between 0 and 1000, got {top}")
    return problems


def summary(pg: PostgresConfig) -> list[str]:
    """The target, for --config.check; the password only as set or not."""
    return [f"postgres: {pg.user}@{pg.host}:{pg.port}/{pg.dbname} "
            f"(password {'set' if pg.password else 'not set'})"]


SECTION = Section(PostgresConfig, check=check, metric_prefixes=("qatoolbox_postgres_",),
                  environment=environment, resolve=resolve, summary=summary,
                  environment_help=(
                      ("DB_HOST, DB_PORT, DB_NAME, DB_USER",
                       "PostgreSQL target (defaults localhost, 5432,\nqatoolbox, postgres)"),
                      ("DB_PASSWORD_FILE, DB_PASSWORD",
                       "its password: a file (preferred) or the value"),
                  ))
