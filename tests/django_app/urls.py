"""URL patterns, one include() so nested route templates are exercised."""

from django.urls import include, path  # type: ignore[import-untyped]

from tests.django_app import views

api = [
    path("items/<int:item_id>/", views.item),
    path("chat/rooms/<str:room_id>/", views.room),
]

urlpatterns = [
    path("", views.home),  # the site root, as QAToolBox routes its home page
    path("fast/", views.fast),
    path("slow/", views.slow),
    path("queries/", views.queries),
    path("boom/", views.boom),
    path("healthz", views.healthz),
    path("api/", include(api)),
]
