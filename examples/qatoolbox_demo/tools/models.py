"""Models giving the tables QAToolBox's business metrics read, with QAToolBox's columns and indexes.

As at QAToolBox's HEAD (apps/tools/models/chat_models.py): the tools app's migration 0070
deleted TimeCapsule, which lives on only in the optional legacy_capsules app here.
Timestamps QAToolBox fills with auto_now_add or auto_now default to timezone.now here instead:
the columns are the same (Django sets no database default either way), and seed_demo can
write the past. The choices are the models' own: the application stores other values too
(message_type "audio" from the send-audio view, "emoji" in older rows, whatever a WebSocket
client sends; status "expired" from a cleanup task, any status a heartbeat sends).
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
    """One message in a room; deleted with its room by the cleanup."""

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
