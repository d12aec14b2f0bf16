"""The demo's routes."""

from django.urls import path

from tools import views

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("login/", views.login_view, name="login"),
    path("rooms/", views.room_list, name="room-list"),
    path("rooms/<str:room_id>/messages/", views.post_message, name="post-message"),
    path("capsules/", views.create_capsule, name="create-capsule"),
    path("capsules/<int:capsule_id>/unlock/", views.unlock_capsule, name="unlock-capsule"),
    path("slow/", views.slow, name="slow"),
    path("fail/", views.fail, name="fail"),
]
