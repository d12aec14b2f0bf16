"""The web config document checked section by section into plain settings (no ssl, no bcrypt)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.config import ConfigError, describe_value, parse_duration

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
# The largest rate_limit.burst (a bucket holds its tokens as a float).
MAX_BURST = 1_000_000_000


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


@dataclass(frozen=True)
class WebSettings:
    """A valid web config document, before anything is built from it."""

    tls: TLSSettings | None = None
    users: dict[str, str] = field(default_factory=dict)  # user name -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: tuple[float, int] | None = None  # (interval in seconds, burst), or no limit


def normal_san(value: str) -> str:
    """IP addresses compared by value (Python writes IPv6 SANs long, Go short)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def _mapping(value: Any, key: str, errors: list[str]) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors.append(f"{key}: expected a mapping, got {describe_value(value)}")
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
        errors.append(f"{prefix}{key}: expected a string, got {describe_value(value)}")
        return default
    return value


def _strings(section: Mapping[Any, Any], key: str, prefix: str,
             errors: list[str]) -> list[str]:
    value = section.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{prefix}{key}: expected a list of strings, got {describe_value(value)}")
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
                      f"{', '.join(CLIENT_AUTH_TYPES)}, got {describe_value(auth_type)}")
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
                          f"got {describe_value(values[key])}")
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
            errors.append(f"{prefix}cipher_suites: unknown cipher suite {describe_value(name)}")
        elif (openssl_name := CIPHER_SUITES[name]) is not None:
            ciphers.append(openssl_name)
    curves = _strings(section, "curve_preferences", prefix, errors)
    curve = ""
    if len(curves) > 1:
        errors.append(f"{prefix}curve_preferences: Python's ssl module can allow only one "
                      f"curve; list one of {', '.join(CURVES)}")
    elif curves and curves[0] not in CURVES:
        errors.append(f"{prefix}curve_preferences: expected one of {', '.join(CURVES)}, "
                      f"got {describe_value(curves[0])}")
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
                      f"{describe_value(prefer)}")
        prefer = True
    return TLSSettings(
        cert_file=values["cert_file"], key_file=values["key_file"],
        client_ca_file=values["client_ca_file"], client_auth_type=auth_type,
        min_version=values["min_version"], max_version=values["max_version"],
        cert=values["cert"], key=values["key"], client_ca=values["client_ca"],
        ciphers=tuple(dict.fromkeys(ciphers)), prefer_server_cipher_suites=prefer,
        curve=curve, client_allowed_sans=frozenset(normal_san(v) for v in sans),
    )


def _rate_limit(raw: Any, errors: list[str]) -> tuple[float, int] | None:
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
                          f"{describe_value(interval_raw)}")
            return None
    elif interval_raw not in (0, None):
        errors.append(f"rate_limit.interval: expected a duration like 1s or 100ms, got "
                      f"{describe_value(interval_raw)}")
        return None
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        errors.append(f"rate_limit.burst: expected a whole number, got {describe_value(burst)}")
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
    return interval, burst


def _users(raw: Any, errors: list[str]) -> dict[str, str]:
    users: dict[str, str] = {}
    for user, hashed in _mapping(raw, "basic_auth_users", errors).items():
        key = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user or not _utf8(user):
            errors.append(f"{key}: a user name is a non-empty string without \":\"")
            continue
        if not isinstance(hashed, str):
            # A number here is most likely a plain password written instead of its hash.
            kind = (describe_value(hashed) if hashed is None or isinstance(hashed, (Mapping, list))
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
                      f"{describe_value(section['http2'])}")
    headers: list[tuple[str, str]] = []
    for name, value in _mapping(section.get("headers"), f"{prefix}headers", errors).items():
        key = f"{prefix}headers.{name}"
        if name not in HEADERS:
            errors.append(f"{key}: unknown header (known: {', '.join(HEADERS)})")
            continue
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {describe_value(value)}")
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
            errors.append(
                f"{key}: expected one of {', '.join(allowed)}, got {describe_value(value)}")
            continue
        headers.append((name, value))
    return tuple(headers)


def validate_web_config(raw: Any, base_dir: str = ".") -> WebSettings:
    """The settings of a parsed web config document; ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([f"expected a mapping at the top level, got {describe_value(raw)}"])
    errors: list[str] = []
    _check_keys(raw, "", TOP_KEYS, errors)
    # A section whose keys are all commented out (null) still asks for TLS: say what is missing.
    tls = _tls(raw["tls_server_config"] or {}, base_dir, errors) \
        if "tls_server_config" in raw else None
    users = _users(raw.get("basic_auth_users"), errors)
    headers = _http(raw.get("http_server_config"), errors)
    rate_limit = _rate_limit(raw.get("rate_limit"), errors)
    if errors:
        raise ConfigError(errors)
    return WebSettings(tls=tls, users=users, headers=headers, rate_limit=rate_limit)
