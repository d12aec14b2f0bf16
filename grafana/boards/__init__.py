"""The dashboards, one module each: file name (without .json) -> the function that builds it."""

from __future__ import annotations

from collections.abc import Callable

from dashboard import Dashboard

from boards import business, host, http, overview, postgres, redis, slo

DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "overview": overview.dashboard,
    "host": host.dashboard,
    "postgres": postgres.dashboard,
    "redis": redis.dashboard,
    "http": http.dashboard,
    "business": business.dashboard,
    "slo": slo.dashboard,
}
