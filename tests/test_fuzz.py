"""Fuzzing: the config loader takes any YAML, the HTTP server any request, and neither breaks."""

from __future__ import annotations

import dataclasses
import re
import socket
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.cli import VALUE_FLAGS
from exporter.collectors import DEFAULTS
from exporter.config import Config, ConfigError, Duration, Regex, Secret, load_config
from tests.harness import ExporterProcess, tempdir

# Keys the generator invents are identifiers, so every problem can be traced to its key.
IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "0", "-1", "1s", "500ms", "1h30m", "0s", "2", "[", "(a", "a{99999999999}",
                     "(" * 300, ":9786", "127.0.0.1:0", "[::1]:9100", "redis://u:p@h:1/0",
                     "/metrics", "/", "/healthz", "postgres://x", "SELECT 1", "DELETE FROM t",
                     "qatoolbox_x", "gauge", "counter", "info", "json", "\u0000", "é", "1e400"]),
)
JUNK = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(IDENT, inner, max_size=4)), max_leaves=12)


def _for_type(tp: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that are often right for tp, and otherwise anything at all."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _for_dataclass(tp, depth + 1)
    if origin is Literal:
        good: st.SearchStrategy[Any] = st.sampled_from(typing.get_args(tp))
    elif origin is tuple:
        good = st.lists(_for_type(typing.get_args(tp)[0], depth + 1), max_size=3)
    elif origin in (Mapping, dict) or tp is Mapping:
        good = st.dictionaries(st.sampled_from([*DEFAULTS, "nope"]), JUNK, max_size=4)
    elif tp is Duration:
        good = st.sampled_from(["1s", "250ms", "0s", "2m", "1h", "-1s", "soon", "0.5s", "99999d"])
    elif tp is Regex:
        good = st.sampled_from(["^a$", ".*", "(", "a{4294967296}", "(" * 500 + ")" * 500, ""])
    elif tp is bool:
        good = st.booleans()
    elif tp is int:
        good = st.integers(min_value=-5, max_value=70000)
    elif tp is float:
        good = st.floats(allow_nan=True, allow_infinity=True)
    elif tp in (str, Secret):
        good = st.text(max_size=20)
    else:
        good = JUNK
    return st.one_of(good, good, JUNK)


def _for_dataclass(cls: type[Any], depth: int) -> st.SearchStrategy[Any]:
    if depth > 4:
        return JUNK
    hints = typing.get_type_hints(cls)
    optional = {f.name: _for_type(hints[f.name], depth) for f in dataclasses.fields(cls)}
    known = st.fixed_dictionaries({}, optional=optional)
    extra = st.dictionaries(IDENT, JUNK, max_size=2)
    return st.one_of(known, st.builds(lambda a, b: {**b, **a}, known, extra), JUNK)


DOCUMENT = _for_dataclass(Config, 0)
TOP_KEYS = {f.name for f in dataclasses.fields(Config)}
ENV_VARS = ["DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD", "DB_PASSWORD_FILE",
            "REDIS_URL", "REDIS_PASSWORD_FILE"]
ENV = st.dictionaries(st.sampled_from(ENV_VARS),
                      st.one_of(st.text(max_size=15),
                                st.sampled_from(["5432", "x", "-1", "99999", "/nonexistent",
                                                 "redis://h:x/0", "redis://[::1/0", "/dev/null",
                                                 "redis://u:p@h:6379/0"])),
                      max_size=4)
# Flag values are strings, as argparse gives them.
OVERRIDES = st.dictionaries(st.sampled_from([key for key, _ in VALUE_FLAGS.values()]),
                            st.text(max_size=15), max_size=3)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempdir() as path:
        yield path


def _assert_names_a_key(problem: str, document: Any, env: Mapping[str, str],
                        overrides: Mapping[str, str]) -> None:
    assert problem and "\n" not in problem, repr(problem)
    if problem.startswith("config file "):
        return
    keys = set(TOP_KEYS) | set(env)
    if isinstance(document, Mapping):
        keys |= {ConfigError([str(k)]).problems[0] for k in document}  # as escaped there
    keys |= {k.split(".")[0] for k in overrides}
    assert any(problem.startswith((f"{k}:", f"{k}.", f"{k}[")) for k in keys), \
        f"{problem!r} names no key of the document"


def _check_load(scratch: Path, document: Any, env: dict[str, str],
                overrides: dict[str, str], text: str | None = None) -> None:
    path = scratch / "fuzz.yml"
    if text is None:
        text = yaml.safe_dump(document, allow_unicode=True)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(str(path), env, DEFAULTS, overrides, {})
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            _assert_names_a_key(problem, document, env, overrides)
        # The message is what the CLI prints: building it must not fail either.
        assert str(exc)
    else:
        assert isinstance(config, Config)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=DOCUMENT, env=ENV, overrides=OVERRIDES)
def test_any_config_document_gives_config_or_config_error(
        scratch: Path, document: Any, env: dict[str, str], overrides: dict[str, str]) -> None:
    _check_load(scratch, document, env, overrides)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["web:", "  listen_address: ", "- ", "[", "{", "&a ", "*a", "!!str ",
                              "!!python/object:os.system ", "? ", ": ", "\n", "  ", "postgres:",
                              "collectors: {host: ", "'", '"', "#", "%YAML 1.1\n", "---\n",
                              "scrape: {timeout: 1s}", "process:\n  groups:\n    - name: x"]),
             max_size=30).map("".join),
))
def test_any_yaml_text_gives_config_or_config_error(scratch: Path, text: str) -> None:
    try:
        document = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        document = None
    _check_load(scratch, document, {}, {}, text=text)


@pytest.mark.parametrize("text", [
    "[" * 5000,  # deeper than the parser's recursion allows
    "a: &x [*x]\nweb: &w {listen_address: *w}\n",
    "host: {filesystem: {mount_points_include: 'a{4294967296}'}}\n",
    "host: {disk: {include: '" + "(" * 2000 + ")" * 2000 + "'}}\n",
    "web: {max_requests: 1e400}\n",
    "? [a, b]\n: c\n",
    "1: 2\nnull: 3\ntrue: x\n",
    "\ufeffweb: {}\n",
    "web: {listen_address: !!binary aGVsbG8=}\n",
])
def test_known_nasty_documents(scratch: Path, text: str) -> None:
    try:
        document = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        document = None
    _check_load(scratch, document, {}, {}, text=text)


# --- the HTTP endpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_exporter() -> Iterator[ExporterProcess]:
    """One real exporter (host and process collectors) shared by the HTTP fuzz tests."""
    with tempdir() as base:
        args = [f"--{'' if name in ('host', 'process') else 'no-'}collector.{name}"
                for name in DEFAULTS]
        process = ExporterProcess(base, args=[*args, "--web.max-requests", "100"]).start()
        try:
            yield process
        finally:
            process.stop()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _statuses(response: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"(?:^|\r\n\r\n|\n)HTTP/1\.1 (\d{3}) ", response)]


def _alive(process: ExporterProcess) -> None:
    assert process.proc is not None and process.proc.poll() is None, process.logs()[-2000:]
    assert process.get("/healthz")[0] == 200


PATH_CHARS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                            exclude_characters="#"), max_size=40)
PATH = st.one_of(
    st.sampled_from(["/metrics", "/", "/healthz", "/metrics/", "//metrics", "*", "",
                     "http://127.0.0.1/metrics", "/%00", "/..%2f..%2fetc/passwd"]),
    PATH_CHARS.map(lambda p: "/" + p),
).flatmap(lambda p: st.one_of(st.just(p), PATH_CHARS.map(lambda q: f"{p}?{q}")))
HEADER_NAME = st.one_of(
    st.sampled_from(["Accept", "Accept-Encoding", "Authorization", "Connection", "Host",
                     "Content-Length", "Transfer-Encoding", "Expect", "Range", "Cookie"]),
    st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True),
)
HEADER_VALUE = st.one_of(
    st.sampled_from(["gzip", "application/openmetrics-text; version=1.0.0", "text/plain;q=x",
                     "*/*;q=0.1, application/openmetrics-text;q=2", "close", "keep-alive",
                     "100-continue", "-1", "99999999999999999999", "chunked", "Basic ???",
                     "Basic " + "A" * 200, "bytes=0-1", "identity;q=0, gzip;q=0", ""]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=60),
)
# Mostly well-formed request lines, so that most examples reach the path and header handling.
METHOD = st.one_of(st.just("GET"), st.just("GET"), st.just("GET"), st.just("HEAD"),
                   st.sampled_from(["POST", "FOO", "PROPFIND", "OPTIONS", "get"]),
                   st.from_regex(r"[A-Z]{1,10}", fullmatch=True))
VERSION = st.one_of(st.just("HTTP/1.1"), st.just("HTTP/1.1"), st.just("HTTP/1.0"),
                    st.sampled_from(["HTTP/2.0", "HTTP/1", "HTTP/x.y", "", "HTTP/1.1 junk"]))


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method, path, version = draw(METHOD), draw(PATH), draw(VERSION)
    line = " ".join(part for part in (method, path, version) if part)
    headers = draw(st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=8))
    head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    body = draw(st.binary(max_size=64))
    return head.encode("latin-1") + body


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=http_requests())
def test_random_requests_never_500(live_exporter: ExporterProcess, data: bytes) -> None:
    response = _exchange(live_exporter.port, data)
    statuses = _statuses(response)
    # Every complete request line gets an answer (a handler that raised closes silently).
    assert response.startswith(b"HTTP/1.1 "), (data[:300], response[:300])
    assert all(s < 500 or s in (503, 505) for s in statuses), (data[:300], response[:300])
    assert live_exporter.proc is not None and live_exporter.proc.poll() is None


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"GET ", b"/metrics", b" HTTP/1.1", b"\r\n", b"\n", b"\r", b": ",
                              b"Host", b"\x00", b"\xff", b" ", b"\t", b"HTTP/1.0", b"HEAD ",
                              b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"]),
             max_size=40).map(b"".join),
))
def test_malformed_bytes_never_500(live_exporter: ExporterProcess, data: bytes) -> None:
    response = _exchange(live_exporter.port, data)
    assert all(s < 500 or s in (503, 505) for s in _statuses(response)), (data, response[:300])
    assert live_exporter.proc is not None and live_exporter.proc.poll() is None


def test_exporter_alive_after_fuzzing(live_exporter: ExporterProcess) -> None:
    _alive(live_exporter)
    assert "Traceback" not in live_exporter.logs()
    assert "request handler failed" not in live_exporter.logs()
    assert live_exporter.scrape().value("qatoolbox_exporter_collector_success",
                                        collector="host") == 1


