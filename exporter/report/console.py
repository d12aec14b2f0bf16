"""What `report` and `export` show while they run and how they end: the progress line on a
terminal, one-line errors, exit codes, SIGTERM taken as Ctrl-C."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130


class Progress:
    """One self-overwriting status line on a terminal; nothing at all in a pipe."""

    def __init__(self, enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self._shown = False

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        self.stream.write(f"\r\033[K[{done}/{total}] {label[:70]}")
        self.stream.flush()
        self._shown = True

    def say(self, text: str) -> None:
        if self.enabled:
            self.clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a stopped systemd unit or Kubernetes job) unwinds like Ctrl-C, so temporary
    output is removed on the way out."""
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(prog: str, message: str, code: int) -> int:
    """Print the one-line error and return the exit code."""
    print(f"{prog}: {message}", file=sys.stderr)
    return code
