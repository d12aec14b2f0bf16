"""The oldest versions pyproject.toml allows, installed in a virtual environment of their own.

`python -m tests.minimums install DIR` (run by scripts/test) creates DIR with exactly the
minimum of every runtime dependency and of the auth extra (not the project itself:
tests/test_minimums.py runs `python -m exporter` from the repository root with that
interpreter). Nothing is done when DIR already holds the same pins.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PINS_FILE = "qatoolbox-minimums.txt"


def minimum_pins() -> list[str]:
    """`name==version` for each runtime requirement and the auth extra, from their `>=`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["auth"]]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?)>=([0-9][0-9.]*)", requirement)
        if match is None:
            raise SystemExit(f"tests/minimums.py: {requirement!r} has no plain >= minimum")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def install(target: Path) -> None:
    pins = minimum_pins()
    marker = target / PINS_FILE
    if marker.exists() and marker.read_text().split() == pins:
        return
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    subprocess.run([*pip, *pins], check=True)
    marker.write_text("\n".join(pins) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "install":
        raise SystemExit("usage: python -m tests.minimums install DIR")
    install(Path(sys.argv[2]))
