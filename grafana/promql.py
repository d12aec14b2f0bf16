"""PromQL builders for the dashboards: selectors scoped by the dashboard variables, rates,
ratios, quantiles and one reading per shared server."""

from __future__ import annotations

# Grafana's rate window: at least four scrape intervals whatever the zoom.
RATE_WINDOW = "$__rate_interval"
# What every query reads: the clusters, jobs and instances selected in the variables.
SELECTED_INSTANCES = 'cluster=~"$cluster",job=~"$job",instance=~"$instance"'
# Shared services on the Overview: every exporter of the cluster, whatever host is selected.
SELECTED_CLUSTERS = 'cluster=~"$cluster",job=~"$job"'
# On a fleet, several exporters may read one PostgreSQL or Redis (docs/scaling.md); their
# samples differ only by instance, so these labels keep one reading per server before any sum.
PER_SERVER = "cluster, server"


def selector(metric: str, labels: str = "", *, scope: str = SELECTED_INSTANCES) -> str:
    """metric{scope,labels}."""
    inner = f"{scope},{labels}" if labels else scope
    return f"{metric}{{{inner}}}"


def rate(metric: str, labels: str = "", function: str = "rate", *,
         scope: str = SELECTED_INSTANCES) -> str:
    """function(metric{scope,labels}[$__rate_interval]); function is rate or increase."""
    return f"{function}({selector(metric, labels, scope=scope)}[{RATE_WINDOW}])"


def ratio(part: str, whole: str, by: str = "") -> str:
    """Share of part in whole, 0 (not empty) where part has no series but whole has."""
    grouping = f" by ({by})" if by else ""
    return (f"(sum{grouping} ({part}) or sum{grouping} ({whole}) * 0)\n/\n"
            f"sum{grouping} ({whole})")


def share_of_hits(hits: str, misses: str) -> str:
    """hits / (hits + misses) of two rate expressions."""
    return f"{hits}\n/\n({hits} + {misses})"


def hit_ratio(hits: str, misses: str, by: str, labels: str = "") -> str:
    """hits / (hits + misses) from two counters, summed by the labels in by."""
    return share_of_hits(f"sum by ({by}) ({rate(hits, labels)})",
                         f"sum by ({by}) ({rate(misses, labels)})")


def quantile(q: float, histogram: str, by: str = "", labels: str = "") -> str:
    """histogram_quantile over the rate of a histogram's buckets."""
    grouping = f"{by}, le" if by else "le"
    return (f"histogram_quantile({q}, "
            f"sum by ({grouping}) ({rate(histogram + '_bucket', labels)}))")


def mean(histogram: str, by: str, labels: str = "") -> str:
    """Mean observation of a histogram over the rate window."""
    return (f"sum by ({by}) ({rate(histogram + '_sum', labels)})\n/\n"
            f"sum by ({by}) ({rate(histogram + '_count', labels)})")


def once_per_server(expr: str, by: str = "") -> str:
    """One series per (cluster, server[, by]) of a service family, however many exporters
    read that server: max, since their readings agree but for scrape timing."""
    return f"max by ({PER_SERVER}{', ' + by if by else ''}) ({expr})"


def sum_per_server(expr: str, by: str) -> str:
    """The sum over the labels in by of one reading per server, per server."""
    return f"sum by ({PER_SERVER}) ({once_per_server(expr, by)})"
