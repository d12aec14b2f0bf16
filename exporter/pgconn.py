"""PostgreSQL plumbing shared by the postgres and business collectors: connect, cut, redact."""

from __future__ import annotations

import gc
import itertools
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from exporter.collectors.postgres_config import PostgresConfig
from exporter.redact import scrub

# Why a connection failed, as the `reason` label of qatoolbox_postgres_connection_error and
# qatoolbox_business_connection_error: a bounded set, the first that matches wins.
REASONS = ("connection_refused", "timeout", "authentication_failed", "database_missing",
           "tls_failed", "other")
# SQLSTATE first (the server said so), then libpq's own words (it never reached a server).
_SQLSTATE_REASONS = {
    "28P01": "authentication_failed",  # invalid_password
    "28000": "authentication_failed",  # invalid_authorization_specification (pg_hba)
    "3D000": "database_missing",  # invalid_catalog_name
}
_TEXT_REASONS = (
    (re.compile(r"password authentication failed|no pg_hba\.conf entry|authentication failed"
                r"|password must be|no password supplied", re.I), "authentication_failed"),
    (re.compile(r'database "[^"]*" does not exist', re.I), "database_missing"),
    (re.compile(r"\bSSL\b|\bTLS\b|certificate", re.I), "tls_failed"),
    (re.compile(r"connection refused|no such file or directory", re.I), "connection_refused"),
    (re.compile(r"timeout expired|timed out|no answer", re.I), "timeout"),
)
_WHITESPACE = re.compile(r"\s+")


def connect_params(cfg: PostgresConfig, application_name: str, options: str,
                   budget_left: float = math.inf) -> dict[str, Any]:
    """libpq parameters for cfg. connect_timeout in whole seconds (libpq's unit), rounded
    down so that a connection never waits longer than configured or than the budget left,
    and 1 at least (0 would mean no timeout)."""
    params: dict[str, Any] = {
        "host": cfg.host,
        "port": cfg.port,
        "dbname": cfg.dbname,
        "user": cfg.user,
        "sslmode": cfg.sslmode,
        "connect_timeout": max(1, math.floor(min(cfg.connect_timeout, budget_left))),
        "application_name": application_name,
        "options": options,
    }
    if cfg.password:
        params["password"] = str(cfg.password)
    return params


def connect(params: dict[str, Any], autocommit: bool = False
            ) -> psycopg.Connection[tuple[Any, ...]]:
    """A new connection with params (connect_params'); raises psycopg.Error."""
    try:
        return psycopg.Connection.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        error = exc
    # psycopg keeps each failed attempt's error, traceback and frames in a reference cycle
    # that holds the attempt's socket (two attempts for localhost: ::1 and 127.0.0.1), and
    # the error raised reaches it through its traceback and context: left to the cyclic
    # collector, an outage kept sockets open for as long as it took to get to them. The error
    # is raised without them (its message and SQLSTATE are what the callers read), and the
    # cycle is collected now (a few ms, on a failed connection only).
    error.__context__ = error.__cause__ = None
    error = error.with_traceback(None)
    gc.collect()
    raise error


def redact(text: str, cfg: PostgresConfig) -> str:
    """text without cfg's password, on one line (libpq's errors have tabs and newlines)."""
    password = str(cfg.password) if cfg.password else ""
    return _WHITESPACE.sub(" ", scrub(text, [password] if password else [])).strip()


def describe_error(exc: BaseException, cfg: PostgresConfig | None = None) -> str:
    """The first line of an error (PostgreSQL adds LINE/HINT lines), prefixed with its class
    for a database error ("UndefinedTable: relation "x" does not exist"), without the
    password when cfg is given. libpq's connection errors keep their second line, which says
    what was tried ("Is the server running on that host ...")."""
    text = str(exc).strip()
    if not (isinstance(exc, psycopg.Error) and getattr(exc, "sqlstate", None) is None):
        text = (text.splitlines() or [""])[0]
    if isinstance(exc, psycopg.Error):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return redact(text, cfg) if cfg is not None else _WHITESPACE.sub(" ", text).strip()


def reason(exc: BaseException | str) -> str:
    """Which of REASONS a connection failure is, from its SQLSTATE or its text."""
    state = getattr(exc, "sqlstate", None)
    if state in _SQLSTATE_REASONS:
        return _SQLSTATE_REASONS[state]
    text = str(exc)
    for pattern, found in _TEXT_REASONS:
        if pattern.search(text):
            return found
    return "other"


def shutdown(fd: int) -> None:
    """shutdown(2) the socket behind fd without closing fd (its owner still uses it): a read
    blocked on it returns at once with an error, on the owner's thread."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected: the blocked call has its answer anyway
    finally:
        dup.close()


class Watchdog:
    """Cuts a connection's socket when its deadline passes.

    A stopped server (SIGSTOP, a frozen VM) never answers and never resets the connection:
    statement_timeout is enforced by the server and TCP keepalives see a live peer, so a
    blocking query would wait forever. shutdown() on the socket makes the blocked read return
    at once with an error, on the thread that reads it, which then closes the connection
    itself; the descriptor is never closed under it. One thread per watchdog, however many
    sockets it watches; once disarm() has returned, a socket is never cut.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 name: str = "postgres-watchdog") -> None:
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._watched: dict[int, tuple[int, float]] = {}  # token -> (fd, deadline)
        self._fired: set[int] = set()
        self._tokens = itertools.count(1)
        self._last = 0
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float) -> int:
        """Watch fd until disarm(token); shut it down if deadline (clock's) passes first."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            token = self._last = next(self._tokens)
            self._watched[token] = (fd, deadline)
            self._cond.notify()
            return token

    def disarm(self, token: int | None = None) -> bool:
        """Stop watching (the last armed socket by default); whether the deadline cut it."""
        with self._cond:
            token = self._last if token is None else token
            self._watched.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def fire(self) -> None:
        """Cut every watched socket now (at shutdown), on this thread."""
        with self._cond:
            for token, (fd, _) in self._watched.items():
                shutdown(fd)
                self._fired.add(token)
            self._watched.clear()

    def stop(self) -> None:
        """End the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._watched:
                    self._cond.wait()
                    continue
                now = self._clock()
                for token, (fd, deadline) in list(self._watched.items()):
                    if deadline <= now:
                        del self._watched[token]
                        shutdown(fd)
                        self._fired.add(token)
                if self._watched:
                    self._cond.wait(min(d for _, d in self._watched.values()) - now)
