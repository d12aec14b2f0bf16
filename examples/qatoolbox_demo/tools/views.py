"""JSON views of the demo: the home page, rooms, messages, voice messages, presence, log in, and
a slow and a failing view. Each writes what QAToolBox's own view of the same job writes."""

import json
import uuid
from typing import Any

from django.contrib.auth import authenticate, login
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from tools.models import ChatMessage, ChatRoom, UserOnlineStatus

MAX_SLOW_SECONDS = 10.0
# The message_type column's length: QAToolBox's WebSocket consumer stores whatever type the
# client sends, so any value up to it gets into the table.
MAX_TYPE_LENGTH = 20
# The cache keys QAToolBox's cache service uses ("user:<id>", "chat_room:<id>:messages"),
# behind Django's KEY_PREFIX "qatoolbox" and version 1 (demo/settings.py).
USER_KEY = "user:{id}"
ROOM_MESSAGES_KEY = "chat_room:{room_id}:messages"
CACHE_SECONDS = 300


def request_fields(request: HttpRequest) -> dict[str, Any]:
    """The request's fields, from a JSON body or a form."""
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    return request.POST.dict()


def acting_user(request: HttpRequest, body: dict[str, Any]) -> User | None:
    """The logged-in user, or (demo shortcut for load generators) the user named in the body."""
    if request.user.is_authenticated:
        return request.user  # type: ignore[return-value]
    username = body.get("username")
    return User.objects.filter(username=username).first() if username else None


@require_GET
def home(request: HttpRequest) -> JsonResponse:
    """The site root, routed as QAToolBox routes its home page: path("", home_view)."""
    return JsonResponse({"rooms": ChatRoom.objects.filter(status="active").count()})


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers."""
    return HttpResponse("ok\n", content_type="text/plain")


@require_POST
def login_view(request: HttpRequest) -> JsonResponse:
    """Log in with username and password: sets last_login (qatoolbox_users_active) and starts a
    session (cached_db: a row in django_session and a key in the Redis cache)."""
    body = request_fields(request)
    user = authenticate(request, username=body.get("username"), password=body.get("password"))
    if user is None:
        return JsonResponse({"error": "invalid credentials"}, status=401)
    login(request, user)
    return JsonResponse({"username": user.get_username()})


@require_GET
def room_list(request: HttpRequest) -> JsonResponse:
    """The most recently active rooms, optionally of one status and type."""
    rooms = ChatRoom.objects.all()
    if status := request.GET.get("status"):
        rooms = rooms.filter(status=status)
    if room_type := request.GET.get("room_type"):
        rooms = rooms.filter(room_type=room_type)
    try:
        limit = max(1, min(200, int(request.GET.get("limit", "50"))))
    except ValueError:
        limit = 50
    fields = ("room_id", "name", "room_type", "status", "last_activity")
    return JsonResponse({"rooms": list(rooms.values(*fields)[:limit])})


def _add_message(room: ChatRoom, sender: User, message_type: str, content: str,
                 file_url: str = "") -> ChatMessage:
    """Store a message and mark the room active now, as QAToolBox's views and consumer do."""
    now = timezone.now()
    with transaction.atomic():
        message = ChatMessage.objects.create(
            room=room, sender=sender, message_type=message_type, content=content,
            file_url=file_url, created_at=now)
        ChatRoom.objects.filter(pk=room.pk).update(last_activity=now, updated_at=now)
    cache.delete(ROOM_MESSAGES_KEY.format(room_id=room.room_id))
    return message


@require_POST
def post_message(request: HttpRequest, room_id: str) -> JsonResponse:
    """Post a message to a room that is not closed, of any type up to the column's length:
    this is the WebSocket consumer's path, which stores the type the client sends."""
    body = request_fields(request)
    room = get_object_or_404(ChatRoom, room_id=room_id)
    sender = acting_user(request, body) or room.user1
    message_type = str(body.get("message_type", "text"))
    if not 0 < len(message_type) <= MAX_TYPE_LENGTH:
        return JsonResponse({"error": f"message_type must be 1 to {MAX_TYPE_LENGTH} characters"},
                            status=400)
    if room.status in ("ended", "archived", "deleted", "expired"):
        return JsonResponse({"error": f"room is {room.status}"}, status=409)
    message = _add_message(room, sender, message_type, str(body.get("content", "")))
    return JsonResponse({"id": message.pk, "room_id": room.room_id}, status=201)


@require_POST
def send_audio(request: HttpRequest, room_id: str) -> JsonResponse:
    """A voice message, as QAToolBox's send-audio view stores it: message_type "audio" (its
    model's choices say "voice"), the file's path in file_url."""
    body = request_fields(request)
    room = get_object_or_404(ChatRoom, room_id=room_id)
    sender = acting_user(request, body) or room.user1
    if room.status in ("ended", "archived", "deleted", "expired"):
        return JsonResponse({"error": f"room is {room.status}"}, status=409)
    message = _add_message(room, sender, "audio", "voice message",
                           file_url=f"chat_audio/{uuid.uuid4()}.webm")
    return JsonResponse({"id": message.pk, "room_id": room.room_id}, status=201)


@require_GET
def room_messages(request: HttpRequest, room_id: str) -> JsonResponse:
    """A room's latest messages, cached under chat_room:<room_id>:messages."""
    key = ROOM_MESSAGES_KEY.format(room_id=room_id)
    messages = cache.get(key)
    if messages is None:
        room = get_object_or_404(ChatRoom, room_id=room_id)
        messages = list(ChatMessage.objects.filter(room=room).order_by("-created_at")
                        .values("id", "message_type", "content")[:20])
        cache.set(key, messages, CACHE_SECONDS)
    return JsonResponse({"messages": messages})


@require_POST
def heartbeat(request: HttpRequest) -> JsonResponse:
    """QAToolBox's HTTP heartbeat: writes the status the client sends (default "online") and
    last_seen, never is_online, so nothing marks such a row offline later."""
    body = request_fields(request)
    user = acting_user(request, body)
    if user is None:
        return JsonResponse({"error": "log in or give a username"}, status=401)
    status = str(body.get("status", "online"))[:MAX_TYPE_LENGTH]
    UserOnlineStatus.objects.update_or_create(
        user=user, defaults={"last_seen": timezone.now(), "status": status})
    cache.set(USER_KEY.format(id=user.pk), {"status": status}, CACHE_SECONDS)
    return JsonResponse({"status": status})


@require_POST
def socket_presence(request: HttpRequest) -> JsonResponse:
    """What QAToolBox's WebSocket consumer writes on a status message (the demo serves no
    WebSockets, so this view stands in for it): status, the current room and is_online, set
    only for "online"; last_seen moves as on every save of the row."""
    body = request_fields(request)
    user = acting_user(request, body)
    if user is None:
        return JsonResponse({"error": "log in or give a username"}, status=401)
    status = str(body.get("status", "online"))[:MAX_TYPE_LENGTH]
    room = ChatRoom.objects.filter(room_id=str(body.get("room_id", ""))).first()
    UserOnlineStatus.objects.update_or_create(user=user, defaults={
        "status": status, "current_room": room, "is_online": status == "online",
        "last_seen": timezone.now()})
    return JsonResponse({"status": status, "is_online": status == "online"})


@require_GET
def slow(request: HttpRequest) -> JsonResponse:
    """Deliberately slow: spends ?seconds= (default 1, at most 10) inside PostgreSQL."""
    try:
        seconds = max(0.0, min(MAX_SLOW_SECONDS, float(request.GET.get("seconds", "1"))))
    except ValueError:
        seconds = 1.0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])
    return JsonResponse({"slept_seconds": seconds})


@require_GET
def fail(request: HttpRequest) -> HttpResponse:
    """Deliberately fails: an unhandled exception, so a 500 and an error log line."""
    raise RuntimeError("deliberate failure (the demo's failing view)")
