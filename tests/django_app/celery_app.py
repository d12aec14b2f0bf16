# mypy: disable-error-code="untyped-decorator"
"""A Celery app for the tests: one task that succeeds, one that fails, one that retries once."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery  # type: ignore[import-untyped]

import exporter.instrument.celery  # noqa: F401  (connects the task signals)

app = Celery("qatb_tests", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:1/0"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1)


@app.task(name="tests.succeed")
def succeed(x: int) -> int:
    return x * 2


@app.task(name="tests.fail")
def fail() -> None:
    raise ValueError("expected failure")


@app.task(name="tests.flaky", bind=True, max_retries=3, default_retry_delay=0)
def flaky(self: Any) -> str:
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return "done"
