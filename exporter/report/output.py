"""Writing results so that nothing half-written ever looks complete: a report directory is
built under a hidden temporary name beside its target and renamed into place in one step; an
export file is written to a temporary file and renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

MARKER = ".qatoolbox-report"


class OutputError(Exception):
    """The output cannot be written where asked."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(target: Path, files: Mapping[str, bytes]) -> None:
    """Write files (relative paths) as directory target. An existing target is replaced only
    if it is an earlier report (it holds the marker file): never someone's other folder."""
    target = target.absolute()
    parent = target.parent
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"--out {target}: exists and is not a directory")
        if any(target.iterdir()) and not (target / MARKER).exists():
            raise OutputError(f"--out {target}: exists and is not an earlier report; "
                              "refusing to replace it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    except OSError as exc:
        raise OutputError(f"--out {target}: cannot create it: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        for name, data in sorted(files.items()):
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (staging / MARKER).write_text("qatoolbox-exporter report\n")
        os.chmod(staging, 0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rename(target, old / "report")
        os.rename(staging, target)
        _fsync_dir(parent)
    except OSError as exc:
        if old is not None and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(old / "report", target)
        raise OutputError(f"--out {target}: cannot write it: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def publish_file(target: Path, data: bytes) -> None:
    """Write data as file target through a temporary file in the same directory."""
    target = target.absolute()
    if target.is_dir():
        raise OutputError(f"--out {target}: is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"--out {target}: cannot create it: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o644)
        os.replace(name, target)
    except OSError as exc:
        raise OutputError(f"--out {target}: cannot write it: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
