"""WSGI entry point of the test project."""

import os

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_app.settings")
application = get_wsgi_application()
