"""App configuration of the tools app."""

from django.apps import AppConfig


class ToolsConfig(AppConfig):
    """The tools app (its label gives the tables their tools_ prefix)."""

    name = "tools"
    default_auto_field = "django.db.models.BigAutoField"
