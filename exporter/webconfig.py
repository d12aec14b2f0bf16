"""The exporter-toolkit web config file: TLS, basic auth and headers, reloaded on change."""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exporter.config import (
    ConfigError,
    FileReadError,
    describe,
    format_duration,
    parse_duration,
    read_file,
    read_yaml,
)

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("exporter.webconfig")

# Go's tls.ClientAuthType names. The two that accept a certificate without verifying it are
# refused: Python's ssl module cannot do that, and the toolkit itself calls them insecure.
# Values are the ssl module's names: ssl (5 MB resident) is imported only with a TLS config.
CLIENT_AUTH_TYPES: dict[str, str | None] = {
    "NoClientCert": "CERT_NONE",
    "RequestClientCert": None,
    "RequireAnyClientCert": None,
    "VerifyClientCertIfGiven": "CERT_OPTIONAL",
    "RequireAndVerifyClientCert": "CERT_REQUIRED",
}
TLS_VERSIONS = {  # oldest first
    "TLS10": "TLSv1",
    "TLS11": "TLSv1_1",
    "TLS12": "TLSv1_2",
    "TLS13": "TLSv1_3",
}
TLS_STRING_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
                   "max_version", "cert", "key", "client_ca")
TLS_LIST_KEYS = ("cipher_suites", "curve_preferences", "client_allowed_sans")
TLS_KEYS = {*TLS_STRING_KEYS, *TLS_LIST_KEYS, "prefer_server_cipher_suites"}
TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
# Go's cipher suite names (crypto/tls), as the toolkit takes them, with OpenSSL's names for the
# TLS 1.0-1.2 suites. Go ignores the setting for TLS 1.3, and so does Python's set_ciphers():
# the TLS 1.3 names are accepted and change nothing, as in the toolkit.
CIPHER_SUITES: dict[str, str | None] = {
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    # Go's older aliases of the two above.
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
# Go's curve names and OpenSSL's. Python's ssl module sets one key-exchange group only
# (set_ecdh_curve), so a list of more than one cannot be honoured and is refused.
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}
HTTP_KEYS = {"headers", "http2"}
# The toolkit's header set, with the values it accepts where it restricts them.
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
_BCRYPT_HASH = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
# Successful checks remembered; more distinct working credentials than this are not expected.
AUTH_CACHE_SIZE = 64
# The largest rate_limit.burst (a bucket holds its tokens as a float).
MAX_BURST = 1_000_000_000
# How often, at most, the files' modification times are looked at.
RELOAD_CHECK_INTERVAL = 1.0


@dataclass(frozen=True)
class TLSSettings:
    """The validated tls_server_config section. A certificate, key or client CA comes from a
    file (re-read when it changes) or inline in the web config (kept out of repr and logs)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cert: str = field(default="", repr=False)
    key: str = field(default="", repr=False)
    client_ca: str = field(default="", repr=False)
    # OpenSSL names of the TLS 1.0-1.2 suites allowed; empty for OpenSSL's defaults.
    ciphers: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve: str = ""  # OpenSSL's name of the one key-exchange group allowed, or "" for all
    client_allowed_sans: frozenset[str] = frozenset()


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
        names = {_normal_san(str(value)) for _, value in (peer_cert or {}).get(
            "subjectAltName", ())}
        return not names.isdisjoint(self.tls.client_allowed_sans)


def _normal_san(value: str) -> str:
    """IP addresses compared by value (Python writes IPv6 SANs long, Go short)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def _mapping(value: Any, key: str, errors: list[str]) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.append(f"{key}: expected a mapping, got {describe(value)}")
        return {}
    return value


def _check_keys(section: Mapping[Any, Any], prefix: str, known: set[str],
                errors: list[str]) -> None:
    for key in section:
        if key not in known:
            errors.append(f"{prefix}{key}: unknown key")


def _string(section: Mapping[Any, Any], key: str, prefix: str, errors: list[str],
            default: str = "") -> str:
    value = section.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        errors.append(f"{prefix}{key}: expected a string, got {describe(value)}")
        return default
    return value


def _strings(section: Mapping[Any, Any], key: str, prefix: str,
             errors: list[str]) -> list[str]:
    value = section.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{prefix}{key}: expected a list of strings, got {describe(value)}")
        return []
    return list(value)


def _utf8(value: str) -> bool:
    """Whether the text can be encoded (YAML's \\uD800 escapes make lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path_problem(path: str) -> str | None:
    """Why a file name can never be opened (os functions raise ValueError for these)."""
    if "\0" in path:
        return "a file name cannot contain a NUL byte"
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return "not a valid file name (characters that cannot be encoded)"
    return None


def _one_of(values: dict[str, str], inline: str, file_key: str, errors: list[str], *,
            required: bool) -> None:
    prefix = "tls_server_config."
    if values[inline] and values[file_key]:
        errors.append(f"{prefix}{inline}: set together with {file_key}; use one of them")
    elif required and not values[inline] and not values[file_key]:
        errors.append(f"{prefix}{file_key}: required when tls_server_config is present "
                      f"(or {inline}, inline)")


def _tls(raw: Any, base_dir: str, errors: list[str]) -> TLSSettings | None:
    if raw is None:
        return None
    prefix = "tls_server_config."
    section = _mapping(raw, "tls_server_config", errors)
    _check_keys(section, prefix, TLS_KEYS, errors)
    values = {key: _string(section, key, prefix, errors) for key in TLS_STRING_KEYS}
    _one_of(values, "cert", "cert_file", errors, required=True)
    _one_of(values, "key", "key_file", errors, required=True)
    _one_of(values, "client_ca", "client_ca_file", errors, required=False)
    has_ca = bool(values["client_ca_file"] or values["client_ca"])
    auth_type = values["client_auth_type"]
    if not auth_type:
        # As the toolkit does: a client CA without a policy means verified client certificates.
        auth_type = "RequireAndVerifyClientCert" if has_ca else "NoClientCert"
    if auth_type not in CLIENT_AUTH_TYPES:
        errors.append(f"{prefix}client_auth_type: expected one of "
                      f"{', '.join(CLIENT_AUTH_TYPES)}, got {describe(auth_type)}")
    elif CLIENT_AUTH_TYPES[auth_type] is None:
        errors.append(f"{prefix}client_auth_type: {auth_type} accepts unverified certificates "
                      f"and is not supported; use RequireAndVerifyClientCert")
    elif auth_type == "NoClientCert" and has_ca:
        errors.append(f"{prefix}client_ca_file: set, but client_auth_type is NoClientCert")
    elif auth_type != "NoClientCert" and not has_ca:
        errors.append(f"{prefix}client_ca_file: required with client_auth_type {auth_type}")
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        values[key] = values[key] or default
        if values[key] not in TLS_VERSIONS:
            errors.append(f"{prefix}{key}: expected one of {', '.join(TLS_VERSIONS)}, "
                          f"got {describe(values[key])}")
    if (values["min_version"] in TLS_VERSIONS and values["max_version"] in TLS_VERSIONS
            and list(TLS_VERSIONS).index(values["min_version"])
            > list(TLS_VERSIONS).index(values["max_version"])):
        errors.append(f"{prefix}min_version: {values['min_version']} is above max_version "
                      f"{values['max_version']}")
    for key in ("cert_file", "key_file", "client_ca_file"):
        if values[key] and (problem := _path_problem(values[key])) is not None:
            errors.append(f"{prefix}{key}: {problem}")
            values[key] = ""
        # Relative paths are relative to the web config file, as in the toolkit.
        if values[key] and not os.path.isabs(values[key]):
            values[key] = os.path.join(base_dir, values[key])
    for key in ("cert", "key", "client_ca"):
        if not _utf8(values[key]):
            # The value itself is never quoted: an inline key is a secret.
            errors.append(f"{prefix}{key}: characters that cannot be encoded (not PEM text)")
            values[key] = ""

    ciphers: list[str] = []
    for name in _strings(section, "cipher_suites", prefix, errors):
        if name not in CIPHER_SUITES:
            errors.append(f"{prefix}cipher_suites: unknown cipher suite {describe(name)}")
        elif (openssl_name := CIPHER_SUITES[name]) is not None:
            ciphers.append(openssl_name)
    curves = _strings(section, "curve_preferences", prefix, errors)
    curve = ""
    if len(curves) > 1:
        errors.append(f"{prefix}curve_preferences: Python's ssl module can allow only one "
                      f"curve; list one of {', '.join(CURVES)}")
    elif curves and curves[0] not in CURVES:
        errors.append(f"{prefix}curve_preferences: expected one of {', '.join(CURVES)}, "
                      f"got {describe(curves[0])}")
    elif curves:
        curve = CURVES[curves[0]]
    sans = _strings(section, "client_allowed_sans", prefix, errors)
    if sans and auth_type != "RequireAndVerifyClientCert":
        errors.append(f"{prefix}client_allowed_sans: needs client_auth_type "
                      f"RequireAndVerifyClientCert")
    prefer = section.get("prefer_server_cipher_suites", True)
    if prefer is None:
        prefer = True
    if not isinstance(prefer, bool):
        errors.append(f"{prefix}prefer_server_cipher_suites: expected true or false, got "
                      f"{describe(prefer)}")
        prefer = True
    return TLSSettings(
        cert_file=values["cert_file"], key_file=values["key_file"],
        client_ca_file=values["client_ca_file"], client_auth_type=auth_type,
        min_version=values["min_version"], max_version=values["max_version"],
        cert=values["cert"], key=values["key"], client_ca=values["client_ca"],
        ciphers=tuple(dict.fromkeys(ciphers)), prefer_server_cipher_suites=prefer,
        curve=curve, client_allowed_sans=frozenset(_normal_san(v) for v in sans),
    )


# A certificate file (a CA bundle is a few hundred KB) is read by us, capped, and handed to
# OpenSSL from memory: given the path, OpenSSL would block on a FIFO and read a huge file whole.
PEM_FILE_LIMIT = 1 << 20


def _pem_path(stack: contextlib.ExitStack, pem: str | bytes) -> str:
    """A path to an inline PEM that OpenSSL can open: an anonymous in-memory file, so an inline
    key never touches the disk."""
    fd = os.memfd_create("qatoolbox-exporter-pem", os.MFD_CLOEXEC)
    stack.callback(os.close, fd)
    os.write(fd, pem.encode() if isinstance(pem, str) else pem)
    return f"/proc/self/fd/{fd}"


def _reason(exc: ssl.SSLError | OSError) -> str:
    # The library's reason only ("PEM lib", "key values mismatch"): never file contents.
    return str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)


def build_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A server-side context from the settings; ConfigError naming the key on a bad file."""
    import ssl

    prefix = "tls_server_config."
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = getattr(ssl.TLSVersion, TLS_VERSIONS[tls.min_version])
    context.maximum_version = getattr(ssl.TLSVersion, TLS_VERSIONS[tls.max_version])
    context.set_alpn_protocols(["http/1.1"])
    problems: list[str] = []
    pems: dict[str, str | bytes] = {"cert_file": tls.cert, "key_file": tls.key,
                                    "client_ca_file": tls.client_ca}
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, key)
        if path and key != "client_ca_file" and not os.access(path, os.R_OK):
            problems.append(f"{prefix}{key}: cannot read {path}")
        elif path:
            try:
                pems[key] = read_file(path, PEM_FILE_LIMIT)
            except FileReadError as exc:
                problems.append(f"{prefix}{key}: cannot read {path}: {exc}")
    unavailable = []
    for name in tls.ciphers:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(name)
        except ssl.SSLError:
            unavailable.append(next(k for k, v in CIPHER_SUITES.items() if v == name))
    if unavailable:
        problems.append(f"{prefix}cipher_suites: not available in this OpenSSL "
                        f"({ssl.OPENSSL_VERSION}): {', '.join(unavailable)}")
    if problems:
        raise ConfigError(problems)
    if tls.ciphers:
        context.set_ciphers(":".join(tls.ciphers))
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve:
        context.set_ecdh_curve(tls.curve)
    cert_name = tls.cert_file or "the inline cert"
    key_name = tls.key_file or "the inline key"
    with contextlib.ExitStack() as stack:
        try:
            context.load_cert_chain(_pem_path(stack, pems["cert_file"]),
                                    _pem_path(stack, pems["key_file"]))
        except (ssl.SSLError, OSError) as exc:
            key = "cert_file" if tls.cert_file else "cert"
            raise ConfigError([f"{prefix}{key}: cannot load {cert_name} with {key_name}: "
                               f"{_reason(exc)}"]) from None
    if tls.client_ca_file or tls.client_ca:
        try:
            if tls.client_ca_file:
                with contextlib.ExitStack() as stack:
                    context.load_verify_locations(
                        cafile=_pem_path(stack, pems["client_ca_file"]))
            else:
                context.load_verify_locations(cadata=tls.client_ca)
        except (ssl.SSLError, OSError, ValueError, TypeError) as exc:
            # TypeError: inline PEM text that is not ASCII (the ssl module's own check).
            key, name = (("client_ca_file", tls.client_ca_file) if tls.client_ca_file
                         else ("client_ca", "the inline client_ca"))
            reason = "not PEM" if isinstance(exc, (ValueError, TypeError)) else _reason(exc)
            raise ConfigError([f"{prefix}{key}: cannot load {name}: {reason}"]) from None
    mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    context.verify_mode = getattr(ssl, mode) if mode is not None else ssl.CERT_REQUIRED
    return context


def _rate_limit(raw: Any, errors: list[str]) -> RateLimiter | None:
    if raw is None:
        return None
    section = _mapping(raw, "rate_limit", errors)
    _check_keys(section, "rate_limit.", {"interval", "burst"}, errors)
    interval_raw, burst = section.get("interval", 0), section.get("burst", 0)
    interval = 0.0
    if isinstance(interval_raw, str):
        try:
            interval = parse_duration(interval_raw)
        except ValueError:
            errors.append(f"rate_limit.interval: expected a duration like 1s or 100ms, got "
                          f"{describe(interval_raw)}")
            return None
    elif interval_raw not in (0, None):
        errors.append(f"rate_limit.interval: expected a duration like 1s or 100ms, got "
                      f"{describe(interval_raw)}")
        return None
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        errors.append(f"rate_limit.burst: expected a whole number, got {describe(burst)}")
        return None
    if burst > MAX_BURST:
        errors.append(f"rate_limit.burst: at most {MAX_BURST}")
        return None
    if interval <= 0:
        return None  # as in the toolkit: no interval, no limit
    if burst < 1:
        errors.append("rate_limit.burst: must be at least 1 when an interval is set "
                      "(0 would refuse every request)")
        return None
    return RateLimiter(interval, burst)


def _users(raw: Any, errors: list[str]) -> dict[str, str]:
    users: dict[str, str] = {}
    for user, hashed in _mapping(raw, "basic_auth_users", errors).items():
        key = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user or not _utf8(user):
            errors.append(f"{key}: a user name is a non-empty string without \":\"")
            continue
        if not isinstance(hashed, str):
            # A number here is most likely a plain password written instead of its hash.
            kind = (describe(hashed) if hashed is None or isinstance(hashed, (Mapping, list))
                    else f"a value of type {type(hashed).__name__}")
            errors.append(f"{key}: expected a bcrypt hash, got {kind}")
            continue
        match = _BCRYPT_HASH.fullmatch(hashed)
        # The hash is not secret in the way a password is, but is still left out of errors.
        if match is None:
            errors.append(f"{key}: expected a bcrypt hash as made by `htpasswd -nBC 10`")
        elif not 4 <= int(match.group(1)) <= 31:
            errors.append(f"{key}: bcrypt cost must be between 4 and 31")
        else:
            users[user] = hashed
    return users


def _http(raw: Any, errors: list[str]) -> tuple[tuple[str, str], ...]:
    prefix = "http_server_config."
    section = _mapping(raw, "http_server_config", errors)
    _check_keys(section, prefix, HTTP_KEYS, errors)
    if "http2" in section and not isinstance(section["http2"], bool):
        errors.append(f"{prefix}http2: expected true or false, got "
                      f"{describe(section['http2'])}")
    headers: list[tuple[str, str]] = []
    for name, value in _mapping(section.get("headers"), f"{prefix}headers", errors).items():
        key = f"{prefix}headers.{name}"
        if name not in HEADERS:
            errors.append(f"{key}: unknown header (known: {', '.join(HEADERS)})")
            continue
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {describe(value)}")
            continue
        if any(c in value for c in "\r\n\0"):
            errors.append(f"{key}: must be a single line")
            continue
        if not all(" " <= c <= "~" or c == "\t" for c in value):
            # The server writes header lines as Latin-1; anything else would fail every response.
            errors.append(f"{key}: must be printable ASCII")
            continue
        allowed = HEADERS[name]
        if allowed is not None and value.lower() not in allowed:
            errors.append(f"{key}: expected one of {', '.join(allowed)}, got {describe(value)}")
            continue
        headers.append((name, value))
    return tuple(headers)


def parse_web_config(raw: Any, base_dir: str = ".") -> WebSecurity:
    """Validate a parsed web config document; raise ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"expected a mapping at the top level, got {describe(raw)}"])
    errors: list[str] = []
    _check_keys(raw, "", TOP_KEYS, errors)
    # A section whose keys are all commented out (null) still asks for TLS: say what is missing.
    tls = _tls(raw["tls_server_config"] or {}, base_dir, errors) \
        if "tls_server_config" in raw else None
    users = _users(raw.get("basic_auth_users"), errors)
    headers = _http(raw.get("http_server_config"), errors)
    limiter = _rate_limit(raw.get("rate_limit"), errors)
    if errors:
        raise ConfigError(errors)
    context = build_ssl_context(tls) if tls is not None else None
    authenticator = Authenticator(users) if users else None
    return WebSecurity(tls=tls, ssl_context=context, users=users, headers=headers,
                       authenticator=authenticator, rate_limiter=limiter)


def load_web_config(path: str) -> WebSecurity:
    """Read and validate the web config file; every problem is prefixed with the file's name."""
    raw = read_yaml(path, "web config file")
    try:
        return parse_web_config(raw, os.path.dirname(os.path.abspath(path)))
    except ConfigError as exc:
        raise ConfigError([f"web config file {path}: {p}" for p in exc.problems]) from None


class Authenticator:
    """Checks HTTP basic credentials against bcrypt hashes, with a cache of successes."""

    def __init__(self, users: Mapping[str, str]) -> None:
        try:
            import bcrypt
        except ImportError:
            raise ConfigError(["basic_auth_users: needs the bcrypt package "
                               "(pip install 'qatoolbox-exporter[auth]')"]) from None
        self._bcrypt = bcrypt
        self._users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        self._cost = max(int(h[4:6]) for h in self._users.values())
        self._dummy: bytes | None = None
        # The cache holds keyed digests, not passwords: a memory dump does not reveal them.
        self._key = os.urandom(32)  # secrets' source, without hashlib loaded at start
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def _dummy_hash(self) -> bytes:
        # Made lazily: the first unknown user pays for it, not every reload.
        with self._lock:
            if self._dummy is None:
                salt = self._bcrypt.gensalt(rounds=self._cost)
                self._dummy = self._bcrypt.hashpw(os.urandom(16), salt)
            return self._dummy

    def check_header(self, header: str | None) -> bool:
        """Whether an Authorization header carries valid credentials."""
        verdict = self.precheck(header)
        return verdict if isinstance(verdict, bool) else self.verify(verdict)

    def precheck(self, header: str | None) -> bool | bytes:
        """What can be told without bcrypt: True for credentials that passed before (cached),
        False for a header that cannot be right (missing, not Basic, not base64), otherwise the
        decoded credentials, for verify()."""
        if not header:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            credentials = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return True if self._cached(credentials) else credentials

    def check(self, credentials: bytes) -> bool:
        """Whether b"user:password" is valid."""
        return self._cached(credentials) or self.verify(credentials)

    def _digest(self, credentials: bytes) -> bytes:
        # hashlib and hmac load libcrypto: only a config with basic auth pays for it.
        import hashlib
        import hmac

        return hmac.new(self._key, credentials, hashlib.sha256).digest()

    def _cached(self, credentials: bytes) -> bool:
        digest = self._digest(credentials)
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return True
        return False

    def verify(self, credentials: bytes) -> bool:
        """The bcrypt check of b"user:password" (remembered when it passes)."""
        digest = self._digest(credentials)
        user, sep, password = credentials.partition(b":")
        hashed = self._users.get(user) if sep else None
        # An unknown user costs one bcrypt check too: response times do not reveal user names.
        ok = self._checkpw(password, hashed if hashed is not None else self._dummy_hash())
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._cache[digest] = None
                while len(self._cache) > AUTH_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok

    def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        if len(password) > 72:
            # bcrypt ignores bytes past 72 (and bcrypt 5 refuses them): never a match, same work.
            self._bcrypt.checkpw(password[:72], hashed)
            return False
        return bool(self._bcrypt.checkpw(password, hashed))

    def cached(self) -> int:
        """How many successful checks are remembered."""
        with self._lock:
            return len(self._cache)


def client_key(address: str) -> str:
    """The unit a client is counted in: its IPv4 address, or its IPv6 /64 (one host usually
    holds a whole /64, and could otherwise rotate addresses at will)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class AuthGuard:
    """Bounds what basic-auth guessing can cost, for the whole process and across reloads.

    A bcrypt check is deliberately slow (cost 14: over a second of CPU), so a request with
    credentials that are not in the cache of successes is admitted to a small verification
    stage: at most `parallel` checks run at once (half the CPUs), a few more may wait up to
    `wait` seconds, and anything beyond gets 503 at once. Requests waiting here hold no request
    slot, so guessers cannot take the slots Prometheus needs. Each client (an IPv4 address or
    an IPv6 /64) also has a budget of checks: `burst`, then one per `interval`; a failed check
    spends one, a successful one is refunded. Over budget: 429 without any bcrypt work.
    """

    # Clients whose budget is remembered (least recently seen dropped first).
    MAX_CLIENTS = 4096

    def __init__(self, *, parallel: int | None = None, waiting: int | None = None,
                 burst: int = 10, interval: float = 1.0, wait: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.parallel = parallel if parallel is not None else max(1, _cpus() // 2)
        self.capacity = self.parallel + (waiting if waiting is not None else 2 * self.parallel)
        self.burst = burst
        self.interval = interval
        self.wait = wait
        self.checks = 0  # bcrypt checks run, for tests and benchmarks
        self._clock = clock
        self._running = threading.BoundedSemaphore(self.parallel)
        self._lock = threading.Lock()
        self._staged = 0
        self._budgets: OrderedDict[str, list[float]] = OrderedDict()  # key: [tokens, updated]

    def admit(self, client: str) -> tuple[int, float] | None:
        """None when the client may have a check now (a place is reserved for it: call
        verify() next); otherwise the status to answer (503 or 429) and the seconds after
        which to try again."""
        key = client_key(client)
        with self._lock:
            if self._staged >= self.capacity:
                return 503, 1.0
            now = self._clock()
            budget = self._budgets.pop(key, None) or [float(self.burst), now]
            budget[0] = min(float(self.burst), budget[0] + (now - budget[1]) / self.interval)
            budget[1] = now
            self._budgets[key] = budget
            while len(self._budgets) > self.MAX_CLIENTS:
                self._budgets.popitem(last=False)
            if budget[0] < 1.0:
                return 429, (1.0 - budget[0]) * self.interval
            budget[0] -= 1.0
            self._staged += 1
            return None

    def verify(self, authenticator: Authenticator, credentials: bytes,
               client: str) -> bool | None:
        """The bcrypt check of an admitted request: whether the credentials are valid, or None
        when no check could start within `wait` seconds (answer 503)."""
        ok: bool | None = None
        try:
            if not self._running.acquire(timeout=self.wait):
                return None
            try:
                ok = authenticator.verify(credentials)
            finally:
                self._running.release()
            with self._lock:
                self.checks += 1
            return ok
        finally:
            with self._lock:
                self._staged -= 1
                budget = self._budgets.get(client_key(client))
                if ok is not False and budget is not None:
                    budget[0] = min(float(self.burst), budget[0] + 1.0)

    def staged(self) -> int:
        """Requests admitted and not finished with their check."""
        with self._lock:
            return self._staged


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

    def describe(self) -> str:
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
