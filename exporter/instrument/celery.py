"""Celery task metrics from task signals; import this module where the Celery app is defined.

    import exporter.instrument.celery  # noqa: F401  (connects the signals)

Each worker process (prefork children included) writes its own files under
PROMETHEUS_MULTIPROC_DIR; a process that shuts down releases its files for the exporter to fold.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import signals  # type: ignore[import-untyped]

from exporter.instrument import recorder, shutdown

__all__ = ["STATES", "connect"]

# Celery's final states of a run -> the state label.
STATES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried",
          "REVOKED": "revoked", "REJECTED": "rejected", "IGNORED": "ignored"}

_started: dict[str, float] = {}
_started_lock = threading.Lock()


def _prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        with _started_lock:
            _started[task_id] = time.perf_counter()


def _postrun(task_id: str | None = None, task: Any = None, state: str | None = None,
             **_: Any) -> None:
    with _started_lock:
        start = _started.pop(task_id, None) if task_id is not None else None
    seconds = None if start is None else time.perf_counter() - start
    name = getattr(task, "name", None) or "<unknown>"
    recorder().task_finished(name, STATES.get(state or "", "other"), seconds)


def _process_shutdown(**_: Any) -> None:
    shutdown()


def connect() -> None:
    """Connect the signal handlers (done on import; calling again changes nothing)."""
    signals.task_prerun.connect(_prerun, weak=False, dispatch_uid="qatoolbox_prerun")
    signals.task_postrun.connect(_postrun, weak=False, dispatch_uid="qatoolbox_postrun")
    signals.worker_process_shutdown.connect(_process_shutdown, weak=False,
                                            dispatch_uid="qatoolbox_process_shutdown")
    signals.worker_shutdown.connect(_process_shutdown, weak=False,
                                    dispatch_uid="qatoolbox_worker_shutdown")


connect()
