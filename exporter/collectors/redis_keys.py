"""Key structure: Redis globs as regexes, a key's structure ("user:{id}"), counting keys by
group, and the names kombu gives Celery's queues and bindings."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from exporter.collectors.redis_config import KeyGroup

KOMBU_SEP = "\x06\x16"
KOMBU_UNACKED = "unacked"
# kombu's Redis transport records each binding of a queue to an exchange as a member
# "<routing key>\x06\x16<pattern>\x06\x16<queue>" of the set "_kombu.binding.<exchange>".
KOMBU_BINDING = "_kombu.binding."
# Celery's own exchanges for remote control and events: their queues belong to one worker or
# one monitor each (celery@host.celery.pidbox, celeryev.<uuid>), they come and go, and kombu
# delivers to them by PUBLISH, not through a list. They are not task queues.
KOMBU_EXCHANGES_SKIPPED = ("celeryev",)
KOMBU_EXCHANGE_SUFFIXES_SKIPPED = (".pidbox",)
# Binding sets read per count, members read per set (SSCAN, 100 at a time): what a key that
# only looks like a binding set can cost.
MAX_BINDING_SETS = 100
MAX_BINDING_MEMBERS = 1000


def glob_to_regex(pattern: str) -> str:
    """A Redis glob (*, ?, [a-z], [^a], \\x) as an equivalent Python regular expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif char == "[":
            # As Redis does: "\\" escapes inside the class, an unclosed class runs to the end,
            # "[]" matches nothing and "[^]" any one character.
            i += 1
            negate = pattern[i: i + 1] == "^"
            i += negate
            parts: list[str] = []
            while i < n and pattern[i] != "]":
                if pattern[i] == "\\" and i + 1 < n:
                    parts.append(re.escape(pattern[i + 1]))
                    i += 2
                elif i + 2 < n and pattern[i + 1] == "-" and pattern[i + 2] != "]":
                    low, high = sorted((pattern[i], pattern[i + 2]))
                    parts.append(f"{re.escape(low)}-{re.escape(high)}")
                    i += 3
                else:
                    parts.append(re.escape(pattern[i]))
                    i += 1
            if parts:
                out.append(f"[{'^' if negate else ''}{''.join(parts)}]")
            else:
                out.append("." if negate else "(?!)")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


# --- key structure ------------------------------------------------------------------------

# Django's cache key: KEY_PREFIX, version, then what the code passed ("qatoolbox:1:<key>").
_CACHE_KEY = re.compile(r"[^:]{1,100}:\d{1,9}:(.*)", re.DOTALL)
# Django's session backends store a session under this prefix and the session key, with no
# separator (cache: "django.contrib.sessions.cache<key>", cached_db: "...cached_db<key>").
_SESSION_PREFIX = "django.contrib.sessions.cache"
SESSION_GROUP = "session"
ID = "{id}"
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# Tokens are runs of letters and digits (an underscore separates, as in "boss_login_12"). Each
# pattern below is one C-level substitution: no Python call per token, so a million keys cost
# about a second. An id is a token with a digit that is a hex string of 8 or more characters
# or any run of 16 or more (hashes, random tokens, session keys), a number, or the number
# that ends a word ("user123456": 4 digits or more).
_EDGE_BEFORE, _EDGE_AFTER = r"(?<![^\W_])", r"(?![^\W_])"
_RANDOM = re.compile(_EDGE_BEFORE + r"(?=[^\W_]*\d)(?:[0-9A-Fa-f]{8,}|[^\W_]{16,})"
                     + _EDGE_AFTER)
_WORD_NUMBER = re.compile(_EDGE_BEFORE + r"([^\W\d_]+)\d{4,}" + _EDGE_AFTER)
_NUMBER = re.compile(_EDGE_BEFORE + r"\d+" + _EDGE_AFTER)
_PRIORITY_LIST = re.compile(KOMBU_SEP + r"\d{1,3}\Z")
# A group name is a label value: at most this long, printable characters only.
MAX_GROUP_NAME = 100
# Structures counted in one pass before further new ones go straight to "other": memory stays
# bounded whatever the keyspace holds.
MAX_TRACKED_SHAPES = 10_000
# key_shape() decides where ids are from where the digits are and how many, not from their
# values: two keys that differ only in digit values (UUIDs replaced first) get the same
# structure, unless it keeps some of those digits ("v2_{id}"). Such structures are looked up by
# that skeleton, which costs a fraction of computing them. At most this many are kept.
MAX_CACHED_SKELETONS = 50_000
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_UUID_BYTES = re.compile(_UUID.pattern.encode())
_ID_BYTES = ID.encode()
_HAS_DIGIT = re.compile(r"[0-9]").search


def key_shape(key: bytes) -> str:
    """The structure a key belongs to: the part after a Django cache prefix and version, with
    each id in it (digits, UUIDs, hex strings, long random tokens) replaced by {id}. Every
    session key is "session"; "qatoolbox:1:user:42" is "user:{id}",
    "qatoolbox:1:chat_room:<uuid>:messages" is "chat_room:{id}:messages",
    "qatoolbox:1:shard_stats" is "shard_stats"."""
    text = key.decode("utf-8", "replace")
    cached = _CACHE_KEY.fullmatch(text)
    if cached is not None:
        text = cached.group(1)
    if text.startswith(_SESSION_PREFIX):
        return SESSION_GROUP
    # A queue's priority lists ("<queue>\x06\x16<step>") go with the queue's own list.
    text = _PRIORITY_LIST.sub("", text)
    text = _NUMBER.sub(ID, _WORD_NUMBER.sub(r"\1" + ID, _RANDOM.sub(ID, _UUID.sub(ID, text))))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text[:MAX_GROUP_NAME + 1])
    return text if len(text) <= MAX_GROUP_NAME else text[:MAX_GROUP_NAME - 3] + "..."


@dataclass
class KeyTally:
    """One pass's counts: keys by configured group, the other keys by structure, keys of
    structures past MAX_TRACKED_SHAPES, and the kombu binding sets seen."""

    groups: list[int]
    shapes: dict[str, int] = field(default_factory=dict)
    untracked: int = 0
    bindings: set[bytes] = field(default_factory=set)

    @classmethod
    def empty(cls, groups: int) -> KeyTally:
        """Zero counts for that many configured groups."""
        return cls([0] * groups)

    def copy(self) -> KeyTally:
        """An independent copy."""
        return KeyTally(list(self.groups), dict(self.shapes), self.untracked,
                        set(self.bindings))

    def counts(self, names: Sequence[str], limit: int) -> dict[str, float]:
        """Keys by group: the configured ones, the `limit` structures with the most keys (ties
        by name), and "other" for the rest. A structure named like a configured group (or
        "other") adds to it. The values add up to the keys counted."""
        counts = {name: float(n) for name, n in zip(names, self.groups, strict=True)}
        other = float(self.untracked)
        ranked: list[tuple[str, int]] = []
        for shape, n in self.shapes.items():
            if shape == "other":
                other += n
            elif shape in counts:
                counts[shape] += n
            else:
                ranked.append((shape, n))
        ranked.sort(key=lambda item: (-item[1], item[0]))
        for shape, n in ranked[:limit]:
            counts[shape] = float(n)
        counts["other"] = counts.get("other", 0.0) + other + sum(n for _, n in ranked[limit:])
        return counts


class KeyClassifier:
    """Assigns keys to groups: the first group with a matching pattern, else "other"."""

    def __init__(self, groups: Sequence[KeyGroup]) -> None:
        self.names = [g.name for g in groups]
        alternatives = (
            "(" + "|".join(f"(?:{glob_to_regex(p)})" for p in g.patterns) + ")" for g in groups
        )
        # One alternation of capturing groups: lastindex names the first group that matched.
        source = "(?:" + "|".join(alternatives) + ")"
        self._regex = re.compile(source.encode(), re.DOTALL) if groups else None
        self._skeletons: dict[bytes, str] = {}

    def count(self, keys: Iterable[bytes], into: list[int]) -> None:
        """Add each key to into[group index], into[-1] being "other"."""
        regex = self._regex
        if regex is None:
            into[-1] += sum(1 for _ in keys)
            return
        fullmatch = regex.fullmatch
        for key in keys:
            match = fullmatch(key)
            into[match.lastindex - 1 if match and match.lastindex else -1] += 1

    def tally(self, keys: Iterable[bytes], into: KeyTally, binding_prefix: bytes = b"") -> None:
        """Add each key to its configured group, or by structure (key_shape) when none
        matches; note the keys that start with binding_prefix (when given)."""
        fullmatch = self._regex.fullmatch if self._regex is not None else None
        shapes, cache = into.shapes, self._skeletons
        for key in keys:
            match = fullmatch(key) if fullmatch is not None else None
            if match is not None and match.lastindex:
                into.groups[match.lastindex - 1] += 1
            else:
                skeleton = (_UUID_BYTES.sub(_ID_BYTES, key) if b"-" in key else key).translate(
                    _DIGITS_TO_ZERO)
                shape = cache.get(skeleton)
                if shape is None:
                    shape = key_shape(key)
                    if not _HAS_DIGIT(shape):
                        if len(cache) >= MAX_CACHED_SKELETONS:
                            cache.clear()
                        cache[skeleton] = shape
                if shape in shapes:
                    shapes[shape] += 1
                elif len(shapes) < MAX_TRACKED_SHAPES:
                    shapes[shape] = 1
                else:
                    into.untracked += 1
            if binding_prefix and key.startswith(binding_prefix) and \
                    len(into.bindings) < MAX_BINDING_SETS:
                into.bindings.add(key)


def binding_exchange(key: bytes, prefix: bytes) -> str | None:
    """The exchange of a binding set's key, None for Celery's control and event exchanges."""
    exchange = key[len(prefix):].decode("utf-8", "replace")
    if exchange in KOMBU_EXCHANGES_SKIPPED or exchange.endswith(KOMBU_EXCHANGE_SUFFIXES_SKIPPED):
        return None
    return exchange


def binding_queue(member: bytes) -> str | None:
    """The queue of a binding set's member, None when it is not a usable queue name."""
    parts = member.split(KOMBU_SEP.encode())
    if len(parts) != 3:
        return None
    try:
        queue = parts[2].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not queue or len(queue) > MAX_GROUP_NAME or not queue.isprintable():
        return None
    return queue


def celery_keys(queues: Sequence[str], prefix: str, steps: Sequence[int]) -> list[tuple[str, str]]:
    """(queue, list key) for every queue and priority step, the way kombu names them."""
    return [(q, f"{prefix}{q}{KOMBU_SEP}{p}" if p else f"{prefix}{q}")
            for q in queues for p in steps]

