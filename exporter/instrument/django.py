"""Django middleware: latency, status, exceptions and DB queries per URL pattern.

Put it first in MIDDLEWARE so the time includes the other middleware:

    MIDDLEWARE = ["exporter.instrument.django.PrometheusMiddleware", ...]

Settings (all optional):
    QATOOLBOX_METRICS_SKIP_PATHS: paths not recorded (health checks), e.g. ("/healthz",).
    QATOOLBOX_METRICS_DB: whether to count queries per request (default True).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.db import connections  # type: ignore[import-untyped]

from exporter.instrument import STANDARD_METHODS, UNMATCHED, recorder

__all__ = ["PrometheusMiddleware", "route_of"]

_COUNTED = "_qatoolbox_exception_counted"


class _QueryTimer:
    """An execute_wrapper: counts the queries of one request and adds up their time."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def __call__(self, execute: Callable[..., Any], sql: Any, params: Any, many: bool,
                 context: Any) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds += time.perf_counter() - start
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
        self._local = threading.local()

    def _wrapper_lists(self) -> list[list[Any]]:
        # Looking a connection up costs about a microsecond (asgiref Local); its wrapper list
        # is the same object for the thread's life, so look it up once per thread.
        lists: list[list[Any]] = [connections[a].execute_wrappers for a in self.db_aliases]
        self._local.lists = lists
        return lists

    def __call__(self, request: Any) -> Any:
        if request.path_info in self.skip:
            return self.get_response(request)
        rec = recorder()
        method = request.method
        if method not in STANDARD_METHODS:
            method = "other"
        timer: _QueryTimer | None = None
        wrapper_lists: list[list[Any]] | None = None
        if self.db_aliases:
            timer = _QueryTimer()
            # What connection.execute_wrapper() does, minus the context manager's overhead.
            wrapper_lists = getattr(self._local, "lists", None) or self._wrapper_lists()
            for wrappers in wrapper_lists:
                wrappers.append(timer)
        rec.request_started()
        start = time.perf_counter()
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
            seconds = time.perf_counter() - start
            match = request.resolver_match
            route = UNMATCHED if match is None or match.route is None else (
                match.route or ROOT_ROUTE)
            if timer is None or wrapper_lists is None:
                rec.request_finished(route, method, status, seconds)
            else:
                for wrappers in wrapper_lists:
                    # Ours is the last one unless a view left one of its own installed.
                    if wrappers and wrappers[-1] is timer:
                        wrappers.pop()
                    else:
                        wrappers.remove(timer)
                rec.request_finished(route, method, status, seconds,
                                     db_queries=timer.count, db_seconds=timer.seconds)

    def process_exception(self, request: Any, exception: BaseException) -> None:
        """Count a view's exception; Django then renders its 500 (or another middleware's)."""
        if request.path_info not in self.skip:
            method = request.method if request.method in STANDARD_METHODS else "other"
            recorder().request_exception(route_of(request), method)
            setattr(request, _COUNTED, True)
