"""Reading the files a configuration names: bounded reads, bounded YAML, secrets."""

from __future__ import annotations

import os
import stat
from typing import Any

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
    # Loaded here, not with this module: PyYAML is start-up work (and the web config's
    # reloads), and the exporter lets go of it once serving (exporter.lean.release_modules).
    from exporter.yamlload import load_bounded

    return load_bounded(text, prefix)


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

