"""The time capsule model of QAToolBox before its tools migration 0070, in its old table."""

from django.contrib.auth.models import User
from django.db import models
from django.utils import timezone


class TimeCapsule(models.Model):
    """A message to the future, unlocked by time, place or event."""

    CAPSULE_TYPES = [
        ("memory", "Memory"),
        ("wish", "Wish"),
        ("secret", "Secret"),
    ]
    UNLOCK_CONDITIONS = [
        ("time", "At a time"),
        ("location", "At a place"),
        ("event", "On an event"),
    ]
    VISIBILITIES = [
        ("private", "Only me"),
        ("public", "Public"),
        ("anonymous", "Anonymous"),
    ]

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="time_capsules")
    title = models.CharField(max_length=200, blank=True)
    content = models.TextField()
    emotions = models.JSONField(default=list)
    location = models.JSONField(null=True, blank=True)
    weather = models.JSONField(null=True, blank=True)
    keywords = models.JSONField(default=list, blank=True)
    capsule_type = models.CharField(max_length=20, choices=CAPSULE_TYPES, default="memory")
    unlock_condition = models.CharField(max_length=20, choices=UNLOCK_CONDITIONS, default="time")
    unlock_time = models.DateTimeField(null=True, blank=True, db_index=True)
    unlock_location = models.JSONField(null=True, blank=True)
    unlock_event = models.CharField(max_length=200, blank=True)
    visibility = models.CharField(
        max_length=20, choices=VISIBILITIES, default="private", db_index=True
    )
    is_anonymous = models.BooleanField(default=False)
    images = models.JSONField(default=list, blank=True)
    audio = models.URLField(blank=True)
    is_locked = models.BooleanField(default=True)
    is_unlocked = models.BooleanField(default=False)
    unlock_count = models.IntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "tools_timecapsule"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["visibility", "created_at"]),
            models.Index(fields=["unlock_time", "unlock_condition"]),
        ]

    def __str__(self) -> str:
        return f"{self.capsule_type} capsule of {self.user_id}"

    def unlock(self) -> None:
        """Open the capsule as QAToolBox did: is_unlocked set, is_locked left as it was."""
        self.is_unlocked = True
        self.unlock_count += 1
        self.save(update_fields=["is_unlocked", "unlock_count", "updated_at"])
