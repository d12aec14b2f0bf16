"""JSON views of the legacy time capsules: create one, unlock one."""

import datetime

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.views.decorators.http import require_POST
from tools.views import acting_user, request_fields

from legacy_capsules.models import TimeCapsule


@require_POST
def create_capsule(request: HttpRequest) -> JsonResponse:
    """Create a time capsule; unlock_in_seconds sets a time condition's unlock time."""
    body = request_fields(request)
    user = acting_user(request, body)
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
        if capsule.is_unlocked:
            return JsonResponse({"id": capsule.pk, "state": "unlocked"})
        if capsule.unlock_condition == "time" and capsule.unlock_time and \
                capsule.unlock_time > timezone.now():
            return JsonResponse({"error": "not yet", "unlock_time": capsule.unlock_time},
                                status=409)
        capsule.unlock()
    return JsonResponse({"id": capsule.pk, "state": "unlocked"})
