"""App collector: merges the metrics the application's workers record (exporter.instrument).

Each folder in app.multiprocess_dirs holds one set of files per worker process plus, per
metric type, one accumulator file `<type>_folded.db` holding everything dead workers counted.
On each scrape the collector folds the files of workers that are gone into the accumulators,
so the files read per scrape are those of live workers plus a constant few, however many
workers have come and gone. See docs/app.md for the crash-safety argument.

The folders are writable by the application's code, so every entry in them is hostile input:
how they are opened and listed safely is exporter/collectors/app_folder.py, how exited
workers' files are folded app_fold.py, and how the kept route set is saved app_routes.py.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.collectors.app_config import AppConfig
from exporter.collectors.app_fold import fold_folder, marker_ident, remove_dead_locks
from exporter.collectors.app_folder import (
    APP_PREFIXES,
    FOLDED_IDENT,
    LIVE_GAUGES,
    LOCK_WAIT,
    LOG_BURST,
    LOG_WINDOW,
    MAX_ROUTES,
    RESERVED_PREFIXES,
    Folder,
    Listing,
    UnusableFolderError,
    accumulator_name,
    open_folder,
    shown,
)
from exporter.collectors.app_routes import SavedRoutes
from exporter.instrument.fileformat import FOLDABLE_TYPES
from exporter.instrument.filemerge import FileInfo, FileMerger, MergePart
from exporter.instrument.safefiles import REFUSAL_REASONS, ReadBuffer, RefusedEntryError
from exporter.logs import OnChange

log = logging.getLogger("exporter.collectors.app")


@dataclass
class _DirResult:
    up: bool = False
    workers: int = 0
    files: int = 0
    part: MergePart | None = None
    paths: set[str] = field(default_factory=set)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)


class _RefusalLog:
    """One log line per refused entry and reason while it stays in the folder (again if it
    comes back), at most LOG_BURST lines a minute; the rest wait for the next minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logged: dict[str, set[tuple[str, str]]] = {}
        self._window = -math.inf
        self._lines = 0
        self._held = False

    def report(self, directory: str, refused: dict[tuple[str, str], str]) -> None:
        logged = self._logged.setdefault(directory, set())
        logged.intersection_update(refused)
        for key, detail in refused.items():
            if key in logged:
                continue
            if not self._take():
                return
            logged.add(key)
            name, reason = key
            log.warning("app metrics file refused",
                        extra={"dir": directory, "file": shown(name), "reason": reason,
                               "detail": shown(detail)})

    def _take(self) -> bool:
        now = self._clock()
        if now - self._window >= LOG_WINDOW:
            self._window, self._lines, self._held = now, 0, False
        if self._lines < LOG_BURST:
            self._lines += 1
            return True
        if not self._held:
            self._held = True
            log.warning("more app metrics files refused than are logged; the others follow at "
                        f"up to {LOG_BURST} lines a minute "
                        "(qatoolbox_app_files_rejected_total counts them all)")
        return False


class AppCollector:
    """Merges the app's worker files; also reports on the folders themselves.

        qatoolbox_http_requests_total{route="api/chat/rooms/<str:id>/",method="GET",status="200"} 2
        qatoolbox_http_request_duration_seconds_bucket{route="...",method="GET",le="0.1"} 9
        qatoolbox_http_requests_in_flight 1
        qatoolbox_celery_tasks_total{task="chat.cleanup_expired_rooms",state="succeeded"} 3
        qatoolbox_app_multiprocess_dir_up{dir="/run/qatoolbox/metrics/web"} 1
        qatoolbox_app_workers{dir="/run/qatoolbox/metrics/web"} 3
        qatoolbox_app_workers_folded_total{dir="/run/qatoolbox/metrics/web"} 17
        qatoolbox_app_files_rejected_total{dir="/run/qatoolbox/metrics/web",reason="symlink"} 0
    """

    name = "app"

    def __init__(self, config: AppConfig, reserved_names: Iterable[str] = (),
                 repeat_interval: float = 300.0) -> None:
        """reserved_names: further families the exporter serves (the business queries');
        repeat_interval: log.repeat_interval, how often a lasting problem is logged again."""
        self._dirs = config.multiprocess_dirs
        self._compact = config.compact
        self._merger = FileMerger(route_limit=MAX_ROUTES, reserved_prefixes=RESERVED_PREFIXES,
                                  allowed_prefixes=APP_PREFIXES, reserved_names=reserved_names)
        self._folded = dict.fromkeys(self._dirs, 0)
        self._rejected = {d: dict.fromkeys(REFUSAL_REASONS, 0) for d in self._dirs}
        self._refusal_log = _RefusalLog()
        # Files are read through this, a window at a time (scrapes of one collector never
        # overlap: the scrape runner runs one collection at a time).
        self._buffer = ReadBuffer()
        # A folder's problems and fold errors, logged as every collector logs a failure.
        self._folder_log = OnChange(repeat_interval)
        # The kept routes are saved in app.state_dir when it is set, else in each folder.
        self._routes = SavedRoutes(self._merger, config.state_dir or None,
                                   compact=self._compact, log_on_change=self._folder_log)
        for directory in self._dirs:
            self._check_at_start(directory)
        self._merger.adopt(self._routes.load_state_dir())

    def _check_at_start(self, directory: str) -> None:
        """Log what is wrong with a folder's ownership and mode (docs/app.md)."""
        try:
            fd, info = open_folder(directory)
        except UnusableFolderError as exc:
            self._problem(directory, str(exc))
            return
        os.close(fd)
        mode, owner, me = stat.S_IMODE(info.st_mode), info.st_uid, os.geteuid()
        if mode & stat.S_IWOTH:
            log.warning("app metrics folder is writable by every user (sticky); files of "
                        "other owners are refused",
                        extra={"dir": directory, "mode": f"{mode:04o}", "owner_uid": owner})
        elif mode & stat.S_IWGRP and owner in (0, me):
            log.warning("app metrics folder is owned by root or the exporter and writable by "
                        "its group: files the app writes as a group member are refused for "
                        "their owner; make the app's user the folder's owner",
                        extra={"dir": directory, "mode": f"{mode:04o}", "owner_uid": owner})
        if self._compact and not os.access(directory, os.W_OK | os.X_OK,
                                           effective_ids=os.access in os.supports_effective_ids):
            log.warning("app metrics folder is not writable by the exporter: exited workers' "
                        "files cannot be folded (reads grow with worker restarts)",
                        extra={"dir": directory, "mode": f"{mode:04o}", "owner_uid": owner,
                               "exporter_uid": me})

    def _problem(self, directory: str, problem: str | None) -> None:
        """Log a folder becoming unusable (when it starts, changes, or again after
        repeat_interval) and usable again (once)."""
        if problem is None:
            if self._folder_log.clear(("unusable", directory)):
                log.info("app metrics folder usable again", extra={"dir": directory})
        elif self._folder_log.changed(("unusable", directory), problem):
            log.warning("app metrics folder unusable", extra={"dir": directory,
                                                               "problem": problem})

    def _fold_error(self, directory: str, error: str | None) -> None:
        if error is None:
            self._folder_log.clear(("fold", directory))
        elif self._folder_log.changed(("fold", directory), error):
            log.warning("app metrics folder could not be folded; it serves nothing until it "
                        "can", extra={"dir": directory, "err": error})

    def collect(self) -> Iterator[Metric]:
        """Fold, read and merge every folder."""
        if not self._dirs:
            return
        results = {d: self._read_dir(d) for d in self._dirs}
        self._routes.save_state_dir()
        self._routes.note_full()
        yield from self._merger.families(
            [r.part for r in results.values() if r.up and r.part is not None])
        self._merger.forget(set().union(*(r.paths for r in results.values())))
        up = GaugeMetricFamily("qatoolbox_app_multiprocess_dir_up",
                               "Whether the app's metrics folder could be read in full.",
                               labels=["dir"])
        workers = GaugeMetricFamily("qatoolbox_app_workers",
                                    "App processes with live metrics files in the folder.",
                                    labels=["dir"])
        files = GaugeMetricFamily("qatoolbox_app_multiprocess_files",
                                  "Metrics files read from the folder in this scrape.",
                                  labels=["dir"])
        folded = CounterMetricFamily("qatoolbox_app_workers_folded",
                                     "Exited app processes whose files this exporter folded "
                                     "into the folder's accumulators.", labels=["dir"])
        rejected = CounterMetricFamily("qatoolbox_app_files_rejected",
                                       "Entries of the app's metrics folder refused, by reason, "
                                       "at every scrape that finds them.",
                                       labels=["dir", "reason"])
        for directory, result in results.items():
            up.add_metric([directory], 1.0 if result.up else 0.0)
            workers.add_metric([directory], float(result.workers))
            files.add_metric([directory], float(result.files))
            folded.add_metric([directory], float(self._folded[directory]))
            counts = self._rejected[directory]
            for _, reason in result.refused:
                counts[reason] += 1
            for reason, count in counts.items():
                rejected.add_metric([directory, reason], float(count))
            self._refusal_log.report(directory, result.refused)
        yield from (up, workers, files, folded, rejected)

    def _read_dir(self, directory: str) -> _DirResult:
        result = _DirResult()
        try:
            fd, info = open_folder(directory)
        except UnusableFolderError as exc:
            self._problem(directory, str(exc))
            return result
        folder = Folder(fd, directory, info.st_uid, self._buffer)
        lock_fd = None
        try:
            listing = folder.listing()
            self._problem(directory, None)
            lock_fd = folder.open_lock()
            alive = {ident: folder.writer_alive(ident) for ident in listing.workers}
            dead = [ident for ident, live in alive.items() if not live]
            if (dead or listing.bare_locks or listing.tmps) and self._compact and \
                    lock_fd is not None and _try_lock(lock_fd, fcntl.LOCK_EX):
                # Under the lock: another exporter may have folded these meanwhile.
                listing = folder.listing()
                self._fold(folder, [i for i in dead if i in listing.workers], listing)
                listing = folder.listing()
                alive = {ident: alive[ident] if ident in alive else folder.writer_alive(ident)
                         for ident in listing.workers}
            # Readers share the lock: a fold elsewhere never runs halfway through this read.
            if lock_fd is not None and not _try_lock(lock_fd, fcntl.LOCK_SH, LOCK_WAIT):
                # Another exporter holds the folder (a fold, or it is stuck): skip this
                # folder for this scrape rather than read it halfway through a fold.
                return result
            if self._routes.state_dir is None and not self._merger.routes_full():
                # Before any route of this folder is decided: the set saved here (by this
                # exporter before a restart, or by another one reading the same folder).
                self._merger.adopt(self._routes.load_folder(folder))
            self._read_files(folder, listing, alive, result)
            if self._routes.state_dir is None and self._compact and lock_fd is not None:
                self._routes.save_folder(folder, listing)
        except UnusableFolderError as exc:
            self._problem(directory, str(exc))
            result.part = None
            return result
        except (OSError, ValueError, RefusedEntryError):
            # A file we cannot read or parse: serve nothing from this folder rather than
            # totals that are too low (Prometheus would take the drop for a counter reset).
            result.part = None
            return result
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(fd)
            result.refused = folder.refused
        result.up = True
        return result

    def _fold(self, folder: Folder, dead: list[str], listing: Listing) -> None:
        """Fold under the exclusive lock; an error (a full disk) takes the folder down for
        this scrape, logged once until a fold succeeds again."""
        directory = folder.path
        try:
            self._folded[directory] += fold_folder(folder, dead, listing.names, self._merger)
            remove_dead_locks(folder, listing.bare_locks, time.time())
            for name in listing.tmps:
                # Under the exclusive lock nobody is writing one: a dead exporter's leftover.
                folder.unlink(name)
        except (OSError, ValueError) as exc:
            self._fold_error(directory, exc.strerror if isinstance(exc, OSError) and
                             exc.strerror else str(exc))
            raise
        self._fold_error(directory, None)

    def _read_files(self, folder: Folder, listing: Listing, alive: dict[str, bool],
                    result: _DirResult) -> None:
        result.part = self._merger.part()
        folded: dict[str, set[str]] = {}
        for prefix in FOLDABLE_TYPES:
            info = self._read(folder, accumulator_name(prefix), prefix, FOLDED_IDENT, result,
                              rewritten=True)
            folded[prefix] = set() if info is None else {
                i for i in map(marker_ident, info.markers) if i}
        self._read(folder, accumulator_name(LIVE_GAUGES), LIVE_GAUGES, FOLDED_IDENT, result,
                   rewritten=True)
        for ident, names in listing.workers.items():
            live = alive.get(ident, False)
            result.workers += live
            for name in names:
                prefix = name[:-3].rpartition("_")[0]
                if prefix in FOLDABLE_TYPES:
                    if ident in folded[prefix]:
                        # Already in the accumulator (a fold stopped before deleting it).
                        continue
                elif not live:
                    # A dead worker's gauges (requests in flight) are no longer true: its
                    # series count as 0 (the fold keeps them at 0 in the gauge accumulator).
                    self._read(folder, name, prefix, ident, result, zero=True)
                    continue
                self._read(folder, name, prefix, ident, result)
        for name in listing.foreign:
            prefix, _, ident = name[:-3].rpartition("_")
            self._read(folder, name, prefix, ident, result)
        # The routes first seen in this folder are kept or folded now that all its files
        # are read (the busiest kept first).
        self._merger.settle(result.part)

    def _read(self, folder: Folder, name: str, prefix: str, ident: str, result: _DirResult, *,
              rewritten: bool = False, zero: bool = False) -> FileInfo | None:
        """Add one file's values to the folder's part; None when it is gone or skipped. Raises
        RefusedEntryError when the folder cannot be served this scrape."""
        assert result.part is not None
        path = os.path.join(folder.path, name)
        try:
            with folder.data(name) as opened:
                if opened is None:
                    return None
                data, stat_info = opened
                info = self._merger.add(result.part, path, data, stat_info.st_ino, prefix,
                                        ident=ident, mtime=stat_info.st_mtime_ns,
                                        rewritten=rewritten, zero=zero)
        except FileNotFoundError:
            # Removed since the listing: a dead worker's gauges (gunicorn child_exit), an app
            # restart emptying the folder, or no accumulator yet.
            return None
        for reason, offender in info.refused:
            folder.refuse(name, reason, f"declares {offender}")
        result.files += 1
        result.paths.add(path)
        return info


def _try_lock(fd: int, kind: int, wait: float = 0.0) -> bool:
    """Take the folder lock without ever blocking for long (a stopped peer holds it forever)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
