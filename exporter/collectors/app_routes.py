"""The app collector's kept route set, saved so that a restarted exporter keeps the same routes
(docs/app.md, "The route cap"): in app.state_dir when that is set, else in each folder when the
exporter may write there (app.compact).

The saved file may have been written by anyone who can write the folder: it is read like any
folder entry (safefiles.open_entry), up to MAX_ROUTES_BYTES, and taken whole or not at all.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from exporter.collectors.app_folder import (
    MAX_ROUTES,
    ROUTES_FILE,
    STATE_ROUTES_FILE,
    Folder,
    Listing,
    shown,
)
from exporter.instrument.filemerge import FileMerger
from exporter.instrument.safefiles import (
    MALFORMED,
    TOO_LARGE,
    UNREADABLE,
    RefusedEntryError,
    open_entry,
    write_bytes_at,
)
from exporter.instrument.series import ROUTE_OVERFLOW
from exporter.logs import OnChange

log = logging.getLogger("exporter.collectors.app")

ROUTES_VERSION = 1
# A saved set is read only up to this size, and a route longer than this is not saved (a
# route template is a few dozen characters; 50 at the limit, as UTF-8, fit well within).
MAX_ROUTES_BYTES = 1 << 20
MAX_ROUTE_CHARS = 2048


class SavedRoutes:
    """Loads and saves the merger's kept routes; a failure to save is logged once per place
    and change, and never takes a folder down (it holds no counts)."""

    def __init__(self, merger: FileMerger, state_dir: str | None, *, compact: bool,
                 log_on_change: OnChange) -> None:
        self._merger = merger
        self.state_dir = state_dir
        self._compact = compact
        self._saved: dict[str, int] = {}  # where -> kept_generation last written there
        self._errors = log_on_change  # the collector's: one repeat_interval for its failures
        self._full_logged = False

    def load_folder(self, folder: Folder) -> list[str]:
        """The route set saved in a folder; none when there is none or it is refused (counted
        and logged like any refused entry, but the folder stays up: it holds no counts)."""
        try:
            fd, info = open_entry(folder.fd, ROUTES_FILE, folder.owners)
        except FileNotFoundError:
            return []
        except RefusedEntryError as exc:
            folder.refuse(ROUTES_FILE, exc.reason, str(exc))
            return []
        try:
            data = _read_small(fd, info)
        except RefusedEntryError as exc:
            folder.refuse(ROUTES_FILE, exc.reason, str(exc))
            return []
        finally:
            os.close(fd)
        try:
            return decode_routes(data)
        except ValueError as exc:
            folder.refuse(ROUTES_FILE, MALFORMED, str(exc))
            return []

    def save_folder(self, folder: Folder, listing: Listing) -> None:
        """Write the kept set into the folder when it changed since last written there, or
        when the file is gone (gunicorn empties the folder when it starts)."""
        generation = self._merger.kept_generation
        if not self._merger.kept_routes or (
                self._saved.get(folder.path) == generation
                and ROUTES_FILE in listing.names):
            return
        try:
            write_bytes_at(folder.fd, ROUTES_FILE, self._to_save(folder.path))
        except OSError as exc:
            self._error(folder.path, exc.strerror or str(exc))
            return
        self._saved[folder.path] = generation
        self._error(folder.path, None)

    def _to_save(self, where: str) -> bytes:
        routes = self._merger.kept_routes
        saved = [r for r in routes if len(r) <= MAX_ROUTE_CHARS]
        if len(saved) != len(routes):
            self._error(where, f"routes over {MAX_ROUTE_CHARS} characters are not "
                                      "saved")
        return encode_routes(saved)

    def _error(self, where: str, error: str | None) -> None:
        if error is None:
            self._errors.clear(("routes", where))
        elif self._errors.changed(("routes", where), error):
            log.warning("app kept routes cannot be saved; a restart may choose other routes "
                        "to keep", extra={"dir": where, "err": error})

    def load_state_dir(self) -> list[str]:
        """The route set saved in app.state_dir (a folder of the exporter's own)."""
        directory = self.state_dir
        if directory is None:
            return []
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("app.state_dir cannot be opened; the kept routes are not saved",
                        extra={"dir": directory, "err": exc.strerror or str(exc)})
            return []
        try:
            fd, info = open_entry(dir_fd, STATE_ROUTES_FILE, frozenset((os.geteuid(), 0)))
            try:
                return decode_routes(_read_small(fd, info))
            finally:
                os.close(fd)
        except FileNotFoundError:
            return []
        except (RefusedEntryError, ValueError) as exc:
            log.warning("app saved routes refused; routes are chosen again",
                        extra={"dir": directory, "file": STATE_ROUTES_FILE,
                               "detail": shown(str(exc))})
            return []
        finally:
            os.close(dir_fd)

    def save_state_dir(self) -> None:
        """Write the kept set into app.state_dir when it changed since last written."""
        directory = self.state_dir
        if directory is None:
            return
        generation = self._merger.kept_generation
        if not self._merger.kept_routes or self._saved.get(directory) == generation:
            return
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                write_bytes_at(dir_fd, STATE_ROUTES_FILE, self._to_save(directory))
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self._error(directory, exc.strerror or str(exc))
            return
        self._saved[directory] = generation
        self._error(directory, None)

    def note_full(self) -> None:
        """Say once that routes are now being folded, and where the kept set is saved."""
        if self._full_logged or not self._merger.routes_full():
            return
        self._full_logged = True
        where = self.state_dir or ("each app folder" if self._compact else None)
        if where is None:
            log.warning(f"app routes past the first {MAX_ROUTES} are summed under "
                        f'route="{ROUTE_OVERFLOW}"; the kept set is not saved (app.compact is '
                        "off): set app.state_dir so that a restart keeps the same routes")
        else:
            log.info(f"app routes past the first {MAX_ROUTES} are summed under "
                     f'route="{ROUTE_OVERFLOW}"', extra={"saved_in": where})


def _read_small(fd: int, info: os.stat_result) -> bytes:
    """A saved route set's bytes: RefusedEntryError when over MAX_ROUTES_BYTES or unreadable."""
    if info.st_size > MAX_ROUTES_BYTES:
        raise RefusedEntryError(TOO_LARGE, f"{info.st_size} bytes, over the "
                                           f"{MAX_ROUTES_BYTES}-byte limit")
    try:
        data = os.pread(fd, MAX_ROUTES_BYTES + 1, 0)
    except OSError as exc:
        raise RefusedEntryError(UNREADABLE, f"cannot be read: {exc.strerror}") from None
    if len(data) > MAX_ROUTES_BYTES:
        raise RefusedEntryError(TOO_LARGE, f"over the {MAX_ROUTES_BYTES}-byte limit")
    return data


def encode_routes(routes: Sequence[str]) -> bytes:
    """The saved form of a kept route set."""
    return (json.dumps({"version": ROUTES_VERSION, "routes": list(routes)},
                       ensure_ascii=False) + "\n").encode("utf-8")


def decode_routes(data: bytes) -> list[str]:
    """The routes of a saved set; ValueError saying what is wrong with it. The file may have
    been written by anyone who can write the folder: it is taken whole or not at all."""
    if len(data) > MAX_ROUTES_BYTES:
        raise ValueError(f"over {MAX_ROUTES_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not UTF-8 JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != ROUTES_VERSION or set(doc) != {
            "version", "routes"}:
        raise ValueError(f'not {{"version": {ROUTES_VERSION}, "routes": [...]}}')
    routes = doc["routes"]
    if not isinstance(routes, list) or len(routes) > MAX_ROUTES:
        raise ValueError(f"routes: not a list of at most {MAX_ROUTES}")
    for route in routes:
        if not isinstance(route, str) or not 0 < len(route) <= MAX_ROUTE_CHARS or \
                route == ROUTE_OVERFLOW or not _encodable(route):
            raise ValueError(f"routes: not a route label: {shown(repr(route))}")
    if len(set(routes)) != len(routes):
        raise ValueError("routes: a route is listed twice")
    return routes


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800 in the JSON)
        return False
    return True
