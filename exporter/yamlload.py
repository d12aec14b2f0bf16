"""Bounded YAML: PyYAML's safe loader refusing a document past the limits before it is built.

Imported when a file is read (exporter.configfile.read_yaml), not with the configuration: the
exporter serving without a web config file lets go of PyYAML once started
(exporter.lean.release_modules), so nothing but that function may keep it.
"""

from __future__ import annotations

from typing import Any

import yaml

from exporter.configfile import YAML_MAX_DEPTH, YAML_MAX_NODES, YAML_MAX_NUMBER_LENGTH
from exporter.configtypes import ConfigError

_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})


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


def load_bounded(text: str, prefix: str) -> Any:
    """The data of a YAML document, within the YAML_MAX_* limits; ConfigError prefixed with
    prefix (the file) for anything that is not data: syntax errors, a document past the
    limits, and the values PyYAML's constructors cannot convert (`2001-13-01`, `!!int x`),
    for which it raises ValueError, AttributeError and the like."""
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
