"""Real servers for tests: throwaway PostgreSQL, Redis and exporter processes on free ports."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll predicate until it is true; fail the test with what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10, group: bool = False) -> None:
    """SIGTERM a child (its whole process group when group) and wait; SIGKILL if it lingers."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(5)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def family_samples(families: Iterable[Any]) -> Samples:
    """{(sample name, sorted labels): value} from metric families, each series at most once."""
    out: Samples = {}
    for family in families:
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


# --- the least-privilege role and ACL user of docs/reliability.md ------------------------------

RELIABILITY_DOC = ROOT / "docs" / "reliability.md"
EXPORTER_ROLE = "qatoolbox_exporter"
EXPORTER_PASSWORD = "exporter-Role-pw-41c9"
# The doc's SQL is written for the application's database, named qatoolbox.
DOC_DATABASE = "qatoolbox"


def documented_block(marker: str) -> str:
    """The fenced block that follows <!-- marker --> in docs/reliability.md."""
    text = RELIABILITY_DOC.read_text(encoding="utf-8")
    if f"<!-- {marker} -->" not in text:
        raise AssertionError(f"docs/reliability.md has no <!-- {marker} --> block")
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def _statements(sql: str) -> list[str]:
    """SQL text split on ';' into statements, comment lines dropped (the doc's SQL has no ';'
    inside literals)."""
    out = []
    for statement in sql.split(";"):
        lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
        if "".join(lines).strip():
            out.append("\n".join(lines).strip())
    return out


_TABLE_GRANT = re.compile(r"\bON\s+(?:TABLE\s+)?([A-Za-z_][A-Za-z0-9_]*)\s+TO\b", re.I)
# psql's \gexec: the statement's result cells are run as statements (the doc's grant on a
# table that only some databases have).
GEXEC = "\\gexec"


def _grant_table(statement: str) -> str | None:
    """The table a `GRANT ... ON table TO` statement is on (None for other statements)."""
    found = _TABLE_GRANT.search(statement)
    return found.group(1) if found else None


@dataclass(frozen=True)
class RoleSql:
    """The documented role SQL in its two parts: the cluster part (role, pg_monitor, settings,
    CONNECT), run once anywhere, and the part the doc says to run connected to the
    application's database: the schema grant, then one column grant per business table."""

    cluster: tuple[str, ...]
    database: tuple[str, ...]
    tables: tuple[str, ...]  # the business tables the grants of `database` are on
    optional: tuple[str, ...] = ()  # those granted only where they exist (psql \gexec)


def documented_role_sql(password: str = EXPORTER_PASSWORD) -> RoleSql:
    """docs/reliability.md's least-privilege SQL with the password set, split where the doc
    says to connect to the application's database."""
    sql = documented_block("least-privilege-sql")
    if sql.count("'change-me'") != 1:
        raise AssertionError("the documented role SQL must set the password 'change-me' once")
    sql = sql.replace("'change-me'", "'" + password.replace("'", "''") + "'")
    cluster_text, marker, database_text = sql.partition("-- connected to the")
    if not marker:
        raise AssertionError("the documented role SQL lost its '-- connected to the ... "
                             "database:' line, which separates the per-database grants")
    cluster = tuple(_statements(cluster_text))
    database = tuple(_statements(database_text.split("\n", 1)[1]))
    if not cluster[0].upper().startswith(f"CREATE ROLE {EXPORTER_ROLE.upper()} "):
        raise AssertionError(f"the documented role SQL must start by creating {EXPORTER_ROLE}")
    tables = tuple(t for t in map(_grant_table, database) if t)
    optional = tuple(t for s in database if s.endswith(GEXEC) and (t := _grant_table(s)))
    return RoleSql(cluster, database, tables, optional)


def documented_acl_rules(password: str = EXPORTER_PASSWORD) -> list[str]:
    """docs/reliability.md's ACL SETUSER arguments after the user name, password set."""
    words = documented_block("least-privilege-redis").split()
    if words[:3] != ["ACL", "SETUSER", EXPORTER_ROLE] or words.count(">change-me") != 1:
        raise AssertionError(f"the documented ACL line must be 'ACL SETUSER {EXPORTER_ROLE} "
                             f"... >change-me ...': {words}")
    return [f">{password}" if w == ">change-me" else w for w in words[3:]]


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists():
            return candidate
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")


class _Process:
    """A child server process the test can stop, kill and pause."""

    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _signal_group(self, sig: int) -> None:
        # The server and every descendant: PostgreSQL's backends each call setsid(), so a
        # process-group signal would miss them and a "paused" server would still answer.
        pids = [self.pid]
        with contextlib.suppress(psutil.Error):
            pids += [child.pid for child in psutil.Process(self.pid).children(recursive=True)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """SIGSTOP the server and its children: sockets stay open, nothing answers."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._signal_group(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server and its children, no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)

    def _terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(5)


_PG_TEMPLATE: dict[str, Path] = {}


def _as_postgres_user() -> dict[str, Any]:
    """Popen arguments that drop root to the postgres user (initdb refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid}


def _pg_template() -> Path:
    """initdb once per test session; each server copies the result (much faster)."""
    if "dir" not in _PG_TEMPLATE:
        holder = Path(tempfile.mkdtemp(prefix="qatb-pgtemplate-"))
        os.chmod(holder, 0o755)
        atexit.register(shutil.rmtree, holder, True)
        target = holder / "data"
        target.mkdir()
        _chown_postgres(target)
        subprocess.run(
            [str(_pg_bindir() / "initdb"), "-D", str(target), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, **_as_postgres_user(),
        )
        _PG_TEMPLATE["dir"] = target
    return _PG_TEMPLATE["dir"]


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            os.chown(p, entry.pw_uid, entry.pw_gid)


@dataclass
class PostgresServer(_Process):
    """A throwaway PostgreSQL cluster on a free loopback port, superuser postgres, trust auth
    on the socket and scram passwords over TCP for roles that have one."""

    base: Path
    port: int = field(default_factory=free_port)
    settings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.datadir = self.base / f"pg-{self.port}"
        self.sockdir = self.base / f"pgsock-{self.port}"
        shutil.copytree(_pg_template(), self.datadir)
        self.sockdir.mkdir()
        _chown_postgres(self.datadir)
        _chown_postgres(self.sockdir)
        os.chmod(self.datadir, 0o700)
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        _chown_postgres(hba)
        self.log_path = self.base / f"pg-{self.port}.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> PostgresServer:
        """Start the server and wait until it accepts connections."""
        args = [str(_pg_bindir() / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
                "-k", str(self.sockdir), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True,
                                         **_as_postgres_user())
        wait_for(self._ready, 30, f"PostgreSQL on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.log_path.read_text()[-2000:]}")
        with self.connect():
            return True

    def stop(self) -> None:
        """Fast shutdown (SIGINT), waiting for it."""
        self._terminate(signal.SIGINT)

    def restart(self) -> None:
        """Stop if running, then start on the same port and data."""
        self.stop()
        self.start()

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str = "") -> str:
        """A libpq connection string for this server over TCP."""
        dsn = f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} connect_timeout=5"
        return dsn + (f" password={password}" if password else "")

    def connect(self, dbname: str = "postgres", user: str = "postgres",
                password: str = "") -> Any:
        """An autocommit psycopg connection (the caller closes it)."""
        import psycopg

        return psycopg.connect(self.dsn(dbname, user, password), autocommit=True)

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run SQL as the superuser and return its rows (empty for statements without rows)."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description else []

    def env(self, dbname: str = "postgres", user: str = "postgres",
            password: str = "") -> dict[str, str]:
        """The DB_* variables that point the exporter at this server."""
        return {"DB_HOST": "127.0.0.1", "DB_PORT": str(self.port), "DB_NAME": dbname,
                "DB_USER": user, "DB_PASSWORD": password}

    def create_exporter_role(self, dbname: str = "postgres",
                             password: str = EXPORTER_PASSWORD) -> list[str]:
        """Apply docs/reliability.md's least-privilege SQL, read from the doc, for the exporter
        connecting to dbname: the role (once per cluster: skipped when it exists), pg_monitor,
        its settings and CONNECT on dbname (the doc's `qatoolbox` database), then, connected
        to dbname, the schema grant and the column grants on the business tables when dbname
        has them (a `\\gexec` statement run as psql runs it: its result cells as statements).
        Run again for each database the role should reach. Returns the tables granted: all of
        the doc's that the database has or, in a database without them, none (some but not
        all of those the doc always grants is an error, as the doc would then be out of step
        with the schema)."""
        role = documented_role_sql(password)
        connect_grants = [s for s in role.cluster
                          if re.search(rf"\bON DATABASE {DOC_DATABASE}\b", s)]
        if len(connect_grants) != 1:
            raise AssertionError(f"expected one GRANT CONNECT ON DATABASE {DOC_DATABASE}: "
                                 f"{role.cluster}")
        # One superuser session in dbname: the cluster part may run from any database.
        with self.connect(dbname) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                  (EXPORTER_ROLE,)).fetchone()
            for index, statement in enumerate(role.cluster):
                if not (exists and index == 0):
                    conn.execute(re.sub(rf"\bON DATABASE {DOC_DATABASE}\b",
                                        f'ON DATABASE "{dbname}"', statement))
            present = {t for t in role.tables
                       if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (t,)).fetchone()[0]}
            required = set(role.tables) - set(role.optional)
            if present and not required <= present:
                raise AssertionError(f"database {dbname} has only some of the documented "
                                     f"business tables: missing {sorted(required - present)}")
            for statement in role.database:
                if statement.endswith(GEXEC):
                    if present:
                        rows = conn.execute(statement.removesuffix(GEXEC)).fetchall()
                        for cell in (c for row in rows for c in row if c is not None):
                            conn.execute(cell)
                elif _grant_table(statement) is None or present:
                    conn.execute(statement)
        return sorted(present)

    def exporter_dsn(self, dbname: str = "postgres", password: str = EXPORTER_PASSWORD) -> str:
        """dsn() for the documented role (create_exporter_role first)."""
        return self.dsn(dbname, EXPORTER_ROLE, password)

    def exporter_env(self, dbname: str = "postgres",
                     password: str = EXPORTER_PASSWORD) -> dict[str, str]:
        """env() for the documented role (create_exporter_role first)."""
        return self.env(dbname, EXPORTER_ROLE, password)

    def exporter_sessions(self) -> int:
        """Sessions of the documented role right now, whatever their application name."""
        rows = self.execute(f"SELECT count(*) FROM pg_stat_activity "
                            f"WHERE usename = '{EXPORTER_ROLE}'")
        return int(rows[0][0])


@dataclass
class RedisServer(_Process):
    """A throwaway Redis on a free loopback port, nothing kept on disk."""

    base: Path
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()

    def start(self) -> RedisServer:
        """Start redis-server and wait until it answers PING."""
        self.log_path = self.base / f"redis-{self.port}.log"
        workdir = self.base / f"redis-{self.port}"
        workdir.mkdir(exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--logfile", str(self.log_path), *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(self._ready, 15, f"Redis on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
        args = list(self.extra_args)
        password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
        with contextlib.closing(self.client(password=password)) as client:
            return bool(client.ping())

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._terminate()

    def restart(self) -> None:
        """Stop if running, then start on the same port."""
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> Any:
        """A redis-py client for this server (the caller closes it)."""
        import redis

        params: dict[str, Any] = {"socket_timeout": 5, **kwargs}
        return redis.Redis(host="127.0.0.1", port=self.port, **params)

    def create_exporter_user(self, password: str = EXPORTER_PASSWORD,
                             admin_password: str | None = None) -> str:
        """Run docs/reliability.md's `ACL SETUSER qatoolbox_exporter ...`, read from the doc,
        and return a URL for that user (admin_password: the default user's, if it has one).
        Users made at run time die with the server: run it again after a restart, as a real
        server would have kept them in its ACL file."""
        with contextlib.closing(self.client(password=admin_password)) as client:
            client.execute_command("ACL", "SETUSER", EXPORTER_ROLE,
                                   *documented_acl_rules(password))
        return self.exporter_url(password)

    def exporter_url(self, password: str = EXPORTER_PASSWORD) -> str:
        """A redis:// URL for the documented ACL user, password in it."""
        return (f"redis://{EXPORTER_ROLE}:{urllib.parse.quote(password, safe='')}"
                f"@127.0.0.1:{self.port}/0")

    def exporter_client(self, password: str = EXPORTER_PASSWORD, **kwargs: Any) -> Any:
        """A redis-py client logged in as the documented ACL user (the caller closes it)."""
        return self.client(username=EXPORTER_ROLE, password=password, **kwargs)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from exposition text."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class Scrape:
    """One scrape's text with lookups by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = parse_metrics(text)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample's value, or None when absent. The `server` label the exporter puts on
        service collectors' samples (exporter/fleet.py) need not be given: labels without it
        match the one sample that has exactly labels plus a server."""
        found = self.samples.get((name, tuple(sorted(labels.items()))))
        if found is not None or "server" in labels:
            return found
        matches = [v for (n, lbl), v in self.samples.items()
                   if n == name and "server" in dict(lbl)
                   and {k: v for k, v in lbl if k != "server"} == labels]
        assert len(matches) <= 1, f"{name} {labels}: one sample per server, {len(matches)}"
        return matches[0] if matches else None

    def names(self) -> set[str]:
        """Every sample name present."""
        return {name for name, _ in self.samples}

    def series(self, prefix: str = "") -> list[tuple[str, dict[str, str]]]:
        """Every sample whose name starts with prefix."""
        return [(n, dict(lbl)) for (n, lbl) in self.samples if n.startswith(prefix)]


@dataclass
class ExporterProcess:
    """The real exporter, run as `python -m exporter` on a free port."""

    base: Path
    config: Mapping[str, Any] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    python: str = sys.executable  # another interpreter: tests/test_minimums.py

    def start(self, wait: bool = True) -> ExporterProcess:
        """Start the exporter; by default wait until /healthz answers."""
        argv = [self.python, "-m", "exporter", "--web.listen-address",
                f"127.0.0.1:{self.port}", *self.args]
        if self.config is not None:
            path = self.base / f"exporter-{self.port}.yml"
            path.write_text(yaml.safe_dump(dict(self.config)))
            argv += ["--config.file", str(path)]
        self.log_path = self.base / f"exporter-{self.port}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DB_", "REDIS_", "PROMETHEUS_MULTIPROC"))}
        # Point at nothing by default, so tests never touch the machine's shared servers.
        env.update({"DB_HOST": "127.0.0.1", "DB_PORT": "1", "REDIS_URL": "redis://127.0.0.1:1/0"})
        env.update(self.env)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT)
        if wait:
            wait_for(self._healthy, 20, f"exporter on port {self.port}")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"exporter exited {self.proc.returncode}: {self.logs()}")
        return self.get("/healthz")[0] == 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: Mapping[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """GET path: status, headers and body (errors are returned, not raised)."""
        request = urllib.request.Request(self.url + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def scrape(self, timeout: float = 30) -> Scrape:
        """GET /metrics, assert 200, parse."""
        status, _, body = self.get("/metrics", timeout=timeout)
        assert status == 200, body[:500]
        return Scrape(body.decode())

    def logs(self) -> str:
        """Everything the exporter wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM, wait, return the exit code."""
        if self.proc is None:
            return None
        stop_process(self.proc)
        return self.proc.returncode

    def threads(self) -> int:
        """Threads of the exporter process right now."""
        status = Path(f"/proc/{self.proc.pid if self.proc else 0}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("Threads:")))


def run_exporter(args: Sequence[str], env: Mapping[str, str] | None = None,
                 timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `python -m exporter ARGS` to completion (for --config.check and bad flags)."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    base_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "exporter", *args], check=False,
                          capture_output=True, text=True, env=base_env, timeout=timeout, cwd=ROOT)


@contextlib.contextmanager
def tempdir() -> Iterator[Path]:
    """A temporary directory readable by the postgres user."""
    path = Path(tempfile.mkdtemp(prefix="qatb-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
