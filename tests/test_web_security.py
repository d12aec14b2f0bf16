"""Web security: the web config file (TLS, client certificates, basic auth, headers) and reloads."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from exporter.collectors import COLLECTORS
from exporter.config import ConfigError, Duration, WebConfig
from exporter.scrape import ScrapeRunner
from exporter.server import ExporterHTTPServer
from exporter.webconfig import RateLimiter, WebConfigFile, load_web_config, parse_web_config
from exporter.webconfig_auth import AUTH_CACHE_SIZE, Authenticator
from exporter.webconfig_parse import CIPHER_SUITES
from tests.harness import ExporterProcess, run_exporter, wait_for
from tests.test_http_robustness import GateCollector

# Cost 4 keeps the unit tests fast; the end-to-end tests use 10 like `htpasswd -nBC 10`.
FAST = 4


def bcrypt_hash(password: str, cost: int = FAST, prefix: str = "$2y$") -> str:
    """A hash as htpasswd writes it ($2y$), unless another prefix is asked for."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    return prefix + hashed[4:]


def only_collectors(*names: str) -> list[str]:
    """Flags that enable exactly the named collectors."""
    return [f"--collector.{n}" if n in names else f"--no-collector.{n}" for n in COLLECTORS]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def problems(raw: Any, base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_web_config(raw, str(base or "."))
    return info.value.problems


# --- certificates made with the openssl command line ------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}")
    return cert, key


def make_cert(directory: Path, name: str, ca: tuple[Path, Path],
              san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
    """A certificate for name signed by ca: (certificate, key)."""
    cert, key, csr = (directory / f"{name}.pem", directory / f"{name}.key",
                      directory / f"{name}.csr")
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-set_serial", str(int(time.time() * 1000)), "-out", str(cert), "-days", "2",
             "-extfile", str(ext))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A CA with a server and a client certificate, and a second CA nobody trusts."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    other = make_ca(directory, "other-ca")
    return {
        "ca": ca,
        "server": make_cert(directory, "server-a", ca),
        "server-b": make_cert(directory, "server-b", ca),
        "client": make_cert(directory, "client", ca, san="DNS:prometheus"),
        "stranger": make_cert(directory, "stranger", other, san="DNS:prometheus"),
    }


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ({"tls_config": {}}, "tls_config: unknown key"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "certfile": "c"}},
     "tls_server_config.certfile: unknown key"),
    ({"http_server_config": {"header": {}}}, "http_server_config.header: unknown key"),
    ({"http_server_config": {"headers": {"X-Powered-By": "me"}}},
     "http_server_config.headers.X-Powered-By: unknown header"),
    ({"rate_limit": {"interval": "1s", "bursts": 2}}, "rate_limit.bursts: unknown key"),
    ({"rate_limit": {"interval": "soon", "burst": 2}},
     "rate_limit.interval: expected a duration like 1s or 100ms, got \"soon\""),
    ({"rate_limit": {"interval": 5, "burst": 2}},
     "rate_limit.interval: expected a duration like 1s or 100ms, got 5"),
    ({"rate_limit": {"interval": "1s", "burst": 0}}, "rate_limit.burst: must be at least 1"),
    ({"rate_limit": {"interval": "1s", "burst": "ten"}},
     "rate_limit.burst: expected a whole number"),
])
def test_unknown_and_unsupported_keys_are_named(raw: Any, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(raw)), problems(raw)


@pytest.mark.parametrize(("tls", "expected"), [
    ({"cert_file": "c"}, "tls_server_config.key_file: required"),
    (None, "tls_server_config.cert_file: required"),  # every key commented out
    ({}, "tls_server_config.cert_file: required"),
    ({"cert_file": "c", "key_file": "k", "client_auth_type": "Sometimes"},
     "tls_server_config.client_auth_type: expected one of NoClientCert, "),
    ({"cert_file": "c", "key_file": "k", "client_auth_type": "RequireAnyClientCert",
      "client_ca_file": "ca"},
     "tls_server_config.client_auth_type: RequireAnyClientCert accepts unverified"),
    ({"cert_file": "c", "key_file": "k", "client_auth_type": "RequireAndVerifyClientCert"},
     "tls_server_config.client_ca_file: required with client_auth_type"),
    ({"cert_file": "c", "key_file": "k", "client_auth_type": "NoClientCert",
      "client_ca_file": "ca"}, "tls_server_config.client_ca_file: set, but client_auth_type"),
    ({"cert_file": "c", "key_file": "k", "min_version": "TLS14"},
     "tls_server_config.min_version: expected one of TLS10, TLS11, TLS12, TLS13"),
    ({"cert_file": "c", "key_file": "k", "min_version": "TLS13", "max_version": "TLS12"},
     "tls_server_config.min_version: TLS13 is above max_version TLS12"),
    ({"cert_file": ["c"], "key_file": "k"}, "tls_server_config.cert_file: expected a string"),
    ({"cert": "PEM", "cert_file": "c", "key_file": "k"},
     "tls_server_config.cert: set together with cert_file; use one of them"),
    ({"cert": "PEM"}, "tls_server_config.key_file: required when tls_server_config is present "
                      "(or key, inline)"),
    ({"cert_file": "c", "key_file": "k", "client_ca": "PEM", "client_ca_file": "ca"},
     "tls_server_config.client_ca: set together with client_ca_file"),
    ({"cert_file": "c", "key_file": "k", "client_allowed_sans": ["prometheus"]},
     "tls_server_config.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert"),
    ({"cert_file": "c", "key_file": "k", "client_allowed_sans": "prometheus"},
     "tls_server_config.client_allowed_sans: expected a list of strings, got \"prometheus\""),
    ({"cert_file": "c", "key_file": "k", "cipher_suites": ["TLS_RSA_WITH_AES_128_CBC_MD5"]},
     "tls_server_config.cipher_suites: unknown cipher suite \"TLS_RSA_WITH_AES_128_CBC_MD5\""),
    ({"cert_file": "c", "key_file": "k", "curve_preferences": ["CurveP256", "X25519"]},
     "tls_server_config.curve_preferences: Python's ssl module can allow only one curve"),
    ({"cert_file": "c", "key_file": "k", "curve_preferences": ["P256"]},
     "tls_server_config.curve_preferences: expected one of CurveP256, CurveP384"),
    ({"cert_file": "c", "key_file": "k", "prefer_server_cipher_suites": "yes"},
     "tls_server_config.prefer_server_cipher_suites: expected true or false"),
])
def test_tls_section_errors(tls: dict[str, Any], expected: str) -> None:
    found = problems({"tls_server_config": tls})
    assert any(p.startswith(expected) for p in found), found


def test_user_and_header_errors_name_the_key() -> None:
    raw = {
        "basic_auth_users": {"alice": "plaintext-password", "a:b": bcrypt_hash("x"),
                             "carol": 12},
        "http_server_config": {"headers": {"X-Frame-Options": "allow-from-everywhere",
                                           "Content-Security-Policy": "a\r\nSet-Cookie: x"},
                               "http2": "yes"},
    }
    found = problems(raw)
    assert "basic_auth_users.alice: expected a bcrypt hash as made by `htpasswd -nBC 10`" in found
    assert any(p.startswith("basic_auth_users.a:b:") for p in found)
    assert any(p.startswith("basic_auth_users.carol: expected a bcrypt hash") for p in found)
    assert any(p.startswith("http_server_config.headers.X-Frame-Options: expected one of deny")
               for p in found)
    assert "http_server_config.headers.Content-Security-Policy: must be a single line" in found
    assert any(p.startswith("http_server_config.http2: expected true or false") for p in found)
    # The rejected plaintext "hash" is not echoed back.
    assert not any("plaintext-password" in p for p in found)


def test_valid_file_loads(tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    (tmp_path / "web.yml").write_text(
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        f"  client_ca_file: {pki['ca'][0]}\n  min_version: TLS13\n"
        f"basic_auth_users:\n  alice: '{bcrypt_hash('pw')}'\n"
        "http_server_config:\n  http2: false\n  headers:\n    X-Content-Type-Options: nosniff\n"
        "    X-XSS-Protection: ''\n"
    )
    security = load_web_config(str(tmp_path / "web.yml"))
    assert security.tls is not None
    # A client CA without a policy means verified client certificates, as in the toolkit.
    assert security.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert security.ssl_context is not None
    assert security.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert security.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert security.headers == (("X-Content-Type-Options", "nosniff"),)
    assert set(security.users) == {"alice"}


def test_relative_certificate_paths_are_relative_to_the_file(
        tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "c.pem").write_bytes(cert.read_bytes())
    (tmp_path / "tls" / "k.pem").write_bytes(key.read_bytes())
    (tmp_path / "web.yml").write_text(
        "tls_server_config:\n  cert_file: tls/c.pem\n  key_file: tls/k.pem\n")
    security = load_web_config(str(tmp_path / "web.yml"))
    assert security.tls is not None
    assert security.tls.cert_file == str(tmp_path / "tls" / "c.pem")


def test_bad_certificate_files_name_the_key(tmp_path: Path,
                                            pki: dict[str, tuple[Path, Path]]) -> None:
    cert, _ = pki["server"]
    _, other_key = pki["server-b"]
    with pytest.raises(ConfigError) as info:
        parse_web_config({"tls_server_config": {"cert_file": str(tmp_path / "missing.pem"),
                                                "key_file": str(other_key)}})
    assert info.value.problems == [f"tls_server_config.cert_file: cannot read "
                                   f"{tmp_path / 'missing.pem'}"]
    with pytest.raises(ConfigError) as info:
        parse_web_config({"tls_server_config": {"cert_file": str(cert),
                                                "key_file": str(other_key)}})
    (problem,) = info.value.problems
    assert problem.startswith("tls_server_config.cert_file: cannot load")
    # The key's bytes never end up in the message.
    assert "PRIVATE" not in problem


def test_cipher_suite_names_match_openssl() -> None:
    """Every Go name maps to the suite OpenSSL itself gives that standard name."""
    listed = subprocess.run(["openssl", "ciphers", "-stdname", "ALL:COMPLEMENTOFALL"],
                            check=True, capture_output=True, text=True).stdout
    openssl = {line.split()[0]: line.split()[2] for line in listed.splitlines()
               if line.startswith("TLS_")}
    checked = 0
    for go_name, openssl_name in CIPHER_SUITES.items():
        standard = go_name if not go_name.endswith("POLY1305") else go_name + "_SHA256"
        if openssl_name is None:
            assert go_name.startswith("TLS_") and "_WITH_" not in go_name  # TLS 1.3
            continue
        if standard in openssl:
            assert openssl[standard] == openssl_name, go_name
            checked += 1
    assert checked >= 18  # all but the RC4 and 3DES suites this OpenSSL no longer builds


def test_tls_options_reach_the_context(tmp_path: Path,
                                       pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    security = parse_web_config({"tls_server_config": {
        "cert": cert.read_text(), "key": key.read_text(), "client_ca": pki["ca"][0].read_text(),
        "client_allowed_sans": ["prometheus", "::1"], "max_version": "TLS12",
        "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"],
        "prefer_server_cipher_suites": False, "curve_preferences": ["CurveP384"]}})
    assert security.tls is not None and security.ssl_context is not None
    context = security.ssl_context
    assert [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"] == [
        "ECDHE-ECDSA-AES128-GCM-SHA256"]
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1
    # The inline key is not in the settings' repr (which a debug log line could print).
    assert "PRIVATE" not in repr(security.tls) and "BEGIN" not in repr(security.tls)
    # IPv6 SANs compare by value: Python writes them long, Go and operators short.
    assert security.client_allowed({"subjectAltName": (("IP Address", "0:0:0:0:0:0:0:1"),)})
    assert security.client_allowed({"subjectAltName": (("DNS", "prometheus"),)})
    assert not security.client_allowed({"subjectAltName": (("DNS", "grafana"),)})
    assert not security.client_allowed({})
    unavailable = problems({"tls_server_config": {
        "cert_file": str(cert), "key_file": str(key),
        "cipher_suites": ["TLS_RSA_WITH_RC4_128_SHA", "TLS_RSA_WITH_AES_128_GCM_SHA256"]}})
    assert unavailable == [
        f"tls_server_config.cipher_suites: not available in this OpenSSL ({ssl.OPENSSL_VERSION}):"
        " TLS_RSA_WITH_RC4_128_SHA"]
    bad_inline = problems({"tls_server_config": {"cert": "not a certificate",
                                                 "key": key.read_text()}})
    assert bad_inline[0].startswith("tls_server_config.cert: cannot load the inline cert with "
                                    "the inline key: ")
    assert not any("PRIVATE" in p for p in bad_inline)


def test_rate_limiter_is_a_token_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(interval=2.0, burst=3, clock=clock)
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 1.0
    assert not limiter.allow()  # half a token
    clock.now += 1.0
    assert limiter.allow() and not limiter.allow()
    clock.now += 100.0  # never more than burst saved up
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    security = parse_web_config({"rate_limit": {"interval": "100ms", "burst": 5}})
    assert security.rate_limiter is not None
    assert (security.rate_limiter.interval, security.rate_limiter.burst) == (0.1, 5)
    # As in the toolkit, no interval means no limit.
    assert parse_web_config({"rate_limit": {"burst": 5}}).rate_limiter is None


def test_file_errors_carry_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users: [alice]\n")
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    assert info.value.problems == [
        f"web config file {path}: basic_auth_users: expected a mapping, got a list"]
    path.write_text("tls_server_config: {cert_file: [\n")
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    assert info.value.problems[0].startswith(f"web config file {path}: invalid YAML (line ")


def test_cli_rejects_a_bad_web_config_and_checks_a_good_one(
        tmp_path: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("basic_auth_users:\n  alice: hunter2\nunknown_section: {}\n")
    result = run_exporter(["--web.config.file", str(bad), *only_collectors("host")])
    assert result.returncode == 2
    assert f"web config file {bad}: basic_auth_users.alice: expected a bcrypt hash" in result.stderr
    assert f"web config file {bad}: unknown_section: unknown key" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    good = tmp_path / "good.yml"
    cert, key = pki["server"]
    good.write_text(f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n"
                    f"basic_auth_users: {{alice: '{bcrypt_hash('pw')}'}}\n")
    result = run_exporter(["--web.config.file", str(good), "--config.check",
                           *only_collectors("host")])
    assert result.returncode == 0, result.stderr
    assert "TLS on (TLS12-TLS13, client certificates: NoClientCert)" in result.stdout
    assert "basic auth on (1 users)" in result.stdout


# --- the authenticator ---------------------------------------------------------------------------


@pytest.fixture
def checkpw_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every hash bcrypt.checkpw is called with."""
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    return calls


def test_credentials_are_checked() -> None:
    auth = Authenticator({"alice": bcrypt_hash("s3cret"), "bob": bcrypt_hash("pw", prefix="$2b$")})
    assert auth.check_header(basic("alice", "s3cret")["Authorization"])
    assert auth.check_header(basic("bob", "pw")["Authorization"])
    assert auth.check(b"alice:s3cret")
    for header in (None, "", "Basic", "Basic !!!notbase64", "Bearer abc",
                   basic("alice", "wrong")["Authorization"], basic("alice", "")["Authorization"],
                   basic("mallory", "s3cret")["Authorization"],
                   "Basic " + base64.b64encode(b"alice").decode(),
                   "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
                   basic("alice", "s3cret" + "x" * 100)["Authorization"]):
        assert not auth.check_header(header), header
    # A password is case-sensitive and user names are exact.
    assert not auth.check(b"Alice:s3cret")
    assert not auth.check(b"alice:S3cret")


def test_unknown_user_costs_the_same_bcrypt_work(checkpw_calls: list[bytes]) -> None:
    auth = Authenticator({"alice": bcrypt_hash("s3cret", cost=6)})
    assert not auth.check(b"alice:wrong")
    assert not auth.check(b"mallory:wrong")
    assert not auth.check(b"no-colon-at-all")
    assert not auth.check(b"alice:" + b"y" * 100)
    # One bcrypt check each, all at the configured cost: timing does not tell users apart.
    assert len(checkpw_calls) == 4
    assert {hashed[4:6] for hashed in checkpw_calls} == {b"06"}


def test_successful_checks_are_cached(checkpw_calls: list[bytes]) -> None:
    auth = Authenticator({"alice": bcrypt_hash("s3cret")})
    for _ in range(5):
        assert auth.check(b"alice:s3cret")
    assert len(checkpw_calls) == 1
    # Failures are never cached: each costs a check.
    for _ in range(3):
        assert not auth.check(b"alice:wrong")
    assert len(checkpw_calls) == 4
    assert auth.cached() == 1


def test_cache_is_bounded() -> None:
    users = {f"user{i}": bcrypt_hash(f"pw{i}") for i in range(AUTH_CACHE_SIZE + 10)}
    auth = Authenticator(users)
    for i in range(AUTH_CACHE_SIZE + 10):
        assert auth.check(f"user{i}:pw{i}".encode())
    assert auth.cached() == AUTH_CACHE_SIZE


LAZY_IMPORTS = """
import base64, sys
import exporter.cli, exporter.server  # the start path: exporter.lean first
from exporter.webconfig import load_web_config
def loaded():
    return sorted(m for m in ("ssl", "hashlib", "hmac", "bcrypt") if m in sys.modules)
print(loaded())
load_web_config(sys.argv[1])
print(loaded())
security = load_web_config(sys.argv[2])
print(loaded())
header = "Basic " + base64.b64encode(b"alice:s3cret").decode()
assert security.authenticator is not None and security.authenticator.check_header(header)
print(loaded())
"""


def test_crypto_modules_load_only_when_the_web_config_needs_them(tmp_path: Path) -> None:
    """ssl (and the system libcrypto with it), hashlib, hmac and bcrypt cost resident memory:
    the server and a web config without TLS or users load none of them; basic auth loads
    bcrypt with its users and hashlib and hmac at its first check; only TLS loads ssl."""
    headers = tmp_path / "headers.yml"
    headers.write_text("http_server_config: {headers: {X-Frame-Options: deny}}\n")
    users = tmp_path / "users.yml"
    users.write_text(f"basic_auth_users: {{alice: '{bcrypt_hash('s3cret')}'}}\n")
    result = subprocess.run([sys.executable, "-c", LAZY_IMPORTS, str(headers), str(users)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "[]", "[]", "['bcrypt']", "['bcrypt', 'hashlib', 'hmac']"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str) -> None:
    # Atomic replace, as a config manager does; the mtime moves on even within one tick.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_reload_at_most_once_a_second_and_drops_the_cache(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "web.yml"
    _write(path, f"basic_auth_users: {{alice: '{bcrypt_hash('old')}'}}\n")
    clock = FakeClock()
    web = WebConfigFile(str(path), clock=clock)
    first = web.current().authenticator
    assert first is not None and first.check(b"alice:old")

    _write(path, f"basic_auth_users: {{alice: '{bcrypt_hash('new')}'}}\n")
    clock.now += 0.5
    assert web.current().authenticator is first  # not looked at yet
    clock.now += 0.6
    second = web.current().authenticator
    assert second is not None and second is not first
    # The cached success of the old password is gone with the old file.
    assert not second.check(b"alice:old")
    assert second.check(b"alice:new")

    # A broken file keeps the last valid settings, and says so once.
    _write(path, "basic_auth_users: {alice: nothash}\n")
    clock.now += 1.1
    with caplog.at_level("ERROR", logger="exporter.webconfig"):
        assert web.current().authenticator is second
        clock.now += 1.1
        assert web.current().authenticator is second
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "basic_auth_users.alice: expected a bcrypt hash" in errors[0].__dict__["err"]

    _write(path, "{}\n")
    clock.now += 1.1
    assert web.current().authenticator is None


# --- end to end --------------------------------------------------------------------------------


@contextlib.contextmanager
def exporter(workdir: Path, web_yaml: str, *args: str, config: dict[str, Any] | None = None,
             probe: ssl.SSLContext | None = None) -> Iterator[ExporterProcess]:
    """A real exporter with a web config file (and optionally a config file); waits for
    /healthz over TLS (with probe, when given) or plain HTTP."""
    (workdir / "web.yml").write_text(web_yaml)
    process = ExporterProcess(workdir, config=config,
                              args=["--web.config.file", str(workdir / "web.yml"),
                                    *only_collectors("host"), *args])
    process.start(wait=False)
    tls = "tls_server_config" in web_yaml

    def healthy() -> bool:
        assert process.proc is not None and process.proc.poll() is None, process.logs()
        context = probe or (ssl._create_unverified_context() if tls else None)
        return request(process.port, "/healthz", context=context)[0] == 200

    try:
        wait_for(healthy, 20, "exporter with a web config")
        yield process
    finally:
        process.stop()


def request(port: int, path: str, headers: dict[str, str] | None = None,
            context: ssl.SSLContext | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh connection (TLS when a context is given)."""
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def client_context(ca: Path, cert: tuple[Path, Path] | None = None,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if maximum is not None:
        context.maximum_version = maximum
    return context


def peer_name(port: int, ca: Path) -> str:
    """The CN of the certificate the server presents on a new connection."""
    context = client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        cert = tls.getpeercert()
    assert cert is not None
    subject: Any = cert["subject"]
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return str(names[0])


REALM = 'Basic realm="qatoolbox-exporter", charset="UTF-8"'


@pytest.mark.integration
def test_basic_auth_end_to_end(workdir: Path) -> None:
    password = "correct horse 4b1e"
    hashed = bcrypt_hash(password, cost=10)
    web = (f"basic_auth_users:\n  prometheus: '{hashed}'\n"
           "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
           "    X-Content-Type-Options: nosniff\n")
    good = basic("prometheus", password)
    wrong = [basic("prometheus", "wrong-pass-81c3"), basic("nobody", password),
             basic("prometheus", ""), {"Authorization": "Bearer tok-55d0e"}]

    def configured_headers(answer: dict[str, str]) -> bool:
        return answer.get("X-Frame-Options") == "deny" and \
            answer.get("X-Content-Type-Options") == "nosniff"

    with exporter(workdir, web, "--log.level", "debug") as process:
        for path in ("/metrics", "/", "/no-such-page"):
            # No credentials, then wrong ones: 401 with the challenge and the headers each time.
            for headers in ({}, *wrong):
                status, answer, _ = request(process.port, path, headers)
                assert status == 401, (path, headers)
                assert answer["WWW-Authenticate"] == REALM, (path, headers)
                assert configured_headers(answer), (path, answer)
        status, answer, metrics = request(process.port, "/metrics", good)
        assert status == 200 and configured_headers(answer)
        assert b"qatoolbox_exporter_collector_success" in metrics
        status, answer, landing = request(process.port, "/", good)
        assert status == 200 and configured_headers(answer)
        assert request(process.port, "/metrics", good, method="HEAD")[0] == 200
        status, answer, _ = request(process.port, "/no-such-page", good)
        assert status == 404 and configured_headers(answer)
        for path in ("/metrics", "/healthz"):
            status, answer, _ = request(process.port, path, good, method="POST")
            assert status == 405 and answer["Allow"] == "GET, HEAD"
            assert configured_headers(answer), answer
        # Liveness probes carry no credentials.
        status, answer, _ = request(process.port, "/healthz")
        assert status == 200 and configured_headers(answer)
    logs = process.logs()
    # Debug logging really was on: every request got a line.
    assert logs.count("msg=request ") >= 20, logs[-2000:]
    # No password (right or wrong), Authorization value or bcrypt hash in the debug log, the
    # metrics or the landing page.
    secrets = [password, "wrong-pass-81c3", hashed, hashed[7:29], hashed[29:], "tok-55d0e",
               *(h["Authorization"].split()[1] for h in [good, *wrong])]
    for where, text in (("log", logs), ("metrics", metrics.decode()),
                        ("landing page", landing.decode())):
        leaked = [s for s in secrets if s in text]
        assert not leaked, (where, leaked)


@pytest.mark.integration
def test_tls_with_rotation_and_min_version(workdir: Path,
                                           pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    cert.write_bytes(pki["server"][0].read_bytes())
    key.write_bytes(pki["server"][1].read_bytes())
    ca = pki["ca"][0]
    web = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS13\n"
    with exporter(workdir, web) as process:
        status, _, body = request(process.port, "/metrics", context=client_context(ca))
        assert status == 200 and b"qatoolbox_exporter_build_info" in body
        assert peer_name(process.port, ca) == "server-a"
        # Below min_version: no handshake.
        with pytest.raises(ssl.SSLError):
            request(process.port, "/healthz",
                    context=client_context(ca, maximum=ssl.TLSVersion.TLSv1_2))
        # Plain HTTP to the TLS port gets no HTTP answer.
        with pytest.raises((http.client.HTTPException, OSError)):
            request(process.port, "/metrics")

        # Rotate: new key first, then the certificate (a half-done rotation must not break).
        assert process.proc is not None
        pid = process.proc.pid
        _write(key, pki["server-b"][1].read_text())
        time.sleep(1.2)
        assert request(process.port, "/healthz", context=client_context(ca))[0] == 200
        _write(cert, pki["server-b"][0].read_text())
        wait_for(lambda: peer_name(process.port, ca) == "server-b", 10, "rotated certificate")
        assert request(process.port, "/metrics", context=client_context(ca))[0] == 200
        assert process.proc is not None and process.proc.pid == pid
        assert process.proc.poll() is None
        assert "web config file invalid; keeping the previous settings" in process.logs()


@pytest.mark.integration
def test_client_certificates_required(workdir: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = (f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
           f"  client_ca_file: {ca}\n  client_auth_type: RequireAndVerifyClientCert\n")
    (workdir / "web.yml").write_text(web)
    process = ExporterProcess(workdir, args=["--web.config.file", str(workdir / "web.yml"),
                                             *only_collectors("host")])
    process.start(wait=False)
    try:
        good = client_context(ca, pki["client"])
        wait_for(lambda: request(process.port, "/healthz", context=good)[0] == 200, 20,
                 "exporter with client certificates")
        assert request(process.port, "/metrics", context=good)[0] == 200
        # /healthz too: the certificate is checked in the TLS handshake, before any path is
        # read, so a liveness probe needs a client certificate in this mode.
        for path in ("/metrics", "/healthz"):
            for context in (client_context(ca), client_context(ca, pki["stranger"])):
                assert refused(process.port, path, context), path
        assert process.proc is not None and process.proc.poll() is None
    finally:
        process.stop()


def refused(port: int, path: str, context: ssl.SSLContext) -> bool:
    """Whether the TLS layer turns the request away (a timeout is not a refusal)."""
    try:
        request(port, path, context=context)
    except TimeoutError:
        return False
    except (ssl.SSLError, ConnectionError, http.client.HTTPException):
        # TLS 1.3 reports a refused client certificate on the first read, not the handshake.
        return True
    return False


@pytest.mark.integration
def test_client_certificate_verified_if_given(workdir: Path,
                                              pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = (f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
           f"  client_ca_file: {ca}\n  client_auth_type: VerifyClientCertIfGiven\n")
    with exporter(workdir, web) as process:
        # No certificate, or one from the trusted CA: served.
        for context in (client_context(ca), client_context(ca, pki["client"])):
            status, _, body = request(process.port, "/metrics", context=context)
            assert status == 200 and b"qatoolbox_exporter_build_info" in body
        # A certificate from a CA the exporter does not trust: refused, even on /healthz.
        for path in ("/metrics", "/healthz"):
            assert refused(process.port, path, client_context(ca, pki["stranger"])), path
        assert request(process.port, "/metrics", context=client_context(ca))[0] == 200
        assert process.proc is not None and process.proc.poll() is None


@pytest.mark.integration
def test_client_ca_file_rotates_without_restart(workdir: Path,
                                                pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    (workdir / "new").mkdir()
    new_ca = make_ca(workdir / "new", "new-ca")
    newcomer = client_context(ca, make_cert(workdir / "new", "newcomer", new_ca,
                                            san="DNS:prometheus"))
    old_client = client_context(ca, pki["client"])
    ca_file = workdir / "client-ca.pem"
    ca_file.write_bytes(ca.read_bytes())
    web = (f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
           f"  client_ca_file: {ca_file}\n  client_auth_type: RequireAndVerifyClientCert\n")
    with exporter(workdir, web, probe=old_client) as process:
        assert process.proc is not None
        pid = process.proc.pid
        assert refused(process.port, "/metrics", newcomer)
        # The change-over: both CAs in the file; then the new one alone.
        _write(ca_file, ca.read_text() + new_ca[0].read_text())
        wait_for(lambda: request(process.port, "/metrics", context=newcomer)[0] == 200, 10,
                 "a client of the new CA accepted")
        assert request(process.port, "/metrics", context=old_client)[0] == 200
        _write(ca_file, new_ca[0].read_text())
        wait_for(lambda: refused(process.port, "/metrics", old_client), 10,
                 "a client of the old CA refused")
        assert request(process.port, "/metrics", context=newcomer)[0] == 200
        assert process.proc.pid == pid and process.proc.poll() is None
        assert "web config file reloaded" in process.logs()


@pytest.mark.integration
def test_slow_tls_handshake_blocks_nobody(workdir: Path,
                                          pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    with exporter(workdir, web, "--log.level", "debug") as process:
        # Connections that never start (or never finish) the handshake.
        opened: list[socket.socket] = []
        try:
            for _ in range(4):
                opened.append(socket.create_connection(("127.0.0.1", process.port)))
            half = opened[-1]
            half.sendall(b"\x16\x03\x01\x00\xff\x01")  # a ClientHello's start, then nothing
            for _ in range(3):
                assert request(process.port, "/metrics", context=client_context(ca))[0] == 200
            # Served while every stalled handshake was still pending (read timeout: 10 s).
            assert all(still_open(sock) for sock in opened)
        finally:
            for sock in opened:
                sock.close()


def still_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed the connection nor sent anything on it yet."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
    return False


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.integration
def test_stalled_tls_handshakes_are_closed_after_the_read_timeout(
        workdir: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    with exporter(workdir, web, "--log.level", "debug",
                  config={"web": {"read_timeout": "1s"}}) as process:
        hello = client_hello()
        assert len(hello) > 100
        start = time.monotonic()
        stalled = {name: socket.create_connection(("127.0.0.1", process.port))
                   for name in ("silent", "half", "trickle")}
        stalled["half"].sendall(hello[:6])  # half a ClientHello, then nothing
        closed: dict[str, float] = {}
        sent = 0
        try:
            # The trickle sends one more byte of its ClientHello every 0.2 s: a deadline per
            # read would keep it open for 100 s; one deadline for the handshake closes it too.
            while len(closed) < len(stalled) and time.monotonic() - start < 8:
                if "trickle" not in closed:
                    with contextlib.suppress(OSError):
                        stalled["trickle"].sendall(hello[sent:sent + 1])
                        sent += 1
                for name, sock in stalled.items():
                    if name not in closed and not still_open(sock):
                        closed[name] = time.monotonic() - start
                time.sleep(0.2)
        finally:
            for sock in stalled.values():
                sock.close()
        assert set(closed) == set(stalled), f"still open after 8 s: {set(stalled) - set(closed)}"
        # Not before the read timeout (1 s), and the trickle was still sending when cut off.
        assert min(closed.values()) >= 0.9, closed
        assert sent < len(hello)
        assert request(process.port, "/metrics", context=client_context(ca))[0] == 200
    timeouts = 'msg="TLS handshake failed" client=127.0.0.1 err=TimeoutError'
    assert process.logs().count(timeouts) == 3, process.logs()[-3000:]


@pytest.mark.integration
def test_silent_tls_connections_lock_nobody_out(
        workdir: Path, pki: dict[str, tuple[Path, Path]]) -> None:
    """80 connections that never start their handshake, with --web.max-requests 1: they used
    to fill the 2 x max_requests connection cap, so TLS clients were disconnected. Now
    handshakes are read by the selector, cost no thread and no request slot, and clients
    are served while all 80 are held."""
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    with exporter(workdir, web, "--web.max-requests", "1",
                  config={"web": {"header_timeout": "60s", "read_timeout": "60s"}}) as process:
        held: list[socket.socket] = []
        try:
            for _ in range(80):
                held.append(socket.create_connection(("127.0.0.1", process.port), timeout=10))
            for path in ("/healthz", "/metrics") * 3:
                assert request(process.port, path, context=client_context(ca))[0] == 200, path
            assert all(still_open(sock) for sock in held)
        finally:
            for sock in held:
                sock.close()
        assert process.proc is not None and process.proc.poll() is None


def raw_response(port: int, data: bytes) -> bytes:
    """Send data on a fresh connection; everything the server answers until it closes."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_configured_headers_on_503_and_request_errors(tmp_path: Path) -> None:
    (tmp_path / "web.yml").write_text(
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    collector = GateCollector()
    collector.gate.clear()  # scrapes wait until the test opens it
    runner = ScrapeRunner([collector], timeout=30)
    web = WebConfig(listen_address="127.0.0.1:0", max_requests=1, read_timeout=Duration(10))
    httpd = ExporterHTTPServer(web, runner, WebConfigFile(str(tmp_path / "web.yml")))
    server = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    server.start()
    port = httpd.server_address[1]
    results: list[int] = []
    scrape = threading.Thread(target=lambda: results.append(request(port, "/metrics")[0]))
    try:
        scrape.start()
        assert collector.entered.wait(10)  # the only slot is taken
        status, headers, _ = request(port, "/")
        assert status == 503 and headers["Retry-After"] == "1"
        assert headers["X-Frame-Options"] == "deny"
        collector.gate.set()
        scrape.join(20)
        assert results == [200]
        assert request(port, "/")[1]["X-Frame-Options"] == "deny"
        # Errors from the request parser: 400, 414, 431, 505.
        for data, status in ((b"NONSENSE\r\n\r\n", 400),
                             (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
                             (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
                             (b"GET / HTTP/2.0\r\n\r\n", 505)):
            response = raw_response(port, data)
            assert response.startswith(b"HTTP/1.1 %d " % status), response[:100]
            assert b"\r\nX-Frame-Options: deny\r\n" in response, response[:500]
        # A request line without a version (HTTP/0.9), a header with a control character,
        # conflicting lengths: the parser's 400s carry the headers too.
        for data in (b"GET /metrics\r\n",
                     b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
                     b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 25\r\n\r\n"):
            response = raw_response(port, data)
            assert response.startswith(b"HTTP/1.1 400 "), response[:100]
            assert b"\r\nX-Frame-Options: deny\r\n" in response, response[:500]
    finally:
        collector.gate.set()
        httpd.shutdown()
        httpd.server_close()
        runner.close()


@pytest.mark.integration
def test_users_added_without_restart(workdir: Path) -> None:
    web_file = workdir / "web.yml"
    with exporter(workdir, f"basic_auth_users: {{alice: '{bcrypt_hash('a-pw')}'}}\n") as process:
        assert request(process.port, "/metrics", basic("alice", "a-pw"))[0] == 200
        assert request(process.port, "/metrics", basic("bob", "b-pw"))[0] == 401
        _write(web_file, f"basic_auth_users: {{bob: '{bcrypt_hash('b-pw')}'}}\n")
        wait_for(lambda: request(process.port, "/metrics", basic("bob", "b-pw"))[0] == 200, 10,
                 "bob accepted after the reload")
        # alice's cached success went with the old file.
        assert request(process.port, "/metrics", basic("alice", "a-pw"))[0] == 401
        _write(web_file, "{}\n")
        wait_for(lambda: request(process.port, "/metrics")[0] == 200, 10, "auth turned off")


@pytest.mark.integration
def test_rate_limit_answers_429_but_not_on_healthz(workdir: Path) -> None:
    hashed = bcrypt_hash("pw")
    with exporter(workdir, "rate_limit: {interval: 1m, burst: 3}\n"
                           f"basic_auth_users: {{alice: '{hashed}'}}\n"
                           "http_server_config: {headers: {X-Frame-Options: deny}}\n") as process:
        statuses = [request(process.port, "/metrics", basic("alice", "pw"))[0],
                    request(process.port, "/metrics", basic("alice", "wrong"))[0],
                    request(process.port, "/", basic("alice", "pw"))[0]]
        assert statuses == [200, 401, 200]
        # The bucket is empty: every path but /healthz, with or without credentials.
        for path, headers in (("/metrics", basic("alice", "pw")), ("/metrics", {}),
                              ("/nowhere", basic("alice", "wrong"))):
            status, answer, _ = request(process.port, path, headers)
            assert status == 429, path
            assert answer["Retry-After"] == "60" and answer["X-Frame-Options"] == "deny"
        assert request(process.port, "/healthz")[0] == 200


@pytest.mark.integration
def test_inline_pem_client_sans_and_cipher_suites(workdir: Path,
                                                  pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = {"tls_server_config": {
        "cert": cert.read_text(), "key": key.read_text(), "client_ca": ca.read_text(),
        "client_auth_type": "RequireAndVerifyClientCert", "client_allowed_sans": ["prometheus"],
        "max_version": "TLS12", "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]}}
    (workdir / "web.yml").write_text(yaml.safe_dump(web))
    process = ExporterProcess(workdir, args=["--web.config.file", str(workdir / "web.yml"),
                                             "--log.level", "debug", *only_collectors("host")])
    process.start(wait=False)
    try:
        good = client_context(ca, pki["client"])  # SAN DNS:prometheus
        wait_for(lambda: request(process.port, "/healthz", context=good)[0] == 200, 20,
                 "exporter with an inline certificate")
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as raw, \
                good.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert (tls.cipher() or ('',))[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        # A client that offers only other suites gets no handshake.
        other_suites = client_context(ca, pki["client"])
        other_suites.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
        with pytest.raises(ssl.SSLError):
            request(process.port, "/healthz", context=other_suites)

        # A verified certificate whose SANs are not on the list is turned away.
        (workdir / "other").mkdir()
        grafana = make_cert(workdir / "other", "grafana", pki["ca"], san="DNS:grafana")
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            request(process.port, "/metrics", context=client_context(ca, grafana))
        assert request(process.port, "/metrics", context=good)[0] == 200
        # The inline key appears nowhere in the logs, even at debug level.
        key_body = key.read_text().splitlines()[1]
        assert key_body not in process.logs()
        assert "client certificate names no allowed SAN" in process.logs()
    finally:
        process.stop()


@pytest.mark.integration
def test_curve_preferences_allow_one_group(workdir: Path,
                                           pki: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pki["server"]
    ca = pki["ca"][0]
    web = (f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
           "  curve_preferences: [CurveP384]\n")
    with exporter(workdir, web) as process:
        p384 = client_context(ca)
        p384.set_ecdh_curve("secp384r1")
        assert request(process.port, "/healthz", context=p384)[0] == 200
        x25519 = client_context(ca)
        x25519.set_ecdh_curve("X25519")
        with pytest.raises(ssl.SSLError):
            request(process.port, "/healthz", context=x25519)
