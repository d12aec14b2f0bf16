"""The exporter-toolkit web config file: TLS, basic auth and headers, reloaded on change.

Its checks are in webconfig_parse.py, the TLS context in webconfig_tls.py and basic auth in
webconfig_auth.py; this module builds what a valid file asks for and reloads it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exporter.config import ConfigError, format_duration, read_yaml
from exporter.webconfig_auth import Authenticator
from exporter.webconfig_parse import TLSSettings, normal_san, validate_web_config
from exporter.webconfig_tls import build_ssl_context

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("exporter.webconfig")

# How often, at most, the files' modification times are looked at.
RELOAD_CHECK_INTERVAL = 1.0


class RateLimiter:
    """A token bucket: `burst` requests at once, then one per `interval` seconds."""

    def __init__(self, interval: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Take a token if there is one."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._updated) / self.interval)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


@dataclass(frozen=True)
class WebSecurity:
    """One loaded web config file: what the HTTP server applies to each connection and request."""

    tls: TLSSettings | None = None
    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    authenticator: Authenticator | None = None
    rate_limiter: RateLimiter | None = None

    def client_allowed(self, peer_cert: Mapping[str, Any] | None) -> bool:
        """Whether a verified client certificate names an allowed SAN (always, with no list)."""
        if self.tls is None or not self.tls.client_allowed_sans:
            return True
        names = {normal_san(str(value)) for _, value in (peer_cert or {}).get(
            "subjectAltName", ())}
        return not names.isdisjoint(self.tls.client_allowed_sans)


def parse_web_config(raw: Any, base_dir: str = ".") -> WebSecurity:
    """Validate a parsed web config document; raise ConfigError listing every problem."""
    settings = validate_web_config(raw, base_dir)
    context = build_ssl_context(settings.tls) if settings.tls is not None else None
    authenticator = Authenticator(settings.users) if settings.users else None
    limiter = RateLimiter(*settings.rate_limit) if settings.rate_limit is not None else None
    return WebSecurity(tls=settings.tls, ssl_context=context, users=settings.users,
                       headers=settings.headers, authenticator=authenticator,
                       rate_limiter=limiter)


def load_web_config(path: str) -> WebSecurity:
    """Read and validate the web config file; every problem is prefixed with the file's name."""
    raw = read_yaml(path, "web config file")
    try:
        return parse_web_config(raw, os.path.dirname(os.path.abspath(path)))
    except ConfigError as exc:
        raise ConfigError([f"web config file {path}: {p}" for p in exc.problems]) from None


_Fingerprint = tuple[tuple[str, int, int], ...]


class WebConfigFile:
    """The web config file, reloaded when it or a certificate file it names changes.

    A file that became invalid is logged and the last valid settings stay in force, so a
    half-written certificate during rotation never takes the exporter's endpoint down.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._current = load_web_config(path)
        self._fingerprint = self._stat()
        self._failed: _Fingerprint | None = None
        self._checked_at = clock()

    def _files(self, security: WebSecurity) -> list[str]:
        files = [self.path]
        if security.tls is not None:
            tls = security.tls
            files += [f for f in (tls.cert_file, tls.key_file, tls.client_ca_file) if f]
        return files

    def _stat(self) -> _Fingerprint:
        result = []
        for path in self._files(self._current):
            try:
                st = os.stat(path)
                result.append((path, st.st_mtime_ns, st.st_size))
            except (OSError, ValueError):
                result.append((path, -1, -1))
        return tuple(result)

    def current(self) -> WebSecurity:
        """The settings in force, after a reload if a file changed (checked at most 1/s)."""
        now = self._clock()
        if now - self._checked_at < RELOAD_CHECK_INTERVAL:
            return self._current
        with self._lock:
            if now - self._checked_at < RELOAD_CHECK_INTERVAL:
                return self._current
            self._checked_at = now
            fingerprint = self._stat()
            if fingerprint not in (self._fingerprint, self._failed):
                self._reload(fingerprint)
            return self._current

    def _reload(self, fingerprint: _Fingerprint) -> None:
        # Runs inside a request: nothing may escape from here, or that request (and every one
        # after it, once a second) would fail without an answer.
        try:
            security = load_web_config(self.path)
        except Exception as exc:  # a bug must not take the endpoint down
            self._failed = fingerprint
            # A ConfigError names keys, never values that could be secrets; anything else is a
            # bug whose message is unknown, so only its type is logged.
            err = ("; ".join(exc.problems) if isinstance(exc, ConfigError)
                   else f"cannot load: {type(exc).__name__}")
            log.error("web config file invalid; keeping the previous settings",
                      extra={"file": self.path, "err": err})
            return
        self._current = security
        self._fingerprint = self._stat()
        self._failed = None
        log.info("web config file reloaded", extra={"file": self.path,
                                                    "tls": security.tls is not None,
                                                    "users": len(security.users)})

    def summary(self) -> str:
        """One line for --config.check: what the file turns on, no secrets."""
        security = self._current
        parts = [f"web config file {self.path}:"]
        if security.tls is None:
            parts.append("TLS off,")
        else:
            parts.append(f"TLS on ({security.tls.min_version}-{security.tls.max_version}, "
                         f"client certificates: {security.tls.client_auth_type}),")
        parts.append(f"basic auth {'on' if security.users else 'off'} "
                     f"({len(security.users)} users), {len(security.headers)} extra headers")
        if security.rate_limiter is not None:
            limiter = security.rate_limiter
            parts.append(f", rate limit {limiter.burst} requests then one every "
                         f"{format_duration(limiter.interval)}")
        return " ".join(parts)
