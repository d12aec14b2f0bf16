"""seed_demo: fill the database (and the cache) the way a running QAToolBox leaves them."""

import datetime
import random
import uuid
from typing import Any, TypeVar

from django.apps import apps
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.contrib.sessions.backends.cached_db import SessionStore
from django.core.cache import cache
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.utils import timezone

from tools.models import ChatMessage, ChatRoom, UserOnlineStatus
from tools.views import ROOM_MESSAGES_KEY, USER_KEY

T = TypeVar("T")
MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)

# How a presence row was last written, in a busy instance: the HTTP heartbeat (status only,
# is_online never set, so an "online" row it left stays online forever), the WebSocket
# consumer (is_online with the status), or nothing for a long time.
PRESENCE = {"offline": 62, "heartbeat_online": 7, "socket_online": 6, "busy": 3, "away": 5,
            "stale_heartbeat_online": 15, "invisible": 2}
ROOM_TYPES = {"private": 60, "group": 25, "public": 10, "system": 5}
# "expired" comes from QAToolBox's expiry task, not from the model's choices.
ROOM_STATUSES = {"waiting": 5, "active": 35, "ended": 30, "inactive": 10, "archived": 8,
                 "deleted": 4, "expired": 8}
# "audio" from the send-audio view (the model's choices say "voice", which only older rows
# have), "emoji" from older versions.
MESSAGE_TYPES = {"text": 78, "image": 7, "file": 3, "audio": 5, "voice": 1, "video": 2,
                 "emoji": 2, "system": 2}
CAPSULE_TYPES = {"memory": 50, "wish": 30, "secret": 20}
UNLOCK_CONDITIONS = {"time": 80, "location": 10, "event": 10}
VISIBILITIES = {"private": 70, "public": 20, "anonymous": 10}
WORDS = ("hello", "anyone", "here", "coffee", "tonight", "deadline", "music", "photo", "trip",
         "weekend", "thanks", "great", "see", "you", "soon", "match", "random", "chat")
# QAToolBox deletes rooms idle for 12 hours every 30 minutes: the rooms that exist were active
# within that, apart from a few idle just past it, waiting for the next run.
CLEANUP_AGE = 12 * HOUR


def pick(rng: random.Random, weights: dict[str, int]) -> str:
    """One key of weights, drawn in proportion to its weight."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def recent(rng: random.Random, now: datetime.datetime, span: datetime.timedelta,
           mean: datetime.timedelta) -> datetime.datetime:
    """A moment in the last span, recent ones likelier (exponential with the given mean)."""
    back = min(rng.expovariate(1 / mean.total_seconds()), span.total_seconds())
    return now - datetime.timedelta(seconds=back)


class Command(BaseCommand):
    """Insert demo data in bulk; sizes are arguments, the seed makes runs repeatable."""

    help = ("Fill the database with realistic demo data (users, presence, rooms, messages, "
            "sessions, and capsules when the legacy module is on).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--users", type=int, default=2000)
        parser.add_argument("--rooms", type=int, default=500)
        parser.add_argument("--messages", type=int, default=20000)
        parser.add_argument("--capsules", type=int, default=1000,
                            help="time capsules (only with QATOOLBOX_DEMO_LEGACY_CAPSULES=1)")
        parser.add_argument("--sessions", type=int, default=50,
                            help="logged-in sessions (cached_db: database and cache)")
        parser.add_argument("--seed", type=int, default=1, help="random seed (repeatable runs)")
        parser.add_argument("--password", default="demo",
                            help="password of every seeded user (hashed once)")
        parser.add_argument("--batch-size", type=int, default=2000)

    def handle(self, *args: Any, **options: Any) -> None:
        rng = random.Random(options["seed"])
        batch = options["batch_size"]
        now = timezone.now()
        with transaction.atomic():
            users = self._users(rng, now, options["users"], options["password"], batch)
            if not users:
                users = list(User.objects.all()[:10000])
            if not users:
                self.stdout.write("no users: nothing else to seed")
                return
            rooms = self._rooms(rng, now, users, options["rooms"], batch)
            messages = self._messages(rng, users, rooms, options["messages"], batch)
            capsules = 0
            if apps.is_installed("legacy_capsules"):
                capsules = self._capsules(rng, now, users, options["capsules"], batch)
            sessions = self._sessions(rng, users, options["sessions"])
        self._cache(rng, users, rooms)
        self.stdout.write(f"seeded {options['users']} users, {len(rooms)} rooms, "
                          f"{messages} messages, {capsules} capsules, {sessions} sessions")

    def _users(self, rng: random.Random, now: datetime.datetime, count: int, password: str,
               batch: int) -> list[User]:
        # Hashing once: a real hash per user would take minutes for thousands of users.
        hashed = make_password(password)
        prefix = f"demo{uuid.uuid4().hex[:6]}_"
        new = []
        for i in range(count):
            joined = recent(rng, now, 365 * DAY, 120 * DAY)
            last_login = None if rng.random() < 0.1 else max(joined, recent(rng, now, 60 * DAY,
                                                                            5 * DAY))
            new.append(User(username=f"{prefix}{i:06d}", password=hashed,
                            email=f"{prefix}{i:06d}@demo.invalid",
                            is_active=rng.random() < 0.95, date_joined=joined,
                            last_login=last_login))
        users = User.objects.bulk_create(new, batch_size=batch)
        presence = []
        for user in users:
            kind = pick(rng, PRESENCE)
            seen = recent(rng, now, 4 * MINUTE, MINUTE)
            status, online = kind, False
            if kind == "heartbeat_online":
                status = "online"
            elif kind == "socket_online":
                status, online = "online", True
            elif kind == "stale_heartbeat_online":
                status, seen = "online", recent(rng, now, 30 * DAY, 2 * DAY) - HOUR
            elif kind == "offline":
                seen = recent(rng, now, 60 * DAY, 3 * DAY)
            presence.append(UserOnlineStatus(user=user, status=status, is_online=online,
                                             last_seen=seen))
        UserOnlineStatus.objects.bulk_create(presence, batch_size=batch)
        return users

    def _rooms(self, rng: random.Random, now: datetime.datetime, users: list[User], count: int,
               batch: int) -> list[ChatRoom]:
        new = []
        for _ in range(count):
            room_type = pick(rng, ROOM_TYPES)
            status = pick(rng, ROOM_STATUSES)
            created = recent(rng, now, 30 * DAY, 2 * DAY)
            if rng.random() < 0.03:  # idle just past the cleanup age: the next run deletes it
                activity = now - CLEANUP_AGE - MINUTE * rng.uniform(1, 20)
            else:
                activity = recent(rng, now, CLEANUP_AGE - HOUR, 2 * HOUR)
            created = min(created, activity)
            new.append(ChatRoom(
                room_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                name=f"{room_type} room {rng.randrange(100000)}", room_type=room_type,
                status=status, user1=rng.choice(users),
                user2=rng.choice(users) if room_type == "private" else None,
                created_at=created, last_activity=activity,
                ended_at=activity if status == "ended" else None,
            ))
        return ChatRoom.objects.bulk_create(new, batch_size=batch)

    def _messages(self, rng: random.Random, users: list[User], rooms: list[ChatRoom],
                  count: int, batch: int) -> int:
        if not rooms:
            return 0
        done = 0
        while done < count:
            chunk = []
            for _ in range(min(batch, count - done)):
                room = rng.choice(rooms)
                sent = room.created_at + (room.last_activity - room.created_at) * rng.random()
                message_type = pick(rng, MESSAGE_TYPES)
                chunk.append(ChatMessage(
                    room=room, sender=rng.choice(users), message_type=message_type,
                    content=" ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
                    file_url=f"chat_audio/{uuid.uuid4()}.webm" if message_type == "audio" else "",
                    is_deleted=rng.random() < 0.02, is_read=rng.random() < 0.7,
                    created_at=sent,
                ))
            ChatMessage.objects.bulk_create(chunk)
            done += len(chunk)
        return done

    def _capsules(self, rng: random.Random, now: datetime.datetime, users: list[User],
                  count: int, batch: int) -> int:
        from legacy_capsules.models import TimeCapsule

        new = []
        for _ in range(count):
            created = recent(rng, now, 365 * DAY, 90 * DAY)
            condition = pick(rng, UNLOCK_CONDITIONS)
            unlock_time = None
            if condition == "time":
                unlock_time = created + datetime.timedelta(hours=rng.uniform(1, 24 * 180))
            # Due capsules are mostly opened by the unlock job; a few lag behind. Opening one
            # sets is_unlocked and leaves is_locked as it was, as QAToolBox did.
            due = unlock_time is not None and unlock_time <= now
            opened = (due and rng.random() < 0.97) or (not due and rng.random() < 0.05)
            new.append(TimeCapsule(
                user=rng.choice(users), title=f"capsule {rng.randrange(100000)}",
                content=" ".join(rng.choices(WORDS, k=rng.randint(3, 30))),
                emotions=rng.sample(["joy", "hope", "calm", "nostalgia", "fear"], k=2),
                capsule_type=pick(rng, CAPSULE_TYPES), unlock_condition=condition,
                unlock_time=unlock_time, visibility=pick(rng, VISIBILITIES),
                is_locked=True, is_unlocked=opened, unlock_count=int(opened),
                created_at=created,
            ))
        TimeCapsule.objects.bulk_create(new, batch_size=batch)
        return len(new)

    @staticmethod
    def _sessions(rng: random.Random, users: list[User], count: int) -> int:
        """Logged-in sessions as Django's login() leaves them, in django_session and (cached_db)
        in the cache under "django.contrib.sessions.cached_db<session key>"."""
        for user in rng.sample(users, min(count, len(users))):
            session = SessionStore()
            session["_auth_user_id"] = str(user.pk)
            session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
            session["_auth_user_hash"] = user.get_session_auth_hash()
            session.create()
        return min(count, len(users))

    @staticmethod
    def _cache(rng: random.Random, users: list[User], rooms: list[ChatRoom]) -> None:
        """The cache keys QAToolBox's code leaves: "user:<id>" of users seen lately,
        "chat_room:<room id>:messages" of rooms read lately, and single figures."""
        for user in rng.sample(users, min(40, len(users))):
            cache.set(USER_KEY.format(id=user.pk), {"status": "online"}, 3600)
        for room in rng.sample(rooms, min(30, len(rooms))):
            cache.set(ROOM_MESSAGES_KEY.format(room_id=room.room_id), [], 3600)
        cache.set("monitoring_data", {"rooms": len(rooms)}, 3600)
        cache.set("shard_stats", {"rooms": len(rooms)}, 3600)
