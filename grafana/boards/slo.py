"""The SLOs dashboard: the SLOs of prometheus/slos/qatoolbox.yml from the generated Sloth
recording rules."""

from __future__ import annotations

from collections.abc import Sequence

from dashboard import Dashboard, Row
from panels import stat, threshold_steps, timeseries

BY_SLO = "{{sloth_slo}}"


def sloth_series(rule: str) -> str:
    """The series of a Sloth recording rule for the QAToolBox service."""
    return f'{rule}{{sloth_service="qatoolbox"}}'


def burn_rates(windows: Sequence[str]) -> list[tuple[str, str]]:
    """(error ratio over each window divided by the budget, legend) of every SLO."""
    return [(f"{sloth_series(f'slo:sli_error:ratio_rate{window}')}\n"
             f"/ on (sloth_id) group_left\n{sloth_series('slo:error_budget:ratio')}",
             f"{BY_SLO} {window}") for window in windows]


def dashboard() -> Dashboard:
    """Error budgets and burn rates of the availability and latency SLOs."""
    return Dashboard("qatoolbox-slo", "QAToolBox / SLOs",
                     "Error budgets and burn rates of the availability and latency SLOs "
                     "(prometheus/slos/qatoolbox.yml), from the Sloth-named recording rules.", [
        Row("Error budget"),
        stat("Objective", "Share of good requests each SLO promises over 30 days.",
             "percentunit", [(sloth_series("slo:objective:ratio"), BY_SLO)], w=6, graph=False),
        stat("Error budget remaining", "1 - the period's burn rate: what would be left at the "
             "end of the 30 days if they went on like the period so far; below 0 the SLO is "
             "missed.", "percentunit",
             [(sloth_series("slo:period_error_budget_remaining:ratio"), BY_SLO)], w=6,
             thresholds=threshold_steps((None, "red"), (0, "orange"), (0.25, "green"))),
        stat("Burn rate now", "Error ratio over 5 minutes divided by the budget: 1 spends it "
             "exactly in 30 days, 14.4 in 2 days.", "none",
             [(sloth_series("slo:current_burn_rate:ratio"), BY_SLO)], w=6,
             thresholds=threshold_steps((None, "green"), (1, "orange"), (14.4, "red"))),
        stat("Period burn rate", "Mean error ratio of the period divided by the budget.",
             "none", [(sloth_series("slo:period_burn_rate:ratio"), BY_SLO)], w=6,
             thresholds=threshold_steps((None, "green"), (1, "red"))),
        Row("Burn rates of the alert windows"),
        timeseries("Page windows", "Error ratio over 5 m, 30 m, 1 h and 6 h divided by the "
                   "budget. SloErrorBudgetBurnFast pages when 1 h and 5 m are over 14.4, or 6 h "
                   "and 30 m over 6.", "none",
                   burn_rates(("5m", "30m", "1h", "6h")), w=12, alert_lines=(6.0, 14.4)),
        timeseries("Ticket windows", "Error ratio over 2 h, 6 h, 1 d and 3 d divided by the "
                   "budget. SloErrorBudgetBurnSlow tickets when 1 d and 2 h are over 3, or 3 d "
                   "and 6 h over 1.", "none",
                   burn_rates(("2h", "6h", "1d", "3d")), w=12, alert_lines=(1.0, 3.0)),
        Row("Service level"),
        timeseries("Error ratio", "Share of bad requests over 5 minutes (5xx for availability, "
                   "over 2 s for latency) against each SLO's budget.", "percentunit",
                   [(sloth_series("slo:sli_error:ratio_rate5m"), BY_SLO),
                    (sloth_series("slo:error_budget:ratio"), f"{BY_SLO} budget")], w=12, min_=0),
        timeseries("Error budget remaining", "The period's remaining budget over time.",
                   "percentunit",
                   [(sloth_series("slo:period_error_budget_remaining:ratio"), BY_SLO)], w=12,
                   alert_lines=(0.0,)),
    ])
