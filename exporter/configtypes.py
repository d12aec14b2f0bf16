"""The pieces a configuration section is written with: its value types, its errors, building
it from plain YAML data, and the Section a collector declares in the collector table."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, Union

_T = TypeVar("_T")


class ConfigError(Exception):
    """Every problem found in a configuration, one per line, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        # Values quoted in a problem come from files and the environment: a newline or other
        # control character in one must not split the one-line message or forge another.
        problems = ["".join(c if c.isprintable() else repr(c)[1:-1] for c in p)
                    for p in problems]
        super().__init__("\n".join(problems))
        self.problems = problems


class Duration(float):
    """Seconds, written in the config as "500ms", "2s", "1m" or "1h30m"."""


class Regex(str):
    """A Python regular expression, checked at load time."""


class Secret(str):
    """A password or token: never shown in summaries, logs or errors."""

    def __repr__(self) -> str:
        return "'<secret>'" if self else "''"


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def sum_duration(text: str, part: re.Pattern[str], units: Mapping[str, float]) -> float:
    """The seconds of a duration written as number-unit parts ("1m30s"), each part matched by
    part (groups: the number, the unit) and its unit looked up in units; ValueError(text) on
    anything else. The config's durations and the report's spans differ only in those two."""
    text = text.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        match = part.match(text, pos)
        if match is None:
            raise ValueError(text)
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(text)
    return total


def parse_duration(text: str) -> float:
    """Parse "1m30s" into 90.0; raise ValueError on anything else."""
    return sum_duration(text, _DURATION_PART, _DURATION_UNITS)


def format_duration(seconds: float) -> str:
    """Render seconds the way the config writes them."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def describe_value(value: Any) -> str:
    """A short, quoted rendering of a bad value for a one-line error."""
    if isinstance(value, str):
        return f'"{value}"' if len(value) < 60 else f'"{value[:57]}..."'
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    text = repr(value)  # bytes from !!binary, a date, a number: bounded like a string
    return text if len(text) < 60 else f"{text[:57]}..."


# Returned for a value that failed to convert (its problem is recorded): the field keeps its
# default, so later checks and the collectors never see a value of the wrong type.
_INVALID: Any = object()


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert one plain value to the annotated type, recording problems under path."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_plain(tp, value, path, errors)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, (list, dict)) or value not in choices:
            options = ", ".join(str(c) for c in choices)
            errors.append(f"{path}: expected one of {options}, got {describe_value(value)}")
            return _INVALID
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {describe_value(value)}")
            return _INVALID
        items = (_convert(item_type, v, f"{path}[{i}]", errors) for i, v in enumerate(value))
        return tuple(item for item in items if item is not _INVALID)
    if origin in (Union, types.UnionType):
        raise TypeError(f"unsupported config type at {path}")
    return _convert_scalar(tp, value, path, errors)


def _convert_scalar(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    if tp is Duration:
        if isinstance(value, str):
            try:
                return Duration(parse_duration(value))
            except ValueError:
                pass
        errors.append(f'{path}: expected a duration like "2s", got {describe_value(value)}')
        return _INVALID
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {describe_value(value)}")
            return _INVALID
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected a whole number, got {describe_value(value)}")
            return _INVALID
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {describe_value(value)}")
            return _INVALID
        return float(value)
    if tp in (str, Regex, Secret):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            # A password written as `!!binary ...` or as a date is still the password.
            got = "something else (not shown: a secret)" if tp is Secret else describe_value(value)
            errors.append(f"{path}: expected a string, got {got}")
            return _INVALID
        if tp is Regex:
            try:
                re.compile(str(value))
            except re.error as exc:
                errors.append(f"{path}: invalid regular expression: {exc}")
            except (OverflowError, RecursionError) as exc:
                # re raises these, not re.error, for a{4294967296} and deep nesting.
                reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                errors.append(f"{path}: invalid regular expression: {reason}")
        return tp(str(value))
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_plain(cls: type[_T], data: Any, path: str, errors: list[str]) -> _T:
    """Build dataclass cls from a mapping; unknown keys and wrong types become errors. A field
    with metadata "derived" is no key; one with "read_apart" is a key its owner reads."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        errors.append(f"{path or 'config'}: expected a mapping, got {describe_value(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]  # type: ignore[arg-type]
    known = {f.name for f in fields}
    apart = {f.name for f in fields if f.metadata.get("read_apart")}
    for key in data:
        if key not in known:
            errors.append(f"{prefix}{key}: unknown key")
    values = {
        name: _convert(hints[name], data[name], f"{prefix}{name}", errors)
        for name in known
        if name in data and name not in apart
    }
    return cls(**{name: value for name, value in values.items() if value is not _INVALID})


# --- what a collector declares --------------------------------------------------------------------


@dataclass(frozen=True)
class Section(Generic[_T]):
    """A collector's part of the configuration: the YAML section named after the collector
    (the key of its row in exporter/collectors/__init__.py) is built into cls, whose field
    defaults are the collector's defaults.

    The hooks write problems as one line each, naming the key ("<collector>.<key>: ...").
    """

    cls: type[_T]
    # Cross-field checks a single type cannot express.
    check: Callable[[_T], list[str]] | None = None
    # The metric name prefixes of the families the collector emits: a business query may not
    # use them (exporter.collectors.reserved_metric_prefixes).
    metric_prefixes: tuple[str, ...] = ()
    # Fill the raw section (a dict, changed in place) from environment variables where the
    # file is silent; problems go to the list.
    environment: Callable[[Mapping[str, str], dict[str, Any], list[str]], None] | None = None
    # For --help: (the variables, what they set; "\n" where the line wraps) of each line.
    environment_help: tuple[tuple[str, str], ...] = ()
    # After the build: the value with what files name (secrets) read in.
    resolve: Callable[[_T, list[str]], _T] | None = None
    # Lines --config.check prints when the collector is enabled (never a secret).
    summary: Callable[[_T], list[str]] | None = None
