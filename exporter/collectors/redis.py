"""Redis collector: health, memory, cache effectiveness, latency, key groups, Celery queues.

The pieces: exporter/resp.py talks to Redis, redis_info.py reads INFO and the other replies
into families, redis_keys.py names key structures, redis_scan.py counts keys in the
background. This module runs one scrape's round trip and says why Redis is down when it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import Metric

from exporter.collectors.redis_config import RedisConfig
from exporter.collectors.redis_info import (
    INFO_SECTIONS,
    UP_HELP,
    CommandLabels,
    LookupAccount,
    as_text,
    celery_families,
    client_families,
    command_families,
    command_stats,
    count_lookups,
    keyspace_families,
    number,
    pairs,
    parse_info,
    parse_latency_histogram,
    replication_families,
    server_families,
    version,
    wants_histogram,
)
from exporter.collectors.redis_keys import KOMBU_UNACKED, celery_keys
from exporter.collectors.redis_scan import KeyGroupScanner, describe_error, key_group_families
from exporter.families import gauge
from exporter.logs import OnChange
from exporter.redact import redact_url, scrub, url_secrets
from exporter.resp import OTHER, TIMEOUT, Connection, ProtocolError, RedisError, ServerError

log = logging.getLogger("exporter.redis")


class RedisUnavailableError(Exception):
    """Redis could not be reached or refused the exporter's INFO."""


def connect(url: str, timeout: float) -> Connection:
    """One lazily opened connection with `timeout` on connect and on every exchange."""
    return Connection(url, timeout)


class RedisCollector:
    """Reads INFO, SLOWLOG LEN, LATENCY HISTOGRAM, CONFIG GET and the Celery queue lengths in
    one pipelined round trip on one persistent connection; key groups, and the Celery queues
    kombu has declared, come from a cache filled by a background SCAN.

    qatoolbox_redis_up 1
    qatoolbox_redis_version_info{mode="standalone",role="master",version="7.0.15"} 1
    qatoolbox_redis_keyspace_hits_total 1523
    qatoolbox_redis_db_keys{db="db0"} 200004
    qatoolbox_redis_commands_total{cmd="get"} 1002
    qatoolbox_redis_command_duration_seconds_bucket{cmd="get",le="8.192e-06"} 1001
    qatoolbox_redis_key_group_keys{group="user:{id}"} 28572
    qatoolbox_redis_key_group_scan_complete 1
    qatoolbox_celery_queue_length{queue="default"} 12
    qatoolbox_celery_unacked_messages 3
    """

    name = "redis"

    def __init__(
        self,
        cfg: RedisConfig,
        timeout: float | None = None,
        client_factory: Callable[[], Connection] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._where = redact_url(cfg.url)
        self._secrets = url_secrets(cfg.url)
        # Leave the runner's budget room for the connect that may precede the round trip.
        socket_timeout = min(cfg.timeout, 0.8 * timeout) if timeout else cfg.timeout
        self._factory = client_factory or (lambda: connect(cfg.url, socket_timeout))
        self._client: Connection | None = None
        # Refused optional commands and key count failures: logged when they first appear,
        # change or come back after the repeat interval, and when they go away.
        self._reported = OnChange()
        self._scanner = KeyGroupScanner(cfg, self._factory, clock, self._reported)
        self._queues = tuple(cfg.celery_queues)
        self._celery = celery_keys(self._queues, cfg.celery_key_prefix,
                                   cfg.celery_priority_steps)
        self._unacked_key = f"{cfg.celery_key_prefix}{KOMBU_UNACKED}"
        self._account = LookupAccount()
        self._labels = CommandLabels(cfg.max_command_labels)
        self._run_id: str | None = None
        self._multi_section_info = False
        self._histogram_commands: list[str] = []
        # Optional parts, probed on first use: False once the server refused them.
        self._supported: dict[str, bool] = {}
        # Why the last run failed (a resp reason), None after a success. A run the scrape
        # runner gave up on is still under way: it says "timeout" until it ends.
        self._reason: str | None = None

    # -- I/O

    def _follow_queues(self) -> None:
        """Add the queues the last key count found declared to the configured ones (at most
        max_celery_queues in all, configured first)."""
        result = self._scanner.result()
        found = [q for q in (result.queues if result else ()) if q not in self._cfg.celery_queues]
        room = max(0, self._cfg.max_celery_queues - len(self._cfg.celery_queues))
        queues = (*self._cfg.celery_queues, *found[:room])
        if queues != self._queues:
            self._queues = queues
            self._celery = celery_keys(queues, self._cfg.celery_key_prefix,
                                       self._cfg.celery_priority_steps)

    def _round_trip(self) -> tuple[dict[str, str], dict[str, Any]]:
        if self._client is None:
            self._client = self._factory()
        self._follow_queues()
        sections = INFO_SECTIONS if self._multi_section_info else ("all",)
        # INFO first: the lookups below must not be in the counters it reports.
        commands: list[tuple[str, ...]] = [("INFO", *sections)]
        parts: list[tuple[str, int]] = []

        def add(part: str, *more: tuple[str, ...]) -> None:
            if self._supported.get(part, True):
                commands.extend(more)
                parts.append((part, len(more)))

        add("slowlog", ("SLOWLOG", "LEN"))
        # Only the commands the last INFO listed: Redis skips the rest of the reply's work.
        add("latency", ("LATENCY", "HISTOGRAM", *self._histogram_commands))
        if self._cfg.config_get:
            add("config", ("CONFIG", "GET", "maxclients"),
                ("CONFIG", "GET", "slowlog-log-slower-than"))
        if self._celery:
            add("celery", *(("LLEN", key) for _, key in self._celery),
                ("HLEN", self._unacked_key))
        replies = self._client.pipeline(commands)
        info_reply = replies[0]
        if isinstance(info_reply, ServerError):
            self._multi_section_info = False  # maybe an older server now: plain INFO next time
            raise info_reply
        if not isinstance(info_reply, bytes):
            raise ProtocolError("an INFO reply that is not a string")
        info = parse_info(as_text(info_reply))
        results: dict[str, Any] = {}
        position = 1
        for part, length in parts:
            chunk = replies[position: position + length]
            position += length
            refused = [r for r in chunk if isinstance(r, ServerError)
                       and not r.text.startswith("WRONGTYPE")]
            if part == "celery":
                # Lookups that ran counted as hits or misses, even when others were refused.
                results["lookups"] = count_lookups(chunk)[:2]
            if refused:
                self._unsupported(part, refused[0].text)
                continue
            if self._supported.get(part) is None and self._reported.clear(("refused", part)):
                log.info("optional Redis command allowed again", extra={"part": part})
            self._supported[part] = True
            results[part] = _read_part(part, chunk)
        return info, results

    def _unsupported(self, part: str, error: str) -> None:
        if self._reported.changed(("refused", part), error):
            log.warning("optional Redis command refused; its metrics are left out",
                        extra={"part": part, "err": scrub(error, self._secrets),
                               "redis": self._where})
        self._supported[part] = False

    def collect(self) -> Iterator[Metric]:
        """One round trip to Redis; raises RedisUnavailableError when it fails."""
        self._reason = TIMEOUT
        try:
            info, results = self._round_trip()
        except RedisError as exc:
            self._reason = exc.reason
            if self._client is not None:
                self._client.close()
            raise RedisUnavailableError(
                f"redis at {self._where}: {describe_error(exc, self._secrets)}") from None
        except BaseException:
            self._reason = OTHER
            raise
        self._reason = None
        run_id = info.get("run_id", "")
        if run_id != self._run_id:
            if self._run_id is not None:
                self._labels.reset()
                self._scanner.forget()
                self._supported.clear()
            self._run_id = run_id
        self._multi_section_info = version(info.get("redis_version", "")) >= (7, 0)
        self._scanner.poke()
        return iter(self._families(info, results))

    # -- families

    def _families(self, info: Mapping[str, str], results: Mapping[str, Any]) -> list[Metric]:
        families = server_families(info)
        families.extend(client_families(info, results.get("config", {}),
                                        results.get("slowlog")))
        families.extend(replication_families(info))
        stats = command_stats(info)
        families.extend(keyspace_families(info, self._hits_misses(info, stats)))
        if "lookups" in results:
            self._account.record(*results["lookups"])
        histograms = results.get("latency")
        calls = {cmd: c for cmd, (c, _) in stats.items()}
        for cmd, (histogram_calls, _) in (histograms or {}).items():
            calls.setdefault(cmd, float(histogram_calls))
        families.extend(command_families(stats, self._labels.labels(calls), histograms))
        self._histogram_commands = sorted(cmd for cmd in stats if wants_histogram(cmd))
        families.extend(key_group_families(self._scanner.result()))
        if "celery" in results:
            families.extend(celery_families(self._celery, results["celery"]))
        return families

    def _hits_misses(self, info: Mapping[str, str],
                     stats: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
        """The server's hits and misses less the exporter's own lookups (LookupAccount)."""
        hits, misses = number(info, "keyspace_hits"), number(info, "keyspace_misses")
        if hits is None or misses is None:
            return None
        calls = (stats["llen"][0] if "llen" in stats else 0.0) + (
            stats["hlen"][0] if "hlen" in stats else 0.0)
        return self._account.adjust(info.get("run_id", ""), hits, misses,
                                    number(info, "total_commands_processed") or 0.0,
                                    calls if stats else None)

    # -- runner hooks

    def failure_metrics(self) -> Iterable[Metric]:
        """`qatoolbox_redis_up 0`, and why, when Redis could not be read."""
        reason = gauge("qatoolbox_redis_connection_error",
                       "Why the last scrape could not read Redis (the reason label); "
                       "present only while qatoolbox_redis_up is 0.", ["reason"])
        reason.add_metric([self._reason or TIMEOUT], 1.0)
        return [gauge("qatoolbox_redis_up", UP_HELP, value=0.0), reason]

    def close(self) -> None:
        """Stop the key group thread and close the scrape's connection."""
        self._scanner.close()
        if self._client is not None:
            self._client.close()


def _read_part(part: str, replies: list[Any]) -> Any:
    """An optional part's replies in the shape the families want; ProtocolError for replies
    no Redis sends (a broken or hostile server)."""
    try:
        if part == "slowlog":
            length = replies[0]
            if not isinstance(length, int):
                raise TypeError(part)
            return length
        if part == "latency":
            return parse_latency_histogram(replies[0])
        if part == "config":
            config: dict[str, str] = {}
            for reply in replies:
                config.update({as_text(k): as_text(v) for k, v in pairs(reply).items()})
            return config
    except (TypeError, ValueError, AttributeError):
        raise ProtocolError(f"a {part} reply no Redis sends") from None
    return replies
