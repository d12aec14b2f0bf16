"""The key-group count: SCAN in a background thread within key and time budgets, and the
queues kombu has declared (SSCAN of its binding sets)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric

from exporter.collectors.redis_config import RedisConfig
from exporter.collectors.redis_keys import (
    KOMBU_BINDING,
    MAX_BINDING_MEMBERS,
    KeyClassifier,
    KeyTally,
    binding_exchange,
    binding_queue,
)
from exporter.families import gauge
from exporter.logs import OnChange
from exporter.redact import scrub, url_secrets
from exporter.resp import Connection, ProtocolError, RedisError, ServerError

log = logging.getLogger("exporter.redis")


@dataclass(frozen=True)
class KeyGroupCounts:
    """What the last key-group count found: keys by group, and the Celery queues kombu has
    declared (from the last complete count)."""

    counts: Mapping[str, float]
    complete: bool
    duration: float
    queues: tuple[str, ...] = ()


class KeyGroupScanner:
    """Counts keys by group with SCAN in a background thread, within key and time budgets.

    A run starts when a scrape finds the last one `interval` old; it stops at the budget and
    the next run carries on from the same cursor, so a large keyspace is still covered in
    full over several intervals. Scrapes only read the published result.
    """

    def __init__(
        self,
        cfg: RedisConfig,
        client_factory: Callable[[], Connection],
        clock: Callable[[], float] = time.monotonic,
        reported: OnChange | None = None,
    ) -> None:
        self._classifier = KeyClassifier(cfg.key_groups)
        self._names = self._classifier.names
        self._max_groups = cfg.max_key_groups
        self._binding_prefix = (f"{cfg.celery_key_prefix}{KOMBU_BINDING}".encode()
                                if cfg.discover_celery_queues else b"")
        self._budget = cfg.key_scan_budget
        self._time_budget = cfg.key_scan_time_budget
        self._interval = cfg.key_scan_interval
        self._batch = cfg.key_scan_batch
        self._client_factory = client_factory
        self._client: Connection | None = None
        self._secrets = url_secrets(cfg.url)
        self._reported = reported or OnChange()
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._last_start: float | None = None
        self._generation = 0
        self._cursor = 0
        self._partial = KeyTally.empty(len(self._names))
        self._published: KeyGroupCounts | None = None
        # SSCAN refused (an ACL without it): queues are then the configured ones only.
        self._sscan_refused = False

    def poke(self) -> None:
        """Start a run in the background if one is due; never waits for it."""
        with self._lock:
            if self._stopping or self._running:
                return
            now = self._clock()
            if self._last_start is not None and now - self._last_start < self._interval:
                return
            self._last_start = now
            self._running = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="redis-keygroups",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def forget(self) -> None:
        """Drop all counts (the server was replaced) and count again at the next scrape."""
        with self._lock:
            self._generation += 1
            self._cursor = 0
            self._partial = KeyTally.empty(len(self._names))
            self._published = None
            self._last_start = None

    def result(self) -> KeyGroupCounts | None:
        """The published counts, None before the first run ends."""
        with self._lock:
            return self._published

    def close(self) -> None:
        """Stop the thread; it closes its connection after the SCAN call under way."""
        with self._lock:
            self._stopping = True
        self._wake.set()

    def _loop(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    self._run()
                finally:
                    with self._lock:
                        self._running = False
        finally:
            # Only this thread touches its connection: closing it from another thread
            # mid-read would leave the reader on a closed socket.
            if self._client is not None:
                self._client.close()

    def _run(self) -> None:
        with self._lock:
            generation, cursor, tally = self._generation, self._cursor, self._partial.copy()
            previous = self._published
        started = self._clock()
        examined = 0
        queues = previous.queues if previous else ()
        try:
            if self._client is None:
                self._client = self._client_factory()
            while True:
                cursor, keys = scan(self._client.call("SCAN", cursor, "COUNT", self._batch))
                self._classifier.tally(keys, tally, self._binding_prefix)
                examined += len(keys)
                if cursor == 0 or self._stopping:
                    break
                if examined >= self._budget or self._clock() - started >= self._time_budget:
                    break
            if cursor == 0 and self._binding_prefix:
                queues = self._declared_queues(self._client, tally.bindings, queues)
        except RedisError as exc:
            if self._client is not None:
                self._client.close()
            error = describe_error(exc, self._secrets)
            if self._reported.changed("keygroups", error):
                log.warning("key group count failed", extra={"err": error})
            with self._lock:
                if generation == self._generation:
                    self._cursor, self._partial = 0, KeyTally.empty(len(self._names))
            return
        if self._reported.clear("keygroups"):
            log.info("key group count recovered")
        duration = self._clock() - started
        complete = cursor == 0
        with self._lock:
            if generation != self._generation:
                return
            values = tally.counts(self._names, self._max_groups)
            if complete:
                self._published = KeyGroupCounts(values, True, duration, queues)
                self._cursor, self._partial = 0, KeyTally.empty(len(self._names))
            else:
                self._cursor, self._partial = cursor, tally
                previous = self._published
                if previous is None or not previous.complete:
                    self._published = KeyGroupCounts(values, False, duration, queues)
                else:
                    self._published = KeyGroupCounts(previous.counts, True, duration, queues)

    def _declared_queues(self, client: Connection, bindings: Iterable[bytes],
                         previous: tuple[str, ...]) -> tuple[str, ...]:
        """The queues bound in kombu's binding sets (SSCAN, bounded), sorted; previous when
        the server refuses SSCAN (logged once)."""
        if self._sscan_refused:
            return previous
        queues: set[str] = set()
        for key in sorted(bindings):
            if binding_exchange(key, self._binding_prefix) is None:
                continue
            read, cursor = 0, 0
            try:
                while True:
                    cursor, members = scan(client.call("SSCAN", key, cursor, "COUNT", 100))
                    for member in members:
                        queue = binding_queue(member)
                        if queue is not None:
                            queues.add(queue)
                    read += len(members)
                    if cursor == 0 or read >= MAX_BINDING_MEMBERS:
                        break
            except ServerError as exc:
                if exc.text.startswith("WRONGTYPE"):
                    continue  # a key that only looks like a binding set
                if exc.text.startswith("NOPERM"):
                    self._sscan_refused = True
                    if self._reported.changed(("refused", "sscan"), exc.text):
                        log.warning("optional Redis command refused; Celery queues are the "
                                    "configured ones only", extra={
                                        "part": "sscan", "err": scrub(exc.text, self._secrets)})
                    return previous
                raise
        return tuple(sorted(queues))



def scan(reply: Any) -> tuple[int, list[bytes]]:
    """SCAN's or SSCAN's reply as (next cursor, keys); ProtocolError when it is not one."""
    try:
        cursor, keys = reply
        next_cursor = int(cursor)
    except (TypeError, ValueError):
        raise ProtocolError("a SCAN reply that is not [cursor, keys]") from None
    if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):
        raise ProtocolError("a SCAN reply whose keys are not strings")
    return next_cursor, keys


def describe_error(exc: Exception, secrets: list[str]) -> str:
    """The exception for a log line, with the URL's secrets scrubbed: the client quotes the
    host, port or socket path it failed on, where a mangled URL may have put part of the
    password, and a server's error text is not ours to trust."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return scrub(text, secrets)


def key_group_families(result: KeyGroupCounts | None) -> list[Metric]:
    """Keys by group, whether the count is complete, and how long it took."""
    complete = gauge("qatoolbox_redis_key_group_scan_complete",
                     "Whether the key group counts cover the whole keyspace (1) or only the "
                     "part scanned within the budget (0).",
                     value=1.0 if result and result.complete else 0.0)
    if result is None:
        return [complete]
    keys = gauge("qatoolbox_redis_key_group_keys",
                 "Keys in the database by key group: configured groups, then the largest key "
                 "structures, the rest under other.", ["group"])
    for group, count in result.counts.items():
        keys.add_metric([group], count)
    duration = gauge("qatoolbox_redis_key_group_scan_duration_seconds",
                     "Time the last key group count took.", value=result.duration)
    return [keys, complete, duration]
