"""ASGI middleware for non-Django apps: the same request metrics, route label from the app.

    def route(scope):              # the app's own pattern for this request, or None
        return ROUTES.get(scope["path"])

    app = PrometheusASGIMiddleware(app, route, skip_paths=("/healthz",))

Only "http" scopes are recorded (not websocket or lifespan). The route function runs after
the app has answered, so it may read what the app's router stored in the scope.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from exporter.instrument import STANDARD_METHODS, UNMATCHED, _State, recorder

__all__ = ["PrometheusASGIMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RouteFunction = Callable[[Scope], "str | None"]


class PrometheusASGIMiddleware:
    """Wraps an ASGI application; records each HTTP request when the app returns."""

    def __init__(self, app: ASGIApp, route: RouteFunction,
                 skip_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.route = route
        self.skip = frozenset(skip_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in self.skip:
            await self.app(scope, receive, send)
            return
        rec = _State.current or recorder()
        method = scope.get("method", "GET")
        if method not in STANDARD_METHODS:
            method = "other"
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        rec.request_started()
        start = time.perf_counter()
        failed = False
        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            failed = True
            raise
        finally:
            route = _label(self.route(scope))
            if failed:
                rec.request_exception(route, method)
                status = 500
            rec.request_finished(route, method, status, time.perf_counter() - start)


def _label(route: str | None) -> str:
    """The route function's answer as a label: None is no match, "" the site root ("/")."""
    if route is None:
        return UNMATCHED
    return route or "/"
