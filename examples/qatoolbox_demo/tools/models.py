"""Models giving the tables QAToolBox's business metrics read, with QAToolBox's columns and indexes.

Timestamps QAToolBox fills with auto_now_add default to timezone.now here instead: the columns
are the same (Django sets no database default either way), and seed_demo can write the past.
"""

from django.contrib.auth.models import User
from django.db import models
from django.utils import timezone


class ChatRoom(models.Model):
    """A private, group, public or system chat room."""

    ROOM_TYPES = [
        ("private", "Private"),
        ("group", "Group"),
        ("public", "Public"),
        ("system", "System"),
    ]
    STATUSES = [
        ("waiting", "Waiting for a match"),
        ("active", "Active"),
        ("ended", "Ended"),
        ("inactive", "Inactive"),
        ("archived", "Archived"),
        ("deleted", "Deleted"),
    ]

    room_id = models.CharField(max_length=100, unique=True, blank=True)
    name = models.CharField(max_length=200, null=True, blank=True)
    description = models.TextField(blank=True)
    room_type = models.CharField(max_length=20, choices=ROOM_TYPES, default="private")
    status = models.CharField(max_length=20, choices=STATUSES, default="active")
    user1 = models.ForeignKey(User, on_delete=models.CASCADE, related_name="chat_rooms_as_user1")
    user2 = models.ForeignKey(
        User, on_delete=models.CASCADE, related_name="chat_rooms_as_user2", null=True, blank=True
    )
    max_members = models.IntegerField(default=100)
    is_encrypted = models.BooleanField(default=False)
    last_activity = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_activity"]
        indexes = [
            models.Index(fields=["room_type", "status"]),
            models.Index(fields=["user1", "status"]),
            models.Index(fields=["last_activity"]),
        ]

    def __str__(self) -> str:
        return f"{self.name or self.room_id} ({self.room_type})"


class ChatMessage(models.Model):
    """One message in a room; deletion only sets is_deleted."""

    MESSAGE_TYPES = [
        ("text", "Text"),
        ("image", "Image"),
        ("file", "File"),
        ("voice", "Voice"),
        ("video", "Video"),
        ("system", "System message"),
    ]

    room = models.ForeignKey(ChatRoom, on_delete=models.CASCADE)
    sender = models.ForeignKey(User, on_delete=models.CASCADE)
    message_type = models.CharField(max_length=20, choices=MESSAGE_TYPES, default="text")
    content = models.TextField()
    file_url = models.URLField(blank=True)
    file_size = models.IntegerField(default=0)
    reply_to = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True)
    is_edited = models.BooleanField(default=False)
    is_deleted = models.BooleanField(default=False)
    is_read = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["room", "created_at"]),
            models.Index(fields=["sender", "created_at"]),
            models.Index(fields=["message_type", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.sender_id}: {self.content[:50]}"


class UserOnlineStatus(models.Model):
    """A user's presence: status and whether they are online now."""

    STATUSES = [
        ("online", "Online"),
        ("busy", "Busy"),
        ("away", "Away"),
        ("offline", "Offline"),
    ]

    user = models.OneToOneField(User, on_delete=models.CASCADE)
    status = models.CharField(max_length=20, choices=STATUSES, default="offline", db_index=True)
    last_seen = models.DateTimeField(default=timezone.now)
    is_typing = models.BooleanField(default=False)
    current_room = models.ForeignKey(ChatRoom, on_delete=models.SET_NULL, null=True, blank=True)
    is_online = models.BooleanField(default=False)
    match_number = models.CharField(max_length=4, null=True, blank=True, db_index=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["status", "last_seen"]),
            models.Index(fields=["is_online", "last_seen"]),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}: {self.status}"


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
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["visibility", "created_at"]),
            models.Index(fields=["unlock_time", "unlock_condition"]),
        ]

    def __str__(self) -> str:
        return f"{self.capsule_type} capsule of {self.user_id}"

    def unlock(self) -> None:
        """Open the capsule (both flags: QAToolBox keeps is_locked and is_unlocked)."""
        self.is_locked = False
        self.is_unlocked = True
        self.unlock_count += 1
        self.save(update_fields=["is_locked", "is_unlocked", "unlock_count", "updated_at"])
