"""The HTTP performance dashboard: requests, errors and latency overall and per route, DB
work per request, Celery tasks."""

from __future__ import annotations

from dashboard import Dashboard, Row, query_variable
from panels import heatmap, table, timeseries
from promql import mean, quantile, rate, ratio, selector

# The routes chosen in the dashboard's Route variable.
ROUTES = 'route=~"$route"'
REQUESTS = "qatoolbox_http_requests_total"
DURATION = "qatoolbox_http_request_duration_seconds"


def share_answered(status: str, by: str = "") -> str:
    """Share of the chosen routes' requests answered with a status matching the regex status."""
    return ratio(rate(REQUESTS, f'{ROUTES},status=~"{status}"'), rate(REQUESTS, ROUTES), by)


def route_quantile(q: float, histogram: str) -> str:
    """The q-quantile of histogram for each chosen route."""
    return quantile(q, histogram, "route", ROUTES)


def dashboard() -> Dashboard:
    """Request rate, errors and latency overall and per route; DB use; Celery tasks."""
    return Dashboard("qatoolbox-http", "QAToolBox / HTTP performance",
                     "Requests, errors and latency per route, DB work per request and Celery "
                     "tasks.", [
        Row("Overall"),
        timeseries("Request rate", "Requests per second by status.", "reqps",
                   [(f"sum by (status) ({rate(REQUESTS, ROUTES)})", "{{status}}")], stack=True),
        timeseries("Error ratio", "Share of requests answered 5xx and 4xx.", "percentunit",
                   [(share_answered("5.."), "5xx"), (share_answered("4.."), "4xx")], min_=0),
        timeseries("Latency p50 / p95 / p99", "Request duration percentiles.", "s",
                   [(quantile(q, DURATION, labels=ROUTES), f"p{round(q * 100)}")
                    for q in (0.5, 0.95, 0.99)]),
        timeseries("In flight", "Requests being served now, summed over workers.", "short",
                   [(f"sum({selector('qatoolbox_http_requests_in_flight')})", "in flight")]),
        timeseries("Exceptions", "Unhandled exceptions per second by route.", "ops",
                   [(f"sum by (route) "
                     f"({rate('qatoolbox_http_request_exceptions_total', ROUTES)})", "{{route}}")]),
        heatmap("Latency distribution", "Request durations over time.", "s",
                f"sum by (le) ({rate(DURATION + '_bucket', ROUTES)})", w=8),
        Row("Traffic against its usual level"),
        timeseries("Request rate, baseline and last week",
                   "Requests per second now, the baseline HttpTrafficAnomaly compares it with "
                   "(median of the same hour 1-3 weeks ago) and the same hour last week, which "
                   "HttpTrafficDrop compares it with (page under 20% of it).", "reqps",
                   [(selector("instance:qatoolbox_http_requests:rate5m"), "{{instance}} now"),
                    (selector("instance:qatoolbox_http_requests:rate5m_prediction"),
                     "{{instance}} baseline"),
                    (f"{selector('instance:qatoolbox_http_requests:rate5m')} offset 1w",
                     "{{instance}} last week")], w=16),
        timeseries("Traffic z-score", "Residual (rate - baseline) in spreads of last week's "
                   "residuals; HttpTrafficAnomaly beyond +-3.", "short",
                   [(selector("instance:qatoolbox_http_requests:rate5m_zscore"), "{{instance}}")],
                   alert_lines=(-3.0, 3.0)),
        Row("Per route"),
        timeseries("p95 by route", "95th percentile duration of each route.", "s",
                   [(route_quantile(0.95, DURATION), "{{route}}")], w=12, legend_right=True),
        timeseries("Rate by route", "Requests per second of each route.", "reqps",
                   [(f"sum by (route) ({rate(REQUESTS, ROUTES)})", "{{route}}")], w=12,
                   legend_right=True),
        table("Slowest routes", "Routes by p95 duration, with p50, p99, rate and 5xx ratio.",
              "s",
              [(route_quantile(0.95, DURATION), ""),
               (route_quantile(0.5, DURATION), ""),
               (route_quantile(0.99, DURATION), ""),
               (f"sum by (route) ({rate(REQUESTS, ROUTES)})", ""),
               (share_answered("5..", "route"), "")],
              columns={"A": "p95", "B": "p50", "C": "p99", "D": "req/s", "E": "5xx ratio"},
              units={"req/s": "reqps", "5xx ratio": "percentunit"}, sort_by="p95"),
        Row("Database work per request"),
        timeseries("DB queries per request p95", "95th percentile of queries per request, "
                   "by route.", "short",
                   [(route_quantile(0.95, "qatoolbox_http_request_db_queries"),
                     "{{route}}")], w=12, legend_right=True),
        timeseries("DB time per request p95", "95th percentile of database time per request, "
                   "by route.", "s",
                   [(route_quantile(0.95, "qatoolbox_http_request_db_seconds"),
                     "{{route}}")], w=12, legend_right=True),
        timeseries("Mean DB queries per request", "Mean queries per request, by route.",
                   "short", [(mean("qatoolbox_http_request_db_queries", "route", ROUTES),
                              "{{route}}")], w=12, legend_right=True),
        timeseries("Mean DB time per request", "Mean database time per request, by route.",
                   "s", [(mean("qatoolbox_http_request_db_seconds", "route", ROUTES), "{{route}}")],
                   w=12, legend_right=True),
        Row("Celery tasks"),
        timeseries("Tasks by state", "Tasks finished per second by task and state.", "ops",
                   [(f"sum by (task, state) ({rate('qatoolbox_celery_tasks_total')})",
                     "{{task}} {{state}}")]),
        timeseries("Task failure ratio", "Share of finished tasks that failed, by task.",
                   "percentunit",
                   [(ratio(rate("qatoolbox_celery_tasks_total", 'state="failed"'),
                           rate("qatoolbox_celery_tasks_total"), "task"), "{{task}}")], min_=0),
        timeseries("Task duration p95", "95th percentile run time by task.", "s",
                   [(quantile(0.95, "qatoolbox_celery_task_duration_seconds", "task"),
                     "{{task}}")]),
    ], [query_variable("route", "Route",
                       'label_values(qatoolbox_http_requests_total{job=~"$job",'
                       'instance=~"$instance"}, route)')])
