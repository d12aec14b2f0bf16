"""QAToolBox defaults on the demo app's real schema, as QAToolBox has it at HEAD (no
tools_timecapsule) and as older deployments have it (the legacy capsule table): exact values,
values found in the data, counters through hard deletes, the cleanup signal, the documented
grants run by psql, seed_demo, the views and the exporter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import DEFAULTS
from exporter.collectors.business import BusinessCollector
from exporter.collectors.business_config import BusinessConfig, business_defaults
from exporter.config import Duration, load_config
from tests.harness import (
    EXPORTER_ROLE,
    ROOT,
    ExporterProcess,
    PostgresServer,
    Scrape,
    documented_block,
    wait_for,
)

pytestmark = pytest.mark.integration

DEMO = ROOT / "examples" / "qatoolbox_demo"
DB = "qatoolbox"
SUCCESS = "qatoolbox_business_query_success"
APPLICABLE = "qatoolbox_business_query_applicable"
DEFAULT_NAMES = [q.metric for q in business_defaults()]
CAPSULE_QUERIES = ["qatoolbox_time_capsules", "qatoolbox_time_capsules_overdue"]
HEAD_QUERIES = [n for n in DEFAULT_NAMES if n not in CAPSULE_QUERIES]
ROOM_TYPES = ["private", "group", "public", "system"]
ROOM_STATUSES = ["waiting", "active", "ended", "inactive", "archived", "deleted", "expired"]
MESSAGE_TYPES = ["text", "image", "file", "audio", "voice", "video", "emoji", "system"]
PRESENCE = ["online", "busy", "away", "offline"]
CAPSULE_TYPES = ["memory", "wish", "secret"]
LEGACY_ENV = {"QATOOLBOX_DEMO_LEGACY_CAPSULES": "1"}


def manage(pg: PostgresServer, *args: str, extra_env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run the demo's manage.py against pg's qatoolbox database."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DB_", "REDIS_", "QATOOLBOX_DEMO_"))}
    env.update(pg.env(DB))
    env.update(extra_env or {})
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=DEMO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def migrate(pg: PostgresServer, legacy: bool) -> list[str]:
    """A qatoolbox database migrated by the demo (with the legacy capsule module or, as at
    QAToolBox's HEAD, without), and the least-privilege role of docs/reliability.md (the doc's
    SQL, read from the doc) that the exporter connects as; returns the tables granted."""
    pg.execute(f"CREATE DATABASE {DB}")
    manage(pg, "migrate", "--verbosity", "0", extra_env=LEGACY_ENV if legacy else None)
    return pg.create_exporter_role(DB)


@pytest.fixture(params=["head", "legacy"])
def shaped_db(request: pytest.FixtureRequest, postgres: PostgresServer) -> tuple[PostgresServer,
                                                                                 bool]:
    """The demo's schema in both shapes: QAToolBox at HEAD, and with the legacy capsules."""
    legacy = request.param == "legacy"
    granted = migrate(postgres, legacy)
    tables = ["auth_user", "tools_chatmessage", "tools_chatroom", "tools_useronlinestatus"]
    assert granted == sorted([*tables, *(["tools_timecapsule"] if legacy else [])])
    return postgres, legacy


@pytest.fixture
def collectors() -> Iterator[list[BusinessCollector]]:
    made: list[BusinessCollector] = []
    yield made
    for collector in made:
        collector.close(timeout=10)


def defaults_collector(pg: PostgresServer, made: list[BusinessCollector],
                       interval: float | None = None) -> BusinessCollector:
    """The defaults as shipped, as the documented role; every interval shortened if given."""
    config = load_config(None, pg.exporter_env(DB), DEFAULTS)
    business = config.business
    if interval is not None:
        business = BusinessConfig(queries=tuple(
            dataclasses.replace(q, interval=Duration(interval)) for q in business_defaults()))
    collector = BusinessCollector(business, config.postgres)
    made.append(collector)
    return collector


def scrape(collector: BusinessCollector) -> Scrape:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return Scrape(generate_latest(registry).decode())


def settled(collector: BusinessCollector, legacy: bool, runs_after: float = 0.0) -> Scrape:
    """Scrape until every default query succeeded or is known not to apply (the capsule ones
    on QAToolBox at HEAD), and (runs_after) every success is newer than that Unix time."""
    found: list[Scrape] = []

    def ready() -> bool:
        found[:] = [scrape(collector)]
        now = found[0]
        for name in DEFAULT_NAMES:
            applies = legacy or name not in CAPSULE_QUERIES
            if now.value(APPLICABLE, query=name) != (1 if applies else 0):
                return False
            if applies and (now.value(SUCCESS, query=name) != 1 or (now.value(
                    "qatoolbox_business_query_last_success_timestamp_seconds", query=name)
                    or 0) <= runs_after):
                return False
        return True

    wait_for(ready, 30, "every default query to succeed or be not applicable")
    return found[0]


def family(scrape: Scrape, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """One family's samples, keyed without the `server` label the exporter adds to every
    business sample (exporter/fleet.py)."""
    return {tuple(kv for kv in labels if kv[0] != "server"): v
            for (n, labels), v in scrape.samples.items() if n == name}


def total(scrape: Scrape, name: str) -> float:
    return sum(family(scrape, name).values())


def count(pg: PostgresServer, table: str) -> int:
    return int(pg.execute(f"SELECT count(*) FROM {table}", dbname=DB)[0][0])


def assert_no_failure(scrape: Scrape, legacy: bool) -> None:
    """No query failed; not applicable ones have no success series at all."""
    successes = family(scrape, SUCCESS)
    assert successes and all(v == 1 for v in successes.values()), successes
    names = {dict(labels)["query"] for labels in successes}
    assert names == set(DEFAULT_NAMES if legacy else HEAD_QUERIES)


# Known data: ages are minutes before the database's now(), far from every window edge.
KNOWN_DATA = """
INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name,
                       email, is_staff, is_active, date_joined)
SELECT '!', now() - ago * interval '1 minute', false, name, '', '', '', false, active,
       now() - interval '30 days'
FROM (VALUES ('u1', 30, true), ('u2', 300, true), ('u3', 3 * 1440, true),
             ('u4', 10 * 1440, true), ('u5', NULL, true), ('u6', 120, false),
             ('u7', NULL, false)) AS v(name, ago, active);

-- u1 by the WebSocket consumer, u2 by the HTTP heartbeat (status only), u3 busy with the
-- flag set, u6 a heartbeat's "online" two hours old, u7 a status the client made up.
INSERT INTO tools_useronlinestatus (status, last_seen, is_typing, is_online, user_id)
SELECT status, now() - seen * interval '1 minute', false, online,
       (SELECT id FROM auth_user WHERE username = name)
FROM (VALUES ('u1', 'online', 0, true), ('u2', 'online', 1, false), ('u3', 'busy', 0, true),
             ('u4', 'away', 2, false), ('u5', 'offline', 1440, false),
             ('u6', 'online', 120, false), ('u7', 'invisible', 1, false))
  AS v(name, status, seen, online);

-- Idle minutes: r2 14 h (no message), r3 20 h (its message too), r6 12.5 h (within the
-- grace), r7 created 3 days ago and idle 14 h by last_activity but with a message a minute
-- old (busy). r8 and r9 have a type and a status no model lists.
INSERT INTO tools_chatroom (room_id, name, description, room_type, status, max_members,
                            is_encrypted, last_activity, created_at, updated_at, user1_id)
SELECT id, id, '', room_type, status, 100, false, now() - idle * interval '1 minute',
       now() - interval '3 days', now(), (SELECT min(id) FROM auth_user)
FROM (VALUES ('r1', 'private', 'active', 0), ('r2', 'private', 'active', 14 * 60),
             ('r3', 'group', 'expired', 20 * 60), ('r4', 'group', 'ended', 60),
             ('r5', 'public', 'waiting', 5), ('r6', 'system', 'archived', 750),
             ('r7', 'private', 'active', 14 * 60), ('r8', 'legacy', 'active', 1),
             ('r9', 'group', 'frozen', 2))
  AS v(id, room_type, status, idle);

INSERT INTO tools_chatmessage (message_type, content, file_url, file_size, is_edited,
                               is_deleted, is_read, created_at, updated_at, sender_id, room_id)
SELECT message_type, 'hi', '', 0, false, false, false, now() - ago * interval '1 minute',
       now(), (SELECT min(id) FROM auth_user),
       (SELECT id FROM tools_chatroom WHERE room_id = room)
FROM (VALUES ('r1', 'text', 10), ('r1', 'text', 20), ('r1', 'text', 50), ('r1', 'text', 120),
             ('r1', 'text', 3 * 1440), ('r1', 'image', 30), ('r1', 'audio', 300),
             ('r1', 'audio', 301), ('r1', 'emoji', 2 * 1440), ('r1', 'sticker', 5),
             ('r1', 'voice', 400), ('r3', 'text', 20 * 60), ('r7', 'text', 1))
  AS v(room, message_type, ago);
"""

# The app unlocks a capsule by setting is_unlocked; is_locked stays true on every row.
LEGACY_DATA = """
INSERT INTO tools_timecapsule (title, content, emotions, keywords, capsule_type,
                               unlock_condition, unlock_time, unlock_event, visibility,
                               is_anonymous, images, audio, is_locked, is_unlocked,
                               unlock_count, created_at, updated_at, user_id)
SELECT '', 'sealed', '[]', '[]', capsule_type, condition,
       now() - ago * interval '1 minute', '', 'private', false, '[]', '', true, unlocked,
       0, now() - interval '30 days', now(), (SELECT min(id) FROM auth_user)
FROM (VALUES ('memory', 'time', 120, false), ('memory', 'time', 30, false),
             ('memory', 'time', 3 * 1440, true), ('wish', 'time', -5 * 1440, false),
             ('wish', 'location', NULL, false), ('secret', 'event', NULL, false),
             ('secret', 'time', 10 * 1440, false), ('secret', 'location', 2 * 1440, false),
             ('gift', 'time', NULL, false))
  AS v(capsule_type, condition, ago, unlocked);
"""


def zero_filled(labels: list[str], *values: list[str]) -> dict[tuple[tuple[str, str], ...],
                                                               float]:
    """Every combination of known values, at 0."""
    combos: list[tuple[str, ...]] = [()]
    for known in values:
        combos = [(*c, v) for c in combos for v in known]
    return {tuple(sorted(zip(labels, c, strict=True))): 0.0 for c in combos}


def expect(labels: list[str], known: list[list[str]],
           values: dict[tuple[str, ...], float]) -> dict[tuple[tuple[str, str], ...], float]:
    series = zero_filled(labels, *known)
    for combo, value in values.items():
        series[tuple(sorted(zip(labels, combo, strict=True)))] = float(value)
    return series


def test_defaults_on_both_schemas_empty_and_known(
    shaped_db: tuple[PostgresServer, bool], collectors: list[BusinessCollector]
) -> None:
    pg, legacy = shaped_db
    empty = settled(defaults_collector(pg, collectors), legacy)
    assert_no_failure(empty, legacy)
    assert family(empty, "qatoolbox_chat_messages_total") == expect(
        ["message_type"], [MESSAGE_TYPES], {})
    assert "# TYPE qatoolbox_chat_messages_total counter" in empty.text
    assert family(empty, "qatoolbox_chat_rooms") == expect(
        ["room_type", "status"], [ROOM_TYPES, ROOM_STATUSES], {})
    assert family(empty, "qatoolbox_users_by_status") == expect(["status"], [PRESENCE], {})
    assert empty.value("qatoolbox_chat_rooms_cleanup_overdue") == 0
    assert empty.value("qatoolbox_users_online") == 0
    for name in CAPSULE_QUERIES:
        assert empty.value(APPLICABLE, query=name) == (1 if legacy else 0)
    if legacy:
        assert family(empty, "qatoolbox_time_capsules") == expect(
            ["capsule_type", "state"], [CAPSULE_TYPES, ["locked", "unlocked"]], {})
    else:
        assert not family(empty, "qatoolbox_time_capsules")

    pg.execute(KNOWN_DATA + (LEGACY_DATA if legacy else ""), dbname=DB)
    known = settled(defaults_collector(pg, collectors), legacy)
    assert_no_failure(known, legacy)
    assert family(known, "qatoolbox_users") == expect(
        ["state"], [["active", "inactive"]], {("active",): 5, ("inactive",): 2})
    assert family(known, "qatoolbox_users_active") == expect(
        ["window"], [["1h", "24h", "7d"]], {("1h",): 1, ("24h",): 3, ("7d",): 4})
    # Online defined once: u1 (flag), u2 (heartbeat status), u3 (flag, busy); u6's status is
    # two hours old, so offline; the made-up status is counted under its own name.
    assert known.value("qatoolbox_users_online") == 3
    assert family(known, "qatoolbox_users_by_status") == expect(
        ["status"], [PRESENCE], {("online",): 3, ("away",): 1, ("offline",): 2,
                                 ("invisible",): 1})
    assert known.value("qatoolbox_users_by_status", status="online") == \
        known.value("qatoolbox_users_online")
    assert family(known, "qatoolbox_chat_rooms") == expect(
        ["room_type", "status"], [ROOM_TYPES, ROOM_STATUSES],
        {("private", "active"): 3, ("group", "expired"): 1, ("group", "ended"): 1,
         ("public", "waiting"): 1, ("system", "archived"): 1, ("legacy", "active"): 1,
         ("group", "frozen"): 1})
    assert known.value("qatoolbox_chat_rooms_cleanup_overdue") == 2  # r2 and r3
    assert family(known, "qatoolbox_chat_messages_stored") == expect(
        ["message_type"], [MESSAGE_TYPES],
        {("text",): 7, ("image",): 1, ("audio",): 2, ("emoji",): 1, ("voice",): 1,
         ("sticker",): 1})
    assert known.value("qatoolbox_chat_messages_last_hour") == 6
    # Sums over labels equal the rows counted.
    assert total(known, "qatoolbox_users") == count(pg, "auth_user")
    assert total(known, "qatoolbox_users_by_status") == count(pg, "tools_useronlinestatus")
    assert total(known, "qatoolbox_chat_rooms") == count(pg, "tools_chatroom")
    assert total(known, "qatoolbox_chat_messages_stored") == count(pg, "tools_chatmessage")
    if legacy:
        # State from is_unlocked (is_locked is true on every row, as the app leaves it).
        assert family(known, "qatoolbox_time_capsules") == expect(
            ["capsule_type", "state"], [CAPSULE_TYPES, ["locked", "unlocked"]],
            {("memory", "locked"): 2, ("memory", "unlocked"): 1, ("wish", "locked"): 2,
             ("secret", "locked"): 3, ("gift", "locked"): 1})
        assert total(known, "qatoolbox_time_capsules") == count(pg, "tools_timecapsule")
        assert known.value("qatoolbox_time_capsules_overdue") == 2


def test_values_past_the_bound_are_summed_under_other(
    shaped_db: tuple[PostgresServer, bool], collectors: list[BusinessCollector]
) -> None:
    """A client that sends a new message type with each message (the WebSocket consumer
    stores any) adds at most up to the bound: 20 message types, the rest under "other"."""
    pg, legacy = shaped_db
    pg.execute(KNOWN_DATA, dbname=DB)
    pg.execute("""
        INSERT INTO tools_chatmessage (message_type, content, file_url, file_size, is_edited,
                                       is_deleted, is_read, created_at, updated_at, sender_id,
                                       room_id)
        SELECT 'kind' || (g % 60), 'x', '', 0, false, false, false, now(), now(),
               (SELECT min(id) FROM auth_user), (SELECT min(id) FROM tools_chatroom)
        FROM generate_series(1, 600) AS g""", dbname=DB)
    found = settled(defaults_collector(pg, collectors), legacy)
    stored = family(found, "qatoolbox_chat_messages_stored")
    assert len(stored) == 21  # 8 known, 12 found, "other"
    assert total(found, "qatoolbox_chat_messages_stored") == count(pg, "tools_chatmessage")
    assert (found.value("qatoolbox_chat_messages_stored", message_type="other") or 0) >= 48 * 10


def test_hard_deletes_never_lower_a_counter_and_the_cleanup_signal(
    shaped_db: tuple[PostgresServer, bool], collectors: list[BusinessCollector]
) -> None:
    """QAToolBox's cleanup deletes idle rooms with their messages. No counter-typed series
    goes down across it; the cleanup signal is above 0 while the cleanup does not run and 0
    once it has."""
    pg, legacy = shaped_db
    pg.execute(KNOWN_DATA + (LEGACY_DATA if legacy else ""), dbname=DB)
    collector = defaults_collector(pg, collectors, interval=0.3)
    history: list[Scrape] = [settled(collector, legacy)]

    def counters(found: Scrape) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        kinds = {line.split()[2]: line.split()[3] for line in found.text.splitlines()
                 if line.startswith("# TYPE ")}
        return {key: v for key, v in found.samples.items() if kinds.get(key[0]) == "counter"}

    def later(what: str, check: Callable[[Scrape], bool]) -> Scrape:
        """Scrapes (kept in history) until check holds for a run that started after now."""
        since = time.time()
        result: list[Scrape] = []

        def ready() -> bool:
            result[:] = [settled(collector, legacy, runs_after=since)]
            history.append(result[0])
            return check(result[0])

        wait_for(ready, 30, what)
        return result[0]

    # Without the cleanup, the signal stays above 0 run after run.
    for _ in range(3):
        assert later("a later run", lambda s: True).value(
            "qatoolbox_chat_rooms_cleanup_overdue") == 2

    def sent(found: Scrape, kind: str) -> float:
        return found.value("qatoolbox_chat_messages_total", message_type=kind) or 0.0

    # New messages (an audio one, a made-up type) are counted once each, a run late.
    base = history[-1]
    pg.execute("""
        INSERT INTO tools_chatmessage (message_type, content, file_url, file_size, is_edited,
                                       is_deleted, is_read, created_at, updated_at, sender_id,
                                       room_id)
        SELECT t, 'x', '', 0, false, false, false, now(), now(), (SELECT min(id) FROM auth_user),
               (SELECT id FROM tools_chatroom WHERE room_id = 'r2')
        FROM unnest(ARRAY['text', 'text', 'audio', 'sticker']) AS t""", dbname=DB)
    grown = later("the new messages counted", lambda s: sent(s, "text") == sent(base, "text") + 2)
    assert sent(grown, "audio") == sent(base, "audio") + 1
    assert sent(grown, "sticker") == sent(base, "sticker") + 1
    # r2 got messages now: busy, no longer overdue.
    assert grown.value("qatoolbox_chat_rooms_cleanup_overdue") == 1

    # The demo's cleanup task, QAToolBox's rule: rooms whose last message (else activity) is
    # 12 hours old go, whatever their status, with their messages (r3 here).
    messages_before = count(pg, "tools_chatmessage")
    done = manage(pg, "shell", "-c", "from tools.tasks import cleanup_inactive_chat_rooms; "
                  "print(cleanup_inactive_chat_rooms())",
                  extra_env=LEGACY_ENV if legacy else None)
    assert done.stdout.strip().splitlines()[-1] == "2"  # r3, and r6 (idle 12.5 h)
    assert count(pg, "tools_chatmessage") < messages_before
    cleaned = later("the cleanup seen", lambda s: s.value(
        "qatoolbox_chat_rooms_cleanup_overdue") == 0)
    assert total(cleaned, "qatoolbox_chat_messages_stored") == count(pg, "tools_chatmessage")

    # More deletes, then more messages: still no counter goes down.
    pg.execute("DELETE FROM tools_chatmessage WHERE id IN (SELECT max(id) FROM tools_chatmessage)",
               dbname=DB)
    later("a run after the deletes", lambda s: True)
    for _ in range(2):
        later("more runs", lambda s: True)
    previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for found in history:
        now = counters(found)
        assert now, "no counter-typed series"
        for key, value in previous.items():
            assert now.get(key, 0.0) >= value, (key, value, now.get(key))
        previous = now


# --- the documented grants, run by psql as an operator runs them ---------------------------


def test_documented_grants_run_in_psql_on_both_schemas(
    shaped_db: tuple[PostgresServer, bool], workdir: Path
) -> None:
    """docs/reliability.md's block, run by psql with ON_ERROR_STOP on a fresh role, succeeds
    on QAToolBox at HEAD (no tools_timecapsule) and on a legacy database, and grants pg_monitor
    and the documented columns of the tables present, nothing else."""
    pg, legacy = shaped_db
    pg.execute(f"DROP OWNED BY {EXPORTER_ROLE}", dbname=DB)
    pg.execute(f"DROP OWNED BY {EXPORTER_ROLE}")
    pg.execute(f"DROP ROLE {EXPORTER_ROLE}")
    block = documented_block("least-privilege-sql").replace("'change-me'", "'psql-pw-7'")
    script = workdir / "role.sql"
    script.write_text(block)
    done = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(pg.port),
         "-U", "postgres", "-d", DB, "-f", str(script)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stderr, done.stderr
    granted = pg.execute(f"""
        SELECT table_name, string_agg(column_name, ',' ORDER BY column_name)
        FROM information_schema.column_privileges
        WHERE grantee = '{EXPORTER_ROLE}' AND privilege_type = 'SELECT'
        GROUP BY table_name ORDER BY table_name""", dbname=DB)
    expected = [("auth_user", "id,is_active,last_login"),
                ("tools_chatmessage", "created_at,id,message_type,room_id"),
                ("tools_chatroom", "id,last_activity,room_type,status")]
    if legacy:
        expected.append(("tools_timecapsule",
                         "capsule_type,id,is_unlocked,unlock_condition,unlock_time"))
    expected.append(("tools_useronlinestatus", "id,is_online,last_seen,status"))
    assert granted == expected
    tables = pg.execute(f"SELECT count(*) FROM information_schema.table_privileges "
                        f"WHERE grantee = '{EXPORTER_ROLE}'", dbname=DB)
    assert tables == [(0,)]  # column grants only
    roles = pg.execute(f"SELECT b.rolname FROM pg_auth_members m JOIN pg_roles r "
                       f"ON r.oid = m.member JOIN pg_roles b ON b.oid = m.roleid "
                       f"WHERE r.rolname = '{EXPORTER_ROLE}'")
    assert roles == [("pg_monitor",)]


# --- seed_demo, the views and the exporter ---------------------------------------------------


def test_seed_demo_views_and_exporter(
    shaped_db: tuple[PostgresServer, bool], exporter_factory: Callable[..., ExporterProcess],
    workdir: Path,
) -> None:
    pg, legacy = shaped_db
    extra = LEGACY_ENV if legacy else {}
    out = manage(pg, "seed_demo", "--users", "300", "--rooms", "200", "--messages", "3000",
                 "--capsules", "300", "--sessions", "20", "--seed", "7", extra_env=extra).stdout
    capsules = 300 if legacy else 0
    assert (f"seeded 300 users, 200 rooms, 3000 messages, {capsules} capsules, 20 sessions"
            in out)
    tables = ["auth_user", "tools_useronlinestatus", "tools_chatroom", "tools_chatmessage",
              "django_session"]
    if legacy:
        tables.append("tools_timecapsule")

    def counts() -> dict[str, int]:
        return {table: count(pg, table) for table in tables}

    assert counts() == {"auth_user": 300, "tools_useronlinestatus": 300, "tools_chatroom": 200,
                        "tools_chatmessage": 3000, "django_session": 20,
                        **({"tools_timecapsule": 300} if legacy else {})}
    assert pg.execute("SELECT to_regclass('tools_timecapsule') IS NOT NULL", dbname=DB) == [
        (legacy,)]

    # The views, through Django's test client on the real database.
    room_id, username = pg.execute(
        "SELECT r.room_id, u.username FROM tools_chatroom r, auth_user u "
        "WHERE r.status = 'active' AND u.is_active ORDER BY r.id, u.id LIMIT 1", dbname=DB)[0]
    env = {"DJANGO_ALLOWED_HOSTS": "testserver", "PYTHONPATH": str(DEMO), **extra}
    result = json.loads(manage(pg, "shell", "-c", VIEW_DRIVER,
                               extra_env={**env, "ROOM_ID": room_id, "USERNAME": username}
                               ).stdout.strip().splitlines()[-1])
    assert result == {
        "home": 200, "login_wrong": 401, "login": 200, "rooms": [200, True], "message": 201,
        "message_new_type": 201, "message_type_too_long": 400, "audio": 201, "recent": 200,
        "heartbeat": 200, "socket": 200, "slow": [200, 0.2], "fail": 500, "healthz": 200,
        "capsule": 201 if legacy else 404,
    }
    after = counts()
    assert after["tools_chatmessage"] == 3003
    assert after["django_session"] == 21  # the log-in
    stored = pg.execute("SELECT message_type, file_url <> '' FROM tools_chatmessage "
                        "ORDER BY id DESC LIMIT 3", dbname=DB)
    assert stored == [("audio", True), ("fax", False), ("text", False)]
    user = f"(SELECT id FROM auth_user WHERE username = '{username}')"
    # The heartbeat wrote status and last_seen, then the socket path the flag with its status.
    assert pg.execute(f"SELECT status, is_online, last_seen > now() - interval '1 minute' "
                      f"FROM tools_useronlinestatus WHERE user_id = {user}", dbname=DB) == [
        ("away", False, True)]

    # The exporter on the seeded database: every default series, consistent with the tables.
    others = {name: False for name in DEFAULTS if name != "business"}
    exporter = exporter_factory(config={"collectors": others}, env=pg.exporter_env(DB))
    found: list[Scrape] = []

    def ready() -> bool:
        found[:] = [exporter.scrape()]
        return all(found[0].value(SUCCESS, query=name) == 1 for name in HEAD_QUERIES) and all(
            found[0].value(APPLICABLE, query=name) == (1 if legacy else 0)
            for name in CAPSULE_QUERIES)

    wait_for(ready, 30, "the exporter's default queries")
    assert "permission denied" not in exporter.logs()
    scrape = found[0]
    assert_no_failure(scrape, legacy)
    assert total(scrape, "qatoolbox_users") == after["auth_user"]
    assert total(scrape, "qatoolbox_users_by_status") == after["tools_useronlinestatus"]
    assert total(scrape, "qatoolbox_chat_rooms") == after["tools_chatroom"]
    assert total(scrape, "qatoolbox_chat_messages_stored") == after["tools_chatmessage"]
    if legacy:
        assert total(scrape, "qatoolbox_time_capsules") == after["tools_timecapsule"]
        assert (scrape.value("qatoolbox_time_capsules_overdue") or 0) > 0
    for message_type in MESSAGE_TYPES:  # realistic data has every kind
        assert (scrape.value("qatoolbox_chat_messages_stored", message_type=message_type)
                or 0) > 0
    assert scrape.value("qatoolbox_chat_messages_stored", message_type="fax") == 1
    assert (scrape.value("qatoolbox_chat_rooms", room_type="private", status="expired")
            or 0) > 0
    online = scrape.value("qatoolbox_users_online") or 0
    assert online > 0 and online == scrape.value("qatoolbox_users_by_status", status="online")
    windows = [scrape.value("qatoolbox_users_active", window=w) or 0 for w in ("7d", "24h", "1h")]
    assert windows == sorted(windows, reverse=True) and windows[-1] >= 1
    # Seeded as QAToolBox leaves it: the cleanup runs, so nothing is overdue.
    assert scrape.value("qatoolbox_chat_rooms_cleanup_overdue") == 0
    # One info line per query that does not apply, none where it does.
    assert exporter.logs().count("business query not applicable") == (0 if legacy else 2)

    check = subprocess.run(["promtool", "check", "metrics"], input=scrape.text,
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        check.stdout + check.stderr


VIEW_DRIVER = r'''
import json, os
from django.apps import apps
from django.test import Client
room, user = os.environ["ROOM_ID"], os.environ["USERNAME"]
c = Client(raise_request_exception=False)
out = {}
out["home"] = c.get("/").status_code
out["login_wrong"] = c.post("/login/", {"username": user, "password": "nope"}).status_code
out["login"] = c.post("/login/", {"username": user, "password": "demo"}).status_code
r = c.get("/rooms/?status=active&limit=5")
out["rooms"] = [r.status_code, 0 < len(r.json()["rooms"]) <= 5]
out["message"] = c.post(f"/rooms/{room}/messages/", {"content": "hello"}).status_code
out["message_new_type"] = c.post(f"/rooms/{room}/messages/",
                                 {"content": "x", "message_type": "fax"}).status_code
out["message_type_too_long"] = c.post(f"/rooms/{room}/messages/",
                                      {"content": "x", "message_type": "f" * 21}).status_code
out["audio"] = c.post(f"/rooms/{room}/audio/").status_code
out["recent"] = c.get(f"/rooms/{room}/recent/").status_code
out["heartbeat"] = c.post("/chat/heartbeat/", {"status": "busy"}).status_code
out["socket"] = c.post("/chat/socket/presence/", {"status": "away", "room_id": room}).status_code
r = c.get("/slow/?seconds=0.2")
out["slow"] = [r.status_code, r.json()["slept_seconds"]]
out["fail"] = c.get("/fail/").status_code
out["healthz"] = c.get("/healthz").status_code
out["capsule"] = c.post("/capsules/", {"capsule_type": "wish"}).status_code
print(json.dumps(out))
'''
