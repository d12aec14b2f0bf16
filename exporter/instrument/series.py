"""What each key of the metrics files is: the served series ("slot") it adds to, or why it is
refused; and which routes keep a label of their own (the route cap).

Entries of many files share their keys, so the verdict on a key is cached under a digest of
its bytes (16 bytes per key however long the key is). Entries of routes past the route cap
are mapped straight to their route="<other>" series: nothing of theirs is kept but that
mapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exporter.instrument.keys import (
    KEY_CACHE_LIMIT,
    Labels,
    Series,
    names_servable,
    parse_key,
)
from exporter.instrument.safefiles import BAD_ENTRY, RESERVED_NAME

try:  # CPython's built-in BLAKE2: hashlib would load OpenSSL's libcrypto (3.4 MB RSS) for it
    from _blake2 import blake2b as blake2b  # noqa: PLC0414 - re-exported (mypy)
except ImportError:  # another interpreter
    from hashlib import blake2b as blake2b  # noqa: PLC0414

# Routes past SeriesIndex's route_limit are summed under this route (the instrument's
# overflow name), ranked by this family's request counts.
ROUTE_OVERFLOW = "<other>"
ROUTE_RANKING = "qatoolbox_http_requests"
# What a cached key maps to besides a served series' index.
_BAD, _RESERVED, _CONFLICT = -1, -2, -3
_REASONS = {_BAD: BAD_ENTRY, _RESERVED: RESERVED_NAME}


class Routed:
    """A key of a route not yet kept or folded: its series with the route left open."""

    __slots__ = ("route", "template")

    def __init__(self, template: int, route: str) -> None:
        self.template, self.route = template, route


@dataclass(frozen=True)
class _Template:
    """A routed series without its route: labels[index] is the route label."""

    family: str
    typ: str
    help: str
    sample: str
    labels: Labels
    index: int
    le: float | None


# What a key is: a served series' index, a code (_BAD, _RESERVED, _CONFLICT), or Routed.
Verdict = int | Routed


def refused(verdict: Verdict) -> bool:
    """Whether an entry with this verdict is refused (never served, never folded)."""
    return verdict.__class__ is int and verdict in _REASONS


def refusal_reason(verdict: int) -> str:
    """The refusal reason (BAD_ENTRY, RESERVED_NAME) of a refused verdict."""
    return _REASONS[verdict]


def key_digest(key: bytes) -> bytes:
    """What the caches know a key by: 16 bytes, however long the key."""
    return blake2b(key, digest_size=16).digest()


class SeriesIndex:
    """Numbers the served series ("slots") and tells what each key of the files adds to.

    Routes past route_limit are summed under route="<other>". The kept routes are those
    adopted (the collector's saved set), then the busiest (most requests) among those first
    seen in one read (FileMerger.settle), then any new route while there is room; once kept,
    a route stays kept and once folded it stays folded, so no series ever moves into or out
    of "<other>" and "<other>"'s counters never go down.
    """

    def __init__(self, route_limit: int | None = None, *,
                 reserved_prefixes: tuple[str, ...] = (), allowed_prefixes: tuple[str, ...] = (),
                 reserved_names: Iterable[str] = ()) -> None:
        """reserved_*: names the files may not declare (other than allowed_prefixes), as a
        family or as a sample name: the exporter's own families."""
        self._reserved_prefixes = reserved_prefixes
        self._allowed_prefixes = allowed_prefixes
        self._reserved_names = frozenset(reserved_names)
        self._route_limit = route_limit
        self._keys: dict[tuple[str, str], dict[bytes, int | Routed]] = {}
        self._key_count = 0
        self._types: dict[str, str] = {}
        self._series: list[Series] = []
        self._series_index: dict[tuple[str, str, Labels, str, float | None, str], int] = {}
        self._templates: list[_Template] = []
        self._template_index: dict[_Template, int] = {}
        self._routed_slots: dict[tuple[int, str], int] = {}
        self._route_names: dict[str, str] = {}  # one string per undecided route
        self._kept: dict[str, None] = {}  # insertion-ordered set
        self.conflicts = 0
        self.kept_generation = 0

    # --- the kept routes ---

    @property
    def kept_routes(self) -> list[str]:
        """The kept routes, in the order they were kept."""
        return list(self._kept)

    def routes_full(self) -> bool:
        """Whether no further route can be kept (every new one is folded)."""
        return self._route_limit is not None and len(self._kept) >= self._route_limit

    def adopt(self, routes: Iterable[str]) -> int:
        """Keep these routes (a saved set) while there is room; how many were new.

        Safe at any time: while there is room every route ever seen is kept, so a route not
        kept yet has never been served, under its own label or under "<other>"."""
        added = 0
        for route in routes:
            if self.routes_full():
                break
            if route != ROUTE_OVERFLOW and route not in self._kept:
                self._kept[route] = None
                added += 1
        if added:
            self.kept_generation += 1
            self._resolve_keys()
        return added

    # --- classifying keys ---

    def verdicts(self, prefix: str) -> dict[bytes, Verdict]:
        """The verdicts known on keys of files of type prefix (not a gauge with one series
        per process), by key_digest(); verdict() for the others."""
        return self._cache(prefix, "")

    def verdict(self, prefix: str, digest: bytes, key: bytes) -> Verdict:
        """What an entry (key_digest(key), key) of a file of type prefix is: refused() tells
        whether it may be kept (a type conflict is not a refusal). Raises ValueError when key
        is not UTF-8."""
        return self._find(prefix, "", digest, key)

    def _cache(self, prefix: str, pid: str) -> dict[bytes, int | Routed]:
        """The verdicts on the keys of one file type (and pid, for gauges with one series
        per process), by key_digest()."""
        cache = self._keys.get((prefix, pid))
        if cache is None:
            cache = self._keys[(prefix, pid)] = {}
        return cache

    def _find(self, prefix: str, pid: str, digest: bytes, key: bytes) -> int | Routed:
        cache = self._cache(prefix, pid)
        found = cache.get(digest)
        if found is None:
            if self._key_count >= KEY_CACHE_LIMIT:
                self._keys, self._key_count = {}, 0
                cache = self._cache(prefix, pid)
            typ, _, mode = prefix.partition("_")
            found = cache[digest] = self._classify(typ, mode, pid, key)
            self._key_count += 1
        elif type(found) is Routed:
            decided = self._decide(found)
            if decided >= 0:
                cache[digest] = found = decided
        return found

    def _classify(self, typ: str, mode: str, pid: str, key: bytes) -> int | Routed:
        parsed = parse_key(key)
        if parsed is None:
            return _BAD
        if not names_servable(typ, mode, parsed):
            return _BAD
        metric, sample, labels, help_text, le = parsed
        if self._reserved(metric) or self._reserved(sample):
            return _RESERVED
        if self._types.setdefault(metric, typ) != typ:
            self.conflicts += 1
            return _CONFLICT
        if pid:
            labels = (*labels, ("pid", pid))
        gauge_mode = mode if typ == "gauge" else ""
        if self._route_limit is not None and typ != "gauge":
            index = next((i for i, (name, _) in enumerate(labels) if name == "route"), -1)
            if index >= 0 and labels[index][1] != ROUTE_OVERFLOW:
                route = labels[index][1]
                # One template for all the routes of a series (the route left blank): the
                # keys of folded routes leave nothing of theirs behind but their digest.
                template = _Template(metric, typ, help_text, sample,
                                     (*labels[:index], ("route", ""), *labels[index + 1:]),
                                     index, le)
                number = self._template_index.get(template)
                if number is None:
                    number = self._template_index[template] = len(self._templates)
                    self._templates.append(template)
                routed = Routed(number, self._route_names.setdefault(route, route))
                decided = self._decide(routed)
                return routed if decided < 0 else decided
        return self._slot(Series(metric, typ, gauge_mode, help_text, sample, labels, le))

    def _slot(self, series: Series) -> int:
        """The index of a series (the first one's help text stays)."""
        key = (series.family, series.sample, series.labels, series.mode, series.le, series.typ)
        slot = self._series_index.get(key)
        if slot is None:
            slot = self._series_index[key] = len(self._series)
            self._series.append(series)
        return slot

    def _decide(self, routed: Routed) -> int:
        """The series a routed key adds to, or -1 while its route is undecided."""
        route = routed.route
        if route in self._kept:
            target = route
        elif self.routes_full():
            target = ROUTE_OVERFLOW
        else:
            return -1
        slot = self._routed_slots.get((routed.template, target))
        if slot is None:
            t = self._templates[routed.template]
            labels = (*t.labels[:t.index], ("route", target), *t.labels[t.index + 1:])
            slot = self._slot(Series(t.family, t.typ, "", t.help, t.sample, labels, t.le))
            self._routed_slots[(routed.template, target)] = slot
        return slot

    def _resolve_keys(self) -> None:
        """Replace cached undecided keys whose route is now decided by their series."""
        for cache in self._keys.values():
            for digest, found in cache.items():
                if type(found) is Routed:
                    decided = self._decide(found)
                    if decided >= 0:
                        cache[digest] = decided
        self._route_names.clear()

    def _reserved(self, name: str) -> bool:
        return name in self._reserved_names or (
            name.startswith(self._reserved_prefixes)
            and not name.startswith(self._allowed_prefixes))

    def _offender(self, key: bytes) -> str:
        """What to name in the log for a refused entry: its reserved name, or its key."""
        parsed = parse_key(key)
        if parsed is not None:
            for name in parsed[:2]:
                if self._reserved(name):
                    return name
        text = key.decode("utf-8", "replace")
        return text if len(text) <= 200 else text[:200] + "..."

