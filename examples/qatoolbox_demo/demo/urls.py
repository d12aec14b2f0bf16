"""URL configuration: everything lives in the tools app."""

from django.urls import include, path

urlpatterns = [
    path("", include("tools.urls")),
]
