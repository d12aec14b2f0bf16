"""The demo's Celery tasks, after QAToolBox's periodic jobs (apps/tools/tasks.py, its
cleanup_inactive_chatrooms command and services/async_service.py)."""

import datetime

from celery import shared_task
from django.apps import apps
from django.core.cache import cache
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from tools.models import ChatMessage, ChatRoom, UserOnlineStatus

# QAToolBox's cleanup deletes rooms idle for 12 hours (call_command(..., hours=12)).
ROOM_IDLE_HOURS = 12
# Its async_service marks rooms "expired" that are active and not updated for 24 hours.
ROOM_EXPIRE_AGE = datetime.timedelta(hours=24)
# Its update_user_online_status marks is_online rows offline after 5 minutes unseen.
PRESENCE_TIMEOUT = datetime.timedelta(minutes=5)
MONITORING_SECONDS = 3600


@shared_task(name="tools.cleanup_inactive_chat_rooms")
def cleanup_inactive_chat_rooms(hours: int = ROOM_IDLE_HOURS) -> int:
    """Delete the rooms, whatever their status, whose last message (else last activity) is
    older than `hours`, with their messages; return how many rooms."""
    threshold = timezone.now() - datetime.timedelta(hours=hours)
    rooms = ChatRoom.objects.annotate(last_message=Max("chatmessage__created_at"))
    idle = [room.pk for room in rooms if (room.last_message or room.last_activity
                                          or room.created_at) < threshold]
    with transaction.atomic():
        ChatMessage.objects.filter(room_id__in=idle).delete()
        ChatRoom.objects.filter(pk__in=idle).delete()
    return len(idle)


@shared_task(name="tools.cleanup_expired_chat_rooms")
def cleanup_expired_chat_rooms() -> int:
    """Mark "expired" the active rooms not updated for 24 hours; return how many."""
    expired = timezone.now() - ROOM_EXPIRE_AGE
    return ChatRoom.objects.filter(status="active", updated_at__lt=expired).update(
        status="expired")


@shared_task(name="tools.update_user_online_status")
def update_user_online_status() -> int:
    """Mark offline the is_online rows not seen for 5 minutes; rows the HTTP heartbeat set
    online (is_online never set) are left as they are, as in QAToolBox."""
    cutoff = timezone.now() - PRESENCE_TIMEOUT
    return UserOnlineStatus.objects.filter(is_online=True, last_seen__lt=cutoff).update(
        status="offline", is_online=False)


@shared_task(name="tools.unlock_due_capsules")
def unlock_due_capsules() -> int:
    """Unlock time capsules whose unlock time has passed (the legacy module only); return how
    many."""
    if not apps.is_installed("legacy_capsules"):
        return 0
    from legacy_capsules.models import TimeCapsule

    due = TimeCapsule.objects.filter(is_unlocked=False, unlock_condition="time",
                                     unlock_time__lte=timezone.now())
    count = 0
    for capsule in due[:500]:
        capsule.unlock()
        count += 1
    return count


@shared_task(name="demo.collect_monitoring_data")
def collect_monitoring_data() -> int:
    """QAToolBox's monitoring_data_collection_task: figures cached as single keys
    ("monitoring_data", "shard_stats"); on the default queue. Returns the rooms counted."""
    rooms = ChatRoom.objects.count()
    cache.set("monitoring_data", {"rooms": rooms, "at": timezone.now().isoformat()},
              MONITORING_SECONDS)
    cache.set("shard_stats", {"messages": ChatMessage.objects.count()}, MONITORING_SECONDS)
    return rooms
