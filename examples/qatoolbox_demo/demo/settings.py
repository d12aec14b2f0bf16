"""Settings of the QAToolBox demo: PostgreSQL from QAToolBox's DB_* variables, JSON views only."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A demo, never deployed: the fallback key only keeps `manage.py` working without setup.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "qatoolbox-demo-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "tools",
]
# Time capsules are gone from QAToolBox since its tools migration 0070; an older deployment
# still has their table. Off by default, as at HEAD; "1" adds tools_timecapsule back.
LEGACY_CAPSULES = os.environ.get("QATOOLBOX_DEMO_LEGACY_CAPSULES", "") == "1"
if LEGACY_CAPSULES:
    INSTALLED_APPS.append("legacy_capsules")

# No CsrfViewMiddleware: the views are a JSON API driven by load generators, not forms.
MIDDLEWARE = [
    # First, so its time covers the other middleware (exporter.instrument, see docs/app.md).
    "exporter.instrument.django.PrometheusMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

# Liveness probes are not traffic.
QATOOLBOX_METRICS_SKIP_PATHS = ("/healthz",)

ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"

# The same variables QAToolBox reads, so the exporter and the app find one database.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("DB_NAME", "qatoolbox"),
        "USER": os.environ.get("DB_USER", "postgres"),
        "PASSWORD": os.environ.get("DB_PASSWORD", ""),
        "HOST": os.environ.get("DB_HOST", "localhost"),
        "PORT": os.environ.get("DB_PORT", "5432"),
        "CONN_MAX_AGE": 60,
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# QAToolBox's production cache: Redis at REDIS_URL, KEY_PREFIX "qatoolbox" (keys are
# "qatoolbox:1:<key>"), sessions in it and in the database (cached_db). QAToolBox uses
# django-redis; Django's own Redis backend names keys the same way (prefix:version:key) and
# needs no extra package. Without REDIS_URL (manage.py migrate in tests) a local-memory cache
# keeps the demo off any Redis it was not pointed at.
if os.environ.get("REDIS_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["REDIS_URL"],
            "KEY_PREFIX": "qatoolbox",
            "TIMEOUT": 300,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                          "KEY_PREFIX": "qatoolbox"}}
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"
SESSION_CACHE_ALIAS = "default"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "WARNING")},
}
