"""The demo's routes; the site root is path("", ...), as QAToolBox routes its home page."""

from django.urls import path

from tools import views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("login/", views.login_view, name="login"),
    path("rooms/", views.room_list, name="room-list"),
    path("rooms/<str:room_id>/messages/", views.post_message, name="post-message"),
    path("rooms/<str:room_id>/recent/", views.room_messages, name="room-messages"),
    path("rooms/<str:room_id>/audio/", views.send_audio, name="send-audio"),
    path("chat/heartbeat/", views.heartbeat, name="heartbeat"),
    path("chat/socket/presence/", views.socket_presence, name="socket-presence"),
    path("slow/", views.slow, name="slow"),
    path("fail/", views.fail, name="fail"),
]
