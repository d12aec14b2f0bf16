"""Views with known behaviour: fast, slow, DB-heavy, failing."""

from __future__ import annotations

import time
from typing import Any

from django.db import connection  # type: ignore[import-untyped]
from django.http import HttpResponse, JsonResponse  # type: ignore[import-untyped]


def home(request: Any) -> Any:
    return HttpResponse("home")


def fast(request: Any) -> Any:
    return HttpResponse("ok")


def item(request: Any, item_id: int) -> Any:
    if item_id >= 1000:
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse({"id": item_id})


def room(request: Any, room_id: str) -> Any:
    return JsonResponse({"room": room_id})


def slow(request: Any) -> Any:
    time.sleep(min(float(request.GET.get("s", "0.12")), 5.0))
    return HttpResponse("slow")


def queries(request: Any) -> Any:
    count = int(request.GET.get("n", "60"))
    with connection.cursor() as cursor:
        for _ in range(count):
            cursor.execute("SELECT 1")
    return HttpResponse(str(count))


def boom(request: Any) -> Any:
    raise RuntimeError("boom")


def healthz(request: Any) -> Any:
    return HttpResponse("ok")
