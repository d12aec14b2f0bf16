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
