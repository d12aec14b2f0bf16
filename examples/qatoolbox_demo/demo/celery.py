"""The demo's Celery app: Redis broker from REDIS_URL, task metrics via exporter.instrument.

Worker, from examples/qatoolbox_demo (beat inside with -B):
    PROMETHEUS_MULTIPROC_DIR=/run/qatoolbox/metrics/celery celery -A demo worker -B
"""

import os

from celery import Celery

import exporter.instrument.celery  # noqa: F401  (connects the task signals)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "cleanup-expired-chat-rooms": {"task": "tools.cleanup_expired_chat_rooms",
                                       "schedule": 3600.0},
        "unlock-due-capsules": {"task": "tools.unlock_due_capsules", "schedule": 60.0},
    },
)
app.autodiscover_tasks(["tools"])
