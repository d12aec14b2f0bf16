"""Fast encoders of the text format and OpenMetrics, byte for byte as prometheus_client's.

prometheus_client's encoders check and escape every metric and label name on every sample (a
regular expression and a character loop each); at ~1,300 samples that was most of a scrape's
cost, and its OpenMetrics encoder, the one a Prometheus scrape asks for, is the slower of the two
(docs/benchmarks.md). Names and series repeat scrape after scrape, so here each is rendered once
and remembered (bounded); label values are escaped only when they contain a character that needs
it. Nothing here imports prometheus_client: its package pulls in an HTTP server, urllib and ssl
the exporter has no use for (except for the rare family with exemplars or native histograms,
which prometheus_client's own encoder renders).

`negotiate(accept)` picks the format for an Accept header the way prometheus_client's
choose_encoder does and returns one encoder object per content type, so a caller can key shared
work on the content type alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

UNDERSCORES = "underscores"
ALLOW_UTF8 = "allow-utf-8"

TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text"
TEXT_TYPE = "text/plain"

_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
# prometheus_client's own patterns, `$` included (it also matches before a final newline).
_LEGACY_METRIC = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LEGACY_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABEL = re.compile(r"^__.*$")
# Bounded so that a collector with ever-new names cannot grow them without limit.
_CACHE_LIMIT = 20_000
_SERIES_LIMIT = 10_000  # twice the series budget: a few MB at most


class Source(Protocol):
    """A registry, or anything else whose collect() yields metric families."""

    def collect(self) -> Iterable[Any]: ...


Encoder = Callable[[Source], bytes]


def _escape_value(text: str) -> str:
    """A label value (and an OpenMetrics HELP text, or a quoted name) with \\, newline and "
    escaped."""
    if "\\" in text or "\n" in text or '"' in text:
        return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return text


def _underscored(name: str, colon: bool) -> str:
    """Every character outside the legacy name set replaced by `_` (digits not first)."""
    return "".join(
        c if ("a" <= c <= "z" or "A" <= c <= "Z" or c == "_" or (colon and c == ":")
              or ("0" <= c <= "9" and i > 0)) else "_"
        for i, c in enumerate(name))


def escape_metric_name(name: str, escaping: str = UNDERSCORES) -> str:
    """A metric name as prometheus_client writes it in HELP and TYPE lines."""
    if not name:
        return name
    valid = _LEGACY_METRIC.match(name) is not None
    if escaping == ALLOW_UTF8:
        return _escape_value(name) if valid else f'"{_escape_value(name)}"'
    return name if valid else _underscored(name, colon=True)


def escape_label_name(name: str, escaping: str = UNDERSCORES) -> str:
    """A label name as prometheus_client writes it."""
    if not name:
        return name
    # `__` names are reserved: valid characters, yet quoted under allow-utf-8.
    valid = _LEGACY_LABEL.match(name) is not None and _RESERVED_LABEL.match(name) is None
    if escaping == ALLOW_UTF8:
        return _escape_value(name) if valid else f'"{_escape_value(name)}"'
    return name if valid else _underscored(name, colon=False)


def format_value(value: float) -> str:
    """A sample value as Go (and prometheus_client's floatToGoString) writes it."""
    value = float(value)
    text = repr(value)
    if text[-1] in "fn":  # inf, -inf, nan
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    dot = text.find(".")
    # Go switches to an exponent from 1e21 down to 1e6 sooner than Python does.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _bounded_put(cache: dict[str, str], key: str, value: str, limit: int) -> str:
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


class _Names:
    """One format and escaping's rendered names and series, each computed once."""

    def __init__(self, openmetrics: bool, escaping: str) -> None:
        self.openmetrics = openmetrics
        self.escaping = escaping
        self.metrics: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        # (sample name, *label names, *label values) -> (length of the rendered series, last
        # value, its line, which starts with the series): a value unchanged since the last
        # scrape (most are) reuses its line, a changed one cuts the series from it. A flat key
        # (its length says where the names end) holds no tuple per label item; no series is
        # kept beside its line (0.2 MB on the demo stack).
        self.series: dict[object, tuple[int, object, str]] = {}

    def metric(self, name: str) -> str:
        """The name of a HELP, TYPE or UNIT line."""
        escaped = self.metrics.get(name)
        return escaped if escaped is not None else self._escaped(self.metrics, name,
                                                                  escape_metric_name)

    def label(self, name: str) -> str:
        escaped = self.labels.get(name)
        return escaped if escaped is not None else self._escaped(self.labels, name,
                                                                  escape_label_name)

    def _escaped(self, cache: dict[str, str], name: str,
                 escape: Callable[[str, str], str]) -> str:
        return _bounded_put(cache, name, escape(name, self.escaping), _CACHE_LIMIT)

    def render(self, name: str, labels: dict[str, str]) -> str:
        """`name{label="value",...}` (labels sorted), or `{"name",label="value"}` for a name
        outside the legacy set under allow-utf-8, as prometheus_client writes a sample."""
        labelstr = ",".join(f'{self.label(k)}="{_escape_value(v)}"'
                            for k, v in sorted(labels.items()))
        utf8 = self.escaping == ALLOW_UTF8
        if utf8 and _LEGACY_METRIC.match(name) is None:
            head = escape_metric_name(name, ALLOW_UTF8)
            return "{" + head + ("," + labelstr if labelstr else "") + "}"
        if not self.openmetrics:
            head = self.metric(name)
        elif utf8:
            head = _escape_value(name)
        else:
            # OpenMetrics writes sample names with the label-name rules: `:` becomes `_`.
            head = _underscored(name, colon=False)
        return head + ("{" + labelstr + "}" if labelstr else "")

    def remember(self, key: object, series: str, value: object, line: str) -> None:
        """Keep a series' rendering and last line (the cache is bounded); a line of _NO_VALUE
        (one with a timestamp) is not reused: only its series is kept."""
        if len(self.series) >= _SERIES_LIMIT:
            self.series.clear()
        self.series[key] = (len(series), value, series if value is _NO_VALUE else line)


# Stands for "no line to reuse" (a sample with a timestamp): equal to no value.
_NO_VALUE = object()


def _same_zero(value: object, last: object) -> bool:
    """Whether two values equal to zero (or None) are written alike: -0.0 == 0.0, yet it is
    written "-0.0". (The callers compare with ==, so NaN is always written again.)"""
    if value is None or last is None:
        return value is last
    return math.copysign(1.0, value) == math.copysign(1.0, last)  # type: ignore[arg-type]


def _help_text(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


class _Encoder:
    """What both encoders share: the escaping, the names and series rendered once, and the
    line of a sample that cannot reuse its last one."""

    openmetrics = False

    def __init__(self, escaping: str = UNDERSCORES) -> None:
        self.escaping = escaping
        self._names = _Names(openmetrics=self.openmetrics, escaping=escaping)

    def _line(self, key: object, sample: Any, last: tuple[int, object, str] | None) -> str:
        """A sample's line, remembered for the next scrape under key (_samples reuses a
        remembered line itself, inline: that is most samples, the hot path)."""
        names = self._names
        value, timestamp = sample[2], sample[3]
        series = last[2][:last[0]] if last is not None else names.render(sample[0], sample[1])
        if value is None and self.openmetrics:
            text = ""
        else:
            text = repr(float(value))
            if len(text) > 8 or text[-1] in "fn":
                text = format_value(value)
        if timestamp is None:
            line = f"{series} {text}\n"
            names.remember(key, series, value, line)
            return line
        names.remember(key, series, _NO_VALUE, "")
        if self.openmetrics:
            return f"{series} {text} {timestamp}\n"
        return f"{series} {text} {int(float(timestamp) * 1000):d}\n"

    def _samples(self, samples: Iterable[Any], output: list[str],
                 split_from: str | None = None) -> dict[str, list[str]] | None:
        """Append the lines of a family's samples to output: the hot loop of a scrape. The
        same series come back scrape after scrape, mostly with the same values, so their
        rendered names and labels, and their last line, are remembered (bounded) and reused.

        split_from (the text format): the family's name, whose samples named it plus an
        OpenMetrics-only suffix (_created, ...) are returned by suffix instead, to be written
        as families of their own. In OpenMetrics, None when a sample has an exemplar or a
        native histogram: the caller renders that family otherwise."""
        cache_get = self._names.series.get
        append = output.append
        openmetrics = self.openmetrics
        split: dict[str, list[str]] = {}
        for sample in samples:
            if openmetrics and (sample[4] is not None or sample[5] is not None):
                return None
            sname: str = sample[0]
            labels: dict[str, str] = sample[1]
            target = append
            if split_from is not None and sname.endswith(_OM_SUFFIXES) and \
                    sname.startswith(split_from) and sname[len(split_from):] in _OM_SUFFIXES:
                target = split.setdefault(sname[len(split_from):], []).append
            key = (sname, *labels, *labels.values()) if labels else sname
            value = sample[2]
            last = cache_get(key)
            if last is not None and sample[3] is None and value == last[1] and \
                    (value or _same_zero(value, last[1])):
                target(last[2])
                continue
            target(self._line(key, sample, last))
        return split


class TextEncoder(_Encoder):
    """The text format 0.0.4 (or 1.0.0 with an escaping), as prometheus_client's
    exposition.generate_latest writes it."""

    def __call__(self, registry: Source) -> bytes:
        names = self._names
        output: list[str] = []
        for metric in registry.collect():
            mname: str = metric.name
            mtype: str = metric.type
            documentation: str = metric.documentation
            if mtype == "counter":
                mname += "_total"
            elif mtype == "info":
                mname += "_info"
                mtype = "gauge"
            elif mtype == "stateset":
                mtype = "gauge"
            elif mtype == "gaugehistogram":
                mtype = "histogram"
            elif mtype == "unknown":
                mtype = "untyped"
            escaped = names.metric(mname)
            output.append(f"# HELP {escaped} {_help_text(documentation)}\n"
                          f"# TYPE {escaped} {mtype}\n")
            base: str = metric.name
            om_samples = self._samples(metric.samples, output, split_from=base) or {}
            for suffix, lines in sorted(om_samples.items()):
                escaped = names.metric(base + suffix)
                output.append(f"# HELP {escaped} {_help_text(documentation)}\n"
                              f"# TYPE {escaped} gauge\n")
                output.extend(lines)
        return "".join(output).encode("utf-8")


class OpenMetricsEncoder(_Encoder):
    """OpenMetrics 1.0.0, as prometheus_client's openmetrics.exposition.generate_latest
    writes it."""

    openmetrics = True

    def __call__(self, registry: Source) -> bytes:
        names = self._names
        output: list[str] = []
        for metric in registry.collect():
            family_at = len(output)
            mname = names.metric(metric.name)
            output.append(f"# HELP {mname} {_escape_value(metric.documentation)}\n"
                          f"# TYPE {mname} {metric.type}\n")
            unit = getattr(metric, "unit", "")
            if unit:
                output.append(f"# UNIT {mname} {unit}\n")
            if self._samples(metric.samples, output) is None:
                # Exemplars and native histograms: rare, left to prometheus_client.
                del output[family_at:]
                output.append(self._fallback(metric))
        output.append("# EOF\n")
        return "".join(output).encode("utf-8")

    def _fallback(self, metric: Any) -> str:
        """The whole family as prometheus_client renders it."""
        from prometheus_client.openmetrics.exposition import generate_latest

        class _One:
            def collect(self) -> list[Any]:
                return [metric]

        body: bytes = generate_latest(_One(), escaping=self.escaping)  # type: ignore[no-untyped-call]
        return body.decode("utf-8").removesuffix("# EOF\n")


_TEXT = TextEncoder(UNDERSCORES)
_OPENMETRICS = OpenMetricsEncoder(UNDERSCORES)
# One encoder per content type this module answers with: shared work (one body for the
# scrapes waiting on one collection) can be keyed on the content type alone.
ENCODERS: dict[str, Encoder] = {
    TEXT_0_0_4: _TEXT,
    f"{TEXT_TYPE}; version=1.0.0; charset=utf-8; escaping={UNDERSCORES}": _TEXT,
    f"{TEXT_TYPE}; version=1.0.0; charset=utf-8; escaping={ALLOW_UTF8}": TextEncoder(ALLOW_UTF8),
    f"{OPENMETRICS_TYPE}; version=1.0.0; charset=utf-8": _OPENMETRICS,
    f"{OPENMETRICS_TYPE}; version=1.0.0; charset=utf-8; escaping={UNDERSCORES}": _OPENMETRICS,
    f"{OPENMETRICS_TYPE}; version=1.0.0; charset=utf-8; escaping={ALLOW_UTF8}":
        OpenMetricsEncoder(ALLOW_UTF8),
}

generate_latest: Encoder = _TEXT
"""The text format 0.0.4, as prometheus_client.exposition.generate_latest(registry)."""
generate_openmetrics: Encoder = _OPENMETRICS
"""OpenMetrics 1.0.0, as prometheus_client.openmetrics.exposition.generate_latest(registry)."""


def _version_at_least_1(version: str) -> bool:
    """Whether a requested version is 1.0.0 or later (anything unparsable is not)."""
    parts = version.split(".")
    if not all(part.isdigit() for part in parts):
        return False
    return tuple(int(part) for part in parts) >= (1, 0, 0)


def _quality(text: str) -> float:
    """A q parameter's value; an unreadable one counts as 1, as if it were absent."""
    try:
        quality = float(text)
    except ValueError:
        return 1.0
    return quality if math.isfinite(quality) else 1.0


def negotiate(accept: str | None) -> tuple[str, Encoder]:
    """(content type, encoder) for an Accept header, chosen as prometheus_client's
    choose_encoder chooses: the first media range that is OpenMetrics (no version, or 1.0.0 or
    later) or text/plain 1.0.0 or later, else the text format 0.0.4. Unlike it, a range with
    q=0 is skipped, and the content type never repeats the client's version string (what is
    served is 1.0.0 whatever later version was asked for)."""
    for item in (accept or "").split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        if media not in (OPENMETRICS_TYPE, TEXT_TYPE):
            continue
        values: dict[str, str] = {}
        for param in params:
            key, sep, value = param.strip().partition("=")
            if sep:
                values.setdefault(key.strip().lower(), value.strip())
        if _quality(values.get("q", "1")) <= 0:
            continue
        version = values.get("version", "")
        escaping = ALLOW_UTF8 if values.get("escaping") == ALLOW_UTF8 else UNDERSCORES
        if media == OPENMETRICS_TYPE and not version:
            return f"{OPENMETRICS_TYPE}; version=1.0.0; charset=utf-8", _OPENMETRICS
        if _version_at_least_1(version):
            content_type = f"{media}; version=1.0.0; charset=utf-8; escaping={escaping}"
            return content_type, ENCODERS[content_type]
    return TEXT_0_0_4, _TEXT


def encoder_for(content_type: str) -> Encoder:
    """The encoder of a content type negotiate() returns (KeyError for any other)."""
    return ENCODERS[content_type]
