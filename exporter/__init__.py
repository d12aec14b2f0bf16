"""qatoolbox-exporter: one Prometheus exporter for a QAToolBox host."""

__version__ = "0.1.0"
