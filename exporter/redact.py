"""Connection URLs made safe to show: every part that may carry a secret is replaced."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

SECRET = "<secret>"

# Query parameters whose values are shown: the settings redis-py parses from a URL (its
# URL_QUERY_ARGUMENT_PARSERS), the user and client names, which are not secret (the user name
# in the userinfo part is shown too), and the TLS settings and file paths. Any other
# parameter's value is hidden: `password`, `ssl_password`, and whatever a later redis-py
# learns to read from the query.
SHOWN_QUERY_PARAMETERS = frozenset({
    "db", "socket_timeout", "socket_connect_timeout", "socket_read_size", "socket_keepalive",
    "retry_on_timeout", "retry_on_error", "max_connections", "health_check_interval",
    "ssl_check_hostname", "ssl_validate_ocsp", "ssl_validate_ocsp_stapled",
    "ssl_include_verify_flags", "ssl_exclude_verify_flags", "ssl_min_version", "timeout",
    "protocol", "legacy_responses", "username", "client_name", "ssl_cert_reqs", "ssl_ca_certs",
    "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
})
# Characters a user name in the userinfo part cannot hold unescaped: with one of them, the
# text before the last "@" is not a user name but a mangled URL, and all of it is hidden.
_NOT_IN_USER = frozenset("/?#[]@")


def _split(url: str) -> tuple[str, str | None, str | None, str, str, str | None] | None:
    """(scheme, user, password, authority and path, query, fragment) read the way a human
    meant it, or None for text that is not a URL. The userinfo part runs to the LAST "@": a
    password may hold an unescaped "@", "/", "?" or "#", which a URL parser would split on
    (leaving part of the password in the host, path or query). user is None when the userinfo
    part is hidden whole; password is None when there is no userinfo part."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.isascii() or not scheme.isalnum():
        return None
    user: str | None = ""
    password: str | None = None
    userinfo, at, after = rest.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if not colon:
            password = ""
        if any(c in _NOT_IN_USER for c in user):
            user, password = None, userinfo
        rest = after
    rest, hash_mark, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    return scheme, user, password, rest, query, fragment if hash_mark else None


def redact_url(url: str) -> str:
    """The URL with every secret-bearing part replaced by <secret>, for logs, errors,
    --config.check and the landing page: the password in the userinfo part, the value of any
    query parameter not known to be a harmless setting, and any fragment."""
    parts = _split(url)
    if parts is None:
        return SECRET  # no structure to show: all of it may be the secret
    scheme, user, password, rest, query, fragment = parts
    shown = f"{scheme}://"
    if user is None:
        shown += f"{SECRET}@"
    elif password is not None:
        shown += f"{user}:{SECRET}@" if password else f"{user}@"
    shown += rest
    if query:
        shown += "?" + "&".join(_redact_query_item(item) for item in query.split("&"))
    if fragment is not None:
        shown += f"#{SECRET}" if fragment else "#"
    return shown


def _redact_query_item(item: str) -> str:
    name, equals, value = item.partition("=")
    if not equals:
        # redis-py ignores it; it may be a piece of a password that held an unescaped "&".
        return SECRET if item else item
    if unquote_plus(name) in SHOWN_QUERY_PARAMETERS or not value:
        return item
    return f"{name}={SECRET}" if unquote_plus(name).isidentifier() else SECRET


def url_secrets(url: str) -> list[str]:
    """The secrets a client library given this URL could quote in an error message, as
    written and decoded, longest first (for scrub()): the password, each piece of it between
    URL delimiters (a password with an unescaped "/" or ":" ends up partly in the host or
    port), and the value of every query parameter redact_url hides."""
    found: set[str] = set()
    parts = _split(url)
    if parts is None:
        found.add(url)
    else:
        password, query = parts[2] or "", parts[4]
        found.add(password)
        found.update(re.split(r"[/?#@&:=\[\]]", password))
        for item in query.split("&"):
            _, equals, value = item.partition("=")
            if equals and _redact_query_item(item) != item:
                found.add(value)
    try:
        # What a URL parser (redis-py's own) makes of it, which may differ for a mangled URL.
        split = urlsplit(url)
        found.add(split.password or "")
        found.update(v for k, v in parse_qsl(split.query) if k not in SHOWN_QUERY_PARAMETERS)
    except ValueError:
        pass
    found |= {unquote(s) for s in found} | {unquote_plus(s) for s in found}
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


def scrub(text: str, secrets: list[str]) -> str:
    """text with every occurrence of each secret (url_secrets' list) replaced by <secret>."""
    if not secrets:
        return text
    # One pass, longest first: a short secret must not match inside a marker already put in.
    return re.sub("|".join(map(re.escape, secrets)), SECRET, text)
