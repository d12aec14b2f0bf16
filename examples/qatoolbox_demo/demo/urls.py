"""URL configuration: the tools app, and the legacy time capsules when that module is on."""

from django.apps import apps
from django.urls import include, path

urlpatterns = [
    path("", include("tools.urls")),
]
if apps.is_installed("legacy_capsules"):
    urlpatterns.append(path("", include("legacy_capsules.urls")))
