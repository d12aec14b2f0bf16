"""gunicorn hooks: set up the shared metrics folder at start, clean up after a dead worker.

In gunicorn.conf.py:

    from exporter.instrument.gunicorn import child_exit, on_starting  # noqa: F401

with PROMETHEUS_MULTIPROC_DIR pointing at a folder of the app's own (on tmpfs, e.g.
/run/qatoolbox/metrics/web) that the exporter can read and write.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any

from exporter.instrument.fileformat import GAUGE_MODE, is_writer_ident, parse_name
from exporter.instrument.store import ENV_DIR, writer_alive

__all__ = ["child_exit", "mark_worker_dead", "on_starting", "setup_multiproc_dir"]


def setup_multiproc_dir(path: str | None = None, empty: bool = True, mode: int = 0o770) -> str:
    """Create the folder, export it as PROMETHEUS_MULTIPROC_DIR, and (by default) empty it.

    A folder this creates gets mode (0770: the app's user and a group the exporter may belong
    to, nobody else, as docs/app.md recommends), whatever the umask; an existing folder keeps
    its owner's choice. Emptying spares the files of processes that are still alive (another
    app server sharing the folder by mistake keeps its values), so it is safe to run at every
    start.
    """
    path = path or os.environ.get(ENV_DIR)
    if not path:
        raise ValueError(f"{ENV_DIR} is not set and no folder was given")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    else:
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    os.environ[ENV_DIR] = path
    if empty:
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                continue
            ident = _ident_of(name)
            if ident is not None and writer_alive(path, ident):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
    return path


def _ident_of(name: str) -> str | None:
    if name.endswith(".lock"):
        ident = name[:-5].lstrip(".")
        return ident if is_writer_ident(ident) else None
    parsed = parse_name(name)
    if parsed is not None and is_writer_ident(parsed[1]):
        return parsed[1]
    return None


def mark_worker_dead(pid: int, path: str | None = None) -> None:
    """Drop the live gauges (requests in flight) of a worker that exited.

    Counters and histograms stay: the exporter folds them into its accumulator files, so
    totals never go down. The exporter would also notice the death by itself (the worker's
    lock is gone); doing it here makes in-flight right at once.
    """
    path = path or os.environ.get(ENV_DIR)
    if not path:
        return
    for full in glob.glob(os.path.join(path, f"gauge_{GAUGE_MODE}_{pid}-*.db")):
        parsed = parse_name(os.path.basename(full))
        if parsed is not None and not writer_alive(path, parsed[1]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
    # Live gauges of plain prometheus_client metrics the app may record in the same folder.
    for full in glob.glob(os.path.join(path, f"gauge_live*_{pid}.db")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)


def on_starting(server: Any) -> None:
    """gunicorn hook (master, before workers start): prepare the metrics folder."""
    setup_multiproc_dir()


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master, after a worker exited)."""
    mark_worker_dead(worker.pid)
