"""A known fortnight of qatoolbox-exporter data for the report tests, loaded into a real
Prometheus: raw samples backfilled with `promtool tsdb create-blocks-from openmetrics`, the
repository's recording rules evaluated over them with `promtool tsdb create-blocks-from rules`.

The fortnight ends on Monday 2024-03-11 00:00 UTC. Samples are 5 minutes apart (the recording
rules' [5m] windows then hold two samples each). The second week has 20% more traffic, an
incident (Wednesday 14:00-15:00: 5xx on api/rooms/, slow requests, a Celery backlog, deadlocks,
Redis evictions) with its alerts, a 25-minute exporter outage, Sloth-style SLO series, and a
chat-room cleanup alert still firing at the end. The root file system fills steadily; business
figures grow. The tests compare the report with Prometheus' own answers, and with this module's
arithmetic where it knows the answer outright.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import ROOT
from tests.promstack import PrometheusServer

END = 1710115200  # 2024-03-11T00:00:00Z, a Monday
DAY = 86400
WEEK = 7 * DAY
STEP = 300
FIRST = END - 2 * WEEK - 3600  # an hour of warm-up before the previous week starts
TIMES = list(range(FIRST, END + 1, STEP))
JOB, INSTANCE = "qatoolbox", "app1:9786"
# The service collectors' samples carry `server` (exporter/fleet.py). The application's exporter
# watches db1 and cache1; TWIN, its HA pair, watches the same servers and reports the same values
# (the report must count them once); OTHER watches a second PostgreSQL and Redis of its own.
TWIN, OTHER = "app2:9786", "app3:9786"
DB1, DB2 = "db1:5432", "db2:5432"
CACHE1, CACHE2 = "cache1:6379", "cache2:6379"
NOT_TWIN = f'instance!="{TWIN}"'
SELECTOR = f'job="{JOB}"'
BASE = f'job="{JOB}",instance="{INSTANCE}"'

INCIDENT = (END - 5 * DAY + 14 * 3600, END - 5 * DAY + 15 * 3600)  # Wed 2024-03-06 14:00-15:00
OUTAGE = (END - 3 * DAY + 3 * 3600, END - 3 * DAY + 3 * 3600 + 1800)  # Fri 03:00-03:30
GIB = 1024 ** 3
MIB = 1024 ** 2

# route, method, mean requests per second at the daily peak, mean seconds, mean DB queries
ROUTES = [
    ("api/rooms/", "GET", 2.0, 0.12, 3.0),
    ("login/", "POST", 0.5, 0.2, 4.0),
    ("api/messages/", "GET", 1.5, 0.3, 42.0),
    ("export/", "GET", 0.05, 2.8, 18.0),
]
DURATION_LE = ["0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf"]
DURATION_CDF = {
    "api/rooms/": [0.30, 0.60, 0.85, 0.95, 0.98, 0.995, 1.0, 1.0],
    "login/": [0.10, 0.30, 0.70, 0.90, 0.97, 1.0, 1.0, 1.0],
    "api/messages/": [0.05, 0.20, 0.50, 0.80, 0.95, 0.99, 1.0, 1.0],
    "export/": [0.0, 0.0, 0.0, 0.0, 0.10, 0.50, 0.90, 1.0],
}
INCIDENT_CDF = [0.05, 0.10, 0.20, 0.35, 0.50, 0.75, 0.90, 1.0]
INCIDENT_MEAN = 1.5
QUERIES_LE = ["1", "5", "10", "25", "50", "100", "+Inf"]
QUERIES_CDF = {
    "api/rooms/": [0.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0],
    "login/": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "api/messages/": [0.0, 0.0, 0.0, 0.1, 0.9, 1.0, 1.0],
    "export/": [0.0, 0.0, 0.2, 0.8, 1.0, 1.0, 1.0],
}
DB_SECONDS_LE = ["0.01", "0.1", "1", "+Inf"]
TASK_LE = ["0.1", "0.5", "1", "5", "10", "30", "+Inf"]
TASKS = {  # task: (cumulative fractions over TASK_LE, mean seconds)
    "tools.tasks.cleanup_expired_rooms": ([0.0, 0.2, 0.9, 1.0, 1.0, 1.0, 1.0], 0.8),
    "tools.tasks.send_notification": ([0.5, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0], 0.15),
}
TABLES = {  # table: (size at FIRST, growth per day)
    "tools_chatmessage": (2 * GIB, 40 * MIB),
    "auth_user": (64 * MIB, 1 * MIB),
    "tools_chatroom": (128 * MIB, 2 * MIB),
    "tools_timecapsule": (256 * MIB, 0),
    "tools_useronlinestatus": (16 * MIB, 0),
}
ROOT_SIZE = 100 * GIB
DATA_SIZE = 50 * GIB


def label_text(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def in_incident(t: int) -> bool:
    return INCIDENT[0] < t <= INCIDENT[1]


def exporter_down(t: int) -> bool:
    return OUTAGE[0] < t < OUTAGE[1]


def traffic(t: int) -> float:
    """Share of the daily peak in the 5 minutes ending at t: a daily cycle peaking at 14:00
    UTC, quieter weekends, and 20% more in the second week."""
    hour = (t % DAY) / 3600
    level = 0.55 + 0.45 * math.cos(2 * math.pi * (hour - 14) / 24)
    weekday = (t // DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    if weekday >= 5:
        level *= 0.6
    if t > END - WEEK:
        level *= 1.2
    return level


def requests(route_index: int, t: int) -> int:
    return int(ROUTES[route_index][2] * traffic(t) * STEP + 0.5)


def server_errors(route: str, count: int, t: int) -> int:
    if route == "api/rooms/":
        return int(count * (0.40 if in_incident(t) else 0.005) + 0.5)
    return 0


def client_errors(route: str, count: int) -> int:
    return int(count * 0.05 + 0.5) if route == "login/" else 0


@dataclass
class Family:
    name: str
    kind: str  # counter, gauge or histogram: only the TYPE line differs
    series: list[tuple[dict[str, str], list[float | None]]] = field(default_factory=list)


class Fortnight:
    """Every series of the fortnight, as values per point of TIMES (None: no sample)."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self._build()

    # --- helpers ---------------------------------------------------------------------------

    def _add(self, name: str, kind: str, labels: dict[str, str],
             values: Sequence[float | None], *, always: bool = False,
             instance: str = INSTANCE) -> None:
        family = self.families.setdefault(name, Family(name, kind))
        if not always:  # nothing but `up` is scraped while the exporter is down
            values = [None if exporter_down(t) else v for t, v in zip(TIMES, values, strict=True)]
        family.series.append(({"job": JOB, "instance": instance, **labels}, list(values)))

    @staticmethod
    def _cumulative(per_interval: Callable[[int], float], start: float = 0.0) -> list[float]:
        out, total = [], start
        for t in TIMES:
            total += per_interval(t)
            out.append(total)
        return out

    def _histogram(self, name: str, labels: dict[str, str], les: list[str], *,
                   counts: list[int], cdfs: list[list[float]], means: list[float]) -> None:
        for position, le in enumerate(les):
            per = [int(c * cdf[position] + 0.5) for c, cdf in zip(counts, cdfs, strict=True)]
            self._add(f"{name}_bucket", "histogram", {**labels, "le": le},
                      list(_running(per)))
        self._add(f"{name}_sum", "histogram", labels,
                  list(_running([c * m for c, m in zip(counts, means, strict=True)])))
        self._add(f"{name}_count", "histogram", labels, list(_running(counts)))

    # --- the data --------------------------------------------------------------------------

    def _build(self) -> None:
        self._add("up", "gauge", {}, [0.0 if exporter_down(t) else 1.0 for t in TIMES],
                  always=True)
        self._http()
        self._host()
        for instance, db, cache, scale in ((INSTANCE, DB1, CACHE1, 1.0),
                                           (TWIN, DB1, CACHE1, 1.0),
                                           (OTHER, DB2, CACHE2, 0.5)):
            self._postgres(instance, db, scale)
            self._redis(instance, cache, scale)
        self._celery()
        for instance in (INSTANCE, TWIN):
            self._business(instance)
        self._slo()
        self._alerts()

    def _http(self) -> None:
        for index, (route, method, _, mean, queries) in enumerate(ROUTES):
            counts = [requests(index, t) for t in TIMES]
            errors = [server_errors(route, c, t) for c, t in zip(counts, TIMES, strict=True)]
            denied = [client_errors(route, c) for c in counts]
            statuses = {"200": [c - e - d for c, e, d in zip(counts, errors, denied, strict=True)],
                        "500": errors}
            if route == "login/":
                statuses["401"] = denied
            for status, values in statuses.items():
                self._add("qatoolbox_http_requests_total", "counter",
                          {"route": route, "method": method, "status": status},
                          list(_running(values)))
            slow = [route == "api/rooms/" and in_incident(t) for t in TIMES]
            cdfs = [INCIDENT_CDF if s else DURATION_CDF[route] for s in slow]
            means = [INCIDENT_MEAN if s else mean for s in slow]
            labels = {"route": route, "method": method}
            self._histogram("qatoolbox_http_request_duration_seconds", labels, DURATION_LE,
                            counts=counts, cdfs=cdfs, means=means)
            self._histogram("qatoolbox_http_request_db_queries", {"route": route}, QUERIES_LE,
                            counts=counts, cdfs=[QUERIES_CDF[route]] * len(TIMES),
                            means=[queries] * len(TIMES))
            db_cdf = [0.5, 0.95, 1.0, 1.0] if queries < 20 else [0.0, 0.3, 0.95, 1.0]
            self._histogram("qatoolbox_http_request_db_seconds", {"route": route},
                            DB_SECONDS_LE, counts=counts, cdfs=[db_cdf] * len(TIMES),
                            means=[queries * 0.002] * len(TIMES))

    def _host(self) -> None:
        def busy(t: int) -> float:
            return min(0.97, 0.10 + 0.5 * traffic(t) + (0.35 if in_incident(t) else 0.0))

        for cpu in ("0", "1"):
            for mode, share in (("idle", lambda t: 1 - busy(t) - 0.02),
                                ("iowait", lambda t: 0.02),
                                ("user", lambda t: busy(t) * 0.7),
                                ("system", lambda t: busy(t) * 0.3)):
                self._add("qatoolbox_host_cpu_seconds_total", "counter",
                          {"cpu": cpu, "mode": mode},
                          self._cumulative(lambda t, s=share: s(t) * STEP, 100000.0))  # type: ignore[misc]
        self._add("qatoolbox_host_load5", "gauge", {}, [4 * busy(t) for t in TIMES])
        total = 8 * GIB
        self._add("qatoolbox_host_memory_total_bytes", "gauge", {}, [float(total)] * len(TIMES))
        self._add("qatoolbox_host_memory_available_bytes", "gauge", {},
                  [float(int(total * (0.55 - 0.2 * traffic(t)
                                      - (0.15 if in_incident(t) else 0.0)))) for t in TIMES])
        span = END - FIRST
        for device, mountpoint, fstype, size, used in (
                ("/dev/sda1", "/", "ext4", ROOT_SIZE, lambda t: 0.60 + 0.2 * (t - FIRST) / span),
                ("/dev/sdb1", "/var/lib/postgresql", "xfs", DATA_SIZE, lambda t: 0.30)):
            labels = {"device": device, "mountpoint": mountpoint, "fstype": fstype}
            self._add("qatoolbox_host_filesystem_size_bytes", "gauge", labels,
                      [float(size)] * len(TIMES))
            self._add("qatoolbox_host_filesystem_avail_bytes", "gauge", labels,
                      [size * (1 - used(t)) for t in TIMES])
            self._add("qatoolbox_host_filesystem_readonly", "gauge", labels, [0.0] * len(TIMES))

    def _service(self, instance: str, server: str, scale: float,
                 ) -> Callable[[str, str, dict[str, str], list[float]], None]:
        """An adder of instance's samples about server, their values times scale."""
        def add(name: str, kind: str, labels: dict[str, str], values: list[float]) -> None:
            self._add(name, kind, {**labels, "server": server}, [v * scale for v in values],
                      instance=instance)
        return add

    def _postgres(self, instance: str, server: str, scale: float) -> None:
        add = self._service(instance, server, scale)
        same = self._service(instance, server, 1.0)
        db = {"datname": "qatoolbox"}
        same("qatoolbox_postgres_up", "gauge", {}, [1.0] * len(TIMES))
        same("qatoolbox_postgres_max_connections", "gauge", {}, [100.0] * len(TIMES))
        same("qatoolbox_postgres_reserved_connections", "gauge", {}, [3.0] * len(TIMES))
        add("qatoolbox_postgres_connections", "gauge", {**db, "state": "active"},
            [float(int(5 + 20 * traffic(t) + (35 if in_incident(t) else 0))) for t in TIMES])
        add("qatoolbox_postgres_connections", "gauge", {**db, "state": "idle"},
            [20.0] * len(TIMES))
        add("qatoolbox_postgres_slow_queries", "gauge", db,
            [3.0 if in_incident(t) else 0.0 for t in TIMES])
        deadlocks_at = {INCIDENT[0] + 600, INCIDENT[0] + 1800, END - WEEK - 4 * DAY + 10 * 3600}
        add("qatoolbox_postgres_deadlocks_total", "counter", db,
            self._cumulative(lambda t: 1.0 if t in deadlocks_at else 0.0, 7.0))
        add("qatoolbox_postgres_blocks_hit_total", "counter", db,
            self._cumulative(lambda t: float(int(1000 * traffic(t) * STEP)), 1e9))
        add("qatoolbox_postgres_blocks_read_total", "counter", db,
            self._cumulative(lambda t: float(int((200 if in_incident(t) else 15)
                                                 * traffic(t) * STEP)), 1e7))
        for table, (size, growth) in TABLES.items():
            add("qatoolbox_postgres_table_size_bytes", "gauge",
                {"schema": "public", "table": table},
                [float(size + int(growth * (t - FIRST) / DAY)) for t in TIMES])
        add("qatoolbox_postgres_database_size_bytes", "gauge", db,
            [float(3 * GIB + int(43 * MIB * (t - FIRST) / DAY)) for t in TIMES])

    def _redis(self, instance: str, server: str, scale: float) -> None:
        add = self._service(instance, server, scale)
        same = self._service(instance, server, 1.0)
        same("qatoolbox_redis_up", "gauge", {}, [1.0] * len(TIMES))
        add("qatoolbox_redis_keyspace_hits_total", "counter", {},
            self._cumulative(lambda t: float(int(100 * traffic(t) * STEP)), 5e6))
        add("qatoolbox_redis_keyspace_misses_total", "counter", {},
            self._cumulative(lambda t: float(int((60 if in_incident(t) else 8)
                                                 * traffic(t) * STEP)), 4e5))
        add("qatoolbox_redis_memory_used_bytes", "gauge", {},
            [float(int(200 * MIB + 100 * MIB * traffic(t)
                       + (600 * MIB if in_incident(t) else 0))) for t in TIMES])
        same("qatoolbox_redis_memory_max_bytes", "gauge", {}, [float(GIB)] * len(TIMES))
        add("qatoolbox_redis_evicted_keys_total", "counter", {},
            self._cumulative(lambda t: 250.0 if in_incident(t) else 0.0, 1000.0))

    def _celery(self) -> None:
        self._add("qatoolbox_celery_queue_length", "gauge", {"queue": "celery"},
                  [float(int(2 + 10 * traffic(t) + (150 if in_incident(t) else 0)))
                   for t in TIMES])
        self._add("qatoolbox_celery_queue_length", "gauge", {"queue": "email"},
                  [float(int(3 * traffic(t))) for t in TIMES])
        runs = {
            "tools.tasks.cleanup_expired_rooms": [1] * len(TIMES),
            "tools.tasks.send_notification": [int(30 * traffic(t)) for t in TIMES],
        }
        for task, counts in runs.items():
            notify = task.endswith("send_notification")
            failed = [int(c * (0.5 if in_incident(t) else 0.02) + 0.5) if notify else 0
                      for c, t in zip(counts, TIMES, strict=True)]
            retried = [1 if notify and in_incident(t) else 0 for t in TIMES]
            succeeded = [c - f for c, f in zip(counts, failed, strict=True)]
            for state, values in (("succeeded", succeeded), ("failed", failed),
                                  ("retried", retried)):
                self._add("qatoolbox_celery_tasks_total", "counter",
                          {"task": task, "state": state}, list(_running(values)))
            cdf, mean = TASKS[task]
            self._histogram("qatoolbox_celery_task_duration_seconds", {"task": task}, TASK_LE,
                            counts=counts, cdfs=[cdf] * len(TIMES), means=[mean] * len(TIMES))

    def _business(self, instance: str) -> None:
        add = self._service(instance, DB1, 1.0)

        def days(t: int) -> float:
            return (t - FIRST) / DAY

        add("qatoolbox_users", "gauge", {"state": "active"},
            [float(1000 + int(days(t) * 24) * 2) for t in TIMES])
        add("qatoolbox_users", "gauge", {"state": "inactive"}, [50.0] * len(TIMES))
        for window, level in (("1h", lambda t: 60 * traffic(t)),
                              ("24h", lambda t: 300 * 1.03 ** days(t)),
                              ("7d", lambda t: 900 * 1.02 ** days(t))):
            add("qatoolbox_users_active", "gauge", {"window": window},
                [float(int(level(t))) for t in TIMES])
        for kind, rate in (("text", 3.0), ("image", 0.4)):
            add("qatoolbox_chat_messages_total", "counter", {"message_type": kind},
                self._cumulative(lambda t, r=rate: float(int(r * traffic(t) * STEP)),  # type: ignore[misc]
                                 250000.0))
        for room_type, status, level in (
                ("group", "active", lambda t: 40 + int(days(t) * 2)),
                ("private", "active", lambda t: 120 + int(days(t) * 5)),
                ("group", "ended", lambda t: 300 + int(days(t) * 10))):
            add("qatoolbox_chat_rooms", "gauge", {"room_type": room_type,
                                                  "status": status},
                [float(level(t)) for t in TIMES])
        add("qatoolbox_chat_rooms_stale", "gauge", {},
            [3.0 if t > END - 5 * 3600 else 0.0 for t in TIMES])

    def _slo(self) -> None:
        """Sloth's series for two SLOs, in the second week only (the first has no SLO rules)."""
        current = [t > END - WEEK for t in TIMES]
        rooms = 0
        totals = [sum(requests(i, t) for i in range(len(ROUTES))) for t in TIMES]
        errors = [server_errors("api/rooms/", requests(rooms, t), t) for t in TIMES]
        slow_share = []
        for t in TIMES:
            slow = 0.0
            for index, (route, _, _, _, _) in enumerate(ROUTES):
                cdf = INCIDENT_CDF if route == "api/rooms/" and in_incident(t) \
                    else DURATION_CDF[route]
                count = requests(index, t)
                slow += count - int(count * cdf[DURATION_LE.index("1")] + 0.5)
            slow_share.append(slow)
        for slo, objective, bad in (("requests-availability", 0.99, errors),
                                    ("requests-latency", 0.95, slow_share)):
            labels = {"sloth_service": "qatoolbox", "sloth_slo": slo,
                      "sloth_id": f"qatoolbox-{slo}"}
            ratio = [b / n if n else 0.0 for b, n in zip(bad, totals, strict=True)]
            spent, seen = 0.0, 0.0
            remaining = []
            for b, n in zip(bad, totals, strict=True):
                spent, seen = spent + b, seen + n
                remaining.append(1 - (spent / seen) / (1 - objective) if seen else 1.0)

            def only_current(values: list[float]) -> list[float | None]:
                return [v if c else None for v, c in zip(values, current, strict=True)]

            self._add("slo:sli_error:ratio_rate5m", "gauge", {**labels, "sloth_window": "5m"},
                      only_current(ratio))
            self._add("slo:objective:ratio", "gauge", labels,
                      only_current([objective] * len(TIMES)))
            self._add("slo:error_budget:ratio", "gauge", labels,
                      only_current([1 - objective] * len(TIMES)))
            self._add("slo:current_burn_rate:ratio", "gauge", labels,
                      only_current([r / (1 - objective) for r in ratio]))
            self._add("slo:period_error_budget_remaining:ratio", "gauge", labels,
                      only_current(remaining))

    def _alerts(self) -> None:
        for episode in ALERT_EPISODES:
            labels = {"alertname": episode.name, **episode.labels, "severity": episode.severity}
            firing = [1.0 if episode.start <= t <= episode.end else None for t in TIMES]
            pending = [1.0 if episode.active_at <= t < episode.start else None for t in TIMES]
            active = [float(episode.active_at) if episode.active_at <= t <= episode.end
                      else None for t in TIMES]
            self._add("ALERTS", "gauge", {**labels, "alertstate": "firing"}, firing,
                      always=True)
            if any(v is not None for v in pending):
                self._add("ALERTS", "gauge", {**labels, "alertstate": "pending"}, pending,
                          always=True)
            self._add("ALERTS_FOR_STATE", "gauge", labels, active, always=True)

    # --- output ----------------------------------------------------------------------------

    def openmetrics(self) -> Iterator[str]:
        """The OpenMetrics text, family by family, each series in time order."""
        for family in self.families.values():
            base = family.name
            if family.kind == "counter":
                base = base.removesuffix("_total")
            elif family.kind == "histogram":
                base = re.sub(r"_(bucket|sum|count)$", "", base)
            yield f"# TYPE {base} {family.kind}\n"
            for labels, values in family.series:
                head = f"{family.name}{{{label_text(labels)}}} "
                yield "".join(f"{head}{v!r} {t}\n" for t, v in zip(TIMES, values, strict=True)
                              if v is not None)
        yield "# EOF\n"


@dataclass(frozen=True)
class Episode:
    """One alert that fired: first and last firing evaluation, and when it went pending."""

    name: str
    severity: str
    active_at: int
    start: int
    end: int
    labels: dict[str, str] = field(default_factory=dict)


ALERT_EPISODES = [
    Episode("HttpErrorRatioHigh", "warning", INCIDENT[0] + 300, INCIDENT[0] + 600,
            INCIDENT[1], {"family": "HttpErrorRatio"}),
    Episode("HttpErrorRatioCritical", "critical", INCIDENT[0] + 300, INCIDENT[0] + 600,
            INCIDENT[1], {"family": "HttpErrorRatio"}),
    Episode("CeleryQueueBacklog", "warning", INCIDENT[0] + 300, INCIDENT[0] + 1200,
            INCIDENT[1], {"queue": "celery"}),
    Episode("ExporterDown", "critical", OUTAGE[0] + 300, OUTAGE[0] + 600, OUTAGE[1] - 300),
    Episode("ChatRoomCleanupStalled", "warning", END - 4 * 3600, END - 3 * 3600, END),
    Episode("PostgresDeadlocks", "warning", END - WEEK - 4 * DAY + 10 * 3600,
            END - WEEK - 4 * DAY + 10 * 3600, END - WEEK - 4 * DAY + 10 * 3600 + 300),
]


def _running(values: list[int] | list[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


# --- what the generator knows outright ----------------------------------------------------


def true_requests(start: int, end: int, status: str | None = None) -> int:
    """Requests answered in (start, end], all or of one status class ("5xx")."""
    total = 0
    for t in TIMES:
        if start < t <= end:
            for index, (route, *_) in enumerate(ROUTES):
                count = requests(index, t)
                total += server_errors(route, count, t) if status == "5xx" else count
    return total


def true_error_ratio_mean(start: int, end: int) -> float:
    """Mean of the 5-minute 5xx ratios in (start, end]: the availability SLO's error."""
    ratios = []
    for t in TIMES:
        if start < t <= end and t > END - WEEK and not exporter_down(t):
            total = sum(requests(i, t) for i in range(len(ROUTES)))
            ratios.append(server_errors("api/rooms/", requests(0, t), t) / total)
    return sum(ratios) / len(ratios)


def true_messages(start: int, end: int) -> int:
    return sum(int(rate * traffic(t) * STEP) for t in TIMES if start < t <= end
               for rate in (3.0, 0.4))


# --- Prometheus loaded with the fortnight ----------------------------------------------------


def inline_recording_rules(doc: dict[str, Any]) -> dict[str, str]:
    """Each recording rule of the repository's file, as record name -> expression with every
    reference to another recorded series replaced by that series' expression, so that all of
    them can be evaluated over raw data alone. The anomaly group (one-week windows, not used by
    the report) is left out."""
    groups = [g for g in doc["groups"] if "anomaly" not in g["name"]]
    exprs = {r["record"]: r["expr"] for g in groups for r in g["rules"]}
    inlined = {}
    for record, original in exprs.items():
        expr = original
        for _ in range(5):
            before = expr
            for name, other in exprs.items():
                pattern = rf"(?<![\w:]){re.escape(name)}(?![\w:])"
                expr = re.sub(pattern, lambda _m, e=other: f"({e})", expr)  # type: ignore[misc]
            if expr == before:
                break
        inlined[record] = expr
    return inlined


def load_fortnight(base: Path) -> PrometheusServer:
    """Write the fortnight, backfill it, evaluate the repository's recording rules over it
    every 5 minutes as Prometheus would have, backfill those too, and start a Prometheus on
    the result; the caller stops it."""
    config = base / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1m"}}))
    prometheus = PrometheusServer(base, config, extra_args=[
        "--storage.tsdb.retention.time=100y", "--query.lookback-delta=5m"])
    data = base / f"prometheus-data-{prometheus.port}"  # where start() points Prometheus
    text = base / "fortnight.om"
    with text.open("w") as out:
        for chunk in Fortnight().openmetrics():
            out.write(chunk)
    _backfill(text, data)
    prometheus.start()
    doc = yaml.safe_load((ROOT / "prometheus" / "rules" / "recording.yml").read_text())
    try:
        with text.open("w") as out:
            for record, expr in inline_recording_rules(doc).items():
                out.write(f"# TYPE {record} gauge\n")
                for series in prometheus.query_range(expr, FIRST, END, STEP):
                    labels = label_text({k: v for k, v in series["metric"].items()
                                         if k != "__name__"})
                    out.write("".join(f"{record}{{{labels}}} {v} {t}\n"
                                      for t, v in series["values"]))
            out.write("# EOF\n")
    finally:
        prometheus.stop()
    _backfill(text, data)
    return prometheus.start()


def _backfill(text: Path, data: Path) -> None:
    result = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet",
                             "--max-block-duration=720h", str(text), str(data)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    text.unlink()
