"""exporter.textformat writes exactly the bytes prometheus_client's encoders write: the text
format and OpenMetrics, in both name escapings a scraper can ask for."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    Timestamp,
)
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString

from exporter import textformat

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def same(families: Iterable[Metric]) -> None:
    """Every format and escaping of ours against prometheus_client's, on the same families."""
    registry = _Families(families)
    assert textformat.generate_latest(registry) == generate_latest(registry)
    assert textformat.generate_openmetrics(registry) == openmetrics.generate_latest(registry)
    for escaping in (textformat.UNDERSCORES, textformat.ALLOW_UTF8):
        assert textformat.TextEncoder(escaping)(registry) == \
            generate_latest(registry, escaping=escaping)
        assert textformat.OpenMetricsEncoder(escaping)(registry) == \
            openmetrics.generate_latest(registry, escaping=escaping)


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0.0, -0.0, 1e6, 999999.0, 1234567.0, 1e21, 1e-7, 0.1, 5e-324]),
)
names = st.one_of(
    st.from_regex(r"\A[a-z_][a-z0-9_]{0,12}\Z"),
    st.from_regex(r"\A[a-zA-Z_:][a-zA-Z0-9_:]{0,8}\Z"),  # colons: OpenMetrics samples differ
    st.text(min_size=1, max_size=8),  # names prometheus_client has to escape (or quote)
    st.sampled_from(["a\n", "1a", "a.b", 'a"b', "a\\b", "é"]),
).filter(lambda name: name not in ("_total", "_info"))  # families strip these to an empty name
label_values = st.text(max_size=10) | st.sampled_from(['a"b', "a\\b", "a\nb", "\\n", ""])
label_names = (st.from_regex(r"\A[a-z_][a-z0-9_]{0,6}\Z") | st.sampled_from(["__x", "le"])
               | st.text(min_size=1, max_size=4))
timestamps = st.none() | st.floats(0, 2e9) | st.builds(Timestamp, st.integers(0, 2 * 10**9),
                                                       st.integers(0, 10**9 - 1))


@st.composite
def families(draw: st.DrawFn) -> Metric:
    kind = draw(st.sampled_from(["gauge", "counter", "histogram", "summary", "info",
                                 "stateset", "unknown", "gaugehistogram", "unit"]))
    name = draw(names)
    doc = draw(st.text(max_size=20) | st.sampled_from(["a\\b\nc.", "Help."]))
    labels = draw(st.lists(label_names, max_size=3, unique=True))
    rows = draw(st.lists(st.tuples(st.lists(label_values, min_size=len(labels),
                                            max_size=len(labels)), values, timestamps),
                           max_size=4))
    family: Metric
    if kind == "gauge":
        gauge = GaugeMetricFamily(name, doc, labels=labels)
        for lv, v, ts in rows:
            gauge.add_metric(lv, v, timestamp=ts)
        family = gauge
    elif kind == "counter":
        family = CounterMetricFamily(name, doc, labels=labels)
        for lv, v, ts in rows:
            family.add_metric(lv, v, created=draw(st.none() | st.floats(0, 2e9)), timestamp=ts)
        with_exemplar = draw(st.booleans())
        if rows and with_exemplar:
            # An exemplar on one sample: OpenMetrics renders this family through
            # prometheus_client; the others stay ours.
            first = family.samples[0]
            family.samples[0] = first._replace(exemplar=Exemplar({"trace_id": "a\"b"}, 1.5))
    elif kind == "histogram":
        family = HistogramMetricFamily(name, doc, labels=[x for x in labels if x != "le"])
        lbl = [x for x in labels if x != "le"]
        for lv, v, _ in rows:
            family.add_metric(lv[:len(lbl)], [("0.5", 1.0), ("+Inf", 2.0)], sum_value=v)
    elif kind == "summary":
        family = SummaryMetricFamily(name, doc, labels=labels)
        for lv, v, _ in rows:
            family.add_metric(lv, count_value=3, sum_value=v)
    elif kind == "info":
        family = InfoMetricFamily(name, doc, labels=labels)
        for lv, _, _ in rows:
            family.add_metric(lv, {"version": draw(label_values)})
    elif kind == "stateset":
        family = StateSetMetricFamily(name, doc, labels=labels)
        for lv, _, _ in rows:
            family.add_metric(lv, {"on": True, "off": False})
    elif kind == "gaugehistogram":
        lbl = [x for x in labels if x != "le"]
        family = GaugeHistogramMetricFamily(name, doc, labels=lbl)
        for lv, v, ts in rows:
            family.add_metric(lv[:len(lbl)], [("1.0", 1.0), ("+Inf", 2.0)], gsum_value=v,
                              timestamp=ts)
    elif kind == "unit":
        family = GaugeMetricFamily(name, doc, labels=labels, unit="seconds")
        for lv, v, ts in rows:
            family.add_metric(lv, v, timestamp=ts)
    else:
        family = Metric(name, doc, "unknown")
        for lv, v, ts in rows:
            family.add_sample(name, dict(zip(labels, lv, strict=True)), v, ts)
    return family


@settings(max_examples=300, deadline=None)
@given(st.lists(families(), max_size=4))
def test_same_bytes_as_prometheus_client(fams: list[Metric]) -> None:
    same(fams)


@settings(max_examples=200, deadline=None)
@given(st.lists(families(), min_size=1, max_size=3), st.data())
def test_same_bytes_when_values_change(fams: list[Metric], data: st.DataObject) -> None:
    """A series seen before reuses its line only when its value is written the same way."""
    same(fams)
    for family in fams:
        for i, sample in enumerate(family.samples):
            if data.draw(st.booleans()):
                family.samples[i] = sample._replace(value=data.draw(values))
    same(fams)
    same(fams)


@pytest.mark.parametrize(("first", "then"), [
    (0.0, -0.0), (-0.0, 0.0), (0, 0.0), (1, 1.0), (math.nan, math.nan), (1.0, True),
    (2.5e7, 25000000.0), (math.inf, math.inf), (1e21, 1e21), (0.0, 0.0)])
def test_unchanged_values_written_as_prometheus_client_does(first: float, then: float) -> None:
    family = GaugeMetricFamily("qatoolbox_a:b_bytes", "Help.", labels=["x", "y"])
    family.add_metric(["1", 'v"'], first)
    same([family])
    family.samples[0] = family.samples[0]._replace(value=then)
    same([family])
    timed = family.samples[0]._replace(timestamp=1.5)
    family.samples[0] = timed
    same([family])
    family.samples[0] = timed._replace(timestamp=None)
    same([family])


def test_missing_value_is_empty_in_openmetrics() -> None:
    family = Metric("qatoolbox_x", "Help.", "unknown")
    family.add_sample("qatoolbox_x", {}, None)  # type: ignore[arg-type]
    registry = _Families([family])
    for _ in range(2):  # the second time from the remembered line
        assert textformat.generate_openmetrics(registry) == \
            openmetrics.generate_latest(registry)
        assert b"qatoolbox_x \n" in textformat.generate_openmetrics(registry)


@given(values)
def test_format_value_is_go_float(value: float) -> None:
    assert textformat.format_value(value) == floatToGoString(value)


def test_known_values() -> None:
    assert textformat.format_value(math.inf) == "+Inf"
    assert textformat.format_value(-math.inf) == "-Inf"
    assert textformat.format_value(math.nan) == "NaN"
    assert textformat.format_value(1234567.0) == "1.234567e+06"
    assert textformat.format_value(3) == "3.0"
    family = GaugeMetricFamily("qatoolbox_x_bytes", 'Quote " and \\ and\nnewline.',
                               labels=["path"])
    family.add_metric(['C:\\"x"\n'], 1.0)
    body = textformat.generate_latest(_Families([family]))
    assert body == (b'# HELP qatoolbox_x_bytes Quote " and \\\\ and\\nnewline.\n'
                    b"# TYPE qatoolbox_x_bytes gauge\n"
                    b'qatoolbox_x_bytes{path="C:\\\\\\"x\\"\\n"} 1.0\n')


@pytest.mark.parametrize("accept", [
    PROMETHEUS_ACCEPT,
    "",
    "text/plain",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=0.0.1,text/plain;version=0.0.4",
    "application/openmetrics-text;version=0.0.1",
    "application/json, */*",
    # Prometheus 3.x with UTF-8 names allowed.
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
])
def test_negotiates_as_prometheus_client(accept: str) -> None:
    """The same format and content type as prometheus_client's choose_encoder, and the
    encoder for it, one object per content type (the key scrapes share a body on)."""
    content_type, encoder = textformat.negotiate(accept)
    theirs, their_type = choose_encoder(accept)
    family = CounterMetricFamily("qatoolbox_requests", "Requests.", labels=["route"])
    family.add_metric(["api/<int:id>/"], 3.0)
    registry = _Families([family])
    assert textformat.encoder_for(content_type) is encoder
    assert textformat.negotiate(accept)[1] is encoder
    if "escaping=dots" in their_type:
        # Dots and values escaping rename even legacy names (a_b -> a__b); only underscores
        # and allow-utf-8 are offered, and the content type says which one was used.
        assert content_type == their_type.replace("escaping=dots", "escaping=underscores")
        assert isinstance(theirs, functools.partial)
        assert encoder(registry) == theirs.func(registry, escaping="underscores")
    else:
        assert content_type == their_type
        assert encoder(registry) == theirs(registry)


def test_prometheus_request_gets_openmetrics() -> None:
    content_type, encoder = textformat.negotiate(PROMETHEUS_ACCEPT)
    assert content_type == ("application/openmetrics-text; version=1.0.0; charset=utf-8; "
                            "escaping=underscores")
    assert encoder is textformat.generate_openmetrics


@pytest.mark.parametrize(("accept", "content_type"), [
    # q=0 means "not acceptable" (RFC 9110): prometheus_client would serve it anyway.
    ("application/openmetrics-text;q=0, text/plain", textformat.TEXT_0_0_4),
    # A version we do not write is answered with the one we do, never echoed back.
    ("application/openmetrics-text;version=2.0.0",
     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"),
    ("text/plain;version=7.0\r\nX-Evil: 1", textformat.TEXT_0_0_4),
    ("application/openmetrics-text;version=1.a", textformat.TEXT_0_0_4),
    ("APPLICATION/OpenMetrics-Text ; VERSION=1.0.0",
     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"),
    ("text/plain;version=1.0.0;q=abc",
     "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
])
def test_negotiation_of_odd_headers(accept: str, content_type: str) -> None:
    assert textformat.negotiate(accept)[0] == content_type


def test_unknown_content_type_has_no_encoder() -> None:
    with pytest.raises(KeyError):
        textformat.encoder_for("text/html")
