"""App collector: merges the metrics the application's workers record (exporter.instrument).

Each folder in app.multiprocess_dirs holds one set of files per worker process plus, per
metric type, one accumulator file `<type>_folded.db` holding everything dead workers counted.
On each scrape the collector folds the files of workers that are gone into the accumulators,
so the files read per scrape are those of live workers plus a constant few, however many
workers have come and gone. See docs/app.md for the crash-safety argument.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter.config import AppConfig
from exporter.instrument._merge import MARKER_PREFIX, FileMerger, FileValues
from exporter.instrument._store import (
    FOLDABLE_TYPES,
    GAUGE_MODE,
    is_writer_ident,
    lock_held,
    lock_path,
    mmap_key,
    parse_name,
    read_entries,
    write_file,
    writer_alive,
)

DIR_LOCK = ".qatoolbox-exporter.lock"
# Routes with series of their own (~57 series each); the requests of any further route are
# summed under route="<other>", so the series budget holds however many routes the app has
# (docs/bench-compare.md).
MAX_ROUTES = 50
# How long a read waits for another exporter's fold of the same folder.
LOCK_WAIT = 1.0
# A bare `.lock.tmp` file younger than this may belong to a writer that is starting.
BARE_TMP_LOCK_AGE = 60.0
LIVE_GAUGES = f"gauge_{GAUGE_MODE}"
FOLDED_IDENT = "folded"
_MARKER = MARKER_PREFIX + "folded__"


def accumulator_path(directory: str, prefix: str) -> str:
    """Where the dead workers' values of one metric type are kept."""
    return os.path.join(directory, f"{prefix}_{FOLDED_IDENT}.db")


def marker_key(ident: str) -> str:
    """The accumulator entry recording that ident's file of that type is already in it."""
    return mmap_key(_MARKER, ident, {}, "")


def marker_ident(key: str) -> str | None:
    """The worker ident a marker key names, or None for a metric key."""
    if not key.startswith(f'["{_MARKER}"'):
        return None
    return str(json.loads(key)[1])


@dataclass
class _Listing:
    """A folder's files by role."""

    workers: dict[str, list[str]] = field(default_factory=dict)  # ident -> data file names
    foreign: list[str] = field(default_factory=list)  # plain prometheus_client files
    # Lock files of writers without data files: a writer that died between creating its
    # lock and its first data file leaves only these (`<ident>.lock`, `.<ident>.lock.tmp`).
    bare_locks: list[str] = field(default_factory=list)


def _list(directory: str) -> _Listing:
    listing = _Listing()
    locks: dict[str, str] = {}
    for name in os.listdir(directory):
        parsed = parse_name(name)
        if parsed is None:
            ident = name.removeprefix(".").removesuffix(".tmp").removesuffix(".lock")
            if name.endswith((".lock", ".lock.tmp")) and is_writer_ident(ident):
                locks[name] = ident
            continue
        ident = parsed[1]
        if ident == FOLDED_IDENT:
            continue
        if is_writer_ident(ident):
            listing.workers.setdefault(ident, []).append(name)
        else:
            listing.foreign.append(name)
    listing.bare_locks = [name for name, ident in locks.items() if ident not in listing.workers]
    return listing


def _remove_dead_locks(directory: str, names: list[str], now: float) -> None:
    """Delete bare lock files nobody holds. A `.tmp` one is left alone for a minute: its writer
    may be between creating it and locking it."""
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".tmp") and now - os.stat(path).st_mtime < BARE_TMP_LOCK_AGE:
                continue
            if lock_held(path):
                continue  # its writer lives
            os.unlink(path)
        except FileNotFoundError:
            continue


def fold(directory: str, dead: list[str]) -> int:
    """Fold dead workers' counters and histograms into the accumulators, then delete their files.

    Caller holds the folder lock exclusively. Returns how many workers were folded. Safe to
    interrupt anywhere: each accumulator is replaced atomically together with its record of
    which workers' files it contains, and files are deleted only after that.
    """
    if not dead:
        return 0
    present = set(os.listdir(directory))
    for prefix in FOLDABLE_TYPES:
        path = accumulator_path(directory, prefix)
        values: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):
            values.update(read_entries(path))
        folded = {ident for ident in map(marker_ident, values) if ident is not None}
        changed = False
        for ident in dead:
            name = f"{prefix}_{ident}.db"
            if name not in present or ident in folded:
                continue
            try:
                entries = list(read_entries(os.path.join(directory, name)))
            except FileNotFoundError:
                continue
            for key, value in entries:
                values[key] = values.get(key, 0.0) + value
            values[marker_key(ident)] = 1.0
            changed = True
        # A marker is only needed while its source file exists (a fold interrupted between
        # replacing the accumulator and deleting the sources); drop the others.
        for ident in folded:
            if f"{prefix}_{ident}.db" not in present:
                del values[marker_key(ident)]
                changed = True
        if changed:
            write_file(path, list(values.items()))
    _fold_gauge_names(directory, dead, present)
    for ident in dead:
        for name in present:
            parsed = parse_name(name)
            if parsed is not None and parsed[1] == ident:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
        # The lock file goes last: while data files remain it marks them as of a dead writer.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(directory, ident))
    return len(dead)


def _fold_gauge_names(directory: str, dead: list[str], present: set[str]) -> None:
    """Keep the dead workers' gauge series, at 0, in a gauge accumulator.

    Their values are no longer true (nothing is in flight in a dead worker), but the series
    stay: `qatoolbox_http_requests_in_flight 0` rather than no series when no worker lives.
    Adding zeros twice changes nothing, so this needs no markers.
    """
    path = accumulator_path(directory, LIVE_GAUGES)
    values: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError):
        values.update(read_entries(path))
    known = len(values)
    for ident in dead:
        name = f"{LIVE_GAUGES}_{ident}.db"
        if name in present:
            with contextlib.suppress(FileNotFoundError):
                values.update((key, 0.0) for key, _ in read_entries(os.path.join(directory, name)))
    if len(values) != known:
        write_file(path, [(key, 0.0) for key in values])


@dataclass
class _DirResult:
    up: bool = False
    workers: int = 0
    files: int = 0
    files_read: list[FileValues] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)


class AppCollector:
    """Merges the app's worker files; also reports on the folders themselves.

        qatoolbox_http_requests_total{route="api/chat/rooms/<str:id>/",method="GET",status="200"} 2
        qatoolbox_http_request_duration_seconds_bucket{route="...",method="GET",le="0.1"} 9
        qatoolbox_http_requests_in_flight 1
        qatoolbox_celery_tasks_total{task="chat.cleanup_expired_rooms",state="succeeded"} 3
        qatoolbox_app_multiprocess_dir_up{dir="/run/qatoolbox/metrics/web"} 1
        qatoolbox_app_workers{dir="/run/qatoolbox/metrics/web"} 3
        qatoolbox_app_workers_folded_total{dir="/run/qatoolbox/metrics/web"} 17
    """

    name = "app"

    def __init__(self, config: AppConfig) -> None:
        self._dirs = config.multiprocess_dirs
        self._compact = config.compact
        self._merger = FileMerger(route_limit=MAX_ROUTES)
        self._folded = dict.fromkeys(self._dirs, 0)

    def collect(self) -> Iterator[Metric]:
        """Fold, read and merge every folder."""
        if not self._dirs:
            return
        results = {d: self._read_dir(d) for d in self._dirs}
        read = [f for r in results.values() if r.up for f in r.files_read]
        yield from self._merger.families(read)
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
        for directory, result in results.items():
            up.add_metric([directory], 1.0 if result.up else 0.0)
            workers.add_metric([directory], float(result.workers))
            files.add_metric([directory], float(result.files))
            folded.add_metric([directory], float(self._folded[directory]))
        yield from (up, workers, files, folded)

    def _read_dir(self, directory: str) -> _DirResult:
        result = _DirResult()
        try:
            listing = _list(directory)
        except OSError:
            return result
        lock_fd = _open_dir_lock(directory)
        try:
            alive = {ident: writer_alive(directory, ident) for ident in listing.workers}
            dead = [ident for ident, live in alive.items() if not live]
            if (dead or listing.bare_locks) and self._compact and lock_fd is not None and \
                    _try_lock(lock_fd, fcntl.LOCK_EX):
                # Under the lock: another exporter may have folded these meanwhile.
                listing = _list(directory)
                dead = [i for i in dead if i in listing.workers]
                self._folded[directory] += fold(directory, dead)
                _remove_dead_locks(directory, listing.bare_locks, time.time())
                listing = _list(directory)
                alive = {ident: alive[ident] if ident in alive else writer_alive(directory, ident)
                         for ident in listing.workers}
            # Readers share the lock: a fold elsewhere never runs halfway through this read.
            if lock_fd is not None and not _try_lock(lock_fd, fcntl.LOCK_SH, LOCK_WAIT):
                # Another exporter holds the folder (a fold, or it is stuck): skip this
                # folder for this scrape rather than read it halfway through a fold.
                return result
            self._read_files(directory, listing, alive, result)
        except (OSError, ValueError):
            # A file we cannot read or parse: serve nothing from this folder rather than
            # totals that are too low (Prometheus would take the drop for a counter reset).
            result.files_read = []
            return result
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        result.up = True
        return result

    def _read_files(self, directory: str, listing: _Listing, alive: dict[str, bool],
                    result: _DirResult) -> None:
        folded: dict[str, set[str]] = {}
        for prefix in FOLDABLE_TYPES:
            values = self._read(accumulator_path(directory, prefix), prefix, FOLDED_IDENT,
                                result, rewritten=True)
            folded[prefix] = set() if values is None else {
                i for i in map(marker_ident, values.markers) if i}
        self._read(accumulator_path(directory, LIVE_GAUGES), LIVE_GAUGES, FOLDED_IDENT, result,
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
                    self._read(os.path.join(directory, name), prefix, ident, result, zero=True)
                    continue
                self._read(os.path.join(directory, name), prefix, ident, result)
        for name in listing.foreign:
            prefix, _, ident = name[:-3].rpartition("_")
            self._read(os.path.join(directory, name), prefix, ident, result)

    def _read(self, path: str, prefix: str, ident: str, result: _DirResult, *,
              rewritten: bool = False, zero: bool = False) -> FileValues | None:
        try:
            values = self._merger.read(path, prefix, ident, rewritten)
            if zero:
                values = FileValues(values.slots, (0.0,) * len(values.values), values.simple,
                                    values.markers)
        except FileNotFoundError:
            # Removed since the listing: a dead worker's gauges (gunicorn child_exit), an app
            # restart emptying the folder, or no accumulator yet.
            return None
        result.files += 1
        result.files_read.append(values)
        result.paths.add(path)
        return values


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


def _open_dir_lock(directory: str) -> int | None:
    try:
        return os.open(os.path.join(directory, DIR_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        # A read-only folder: no folding, reads are still right (dead workers' files are
        # read as they are).
        return None
