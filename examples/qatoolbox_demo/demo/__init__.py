"""The QAToolBox demo project (settings, URLs, WSGI entry point)."""
