"""The demo's Celery app, configured as QAToolBox's (QAToolBox/celery.py): broker at REDIS_URL,
default queue "default", the tools app's tasks routed to "tools", the room cleanup every 30
minutes; task metrics via exporter.instrument.

Worker, from examples/qatoolbox_demo (beat inside with -B; it consumes both queues):
    PROMETHEUS_MULTIPROC_DIR=/run/qatoolbox/metrics/celery celery -A demo worker -B
"""

import os

from celery import Celery
from kombu import Queue

import exporter.instrument.celery  # noqa: F401  (connects the task signals)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

# Queues and routes, also used by clients that send the demo's tasks by name.
QUEUES = ("default", "tools")
ROUTES = {"tools.*": {"queue": "tools"}}

app = Celery("demo", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue="default",
    task_default_exchange="default",
    task_default_routing_key="default",
    task_queues=[Queue(name, routing_key=name) for name in QUEUES],
    task_routes=ROUTES,
    beat_schedule={
        "cleanup-inactive-chatrooms-every-30-minutes": {
            "task": "tools.cleanup_inactive_chat_rooms", "schedule": 1800.0},
        "cleanup-expired-chat-rooms": {"task": "tools.cleanup_expired_chat_rooms",
                                       "schedule": 3600.0},
        "update-user-online-status-every-5-minutes": {
            "task": "tools.update_user_online_status", "schedule": 300.0},
        "monitoring-data-collection-every-minute": {
            "task": "demo.collect_monitoring_data", "schedule": 60.0},
        "unlock-due-capsules": {"task": "tools.unlock_due_capsules", "schedule": 60.0},
    },
)
app.autodiscover_tasks(["tools"])
