"""The redis collector's configuration section: the server, timeouts, key groups and Celery
queues."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.configfile import read_secret
from exporter.configtypes import Duration, Secret, Section, describe_value
from exporter.redact import redact_url


@dataclass(frozen=True)
class KeyGroup:
    """A named set of Redis keys, matched by glob patterns (the first matching group wins)."""

    name: str = ""
    patterns: tuple[str, ...] = ()


# None: keys are grouped by their structure (exporter.collectors.redis_keys.key_shape), which finds
# QAToolBox's cache keys (KEY_PREFIX "qatoolbox", version 1, whatever the code passed), its
# sessions and Celery's keys without a list that goes stale as the application changes.
DEFAULT_KEY_GROUPS: tuple[KeyGroup, ...] = ()
# QAToolBox's Celery configuration: task_default_queue "default", apps.tools.tasks routed to
# "tools". Reported even before (or without) the discovery from kombu's binding sets.
DEFAULT_CELERY_QUEUES = ("default", "tools")


@dataclass(frozen=True)
class RedisConfig:
    """Redis connection and collector settings (REDIS_URL as default)."""

    url: Secret = field(default=Secret("redis://127.0.0.1:6379"), repr=False)
    password_file: str = ""
    # Socket timeout of every call (connect, command); must fit in scrape.timeout.
    timeout: Duration = Duration(2.0)
    # Configured groups take precedence; the other keys are grouped by their structure, the
    # max_key_groups largest structures by key count named, the rest summed under "other".
    key_groups: tuple[KeyGroup, ...] = DEFAULT_KEY_GROUPS
    max_key_groups: int = 20
    # One key-group count stops after this many keys or this long, whichever comes first,
    # and the next count resumes where it stopped.
    key_scan_budget: int = 1_000_000
    key_scan_time_budget: Duration = Duration(1.0)
    key_scan_interval: Duration = Duration(60.0)
    key_scan_batch: int = 1000
    # Always reported; the queues kombu has declared (its _kombu.binding.* sets, read during the
    # key count) are added, up to max_celery_queues in all.
    celery_queues: tuple[str, ...] = DEFAULT_CELERY_QUEUES
    discover_celery_queues: bool = True
    max_celery_queues: int = 50
    # kombu's global_keyprefix transport option, prepended to every key Celery uses.
    celery_key_prefix: str = ""
    # kombu's priority_steps: step 0 is the queue's own list, step p is "<queue>\x06\x16<p>".
    celery_priority_steps: tuple[int, ...] = (0, 3, 6, 9)
    # Per-command series (commands_total, durations, latency histogram) for at most this many
    # commands; the rest are summed under cmd="other".
    max_command_labels: int = 30
    # CONFIG GET slowlog-log-slower-than (and maxclients where INFO lacks it). Off by default:
    # an ACL that allows CONFIG GET allows it for every parameter, requirepass and masterauth
    # included, so the least-privilege user of docs/reliability.md does not have it.
    config_get: bool = False


def environment(env: Mapping[str, str], section: dict[str, Any], _errors: list[str]) -> None:
    """Fill the redis section from REDIS_URL and REDIS_PASSWORD_FILE where the file is silent."""
    if "REDIS_URL" in env and "url" not in section:
        section["url"] = env["REDIS_URL"]
    if "REDIS_PASSWORD_FILE" in env and "password_file" not in section:
        section["password_file"] = env["REDIS_PASSWORD_FILE"]


def resolve(rd: RedisConfig, errors: list[str]) -> RedisConfig:
    """The password read from password_file, when one is named, put into the URL."""
    if not rd.password_file:
        return rd
    password = read_secret(rd.password_file, "redis.password_file", errors)
    try:
        return dataclasses.replace(rd, url=Secret(_url_with_password(rd.url, password)))
    except ValueError:
        # urllib's message is safe, but the URL may hold a password: name the key only.
        errors.append("redis.url: not a valid URL (a port that is not a number, or a bad "
                      "IPv6 address)")
    return rd


def _url_with_password(url: str, password: str) -> str:
    """Put password into a redis:// URL, keeping any username."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    user = parts.username or ""
    # The netloc after any userinfo, as written: hostname would lose an IPv6 address's [].
    host = parts.netloc.rpartition("@")[2] or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check(rd: RedisConfig) -> list[str]:
    """The URL, timeouts, key groups, budgets and Celery queues."""
    problems: list[str] = []
    if not rd.url.startswith(("redis://", "rediss://", "unix://")):
        problems.append("redis.url: expected a redis://, rediss:// or unix:// URL")
    else:
        from urllib.parse import urlsplit

        try:
            port = urlsplit(rd.url).port
        except ValueError:  # the message would quote the URL, password included
            port = -1
        if port is not None and not 0 <= port < 65536:
            problems.append("redis.url: the port is not a number from 0 to 65535")
    if rd.timeout <= 0:
        problems.append("redis.timeout: must be greater than 0")
    seen: set[str] = set()
    for i, group in enumerate(rd.key_groups):
        where = f"redis.key_groups[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", group.name) or group.name == "other":
            problems.append(f"{where}.name: expected a short name (letters, digits, _ . -) other "
                            f"than \"other\", got {describe_value(group.name)}")
        elif group.name in seen:
            problems.append(f"{where}.name: duplicate group \"{group.name}\"")
        seen.add(group.name)
        if not group.patterns or not all(group.patterns):
            problems.append(f"{where}.patterns: needs at least one non-empty glob pattern")
    for key, value, low, high in (("key_scan_budget", rd.key_scan_budget, 1, 10**9),
                                  ("key_scan_batch", rd.key_scan_batch, 1, 100_000),
                                  ("max_command_labels", rd.max_command_labels, 0, 1000),
                                  ("max_key_groups", rd.max_key_groups, 0, 1000),
                                  ("max_celery_queues", rd.max_celery_queues, 0, 1000)):
        if isinstance(value, int) and not low <= value <= high:
            problems.append(f"redis.{key}: must be between {low} and {high}, got {value}")
    if rd.key_scan_time_budget <= 0:
        problems.append("redis.key_scan_time_budget: must be greater than 0")
    if rd.key_scan_interval <= 0:
        problems.append("redis.key_scan_interval: must be greater than 0")
    if len(set(rd.celery_queues)) != len(rd.celery_queues) or not all(rd.celery_queues):
        problems.append("redis.celery_queues: expected distinct non-empty queue names")
    elif isinstance(rd.max_celery_queues, int) and len(rd.celery_queues) > rd.max_celery_queues:
        problems.append(f"redis.celery_queues: {len(rd.celery_queues)} queues, more than "
                        f"redis.max_celery_queues ({rd.max_celery_queues})")
    steps = rd.celery_priority_steps
    if any(isinstance(s, int) and not 0 <= s <= 255 for s in steps) or len(set(steps)) != len(
            steps):
        problems.append("redis.celery_priority_steps: expected distinct whole numbers from 0 "
                        "to 255")
    return problems


def summary(rd: RedisConfig) -> list[str]:
    """The target, for --config.check, its password redacted."""
    return [f"redis: {redact_url(rd.url)}"]


# qatoolbox_celery_* is the app collector's too (tasks); the redis collector's are queues.
SECTION = Section(RedisConfig, check=check,
                  metric_prefixes=("qatoolbox_redis_", "qatoolbox_celery_"),
                  environment=environment, resolve=resolve, summary=summary,
                  environment_help=(
                      ("REDIS_URL", "Redis target (default redis://127.0.0.1:6379)"),
                      ("REDIS_PASSWORD_FILE", "the Redis password, from a file"),
                  ))
