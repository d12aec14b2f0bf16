"""exporter.textformat writes exactly the bytes prometheus_client's generate_latest writes."""

from __future__ import annotations

import math
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from exporter import textformat


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def same(families: Iterable[Metric]) -> None:
    registry = _Families(families)
    assert textformat.generate_latest(registry) == generate_latest(registry)


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0.0, -0.0, 1e6, 999999.0, 1234567.0, 1e21, 1e-7, 0.1, 5e-324]),
)
names = st.one_of(
    st.from_regex(r"\A[a-z_][a-z0-9_]{0,12}\Z"),
    st.text(min_size=1, max_size=8),  # names prometheus_client has to escape
)
label_values = st.text(max_size=10) | st.sampled_from(['a"b', "a\\b", "a\nb", "\\n", ""])
label_names = st.from_regex(r"\A[a-z_][a-z0-9_]{0,6}\Z") | st.sampled_from(["__x", "le"])


@st.composite
def families(draw: st.DrawFn) -> Metric:
    kind = draw(st.sampled_from(["gauge", "counter", "histogram", "summary", "info",
                                 "stateset", "unknown"]))
    name = draw(names)
    doc = draw(st.text(max_size=20) | st.sampled_from(["a\\b\nc.", "Help."]))
    labels = draw(st.lists(label_names, max_size=3, unique=True))
    rows = draw(st.lists(st.tuples(st.lists(label_values, min_size=len(labels),
                                            max_size=len(labels)), values,
                                   st.none() | st.floats(0, 2e9)), max_size=4))
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
    else:
        family = Metric(name, doc, "unknown")
        for lv, v, ts in rows:
            family.add_sample(name, dict(zip(labels, lv, strict=True)), v, ts)
    return family


@settings(max_examples=150, deadline=None)
@given(st.lists(families(), max_size=4))
def test_same_bytes_as_prometheus_client(fams: list[Metric]) -> None:
    same(fams)


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
