"""Redis URLs (redis://, rediss://, unix://) read the way redis-py reads them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# --- URL --------------------------------------------------------------------------------------

_TRUE_FALSE = {"0": False, "f": False, "false": False, "n": False, "no": False}
# Query parameters redis-py reads from a URL that mean nothing for one connection without
# retries or a pool: accepted and ignored, so a URL that worked with redis-py still works.
_IGNORED = frozenset({
    "socket_read_size", "socket_keepalive", "retry_on_timeout", "retry_on_error",
    "max_connections", "health_check_interval", "timeout", "protocol", "legacy_responses",
    "ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "ssl_include_verify_flags",
    "ssl_exclude_verify_flags", "ssl_min_version",
})
_CERT_REQS = ("none", "optional", "required")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, read from a redis://, rediss:// or unix:// URL the way
    redis-py reads it."""

    host: str = "localhost"
    port: int = 6379
    path: str = ""  # a unix socket
    tls: bool = False
    username: str = ""
    password: str = ""
    db: int = 0
    client_name: str = ""
    connect_timeout: float | None = None
    read_timeout: float | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True
    ssl_ca_certs: str = ""
    ssl_ca_path: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_password: str = ""

    @property
    def where(self) -> str:
        """host:port or the socket path, for messages."""
        return self.path or f"{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """The Endpoint of a URL; ValueError (naming no part of it) when it cannot be used.

    As redis-py: the userinfo's user and password win over the query's, the path of a TCP URL
    is the database number (a query `db` wins), a unix URL's path is the socket, the first
    value of a repeated parameter counts."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL (a port that is not a number, or a bad IPv6 "
                     "address)") from None
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
    fields: dict[str, Any] = {"tls": scheme == "rediss"}
    for name, value in query.items():
        if name in _IGNORED:
            continue
        if name in ("db",):
            fields["db"] = _number(int, name, value)
        elif name in ("socket_timeout", "socket_connect_timeout"):
            key = "read_timeout" if name == "socket_timeout" else "connect_timeout"
            fields[key] = _number(float, name, value)
        elif name in ("username", "password", "client_name", "ssl_ca_certs", "ssl_ca_path",
                      "ssl_certfile", "ssl_keyfile", "ssl_password"):
            fields[name] = value
        elif name == "ssl_check_hostname":
            fields[name] = _TRUE_FALSE.get(value.lower(), True)
        elif name == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise ValueError("ssl_cert_reqs: expected none, optional or required")
            fields[name] = value.lower()
        else:
            # Not named: a piece of a password with an unescaped "&" would land here.
            raise ValueError("a query parameter the client does not know")
    if parts.username:
        fields["username"] = unquote(parts.username)
    if parts.password:
        fields["password"] = unquote(parts.password)
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path")
        fields["path"] = unquote(parts.path)
    else:
        if parts.hostname:
            fields["host"] = unquote(parts.hostname)
        if port is not None:
            fields["port"] = port
        if parts.path and "db" not in query:
            with contextlib.suppress(ValueError):
                fields["db"] = int(unquote(parts.path).replace("/", ""))
    for key in ("connect_timeout", "read_timeout"):
        if key in fields and not fields[key] > 0:
            raise ValueError("socket timeouts must be greater than 0")
    return Endpoint(**fields)


def _number(kind: type[float] | type[int], name: str, value: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}: not a number") from None
