"""Configuration: YAML file and environment, validated into frozen dataclasses.

The exporter's own sections (web, log, scrape, collectors) are here. Each collector declares
its own section (a Section named by its row in exporter/collectors/__init__.py: dataclass,
checks, environment, secrets, the metric prefixes it owns); Config composes them from the
collector table, one field per collector, named after it."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from exporter import collectors as table
from exporter.configfile import (
    CONFIG_FILE_LIMIT,
    SECRET_FILE_LIMIT,
    YAML_MAX_DEPTH,
    YAML_MAX_NODES,
    YAML_MAX_NUMBER_LENGTH,
    FileReadError,
    read_file,
    read_yaml,
)
from exporter.configtypes import (
    ConfigError,
    Duration,
    Regex,
    Secret,
    describe_value,
    format_duration,
    from_plain,
    parse_duration,
)

# The building blocks stay importable from here (webconfig.py and the tests use them).
__all__ = [
    "CONFIG_FILE_LIMIT", "SECRET_FILE_LIMIT", "YAML_MAX_DEPTH", "YAML_MAX_NODES",
    "YAML_MAX_NUMBER_LENGTH", "Config", "ConfigBase", "ConfigError", "Duration", "FileReadError",
    "LogConfig", "Regex", "ScrapeConfig", "Secret", "WebConfig", "compose", "describe_value",
    "format_duration", "load_config", "parse_duration", "read_file", "read_yaml",
    "split_listen_address", "summary",
]

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["logfmt", "json"]
# Which collectors run by default (docs/scaling.md): every one, those about the machine the
# exporter runs on (one exporter per host), or those about shared services (one per database).
CollectorScope = Literal["all", "host", "service"]
SCOPES: tuple[CollectorScope, ...] = ("all", "host", "service")


@dataclass(frozen=True)
class WebConfig:
    """HTTP server settings."""

    listen_address: str = ":9786"
    telemetry_path: str = "/metrics"
    max_requests: int = 40
    read_timeout: Duration = Duration(10.0)
    # A connection must have sent a whole request header (and finished TLS) within this long
    # (and within read_timeout), or it is closed: idle crowds cannot hold the server.
    header_timeout: Duration = Duration(5.0)
    config_file: str = ""  # exporter-toolkit web config (TLS, basic auth), see webconfig.py
    grafana_url: str = ""  # linked from the landing page (checked in exporter/checks.py)


@dataclass(frozen=True)
class LogConfig:
    """Logging settings."""

    level: LogLevel = "info"
    format: LogFormat = "logfmt"
    # A failing collector logs again with the same error only after this long.
    repeat_interval: Duration = Duration(300.0)


@dataclass(frozen=True)
class ScrapeConfig:
    """How the enabled collectors are run on each scrape."""

    timeout: Duration = Duration(4.0)


@dataclass(frozen=True)
class ConfigBase:
    """The exporter's own sections; compose() adds one field per collector."""

    web: WebConfig = WebConfig()
    log: LogConfig = LogConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    # Read by _collectors, not built as a section.
    collectors: Mapping[str, bool] = field(default_factory=dict, metadata={"read_apart": True})
    # collectors.scope: the collectors' defaults before collectors.<name> and the flags. Set
    # from the collectors section, never a key of its own.
    scope: CollectorScope = field(default="all", metadata={"derived": True})

    if TYPE_CHECKING:
        # What the composed class takes and has: a section per collector (config.host, ...).
        def __init__(self, **fields: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

    def enabled(self, name: str) -> bool:
        """Whether the collector called name runs."""
        return self.collectors.get(name, False)


def compose() -> type[Config]:
    """The Config class of the collector table as it is now: ConfigBase's fields, then one
    field per collector holding its section (the same class for the same table)."""
    return _composed(tuple((name, spec.section.cls) for name, spec in table.COLLECTORS.items()))


@functools.cache
def _composed(sections: tuple[tuple[str, type[Any]], ...]) -> type[Config]:
    fields = [(name, cls, field(default_factory=cls)) for name, cls in sections]
    namespace = {"__module__": __name__, "__doc__": "The whole validated configuration."}
    composed = dataclasses.make_dataclass(
        "Config", fields, bases=(ConfigBase,), frozen=True, namespace=namespace)
    return cast("type[Config]", composed)


if TYPE_CHECKING:
    from exporter.collectors.app_config import AppConfig
    from exporter.collectors.business_config import BusinessConfig
    from exporter.collectors.host_config import HostConfig
    from exporter.collectors.postgres_config import PostgresConfig
    from exporter.collectors.process_config import ProcessConfig
    from exporter.collectors.redis_config import RedisConfig

    class Config(ConfigBase):
        """What the type checker knows of the composed class: the shipped collectors'
        sections typed; a section registered later is Any (ConfigBase.__getattr__)."""

        host: HostConfig
        process: ProcessConfig
        postgres: PostgresConfig
        business: BusinessConfig
        redis: RedisConfig
        app: AppConfig
else:
    # The table's own collectors; load_config composes again for one registered later.
    Config = compose()


def _collectors(
    raw: Any, known: Mapping[str, bool], flags: Mapping[str, bool], errors: list[str],
    scopes: Mapping[str, str] | None = None,
) -> tuple[dict[str, bool], CollectorScope]:
    enabled = dict(known)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(f"collectors: expected a mapping of collector names to true/false, got "
                      f"{describe_value(raw)}")
        raw = {}
    scope: CollectorScope = "all"
    if "scope" in raw:
        if isinstance(raw["scope"], str) and raw["scope"] in SCOPES:
            scope = raw["scope"]
        else:
            errors.append(f"collectors.scope: expected one of {', '.join(SCOPES)}, got "
                          f"{describe_value(raw['scope'])}")
    if scope != "all":
        # A collector outside the scope is off unless named below or by a flag.
        enabled = {name: on and (scopes or {}).get(name) == scope
                   for name, on in enabled.items()}
    for name, value in raw.items():
        if name == "scope":
            continue
        if name not in known:
            errors.append(f"collectors.{name}: unknown collector (known: {', '.join(known)})")
        elif not isinstance(value, bool):
            errors.append(f"collectors.{name}: expected true or false, got {describe_value(value)}")
        else:
            enabled[name] = value
    enabled.update(flags)
    return enabled, scope


def load_config(
    path: str | None,
    env: Mapping[str, str],
    known_collectors: Mapping[str, bool],
    overrides: Mapping[str, Any] | None = None,
    collector_flags: Mapping[str, bool] | None = None,
    *,
    collector_scopes: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config from a YAML file (optional), the environment and flag overrides.

    overrides maps dotted keys ("web.listen_address") to raw values from flags; flags win
    over the file, the file wins over the environment, the environment over defaults.
    collector_scopes maps each collector to its scope ("host" or "service") for
    collectors.scope.
    """
    raw: Any = read_yaml(path) if path else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"config file {path}: expected a mapping at the top level, "
                           f"got {describe_value(raw)}"])
    raw = dict(raw)
    errors: list[str] = []
    sections = {name: spec.section for name, spec in table.COLLECTORS.items()}
    for name, section in sections.items():
        if section.environment is not None:
            given = raw.get(name)
            filled = dict(given) if isinstance(given, Mapping) else {}
            section.environment(env, filled, errors)
            # An empty section (all its keys commented out) is null: the environment still
            # applies. Anything else that is not a mapping is left for the build to report.
            if given is None or isinstance(given, Mapping):
                raw[name] = filled
    for dotted, value in (overrides or {}).items():
        name, key = dotted.split(".", 1)
        current = raw.get(name)
        raw[name] = {**(current if isinstance(current, Mapping) else {}), key: value}

    config = from_plain(compose(), raw, "", errors)
    enabled, scope = _collectors(raw.get("collectors"), known_collectors, collector_flags or {},
                                 errors, collector_scopes)
    # Secrets are read from the files the sections name, in table order.
    resolved = {name: section.resolve(getattr(config, name), errors)
                for name, section in sections.items() if section.resolve is not None}
    config = dataclasses.replace(config, collectors=types.MappingProxyType(enabled), scope=scope,
                                 **resolved)
    # A value that failed to convert was replaced by a placeholder: don't also report the
    # placeholder as out of range under the same key.
    failed = {problem.split(":", 1)[0] for problem in errors}
    errors.extend(p for p in _check(config) if p.split(":", 1)[0] not in failed)
    if errors:
        raise ConfigError(errors)
    return config


def _check(config: Config) -> list[str]:
    """Cross-field checks that a single type cannot express: the exporter's, then each
    collector's."""
    problems: list[str] = []
    web = config.web
    if not web.telemetry_path.startswith("/") or web.telemetry_path in ("/", "/healthz"):
        problems.append(f'web.telemetry_path: must start with "/" and not be "/" or "/healthz", '
                        f'got "{web.telemetry_path}"')
    try:
        split_listen_address(web.listen_address)
    except ValueError as exc:
        problems.append(f"web.listen_address: {exc}")
    if isinstance(web.max_requests, int) and web.max_requests < 1:
        problems.append(f"web.max_requests: must be at least 1, got {web.max_requests}")
    for key in ("read_timeout", "header_timeout"):
        if getattr(web, key) <= 0:
            problems.append(f"web.{key}: must be greater than 0")
    if config.scrape.timeout <= 0:
        problems.append("scrape.timeout: must be greater than 0")
    for name, spec in table.COLLECTORS.items():
        if spec.section.check is not None:
            problems.extend(spec.section.check(getattr(config, name)))
    return problems


def split_listen_address(address: str) -> tuple[str, int]:
    """Split "host:port" (host may be empty or a bracketed IPv6 address)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f'expected "host:port" or ":port", got "{address}"')
    return host.strip("[]"), int(port)


def summary(config: Config) -> list[str]:
    """A short description of what would run, with secrets left out."""
    lines = [f"listen on {config.web.listen_address}, metrics at {config.web.telemetry_path}",
             f"collector timeout {format_duration(config.scrape.timeout)}"]
    if config.scope != "all":
        lines.append(f"collectors scope: {config.scope}")
    for name, on in config.collectors.items():
        lines.append(f"collector {name}: {'enabled' if on else 'disabled'}")
    for name, spec in table.COLLECTORS.items():
        if config.enabled(name) and spec.section.summary is not None:
            lines.extend(spec.section.summary(getattr(config, name)))
    return lines
