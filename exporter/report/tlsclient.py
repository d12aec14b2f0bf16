"""The TLS client side of the report's connections (Prometheus' HTTP API, the mail server), from
the tls_config keys Prometheus and Alertmanager use for theirs."""

from __future__ import annotations

import ssl


def client_context(ca_file: str, cert_file: str, key_file: str,
                   insecure_skip_verify: bool) -> ssl.SSLContext:
    """A verifying client context (the system's CAs, or ca_file), with a client certificate
    when cert_file and key_file are given; ValueError with a one-line reason when they
    cannot be used."""
    if (cert_file or key_file) and not (cert_file and key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(" ".join(str(exc).split())) from None
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
