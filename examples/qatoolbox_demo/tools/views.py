"""JSON views of the demo: rooms, messages, capsules, log in, and a slow and a failing view."""

import datetime
import json
from typing import Any

from django.contrib.auth import authenticate, login
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from tools.models import ChatMessage, ChatRoom, TimeCapsule

MAX_SLOW_SECONDS = 10.0


def _body(request: HttpRequest) -> dict[str, Any]:
    """The request's fields, from a JSON body or a form."""
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}
    return request.POST.dict()


def _acting_user(request: HttpRequest, body: dict[str, Any]) -> User | None:
    """The logged-in user, or (demo shortcut for load generators) the user named in the body."""
    if request.user.is_authenticated:
        return request.user  # type: ignore[return-value]
    username = body.get("username")
    return User.objects.filter(username=username).first() if username else None


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers."""
    return HttpResponse("ok\n", content_type="text/plain")


@require_POST
def login_view(request: HttpRequest) -> JsonResponse:
    """Log in with username and password (sets last_login, which qatoolbox_users_active reads)."""
    body = _body(request)
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


@require_POST
def post_message(request: HttpRequest, room_id: str) -> JsonResponse:
    """Post a message to a room that is not closed."""
    body = _body(request)
    room = get_object_or_404(ChatRoom, room_id=room_id)
    sender = _acting_user(request, body) or room.user1
    message_type = body.get("message_type", "text")
    if message_type not in dict(ChatMessage.MESSAGE_TYPES):
        return JsonResponse({"error": f"unknown message_type {message_type!r}"}, status=400)
    if room.status in ("ended", "archived", "deleted"):
        return JsonResponse({"error": f"room is {room.status}"}, status=409)
    now = timezone.now()
    with transaction.atomic():
        message = ChatMessage.objects.create(
            room=room, sender=sender, message_type=message_type,
            content=str(body.get("content", "")), created_at=now,
        )
        ChatRoom.objects.filter(pk=room.pk).update(last_activity=now, updated_at=now)
    return JsonResponse({"id": message.pk, "room_id": room.room_id}, status=201)


@require_POST
def create_capsule(request: HttpRequest) -> JsonResponse:
    """Create a time capsule; unlock_in_seconds sets a time condition's unlock time."""
    body = _body(request)
    user = _acting_user(request, body)
    if user is None:
        return JsonResponse({"error": "log in or give a username"}, status=401)
    capsule_type = body.get("capsule_type", "memory")
    condition = body.get("unlock_condition", "time")
    if capsule_type not in dict(TimeCapsule.CAPSULE_TYPES) or \
            condition not in dict(TimeCapsule.UNLOCK_CONDITIONS):
        return JsonResponse({"error": "unknown capsule_type or unlock_condition"}, status=400)
    unlock_time = None
    if condition == "time":
        try:
            seconds = float(body.get("unlock_in_seconds", 86400))
        except (TypeError, ValueError):
            return JsonResponse({"error": "unlock_in_seconds must be a number"}, status=400)
        unlock_time = timezone.now() + datetime.timedelta(seconds=seconds)
    capsule = TimeCapsule.objects.create(
        user=user, title=str(body.get("title", "")), content=str(body.get("content", "")),
        capsule_type=capsule_type, unlock_condition=condition, unlock_time=unlock_time,
        visibility=body.get("visibility", "private"),
    )
    return JsonResponse({"id": capsule.pk, "unlock_time": unlock_time}, status=201)


@require_POST
def unlock_capsule(request: HttpRequest, capsule_id: int) -> JsonResponse:
    """Unlock a capsule whose time has come (any location or event capsule, in this demo)."""
    with transaction.atomic():
        capsule = get_object_or_404(TimeCapsule.objects.select_for_update(), pk=capsule_id)
        if not capsule.is_locked:
            return JsonResponse({"id": capsule.pk, "state": "unlocked"})
        if capsule.unlock_condition == "time" and capsule.unlock_time and \
                capsule.unlock_time > timezone.now():
            return JsonResponse({"error": "not yet", "unlock_time": capsule.unlock_time},
                                status=409)
        capsule.unlock()
    return JsonResponse({"id": capsule.pk, "state": "unlocked"})


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
