"""The one set of metric family helpers the collectors share; callers write the full name."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def gauge(
    name: str, help_text: str, labels: Sequence[str] = (), value: float | None = None
) -> GaugeMetricFamily:
    """A gauge named in full (``qatoolbox_...``); with ``value``, one unlabelled sample."""
    if value is not None:
        return GaugeMetricFamily(name, help_text, value=value)
    return GaugeMetricFamily(name, help_text, labels=list(labels))


def counter(
    name: str, help_text: str, labels: Sequence[str] = (), value: float | None = None
) -> CounterMetricFamily:
    """A counter named in full without ``_total`` (the family adds it); ``value`` as for gauge."""
    if value is not None:
        return CounterMetricFamily(name, help_text, value=value)
    return CounterMetricFamily(name, help_text, labels=list(labels))
