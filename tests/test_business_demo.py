"""QAToolBox defaults on the demo app's real schema: exact values, seed_demo, views, exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import DEFAULTS
from exporter.collectors.business import BusinessCollector
from exporter.config import load_config
from tests.harness import ROOT, ExporterProcess, PostgresServer, Scrape, wait_for

DEMO = ROOT / "examples" / "qatoolbox_demo"
DB = "qatoolbox"
SUCCESS = "qatoolbox_business_query_success"
DEFAULT_NAMES = [
    "qatoolbox_users", "qatoolbox_users_active", "qatoolbox_users_online",
    "qatoolbox_users_by_status", "qatoolbox_chat_rooms", "qatoolbox_chat_rooms_stale",
    "qatoolbox_chat_messages_total", "qatoolbox_chat_messages_last_hour",
    "qatoolbox_time_capsules", "qatoolbox_time_capsules_overdue",
]
ROOM_TYPES = ["private", "group", "public", "system"]
ROOM_STATUSES = ["waiting", "active", "ended", "inactive", "archived", "deleted"]
MESSAGE_TYPES = ["text", "image", "file", "voice", "video", "system"]
CAPSULE_TYPES = ["memory", "wish", "secret"]


def manage(pg: PostgresServer, *args: str, extra_env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run the demo's manage.py against pg's qatoolbox database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env.update(pg.env(DB))
    env.update(extra_env or {})
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=DEMO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def demo_db(postgres: PostgresServer) -> PostgresServer:
    """The postgres fixture with a qatoolbox database migrated by the demo's migrations, and
    the least-privilege role of docs/reliability.md (the doc's SQL, read from the doc), which
    the exporter connects as: the demo app itself stays the tables' owner."""
    postgres.execute(f"CREATE DATABASE {DB}")
    manage(postgres, "migrate", "--verbosity", "0")
    granted = postgres.create_exporter_role(DB)
    assert len(granted) == 5, granted  # every documented grant found its table
    return postgres


@pytest.fixture
def collectors() -> Iterator[list[BusinessCollector]]:
    made: list[BusinessCollector] = []
    yield made
    for collector in made:
        collector.close(timeout=10)


def defaults_collector(pg: PostgresServer, made: list[BusinessCollector]) -> BusinessCollector:
    config = load_config(None, pg.exporter_env(DB), DEFAULTS)
    collector = BusinessCollector(config.business, config.postgres)
    made.append(collector)
    return collector


def scrape_all(collector: BusinessCollector) -> Scrape:
    """Scrape until every default query has succeeded."""
    found: list[Scrape] = []

    def ready() -> bool:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        found[:] = [Scrape(generate_latest(registry).decode())]
        return all(found[0].value(SUCCESS, query=name) == 1 for name in DEFAULT_NAMES)

    wait_for(ready, 30, "every default query to succeed")
    return found[0]


def serve(scrape: Scrape) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The default metrics' samples only (no self metrics), keyed without the `server` label
    the exporter adds to every business sample (exporter/fleet.py)."""
    return {(name, tuple(kv for kv in labels if kv[0] != "server")): value
            for (name, labels), value in scrape.samples.items() if name in DEFAULT_NAMES}


def expected_series(values: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                     float]:
    """Every series of every default metric, zero unless values (name -> value or
    {labels tuple -> value}) says otherwise."""
    layout: dict[str, tuple[list[str], list[tuple[str, ...]]]] = {
        "qatoolbox_users": (["state"], [("active",), ("inactive",)]),
        "qatoolbox_users_active": (["window"], [("1h",), ("24h",), ("7d",)]),
        "qatoolbox_users_online": ([], [()]),
        "qatoolbox_users_by_status": (["status"], [(s,) for s in
                                                   ["online", "busy", "away", "offline"]]),
        "qatoolbox_chat_rooms": (["room_type", "status"],
                                 [(t, s) for t in ROOM_TYPES for s in ROOM_STATUSES]),
        "qatoolbox_chat_rooms_stale": ([], [()]),
        "qatoolbox_chat_messages_total": (["message_type"], [(t,) for t in MESSAGE_TYPES]),
        "qatoolbox_chat_messages_last_hour": ([], [()]),
        "qatoolbox_time_capsules": (["capsule_type", "state"],
                                    [(t, s) for t in CAPSULE_TYPES
                                     for s in ("locked", "unlocked")]),
        "qatoolbox_time_capsules_overdue": ([], [()]),
    }
    series = {}
    for name, (labels, combos) in layout.items():
        given = values.get(name, {})
        for combo in combos:
            value = given if not isinstance(given, dict) else given.get(combo, 0)
            key = (name, tuple(sorted(zip(labels, combo, strict=True))))
            series[key] = float(value)
    return series


# Known data: ages are minutes before the database's now(), far from every window edge.
KNOWN_DATA = """
INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name,
                       email, is_staff, is_active, date_joined)
SELECT '!', now() - ago * interval '1 minute', false, name, '', '', '', false, active,
       now() - interval '30 days'
FROM (VALUES ('u1', 30, true), ('u2', 300, true), ('u3', 3 * 1440, true),
             ('u4', 10 * 1440, true), ('u5', NULL, true), ('u6', 120, false),
             ('u7', NULL, false)) AS v(name, ago, active);

INSERT INTO tools_useronlinestatus (status, last_seen, is_typing, is_online, user_id)
SELECT status, now(), false, online, (SELECT id FROM auth_user WHERE username = name)
FROM (VALUES ('u1', 'online', true), ('u2', 'busy', true), ('u3', 'away', false),
             ('u4', 'offline', false), ('u5', 'offline', false), ('u6', 'online', true),
             ('u7', 'invisible', false)) AS v(name, status, online);

INSERT INTO tools_chatroom (room_id, name, description, room_type, status, max_members,
                            is_encrypted, last_activity, created_at, updated_at, user1_id)
SELECT id, id, '', room_type, status, 100, false, now(), now() - ago * interval '1 minute',
       now(), (SELECT min(id) FROM auth_user)
FROM (VALUES ('r1', 'private', 'active', 120), ('r2', 'private', 'active', 30 * 60),
             ('r3', 'group', 'active', 3 * 1440), ('r4', 'group', 'ended', 5 * 1440),
             ('r5', 'public', 'waiting', 60), ('r6', 'system', 'archived', 10 * 1440),
             ('r7', 'private', 'active', 25 * 60), ('r8', 'legacy', 'active', 5 * 1440))
  AS v(id, room_type, status, ago);

INSERT INTO tools_chatmessage (message_type, content, file_url, file_size, is_edited,
                               is_deleted, is_read, created_at, updated_at, sender_id, room_id)
SELECT message_type, 'hi', '', 0, false, deleted, false, now() - ago * interval '1 minute',
       now(), (SELECT min(id) FROM auth_user), (SELECT min(id) FROM tools_chatroom)
FROM (VALUES ('text', 10, false), ('text', 20, true), ('text', 50, false),
             ('text', 120, false), ('text', 3 * 1440, false), ('image', 30, false),
             ('voice', 300, false), ('voice', 301, false), ('system', 2 * 1440, false))
  AS v(message_type, ago, deleted);

INSERT INTO tools_timecapsule (title, content, emotions, keywords, capsule_type,
                               unlock_condition, unlock_time, unlock_event, visibility,
                               is_anonymous, images, audio, is_locked, is_unlocked,
                               unlock_count, created_at, updated_at, user_id)
SELECT '', 'sealed', '[]', '[]', capsule_type, condition,
       now() - ago * interval '1 minute', '', 'private', false, '[]', '', locked, NOT locked,
       0, now() - interval '30 days', now(), (SELECT min(id) FROM auth_user)
FROM (VALUES ('memory', 'time', 120, true), ('memory', 'time', 30, true),
             ('memory', 'time', 3 * 1440, false), ('wish', 'time', -5 * 1440, true),
             ('wish', 'location', NULL, true), ('secret', 'event', NULL, true),
             ('secret', 'time', 10 * 1440, true), ('secret', 'location', 2 * 1440, true))
  AS v(capsule_type, condition, ago, locked);
"""

KNOWN_VALUES: dict[str, Any] = {
    "qatoolbox_users": {("active",): 5, ("inactive",): 2},
    "qatoolbox_users_active": {("1h",): 1, ("24h",): 3, ("7d",): 4},
    "qatoolbox_users_online": 3,
    "qatoolbox_users_by_status": {("online",): 2, ("busy",): 1, ("away",): 1, ("offline",): 2},
    "qatoolbox_chat_rooms": {("private", "active"): 3, ("group", "active"): 1,
                             ("group", "ended"): 1, ("public", "waiting"): 1,
                             ("system", "archived"): 1},
    "qatoolbox_chat_rooms_stale": 3,
    "qatoolbox_chat_messages_total": {("text",): 5, ("image",): 1, ("voice",): 2,
                                      ("system",): 1},
    "qatoolbox_chat_messages_last_hour": 4,
    "qatoolbox_time_capsules": {("memory", "locked"): 2, ("memory", "unlocked"): 1,
                                ("wish", "locked"): 2, ("secret", "locked"): 3},
    "qatoolbox_time_capsules_overdue": 2,
}


def test_defaults_exact_on_empty_and_known_data(
    demo_db: PostgresServer, collectors: list[BusinessCollector]
) -> None:
    empty = scrape_all(defaults_collector(demo_db, collectors))
    assert serve(empty) == expected_series({})
    assert "# TYPE qatoolbox_chat_messages_total counter" in empty.text

    demo_db.execute(KNOWN_DATA, dbname=DB)
    known = scrape_all(defaults_collector(demo_db, collectors))
    assert serve(known) == expected_series(KNOWN_VALUES)


def test_seed_demo_views_and_exporter(
    demo_db: PostgresServer, exporter_factory: Callable[..., ExporterProcess], workdir: Path,
    collectors: list[BusinessCollector],
) -> None:
    out = manage(demo_db, "seed_demo", "--users", "300", "--rooms", "200", "--messages",
                 "3000", "--capsules", "300", "--seed", "7").stdout
    assert "seeded 300 users, 200 rooms, 3000 messages, 300 capsules" in out

    def counts() -> dict[str, int]:
        return {table: int(demo_db.execute(f"SELECT count(*) FROM {table}", dbname=DB)[0][0])
                for table in ("auth_user", "tools_useronlinestatus", "tools_chatroom",
                              "tools_chatmessage", "tools_timecapsule")}

    assert counts() == {"auth_user": 300, "tools_useronlinestatus": 300, "tools_chatroom": 200,
                        "tools_chatmessage": 3000, "tools_timecapsule": 300}

    # The views, through Django's test client on the real database.
    room_id, username = demo_db.execute(
        "SELECT r.room_id, u.username FROM tools_chatroom r, auth_user u "
        "WHERE r.status = 'active' AND u.is_active ORDER BY r.id, u.id LIMIT 1", dbname=DB)[0]
    script = workdir / "drive_views.py"
    script.write_text(VIEW_DRIVER)
    env = {"DJANGO_ALLOWED_HOSTS": "testserver", "PYTHONPATH": str(DEMO)}
    result = json.loads(manage(demo_db, "shell", "-c", script.read_text(),
                               extra_env={**env, "ROOM_ID": room_id, "USERNAME": username}
                               ).stdout.strip().splitlines()[-1])
    assert result == {
        "login_wrong": 401, "login": 200, "rooms": [200, True], "message": 201,
        "message_bad_type": 400, "capsule": 201, "capsule_future": 201, "unlock": 200,
        "unlock_not_yet": 409, "slow": [200, 0.2], "fail": 500, "healthz": 200,
    }
    after = counts()
    assert after["tools_chatmessage"] == 3001 and after["tools_timecapsule"] == 302
    assert demo_db.execute(f"SELECT last_login > now() - interval '1 minute' FROM auth_user "
                           f"WHERE username = '{username}'", dbname=DB) == [(True,)]

    # The exporter on the seeded database: every default series, consistent with the tables.
    others = {name: False for name in DEFAULTS if name != "business"}
    exporter = exporter_factory(config={"collectors": others}, env=demo_db.exporter_env(DB))
    found: list[Scrape] = []

    def ready() -> bool:
        found[:] = [exporter.scrape()]
        return all(found[0].value(SUCCESS, query=name) == 1 for name in DEFAULT_NAMES)

    wait_for(ready, 30, "the exporter's default queries")
    assert "permission denied" not in exporter.logs()
    scrape = found[0]
    assert set(serve(scrape)) == set(expected_series({}))

    def total(name: str) -> float:
        return sum(v for (n, _), v in scrape.samples.items() if n == name)

    assert total("qatoolbox_users") == after["auth_user"]
    assert total("qatoolbox_users_by_status") == after["tools_useronlinestatus"]
    assert total("qatoolbox_chat_rooms") == after["tools_chatroom"]
    assert total("qatoolbox_chat_messages_total") == after["tools_chatmessage"]
    assert total("qatoolbox_time_capsules") == after["tools_timecapsule"]
    for message_type in MESSAGE_TYPES:  # realistic data has every kind
        assert (scrape.value("qatoolbox_chat_messages_total", message_type=message_type)
                or 0) > 0
    windows = [scrape.value("qatoolbox_users_active", window=w) or 0 for w in ("7d", "24h", "1h")]
    assert windows == sorted(windows, reverse=True) and windows[-1] >= 1
    assert (scrape.value("qatoolbox_chat_rooms_stale") or 0) > 0
    assert (scrape.value("qatoolbox_time_capsules_overdue") or 0) > 0

    check = subprocess.run(["promtool", "check", "metrics"], input=scrape.text,
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        check.stdout + check.stderr


VIEW_DRIVER = r'''
import json, os
from django.test import Client
room, user = os.environ["ROOM_ID"], os.environ["USERNAME"]
c = Client(raise_request_exception=False)
out = {}
out["login_wrong"] = c.post("/login/", {"username": user, "password": "nope"}).status_code
out["login"] = c.post("/login/", {"username": user, "password": "demo"}).status_code
r = c.get("/rooms/?status=active&limit=5")
out["rooms"] = [r.status_code, 0 < len(r.json()["rooms"]) <= 5]
out["message"] = c.post(f"/rooms/{room}/messages/", {"content": "hello"}).status_code
out["message_bad_type"] = c.post(f"/rooms/{room}/messages/",
                                 {"content": "x", "message_type": "fax"}).status_code
r = c.post("/capsules/", {"capsule_type": "wish", "unlock_in_seconds": "-60"})
out["capsule"] = r.status_code
ready = r.json()["id"]
r = c.post("/capsules/", {"capsule_type": "secret", "unlock_in_seconds": "3600"})
out["capsule_future"] = r.status_code
later = r.json()["id"]
out["unlock"] = c.post(f"/capsules/{ready}/unlock/").status_code
out["unlock_not_yet"] = c.post(f"/capsules/{later}/unlock/").status_code
r = c.get("/slow/?seconds=0.2")
out["slow"] = [r.status_code, r.json()["slept_seconds"]]
out["fail"] = c.get("/fail/").status_code
out["healthz"] = c.get("/healthz").status_code
print(json.dumps(out))
'''
