"""gunicorn configuration of the test project: the two hooks from exporter.instrument."""

from exporter.instrument.gunicorn import child_exit, on_starting

__all__ = ["child_exit", "on_starting"]
