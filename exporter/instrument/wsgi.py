"""WSGI middleware for non-Django apps: the same request metrics, route label from the app.

    def route(environ):            # the app's own pattern for this request, or None
        return ROUTES.get(environ["PATH_INFO"])

    application = PrometheusWSGIMiddleware(application, route, skip_paths=("/healthz",))

The route function runs after the app has answered, so it may read what the app's router
stored in environ; it must return a pattern template (bounded), never the raw path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from exporter.instrument import STANDARD_METHODS, UNMATCHED, _State, recorder

__all__ = ["PrometheusWSGIMiddleware"]

RouteFunction = Callable[[Mapping[str, Any]], "str | None"]


class _Body:
    """The app's response body; the request ends when the server closes it."""

    def __init__(self, body: Iterable[bytes], done: Callable[[bool], None]) -> None:
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except BaseException:
            self._done(True)
            self._done = _noop
            raise

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(False)
            self._done = _noop


def _noop(_failed: bool) -> None:
    pass


class PrometheusWSGIMiddleware:
    """Wraps a WSGI application; records each request when its body is closed."""

    def __init__(self, app: Callable[..., Iterable[bytes]], route: RouteFunction,
                 skip_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.route = route
        self.skip = frozenset(skip_paths)

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in self.skip:
            return self.app(environ, start_response)
        rec = _State.current or recorder()
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in STANDARD_METHODS:
            method = "other"
        status = [500]

        def recording_start_response(status_line: str, headers: Any,
                                     exc_info: Any = None) -> Any:
            status[0] = int(status_line[:3])
            return start_response(status_line, headers, exc_info)

        rec.request_started()
        start = time.perf_counter()

        def done(failed: bool) -> None:
            route = _label(self.route(environ))
            if failed:
                rec.request_exception(route, method)
            rec.request_finished(route, method, 500 if failed else status[0],
                                 time.perf_counter() - start)

        try:
            body = self.app(environ, recording_start_response)
        except BaseException:
            done(True)
            raise
        return _Body(body, done)


def _label(route: str | None) -> str:
    """The route function's answer as a label: None is no match, "" the site root ("/")."""
    if route is None:
        return UNMATCHED
    return route or "/"
