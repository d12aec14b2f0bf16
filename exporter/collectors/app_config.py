"""The app collector's configuration section: the folders the application's workers write
their metrics files to."""

from __future__ import annotations

import os
from dataclasses import dataclass

from exporter.configtypes import Section, describe_value


@dataclass(frozen=True)
class AppConfig:
    """App collector settings: folders the application's workers write metrics files to."""

    multiprocess_dirs: tuple[str, ...] = ()
    # Fold the files of exited workers into one accumulator per metric type (needs write
    # access to the folders); off, dead workers' files are read as they are, forever.
    compact: bool = True
    # A folder of the exporter's own where the kept routes are saved; empty: in each folder
    # above (when compact is on).
    state_dir: str = ""


def check(app: AppConfig) -> list[str]:
    """Folders absolute and distinct."""
    problems: list[str] = []
    app_dirs = [os.path.normpath(d) if d else d for d in app.multiprocess_dirs]
    for i, directory in enumerate(app_dirs):
        if not directory.startswith("/"):
            problems.append(f"app.multiprocess_dirs[{i}]: expected an absolute path, "
                            f"got {describe_value(directory)}")
        elif app_dirs.index(directory) != i:
            problems.append(
                f"app.multiprocess_dirs[{i}]: duplicate folder {describe_value(directory)}")
    if app.state_dir and not app.state_dir.startswith("/"):
        problems.append(f"app.state_dir: expected an absolute path, "
                        f"got {describe_value(app.state_dir)}")
    return problems


# qatoolbox_celery_* is the redis collector's too (queue lengths); the app's are tasks.
SECTION = Section(AppConfig, check=check, metric_prefixes=("qatoolbox_http_", "qatoolbox_celery_"))
