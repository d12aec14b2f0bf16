"""What start-up would reject beyond the config's own checks: the listen address on this
machine and URLs to link to; --config.check and start-up run the same checks."""

from __future__ import annotations

import errno
import os
import socket

from exporter.config import Config, describe_value, split_listen_address


def listen_problems(address: str) -> list[str]:
    """Problems binding address would meet that are the configuration's fault: a host that
    does not resolve, or an address that is not this machine's (a port in use is not one)."""
    try:
        host, _ = split_listen_address(address)
    except ValueError:
        return []  # the config's own check reports it
    if host == "":
        return []
    # The server binds the host as written, IPv6 when it holds a colon (exporter/server.py).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # An ASCII name as bytes: a str makes getaddrinfo load the IDNA codec (encodings.idna,
        # stringprep, unicodedata: 0.4 MB resident for the exporter's life) for nothing.
        name = host.encode() if host.isascii() else host
        resolved = socket.getaddrinfo(name, 0, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        return [f"web.listen_address: cannot resolve {describe_value(host)}: {reason}"]
    except OSError as exc:
        return [f"web.listen_address: cannot resolve {describe_value(host)}: {exc.strerror or exc}"]
    sockaddr = resolved[0][4]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind((sockaddr[0], 0, *sockaddr[2:]))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return [f"web.listen_address: {describe_value(host)} is not an address of this machine"]
    finally:
        probe.close()
    return []


def url_problems(key: str, url: str) -> list[str]:
    """A link for the landing page: empty, or an http(s) URL with a host and no spaces."""
    if not url:
        return []
    scheme, sep, rest = url.partition("://")
    if (not sep or scheme.lower() not in ("http", "https") or not rest or rest[0] in "/?#"
            or any(c.isspace() or not c.isprintable() for c in url)):
        return [f"{key}: expected an http:// or https:// URL, got {describe_value(url)}"]
    return []


def redis_url_problems(config: Config) -> list[str]:
    """What the Redis client would refuse in redis.url (an unknown query parameter, a bad
    timeout), said now rather than as `up 0` at every scrape; the URL shown redacted."""
    if not config.enabled("redis"):
        return []
    from exporter.redact import redact_url
    from exporter.resp_url import parse_url

    try:
        parse_url(config.redis.url)
    except ValueError as exc:
        return [f"redis.url: {exc} in {describe_value(redact_url(config.redis.url))}"]
    return []


def problems(config: Config) -> list[str]:
    """Everything start-up would reject that load_config does not already."""
    return [*listen_problems(config.web.listen_address),
            *url_problems("web.grafana_url", config.web.grafana_url),
            *redis_url_problems(config)]


def warnings(config: Config) -> list[str]:
    """What start-up accepts but will not work as written (the collector reports it at run
    time): printed by --config.check, never a reason to exit 2."""
    found = []
    if config.enabled("app"):
        for i, directory in enumerate(config.app.multiprocess_dirs):
            if not os.path.isdir(directory):
                found.append(f"app.multiprocess_dirs[{i}]: {describe_value(directory)} is not a "
                             f"folder (yet): qatoolbox_app_multiprocess_dir_up 0 until it is")
            elif not os.access(directory, os.R_OK | os.X_OK):
                found.append(f"app.multiprocess_dirs[{i}]: {describe_value(directory)} is not "
                             f"readable by this user")
    if config.enabled("host"):
        for key in ("proc_path", "sys_path", "root_path"):
            path = getattr(config.host, key)
            if not os.path.isdir(path):
                found.append(f"host.{key}: {describe_value(path)} is not a folder")
    return found
