"""Routes of the legacy time capsules (mounted only when the module is on)."""

from django.urls import path

from legacy_capsules import views

urlpatterns = [
    path("capsules/", views.create_capsule, name="create-capsule"),
    path("capsules/<int:capsule_id>/unlock/", views.unlock_capsule, name="unlock-capsule"),
]
