"""Hostile files named by the config or the environment: one line, exit 2, at once, little memory.

Each case runs the real exporter (`python -m exporter --config.check`, or a serving exporter for
the web config reload) against a secret, config, web config or certificate file that is
/dev/zero, /dev/urandom, a FIFO, a directory, a 200 MB sparse file, a 50 MB quoted string, a
40 MB mapping, or a document under the size cap built to take the parser long (aliases that
expand exponentially, 500,000 list items, deep nesting, a huge sexagesimal number). Before the
fix these read until MemoryError (1.9 GB, exit 1 with a traceback), hung for ever (a FIFO),
were accepted whole (416 MB for the 200 MB file) or parsed for minutes (94 s and 2.7 GB).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.config import CONFIG_FILE_LIMIT
from tests.harness import ROOT, ExporterProcess, wait_for

pytestmark = pytest.mark.integration

# Functional deadline of one run (they take a fraction of a second: the figures are in the
# closing note of issue 22), and a bound on its peak RSS (about 26 MB for --config.check
# alone, 46 MB for the worst document under the cap; /dev/zero reached 1.9 GB before).
DEADLINE = 10.0
MAX_PEAK_RSS_MB = 100
# The child runs the exporter as `python -m exporter` does, and writes its own peak RSS
# (VmHWM, which starts afresh at exec) when it exits: ru_maxrss from wait4 would count the
# memory of this pytest process, which the child shares between fork and exec. RLIMIT_AS keeps
# a regression from taking the machine's memory.
RUNNER = """
import atexit, resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
report = sys.argv[1]

def peak():
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

atexit.register(peak)
sys.argv = ["qatoolbox-exporter", *sys.argv[2:]]
runpy.run_module("exporter", run_name="__main__", alter_sys=True)
"""


@dataclass
class Outcome:
    """One finished run: exit code, stderr, wall time and peak RSS."""

    returncode: int
    stderr: str
    seconds: float
    peak_rss_mb: float

    def problems(self) -> list[str]:
        """The problem lines under "invalid ...:" (each indented by two spaces)."""
        return [line.strip() for line in self.stderr.splitlines() if line.startswith("  ")]


def run_check(args: list[str], env: dict[str, str] | None = None) -> Outcome:
    """`python -m exporter --config.check ARGS` with only env's DB_*/REDIS_* variables; fails
    the test when it is still running after DEADLINE seconds (it is killed then)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    full_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="qatb-hostile-") as scratch:
        report = Path(scratch) / "peak"
        with open(Path(scratch) / "stderr", "w+b") as stderr:
            started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(report), "--config.check", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env=full_env, cwd=ROOT, start_new_session=True)
            try:
                returncode = proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running after {DEADLINE}s: {args} {env}") from None
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            seconds = time.monotonic() - started
            stderr.seek(0)
            text = stderr.read().decode(errors="replace")
        peak = int(report.read_text()) / 1024 if report.exists() else float("nan")
    return Outcome(returncode, text, seconds, peak)


def assert_one_line_error(outcome: Outcome, *needles: str) -> None:
    """Exit 2, no traceback, exactly one problem line holding every needle, in time and in
    bounded memory."""
    assert outcome.returncode == 2, outcome
    assert "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    problems = outcome.problems()
    assert len(problems) == 1, problems[:5]
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])
    assert outcome.seconds < DEADLINE, outcome
    assert outcome.peak_rss_mb < MAX_PEAK_RSS_MB, outcome


@pytest.fixture(scope="module")
def hostile() -> Iterator[dict[str, str]]:
    """{name: path} of every hostile file, made once for the module."""
    with tempfile.TemporaryDirectory(prefix="qatb-hostile-files-") as scratch:
        base = Path(scratch)
        fifo = base / "fifo"
        os.mkfifo(fifo)
        sparse = base / "sparse-200MB"
        with open(sparse, "wb") as handle:
            handle.truncate(200 * 10**6)
        directory = base / "folder"
        directory.mkdir()
        quoted = base / "quoted-50MB.yml"
        with open(quoted, "w") as handle:
            handle.write('web: {listen_address: "')
            chunk = "a" * 10**6
            for _ in range(50):
                handle.write(chunk)
            handle.write('"}\n')
        mapping = base / "mapping-40MB.yml"
        with open(mapping, "w") as handle:
            written, i = 0, 0
            while written < 40 * 10**6:
                lines = "".join(f"k{n}: {n}\n" for n in range(i, i + 10000))
                handle.write(lines)
                written += len(lines)
                i += 10000
        yield {"/dev/zero": "/dev/zero", "/dev/urandom": "/dev/urandom", "fifo": str(fifo),
               "sparse": str(sparse), "directory": str(directory), "quoted": str(quoted),
               "mapping": str(mapping), "base": scratch}


# What each hostile secret file is called in the error.
SECRET_TARGETS = {
    "/dev/zero": "not a regular file (a character device)",
    "/dev/urandom": "not a regular file (a character device)",
    "fifo": "not a regular file (a FIFO)",
    "sparse": "larger than the 4 KiB limit (200000000 bytes)",
    "directory": "not a regular file (a directory)",
}


@pytest.mark.parametrize("target", SECRET_TARGETS)
@pytest.mark.parametrize(("carrier", "key"), [
    ("DB_PASSWORD_FILE", "postgres.password_file"),
    ("REDIS_PASSWORD_FILE", "redis.password_file"),
    ("yaml", "postgres.password_file"),
    ("yaml", "redis.password_file"),
])
def test_hostile_secret_file(hostile: dict[str, str], target: str, carrier: str,
                             key: str) -> None:
    path = hostile[target]
    if carrier == "yaml":
        section, name = key.split(".")
        config = Path(hostile["base"]) / f"{section}-{target.replace('/', '_')}.yml"
        config.write_text(f"{section}:\n  {name}: {path}\n")
        outcome = run_check(["--config.file", str(config)])
    else:
        outcome = run_check([], {carrier: path})
    assert_one_line_error(outcome, f"{key}: cannot read {path}: {SECRET_TARGETS[target]}")


CONFIG_TARGETS = {
    "fifo": "cannot read: not a regular file (a FIFO)",
    "/dev/zero": "cannot read: not a regular file (a character device)",
    "directory": "cannot read: not a regular file (a directory)",
    "quoted": "cannot read: larger than the 1 MiB limit (50000026 bytes)",
    "mapping": "cannot read: larger than the 1 MiB limit",
}


@pytest.mark.parametrize("target", CONFIG_TARGETS)
@pytest.mark.parametrize(("flag", "what"), [("--config.file", "config file"),
                                            ("--web.config.file", "web config file")])
def test_hostile_config_file(hostile: dict[str, str], target: str, flag: str,
                             what: str) -> None:
    path = hostile[target]
    outcome = run_check([flag, path])
    assert_one_line_error(outcome, f"{what} {path}: {CONFIG_TARGETS[target]}")


def _laughs() -> str:
    """Nine levels of nine aliases each: 9^9 (387 million) values once expanded."""
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]\n"
    return text + "process: {groups: [{name: x, names: *i}]}\n"


def _merge_bomb() -> str:
    """Merge keys that double a mapping at each of 30 levels."""
    text = "a0: &a0 {k1: 1, k2: 2}\n"
    for level in range(1, 31):
        text += f"a{level}: &a{level} {{<<: [*a{level - 1}, *a{level - 1}]}}\n"
    return text


def _under_cap(body: Callable[[int], str]) -> str:
    """body(n) for the largest n that keeps the text within CONFIG_FILE_LIMIT bytes."""
    low, high = 1, CONFIG_FILE_LIMIT
    while low < high:
        middle = (low + high + 1) // 2
        if len(body(middle).encode()) <= CONFIG_FILE_LIMIT:
            low = middle
        else:
            high = middle - 1
    return body(low)


# Documents within the size cap, each built to cost the parser or the config builder time or
# memory, and the one-line problem each gets.
UNDER_CAP = {
    "billion laughs": (_laughs, "more than 20000 values (an alias counts as many as it refers to)"),
    "merge-key bomb": (_merge_bomb, "more than 20000 values"),
    "recursive alias": (lambda: "a: &x [1, *x]\n", "an alias inside the value it refers to"),
    "500k list items": (lambda: _under_cap(lambda n: "a: [" + "1," * n + "]\n"),
                        "more than 20000 values"),
    "deep nesting": (lambda: _under_cap(lambda n: "a: " + "[" * n + "\n"),
                     "nested too deeply (more than 64 levels)"),
    "sexagesimal number": (lambda: _under_cap(lambda n: "web: {max_requests: 1" + ":1" * n
                                              + "}\n"),
                           "a number longer than 100 characters"),
}


@pytest.mark.parametrize("name", UNDER_CAP)
@pytest.mark.parametrize(("flag", "what"), [("--config.file", "config file"),
                                            ("--web.config.file", "web config file")])
def test_costly_document_under_the_cap(hostile: dict[str, str], name: str, flag: str,
                                       what: str) -> None:
    build, problem = UNDER_CAP[name]
    path = Path(hostile["base"]) / f"under-cap-{name.replace(' ', '-')}.yml"
    path.write_text(build())
    assert path.stat().st_size <= CONFIG_FILE_LIMIT
    outcome = run_check([flag, str(path)])
    assert_one_line_error(outcome, f"{what} {path}: invalid YAML (line ", problem)


def test_files_at_the_cap_parse_quickly(hostile: dict[str, str]) -> None:
    """A 1 MiB string and a 1 MiB comment are read and parsed in time; one byte more is too
    large."""
    base = Path(hostile["base"])
    string = base / "string-at-cap.yml"
    prefix = 'web: {listen_address: "'
    string.write_text(prefix + "a" * (CONFIG_FILE_LIMIT - len(prefix) - 3) + '"}\n')
    assert string.stat().st_size == CONFIG_FILE_LIMIT
    # Read and parsed whole: the problem is the value (shortened), not the file.
    assert_one_line_error(run_check(["--config.file", str(string)]),
                          'web.listen_address: expected "host:port" or ":port", got "aaaa')
    comment = base / "comment-at-cap.yml"
    comment.write_text("# " + "x" * (CONFIG_FILE_LIMIT - 3) + "\n")
    outcome = run_check(["--config.file", str(comment)])
    assert outcome.returncode == 0, outcome
    assert outcome.seconds < DEADLINE and outcome.peak_rss_mb < MAX_PEAK_RSS_MB, outcome
    with open(comment, "a") as handle:
        handle.write("x")
    assert_one_line_error(run_check(["--config.file", str(comment)]),
                          f"config file {comment}: cannot read: larger than the 1 MiB limit "
                          f"({CONFIG_FILE_LIMIT + 1} bytes)")


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "directory", "sparse"])
def test_hostile_certificate_file(hostile: dict[str, str], target: str) -> None:
    """OpenSSL, given the path, blocked for ever on a FIFO."""
    path = hostile[target]
    web = Path(hostile["base"]) / f"web-cert-{target.replace('/', '_')}.yml"
    key = Path(hostile["base"]) / "unused.key"
    key.write_text("not read: the certificate fails first\n")
    web.write_text(f"tls_server_config:\n  cert_file: {path}\n  key_file: {key}\n")
    reason = {"fifo": "not a regular file (a FIFO)",
              "/dev/zero": "not a regular file (a character device)",
              "directory": "not a regular file (a directory)",
              "sparse": "larger than the 1 MiB limit (200000000 bytes)"}[target]
    assert_one_line_error(run_check(["--web.config.file", str(web)]),
                          f"tls_server_config.cert_file: cannot read {path}: {reason}")


def test_secret_behind_symlinks_is_read(hostile: dict[str, str]) -> None:
    """Kubernetes mounts a secret as ..data/<name> behind two symbolic links: that is fine; a
    link to a device is not."""
    base = Path(hostile["base"])
    data = base / "..2024_01_01"
    data.mkdir(exist_ok=True)
    (data / "password").write_text("hunter2-behind-links\n")
    with contextlib.suppress(FileExistsError):
        (base / "..data").symlink_to(data.name)
    with contextlib.suppress(FileExistsError):
        (base / "password").symlink_to("..data/password")
    outcome = run_check(["--collector.postgres"], {"DB_PASSWORD_FILE": str(base / "password")})
    assert outcome.returncode == 0, outcome
    assert "hunter2" not in outcome.stderr
    to_device = base / "password-to-zero"
    with contextlib.suppress(FileExistsError):
        to_device.symlink_to("/dev/zero")
    assert_one_line_error(run_check([], {"DB_PASSWORD_FILE": str(to_device)}),
                          f"postgres.password_file: cannot read {to_device}: not a regular "
                          f"file (a character device)")


def test_web_config_replaced_by_a_fifo_while_serving(workdir: Path) -> None:
    """The web config file is re-read inside a request: a FIFO put in its place must not hang
    that request (and every later one, behind the reload lock)."""
    web = workdir / "web.yml"
    web.write_text("http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    exporter = ExporterProcess(workdir, args=["--web.config.file", str(web),
                                              "--no-collector.host", "--no-collector.process",
                                              "--no-collector.postgres", "--no-collector.redis"])
    try:
        exporter.start()
        assert exporter.get("/healthz")[1].get("X-Frame-Options") == "deny"
        web.unlink()
        os.mkfifo(web)
        # The file is re-read by a request, at most once a second.
        wait_for(lambda: exporter.get("/healthz", timeout=DEADLINE)[0] == 200
                 and "web config file invalid" in exporter.logs(), 15,
                 "the reload to fail on the FIFO")
        started = time.monotonic()
        status, headers, _ = exporter.get("/healthz", timeout=DEADLINE)
        assert status == 200 and headers.get("X-Frame-Options") == "deny"  # previous kept
        assert time.monotonic() - started < DEADLINE
        line = next(ln for ln in exporter.logs().splitlines() if "web config file invalid" in ln)
        assert "not a regular file (a FIFO)" in line, line
    finally:
        exporter.stop()
