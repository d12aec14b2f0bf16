"""A tiny Django project for the instrumentation tests (SQLite, no apps of its own)."""
