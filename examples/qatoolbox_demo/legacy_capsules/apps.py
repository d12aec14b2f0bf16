"""App configuration of the legacy time capsule module."""

from django.apps import AppConfig


class LegacyCapsulesConfig(AppConfig):
    """Time capsules, in the table QAToolBox's tools app gave them (tools_timecapsule)."""

    name = "legacy_capsules"
    default_auto_field = "django.db.models.BigAutoField"
