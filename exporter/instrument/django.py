"""Django middleware: latency, status, exceptions and DB queries per URL pattern.

Put it first in MIDDLEWARE so the time includes the other middleware:

    MIDDLEWARE = ["exporter.instrument.django.PrometheusMiddleware", ...]

Settings (all optional):
    QATOOLBOX_METRICS_SKIP_PATHS: paths not recorded (health checks), e.g. ("/healthz",).
    QATOOLBOX_METRICS_DB: whether to count queries per request (default True).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.db import connections  # type: ignore[import-untyped]

from exporter.instrument import STANDARD_METHODS, UNMATCHED, _State, recorder

__all__ = ["PrometheusMiddleware", "route_of"]

_COUNTED = "_qatoolbox_exception_counted"
# This thread's query counter (see _QueryCounter).
_THREAD = threading.local()


class _QueryCounter:
    """An execute_wrapper, installed once per thread on each database connection: counts the
    thread's queries and adds up their time. A request's share is the difference between the
    counts at its end and at its start, so nothing is added to or removed from the
    connection's wrapper list per request (that was a third of the middleware's cost)."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def __call__(self, execute: Callable[..., Any], sql: Any, params: Any, many: bool,
                 context: Any) -> Any:
        start = perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds += perf_counter() - start
            self.count += 1


# The site root's template is empty (path("", home_view)): labelled "/", as the WSGI and ASGI
# helpers label a route function's "".
ROOT_ROUTE = "/"


def route_of(request: Any) -> str:
    """The route label: the matched URL pattern template, never the raw path."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return UNMATCHED
    route = match.route
    return UNMATCHED if route is None else (route or ROOT_ROUTE)


class PrometheusMiddleware:
    """Records every request into this worker's metrics files (see exporter.instrument)."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.skip = frozenset(getattr(settings, "QATOOLBOX_METRICS_SKIP_PATHS", ()))
        self.db_aliases: tuple[str, ...] = (
            tuple(settings.DATABASES) if getattr(settings, "QATOOLBOX_METRICS_DB", True) else ())

    def _counter(self) -> _QueryCounter:
        # Looking a connection up costs about a microsecond (asgiref Local); a thread's
        # connection objects live as long as the thread, so this runs once per thread (for
        # all middleware instances: a query is counted once).
        counter = _QueryCounter()
        for alias in self.db_aliases:
            connections[alias].execute_wrappers.append(counter)
        _THREAD.counter = counter
        return counter

    def __call__(self, request: Any) -> Any:
        # Every request comes through here: bench/app_overhead.py measures what it adds.
        if self.skip and request.path_info in self.skip:
            return self.get_response(request)
        rec = _State.current or recorder()
        method = request.method
        if method not in STANDARD_METHODS:
            method = "other"
        counter: _QueryCounter | None = None
        queries, busy = 0, 0.0
        if self.db_aliases:
            counter = getattr(_THREAD, "counter", None) or self._counter()
            queries, busy = counter.count, counter.seconds
        rec.request_started()
        start = perf_counter()
        status = 500
        try:
            response = self.get_response(request)
            status = response.status_code
            return response
        except BaseException:
            # Only reached when an exception escapes Django's own handling (which otherwise
            # turns it into a 500 response); process_exception may have counted it already.
            if not getattr(request, _COUNTED, False):
                rec.request_exception(route_of(request), method)
            raise
        finally:
            seconds = perf_counter() - start
            match = request.resolver_match
            route = UNMATCHED if match is None or match.route is None else (
                match.route or ROOT_ROUTE)
            if counter is None:
                rec.request_finished(route, method, status, seconds)
            else:
                rec.request_finished(route, method, status, seconds,
                                     db_queries=counter.count - queries,
                                     db_seconds=counter.seconds - busy)

    def process_exception(self, request: Any, exception: BaseException) -> None:
        """Count a view's exception; Django then renders its 500 (or another middleware's)."""
        if request.path_info not in self.skip:
            method = request.method if request.method in STANDARD_METHODS else "other"
            recorder().request_exception(route_of(request), method)
            setattr(request, _COUNTED, True)
