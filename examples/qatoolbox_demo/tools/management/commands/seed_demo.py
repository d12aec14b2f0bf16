"""seed_demo: fill the database with realistic users, presence, rooms, messages and capsules."""

import datetime
import random
import uuid
from typing import Any, TypeVar

from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.utils import timezone

from tools.models import ChatMessage, ChatRoom, TimeCapsule, UserOnlineStatus

T = TypeVar("T")
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)

# Shares in a busy QAToolBox-like instance; what matters is that every label value occurs.
PRESENCE = {"online": 10, "busy": 3, "away": 5, "offline": 82}
ROOM_TYPES = {"private": 60, "group": 25, "public": 10, "system": 5}
ROOM_STATUSES = {"waiting": 5, "active": 30, "ended": 40, "inactive": 10, "archived": 10,
                 "deleted": 5}
MESSAGE_TYPES = {"text": 80, "image": 8, "file": 3, "voice": 4, "video": 2, "system": 3}
CAPSULE_TYPES = {"memory": 50, "wish": 30, "secret": 20}
UNLOCK_CONDITIONS = {"time": 80, "location": 10, "event": 10}
VISIBILITIES = {"private": 70, "public": 20, "anonymous": 10}
WORDS = ("hello", "anyone", "here", "coffee", "tonight", "deadline", "music", "photo", "trip",
         "weekend", "thanks", "great", "see", "you", "soon", "match", "random", "chat")


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

    help = "Fill the database with realistic demo data (users, rooms, messages, capsules)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--users", type=int, default=2000)
        parser.add_argument("--rooms", type=int, default=500)
        parser.add_argument("--messages", type=int, default=20000)
        parser.add_argument("--capsules", type=int, default=1000)
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
            capsules = self._capsules(rng, now, users, options["capsules"], batch)
        self.stdout.write(f"seeded {options['users']} users, {len(rooms)} rooms, "
                          f"{messages} messages, {capsules} capsules")

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
            status = pick(rng, PRESENCE)
            online = status != "offline"
            seen = recent(rng, now, HOUR, 5 * datetime.timedelta(minutes=1)) if online else \
                recent(rng, now, 60 * DAY, 3 * DAY)
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
            created = recent(rng, now, 60 * DAY, 7 * DAY)
            activity = created + (now - created) * rng.random()
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
                chunk.append(ChatMessage(
                    room=room, sender=rng.choice(users), message_type=pick(rng, MESSAGE_TYPES),
                    content=" ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
                    is_deleted=rng.random() < 0.02, is_read=rng.random() < 0.7,
                    created_at=sent,
                ))
            ChatMessage.objects.bulk_create(chunk)
            done += len(chunk)
        return done

    def _capsules(self, rng: random.Random, now: datetime.datetime, users: list[User],
                  count: int, batch: int) -> int:
        new = []
        for _ in range(count):
            created = recent(rng, now, 365 * DAY, 90 * DAY)
            condition = pick(rng, UNLOCK_CONDITIONS)
            unlock_time = None
            if condition == "time":
                unlock_time = created + datetime.timedelta(hours=rng.uniform(1, 24 * 180))
            # Due capsules are mostly opened by QAToolBox's unlock job; a few lag behind.
            due = unlock_time is not None and unlock_time <= now
            opened = (due and rng.random() < 0.97) or (not due and rng.random() < 0.05)
            new.append(TimeCapsule(
                user=rng.choice(users), title=f"capsule {rng.randrange(100000)}",
                content=" ".join(rng.choices(WORDS, k=rng.randint(3, 30))),
                emotions=rng.sample(["joy", "hope", "calm", "nostalgia", "fear"], k=2),
                capsule_type=pick(rng, CAPSULE_TYPES), unlock_condition=condition,
                unlock_time=unlock_time, visibility=pick(rng, VISIBILITIES),
                is_locked=not opened, is_unlocked=opened, unlock_count=int(opened),
                created_at=created,
            ))
        TimeCapsule.objects.bulk_create(new, batch_size=batch)
        return len(new)
