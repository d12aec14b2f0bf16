"""The demo's Celery tasks, after QAToolBox's periodic jobs."""

import datetime

from celery import shared_task
from django.utils import timezone

from tools.models import ChatRoom, TimeCapsule

ROOM_MAX_AGE = datetime.timedelta(hours=24)


@shared_task(name="tools.cleanup_expired_chat_rooms")
def cleanup_expired_chat_rooms() -> int:
    """End chat rooms that have been active for more than 24 hours; return how many."""
    now = timezone.now()
    return ChatRoom.objects.filter(status="active", created_at__lt=now - ROOM_MAX_AGE).update(
        status="ended", ended_at=now, updated_at=now)


@shared_task(name="tools.unlock_due_capsules")
def unlock_due_capsules() -> int:
    """Unlock time capsules whose unlock time has passed; return how many."""
    due = TimeCapsule.objects.filter(is_locked=True, unlock_condition="time",
                                     unlock_time__lte=timezone.now())
    count = 0
    for capsule in due[:500]:
        capsule.unlock()
        count += 1
    return count
