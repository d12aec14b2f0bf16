"""Reading the files a configuration names: bounded reads, bounded YAML, secrets."""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from exporter.configtypes import ConfigError, Secret, describe_value

# Hard caps on what is read from a file named by the configuration or the environment: a
# password is one line, a config file a few hundred. /dev/zero, a FIFO or a 200 MB file named
# by mistake or malice is a one-line error, not an endless read or a hang.
SECRET_FILE_LIMIT = 4096
CONFIG_FILE_LIMIT = 1 << 20
# A YAML document is refused beyond these, before PyYAML builds anything: its pure-Python
# parser needs seconds and hundreds of MB for a 1 MiB list of 500,000 items, an alias counts
# as often as it is used (a few lines of nested aliases would expand to 10^9 values, and the
# config is walked as a tree), and building a 1 MiB sexagesimal number (1:1:1:...) takes time
# quadratic in its length. Real configs stay far below.
YAML_MAX_NODES = 20_000
YAML_MAX_DEPTH = 64
YAML_MAX_NUMBER_LENGTH = 100
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


class FileReadError(Exception):
    """Why a file could not be read, in a few words for a one-line error."""


def _not_regular(mode: int) -> FileReadError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "something else")
    return FileReadError(f"not a regular file ({kind})")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"


def read_file(path: str, limit: int) -> bytes:
    """The content of a regular file of at most limit bytes, or FileReadError.

    Symbolic links are followed (Kubernetes mounts secrets as links to regular files). The
    open does not block (a FIFO without a writer would hang it), and the file is checked to be
    regular with fstat on the open descriptor, so it cannot be swapped after the check; a stat
    before the open spares devices an open at all. The read stops at limit + 1 bytes whatever
    the size said (a file may grow, /proc files say 0).
    """
    try:
        if not stat.S_ISREG((before := os.stat(path)).st_mode):
            raise _not_regular(before.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise FileReadError(exc.strerror or type(exc).__name__) from None
    except ValueError:  # a NUL byte, or characters the file system encoding cannot hold
        raise FileReadError("not a valid file name") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(info.st_mode)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit or info.st_size > limit:
            raise FileReadError(f"larger than the {_size(limit)} limit "
                              f"({max(size, info.st_size)} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise FileReadError(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)


class _RefusedError(Exception):
    """A YAML document beyond the limits above, with where it went over."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts nodes as it composes them (an alias by the size of
    what it refers to) and refuses a document past the limits before anything is built."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._nodes = 0
        self._depth = 0
        # Expanded size of each node composed so far; an anchor's is missing until its node is
        # complete, so an alias inside its own anchor (a recursive document) is found.
        self._sizes: dict[int, int] = {}

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        if self._nodes > YAML_MAX_NODES:
            raise _RefusedError(f"more than {YAML_MAX_NODES} values (an alias counts as many as "
                           f"it refers to)", mark)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # PyYAML's stubs leave peek_event unannotated: it returns the next parser event.
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:  # else PyYAML reports the undefined alias
                if id(anchored) not in self._sizes:
                    raise _RefusedError("an alias inside the value it refers to", event.start_mark)
                self._count(self._sizes[id(anchored)], event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            raise _RefusedError(f"nested too deeply (more than {YAML_MAX_DEPTH} levels)",
                           event.start_mark)
        first = self._nodes
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if node is not None:
            self._sizes[id(node)] = self._nodes - first
            if (isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER_TAGS
                    and len(node.value) > YAML_MAX_NUMBER_LENGTH):
                raise _RefusedError(f"a number longer than {YAML_MAX_NUMBER_LENGTH} characters",
                               node.start_mark)
        return node


def read_yaml(path: str, what: str = "config file") -> Any:
    """Read a YAML file; ConfigError, prefixed "<what> <path>", for anything that is not data:
    a file that is not regular or is larger than CONFIG_FILE_LIMIT, I/O errors, syntax errors,
    text that is not UTF-8, a document past the YAML_MAX_* limits, and the values PyYAML's
    constructors cannot convert (`2001-13-01`, `!!int x`), for which it raises ValueError,
    AttributeError and the like."""
    shown = path.replace("\0", "\\0")
    prefix = f"{what} {shown}"
    try:
        text = read_file(path, CONFIG_FILE_LIMIT).decode("utf-8")
    except FileReadError as exc:
        raise ConfigError([f"{prefix}: cannot read: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{prefix}: not UTF-8 text"]) from None
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks the characters at once
        return loader.get_single_data()
    except (yaml.YAMLError, _RefusedError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{prefix}: invalid YAML{where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{prefix}: invalid YAML: nested too deeply"]) from None
    except Exception:
        # The library's message may quote the value; the file may hold secrets.
        raise ConfigError([f"{prefix}: invalid YAML: a value that cannot be converted (a bad "
                           f"date, number or tagged value)"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_secret(path: str, key: str, errors: list[str]) -> Secret:
    """The stripped text of a secret file; "" and a problem under key if it cannot be read."""
    try:
        return Secret(read_file(path, SECRET_FILE_LIMIT).decode("utf-8").strip())
    except FileReadError as exc:
        errors.append(f"{key}: cannot read {path}: {exc}")
    except UnicodeDecodeError:
        # A binary file: the content is never echoed.
        errors.append(f"{key}: cannot read {describe_value(path)} as a text file")
    return Secret("")

