"""The HTTP server's TLS context from validated tls_server_config settings (ssl loaded here)."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from exporter.config import ConfigError, FileReadError, read_file
from exporter.webconfig_parse import CIPHER_SUITES, CLIENT_AUTH_TYPES, TLS_VERSIONS, TLSSettings

if TYPE_CHECKING:
    import ssl


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

