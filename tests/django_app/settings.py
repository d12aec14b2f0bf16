"""Settings of the test project: the middleware first, SQLite in QATB_TEST_DB (or memory)."""

import os

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.django_app.urls"
USE_TZ = True
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "exporter.instrument.django.PrometheusMiddleware",
    "django.middleware.common.CommonMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("QATB_TEST_DB", ":memory:"),
    }
}
QATOOLBOX_METRICS_SKIP_PATHS = ("/healthz",)
LOGGING = {"version": 1, "disable_existing_loggers": True,
           "handlers": {"null": {"class": "logging.NullHandler"}},
           "root": {"handlers": ["null"]},
           "loggers": {"django": {"handlers": ["null"], "propagate": False}}}
