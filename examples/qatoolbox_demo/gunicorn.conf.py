"""gunicorn settings of the demo: several workers recording into PROMETHEUS_MULTIPROC_DIR.

Run from this folder:
    PROMETHEUS_MULTIPROC_DIR=/run/qatoolbox/metrics/web gunicorn demo.wsgi:application
The exporter reads that folder (app.multiprocess_dirs). on_starting creates and empties it;
child_exit drops a dead worker's in-flight count at once.
"""

import os

from exporter.instrument.gunicorn import child_exit, on_starting

__all__ = ["bind", "child_exit", "on_starting", "timeout", "workers"]

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "3"))
timeout = 30
# Restart workers now and then, as production does: the exporter folds the files they leave.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
max_requests_jitter = max_requests // 10
