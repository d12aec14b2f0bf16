"""Alerting checks: promtool, amtool, rule unit tests and lint, inhibitions, metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ROOT, ExporterProcess, PostgresServer, RedisServer
from tests.promstack import (
    ALERTMANAGER_DIR,
    PROMETHEUS_DIR,
    AlertmanagerServer,
    alertmanager_test_config,
    record_app_traffic,
)

RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TESTS_DIR = ROOT / "tests" / "rules"
RULE_TESTS = sorted(RULE_TESTS_DIR.glob("*.test.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
AM_CONFIG = ALERTMANAGER_DIR / "alertmanager.yml"
SEVERITIES = {"critical", "warning", "info"}
# Alerts whose result has no instance: the service-level SLO burns, the Watchdog (severity
# "none", for the dead man's switch alone) and absent() ones.
INSTANCELESS = {"Watchdog", "SloErrorBudgetBurnFast", "SloErrorBudgetBurnSlow"}
SLO_SPEC = PROMETHEUS_DIR / "slos" / "qatoolbox.yml"
SLO_GENERATOR = PROMETHEUS_DIR / "generate_slo.py"
SCENARIOS = ROOT / "tests" / "rules" / "scenarios.py"
RUNBOOK_PREFIX = "https://github.com/qatoolbox/qatoolbox-exporter/blob/main/docs/runbooks.md#"

# PromQL functions that exist in Prometheus 2.42 and are unchanged in 3.x. holt_winters is
# deliberately absent: 3.0 renamed it (double_exponential_smoothing, behind a feature flag).
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time",
    "ln", "log10", "log2", "max_over_time", "min_over_time", "minute", "month",
    "predict_linear", "present_over_time", "quantile_over_time", "rate", "resets", "round",
    "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "time", "timestamp", "vector", "year",
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}
REMOVED_IN_3 = {"holt_winters"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "offset", "bool", "atan2", "inf", "nan", "Inf", "NaN"}
# Series Prometheus itself makes, not the exporter, and those of Prometheus' and
# Alertmanager's own /metrics (rules/monitoring.yml).
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"}
SELF_MONITORING_PREFIXES = ("prometheus_", "alertmanager_")


# --- helpers ----------------------------------------------------------------------------------

def run(argv: list[str], cwd: Path = ROOT,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def load_rules() -> list[tuple[Path, dict[str, Any]]]:
    rules: list[tuple[Path, dict[str, Any]]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend((path, rule) for rule in group["rules"])
    return rules


def alert_rules() -> list[dict[str, Any]]:
    return [rule for _, rule in load_rules() if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for _, rule in load_rules() if "record" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in RUNBOOKS.read_text().splitlines()
            if line.startswith("#")}


def strip_promql(expr: str) -> str:
    """The expression without strings, label matchers, ranges and grouping label lists."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"#[^\n]*", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)


def promql_tokens(expr: str) -> tuple[set[str], set[str]]:
    """(function names, series names) used by a PromQL expression."""
    text = strip_promql(expr)
    functions: set[str] = set()
    names: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # a duration (167h30m) or an exponent (1e9)
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or re.match(r"(by|without)\b", rest):
            if token not in KEYWORDS:
                functions.add(token)
        elif token not in KEYWORDS:
            names.add(token)
    return functions, names


def rule_series_names() -> dict[str, set[str]]:
    """{series name used in some rule expression: the rules using it}, recording rules out."""
    recorded = {rule["record"] for rule in recording_rules()}
    used: dict[str, set[str]] = {}
    for _, rule in load_rules():
        _, names = promql_tokens(rule["expr"])
        for name in names - recorded:
            used.setdefault(name, set()).add(rule.get("alert") or rule["record"])
    return used


def rule_tests() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            cases.append(case)
    return cases


# --- promtool ---------------------------------------------------------------------------------

def test_promtool_check_config() -> None:
    result = run(["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


def test_prometheus_config_shape() -> None:
    """file_sd targets for the exporter, 15s interval, rules loaded, Alertmanager API v2."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["rules/*.yml"]
    job = next(s for s in config["scrape_configs"] if s["job_name"] == "qatoolbox")
    assert job["file_sd_configs"][0]["files"] == ["targets/*.yml"]
    for target_file in (PROMETHEUS_DIR / "targets").glob("*.yml"):
        for group in yaml.safe_load(target_file.read_text()):
            assert group["targets"], target_file
    for manager in config["alerting"]["alertmanagers"]:
        assert manager.get("api_version", "v2") == "v2"  # v1 is gone in Prometheus 3


def test_commented_tls_and_basic_auth_example_is_valid(workdir: Path) -> None:
    """The commented scrape settings for an exporter behind TLS and basic auth work when
    uncommented (promtool checks the referenced files exist, so they point at temp files)."""
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    marker = "    # With --web.config.file"
    assert marker in text
    head, example = text.split(marker)
    lines = [line.replace("    #   ", "    ", 1) for line in example.splitlines()[1:]]
    for name in ("exporter-ca.pem", "exporter-password"):
        (workdir / name).write_text("x\n")
    uncommented = "\n".join(lines).replace("/etc/prometheus/secrets", str(workdir))
    assert "scheme: https" in uncommented and "password_file:" in uncommented
    dest = workdir / "prom"
    shutil.copytree(PROMETHEUS_DIR, dest)
    (dest / "prometheus.yml").write_text(head + uncommented + "\n")
    config = yaml.safe_load((dest / "prometheus.yml").read_text())
    job = next(s for s in config["scrape_configs"] if s["job_name"] == "qatoolbox")
    assert job["scheme"] == "https" and job["basic_auth"]["username"] == "prometheus"
    result = run(["promtool", "check", "config", "prometheus.yml"], cwd=dest)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_list_every_alert() -> None:
    text = (ROOT / "docs" / "alerting.md").read_text()
    missing = [r["alert"] for r in alert_rules() if f"| `{r['alert']}` |" not in text]
    assert not missing, missing


def test_promtool_check_rules() -> None:
    result = run(["promtool", "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(test_file: Path) -> None:
    result = run(["promtool", "test", "rules", test_file.name], cwd=RULE_TESTS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail(workdir: Path) -> None:
    """A wrong expected annotation fails: the unit tests above are not vacuous."""
    text = (RULE_TESTS_DIR / "postgres.test.yml").read_text()
    mutated = text.replace("(qatoolbox_postgres_up = 0)", "(qatoolbox_postgres_up = 1)")
    assert mutated != text
    target = workdir / "mutated.test.yml"
    target.write_text(mutated.replace("../../prometheus/", f"{PROMETHEUS_DIR}/"))
    result = run(["promtool", "test", "rules", str(target)])
    assert result.returncode != 0
    assert "PostgresDown" in result.stdout + result.stderr


# --- rule lint --------------------------------------------------------------------------------

def test_there_is_an_alert_for_everything_the_issue_names() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    required = {
        "HostCpuUsageHigh", "HostCpuUsageCritical", "HostMemoryUsageHigh",
        "HostMemoryUsageCritical", "HostDiskUsageHigh", "HostDiskUsageCritical",
        "HostDiskWillFillIn24Hours", "HostDiskWillFillIn4Hours", "HostHighLoad",
        "ProcessGroupDown", "PostgresDown", "PostgresTooManyConnections",
        "PostgresConnectionsExhausted", "PostgresSlowQueries", "PostgresLockWaits",
        "PostgresDeadlocks", "PostgresLowCacheHitRatio", "PostgresLongTransaction",
        "PostgresIdleInTransaction", "PostgresHighRollbackRatio", "PostgresReplicationLag",
        "PostgresRestarted", "RedisDown", "RedisLowHitRatio", "RedisMemoryHigh",
        "RedisEvictingKeys", "RedisRejectedConnections", "RedisTooManyClients",
        "HttpErrorRatioHigh", "HttpLatencyP95High", "HttpTooManyDbQueries", "HttpSlowDbTime",
        "CeleryQueueBacklog", "CeleryTaskFailureRatio", "ChatRoomCleanupStalled",
        "TimeCapsuleUnlockStalled", "ActiveUsersLow", "BusinessQueryFailing", "ExporterDown",
        "ExporterCollectorFailing", "HttpTrafficAnomaly",
        # issue 16
        "SloErrorBudgetBurnFast", "SloErrorBudgetBurnSlow", "HttpTrafficDrop", "Watchdog",
        "PrometheusRuleEvaluationFailures", "PrometheusNotificationsFailing",
        "PrometheusConfigReloadFailed", "PrometheusTsdbCompactionsFailing",
        "PrometheusScrapeSamplesRejected", "AlertmanagerNotificationsFailing",
        "AlertmanagerClusterPeersMissing", "AppInstrumentationDown", "ExporterCollectorSlow",
        "HostClockSkew", "HostClockNotSynchronising", "HostOomKillDetected",
        "HostConntrackLimit", "PostgresXidWraparound", "PostgresWalArchiveFailing",
        "HostOutOfInodes", "HostNetworkErrors", "HostNetworkDrops", "HostDiskIoSaturated",
        "HostDiskLatencyHigh", "HostSwapUsageHigh", "HostMemoryPressure", "HostIoPressure",
        "HostCpuPressure", "PostgresReplicationSlotWalHigh", "PostgresReplicaLagging",
        "PostgresDeadTuplesHigh", "PostgresTableNotAutovacuumed", "RedisMemoryFragmentation",
        "RedisReplicaLinkDown", "RedisRdbSaveTooOld", "CeleryUnackedMessages",
    }
    assert required <= names, sorted(required - names)
    # Retired: the SLO burn rates page instead (docs/alerting.md).
    assert not names & {"HttpErrorRatioCritical", "HttpLatencyP99Critical"}
    # One rule per alert name, except the SLO alerts: one rule per SLO, told apart by `slo`.
    seen: dict[str, set[str]] = {}
    for rule in alert_rules():
        key = rule["labels"].get("slo", "")
        assert key not in seen.setdefault(rule["alert"], set()), f"duplicate {rule['alert']}"
        seen[rule["alert"]].add(key)


def test_slo_alerts_carry_the_slo_and_sloth_labels() -> None:
    slos = {rule["labels"]["slo"] for rule in alert_rules()
            if rule["alert"].startswith("SloErrorBudgetBurn")}
    assert slos == {"availability", "latency"}
    for rule in alert_rules():
        if rule["alert"].startswith("SloErrorBudgetBurn"):
            severity = {"SloErrorBudgetBurnFast": ("critical", "page"),
                        "SloErrorBudgetBurnSlow": ("warning", "ticket")}[rule["alert"]]
            assert (rule["labels"]["severity"], rule["labels"]["sloth_severity"]) == severity


def test_every_alert_has_severity_and_annotations() -> None:
    anchors = runbook_anchors()
    problems = []
    for rule in alert_rules():
        name = rule["alert"]
        labels = rule.get("labels", {})
        notes = rule.get("annotations", {})
        if labels.get("severity") not in SEVERITIES and (name, labels.get("severity")) != (
                "Watchdog", "none"):
            problems.append(f"{name}: severity {labels.get('severity')!r}")
        for key in ("summary", "description", "runbook_url"):
            if not notes.get(key):
                problems.append(f"{name}: no {key}")
        description = notes.get("description", "")
        if "$value" not in description:
            problems.append(f"{name}: description does not show the value")
        # Host alerts name the exporter's instance; PostgreSQL and Redis alerts, aggregated
        # over the exporters reading one server (docs/scaling.md), name the server.
        names_where = ("$labels.instance" in description
                       or ("$labels.server" in description and "server" in rule["expr"]))
        if (not names_where and not rule["expr"].startswith("absent(")
                and name not in INSTANCELESS):
            problems.append(f"{name}: description does not name the instance (or server)")
        url = notes.get("runbook_url", "")
        if not url.startswith(RUNBOOK_PREFIX):
            problems.append(f"{name}: runbook_url {url!r} is not a docs/runbooks.md link")
        elif url.removeprefix(RUNBOOK_PREFIX) not in anchors:
            problems.append(f"{name}: no heading for anchor {url.removeprefix(RUNBOOK_PREFIX)}")
        elif url.removeprefix(RUNBOOK_PREFIX) != github_anchor(name):
            problems.append(f"{name}: runbook anchor is not the alert's own section")
    assert not problems, "\n".join(problems)


def test_every_runbook_section_has_the_three_parts() -> None:
    """Meaning, first checks and how to silence it, under each alert's heading."""
    text = RUNBOOKS.read_text()
    sections = re.split(r"^### ", text, flags=re.MULTILINE)[1:]
    by_name = {section.splitlines()[0].strip(): section for section in sections}
    problems = []
    for rule in alert_rules():
        section = by_name.get(rule["alert"])
        if section is None:
            problems.append(f"{rule['alert']}: no ### section")
            continue
        for part in ("Meaning", "First checks", "Silencing"):
            if f"**{part}" not in section:
                problems.append(f"{rule['alert']}: no **{part}** part")
    assert not problems, "\n".join(problems)


def test_dashboard_annotations_name_real_dashboards() -> None:
    """The templates link GRAFANA/d/<dashboard>?var-instance=...: the uid must exist and have
    an instance variable."""
    dashboards = {}
    for path in (ROOT / "grafana" / "dashboards").glob("*.json"):
        board = json.loads(path.read_text())
        dashboards[board["uid"]] = {v["name"] for v in board.get("templating", {}).get("list", [])}
    if not dashboards:
        pytest.skip("no dashboards in grafana/dashboards yet")
    for rule in alert_rules():
        uid = rule["annotations"].get("dashboard")
        assert uid in dashboards, (rule["alert"], uid)
        assert "instance" in dashboards[uid], uid


def test_warning_critical_pairs_share_a_family() -> None:
    """The inhibition of a warning by its critical twin relies on the family label."""
    families: dict[str, set[str]] = {}
    for rule in alert_rules():
        family = rule.get("labels", {}).get("family")
        if family:
            families.setdefault(family, set()).add(rule["labels"]["severity"])
    assert families, "no families"
    for family, severities in families.items():
        assert severities == {"warning", "critical"}, (family, severities)


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in rule_tests():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), f"no firing test: {sorted(names - firing)}"
    # The Watchdog cannot be quiet: it is vector(1), firing from the first evaluation.
    assert names - quiet == {"Watchdog"}, f"no non-firing test: {sorted(names - quiet)}"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


def test_every_recording_rule_has_an_expression_test() -> None:
    tested: set[str] = set()
    for case in rule_tests():
        for check in case.get("promql_expr_test", []):
            tested |= promql_tokens(check["expr"])[1]
    names = {rule["record"] for rule in recording_rules()}
    assert names - tested == set(), f"no promql_expr_test: {sorted(names - tested)}"


# Sloth's names, kept so that Sloth's dashboards and reports read the generated SLO rules.
SLOTH_RECORDS = {
    *(f"slo:sli_error:ratio_rate{w}" for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d")),
    "slo:objective:ratio", "slo:error_budget:ratio", "slo:time_period:days",
    "slo:current_burn_rate:ratio", "slo:period_burn_rate:ratio",
    "slo:period_error_budget_remaining:ratio", "sloth_slo_info",
}


def test_recording_rule_names_follow_level_metric_operation() -> None:
    for path, rule in load_rules():
        if path.name == "slo.yml":
            assert rule.get("alert") or rule["record"] in SLOTH_RECORDS, rule["record"]
            continue
        if "record" not in rule:
            continue
        parts = rule["record"].split(":")
        assert len(parts) == 3 and all(parts), rule["record"]
        assert parts[1].startswith("qatoolbox_"), rule["record"]
    assert {rule["record"] for rule in recording_rules()} >= SLOTH_RECORDS


def test_slo_rules_are_generated_from_the_spec() -> None:
    """prometheus/rules/slo.yml is what generate_slo.py makes of the spec (like the
    dashboards' --check), and the anomaly scenario what scenarios.py writes."""
    for script in (SLO_GENERATOR, SCENARIOS):
        result = run([sys.executable, str(script), "--check"])
        assert result.returncode == 0, result.stdout + result.stderr


def test_slo_generator_refuses_a_bad_spec_in_one_line(workdir: Path) -> None:
    spec = yaml.safe_load(SLO_SPEC.read_text())
    cases = {
        "version": ({**spec, "version": "prometheus/v2"}, "version: must be 'prometheus/v1'"),
        "objective": ({**spec, "slos": [{**spec["slos"][0], "objective": 100}]},
                      "slos[0].objective: must be a percentage between 0 and 100"),
        "window": ({**spec, "slos": [{**spec["slos"][0], "sli": {"events": {
            "error_query": "sum(rate(x_total[5m]))", "total_query": "sum(rate(y_total[5m]))"}}}]},
            "slos[0].sli.events.error_query: must use the {{.window}} placeholder"),
        "severity": ({**spec, "slos": [{**spec["slos"][0], "alerting": {
            "name": "X", "page_alert": {"labels": {}}}}]},
            "slos[0].alerting.page_alert.labels.severity: every alert needs a severity"),
    }
    for case, (doc, message) in cases.items():
        path = workdir / f"{case}.yml"
        path.write_text(yaml.safe_dump(doc))
        out = workdir / f"{case}-rules.yml"
        result = run([sys.executable, str(SLO_GENERATOR), "--spec", str(path), "--out", str(out)])
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
    # A good spec elsewhere writes a file promtool accepts, equal to the committed one.
    out = workdir / "slo.yml"
    result = run([sys.executable, str(SLO_GENERATOR), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (RULES_DIR / "slo.yml").read_text()
    stale = workdir / "stale.yml"
    stale.write_text(out.read_text().replace("14.4", "14.5"))
    result = run([sys.executable, str(SLO_GENERATOR), "--check", "--out", str(stale)])
    assert result.returncode == 1 and "out of date" in result.stderr


def test_rules_use_only_functions_that_prometheus_3_keeps() -> None:
    problems = []
    for path, rule in load_rules():
        functions, _ = promql_tokens(rule["expr"])
        name = rule.get("alert") or rule["record"]
        for function in sorted(functions):
            if function in REMOVED_IN_3:
                problems.append(f"{path.name} {name}: {function} is gone in Prometheus 3")
            elif function not in PROMQL_FUNCTIONS:
                problems.append(f"{path.name} {name}: unknown function {function}")
        # Prometheus 3 writes classic histogram bounds as floats (le="1.0"): matching a
        # bound by its text breaks across the upgrade, unless a regex takes both writings.
        for op, value in re.findall(r'\ble\s*(=~?)\s*"((?:[^"\\]|\\.)*)"', rule["expr"]):
            pattern = value.replace("\\\\", "\\")
            bound = pattern.split("|")[0]
            if op == "=" or not (re.fullmatch(pattern, bound)
                                 and re.fullmatch(pattern, f"{float(bound)!r}")):
                problems.append(f"{path.name} {name}: matches le={value!r}, not both writings")
    assert not problems, "\n".join(problems)


def test_rules_never_rate_a_gauge() -> None:
    """rate/increase/irate only on counters (_total) or histogram buckets; gauge functions
    only on gauges."""
    problems = []
    for _, rule in load_rules():
        expr = strip_promql(rule["expr"])
        for match in re.finditer(r"\b(rate|irate|increase|resets)\s*\(\s*([A-Za-z_:][\w:]*)", expr):
            series = match.group(2)
            if not series.endswith(("_total", "_bucket", "_count", "_sum")):
                problems.append(f"{rule.get('alert') or rule['record']}: {match.group(0)}")
        for match in re.finditer(r"\b(deriv|predict_linear|delta)\s*\(\s*([A-Za-z_:][\w:]*)", expr):
            if match.group(2).endswith("_total"):
                problems.append(f"{rule.get('alert') or rule['record']}: {match.group(0)}")
    assert not problems, "\n".join(problems)


def test_promql_tokenizer() -> None:
    functions, names = promql_tokens(
        'sum without (cpu, mode) (rate(a_total{mode=~"idle|x"}[5m])) / on (job) group_left () '
        "b:c:d > 1e9 and avg_over_time(x[1h] offset 167h30m) unless absent(up{job=\"q\"})")
    assert functions == {"sum", "rate", "avg_over_time", "absent"}
    assert names == {"a_total", "b:c:d", "x", "up"}


# --- amtool -----------------------------------------------------------------------------------

def test_amtool_check_config() -> None:
    result = run(["amtool", "check-config", str(AM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 receivers" in result.stdout
    assert "11 inhibit rules" in result.stdout


def route(*labels: str) -> str:
    result = run(["amtool", "config", "routes", "test", f"--config.file={AM_CONFIG}", *labels])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


# Criticals page (oncall) and also reach the team's DingTalk group (chat, after continue).
RECEIVERS = {"critical": "oncall,chat", "warning": "team", "info": "digest"}


@pytest.mark.parametrize(("severity", "receiver"), list(RECEIVERS.items()))
def test_each_severity_lands_on_its_receiver(severity: str, receiver: str) -> None:
    assert route(f"severity={severity}", "alertname=HostCpuUsageHigh", "instance=h1") == receiver
    verified = run(["amtool", "config", "routes", "test", f"--config.file={AM_CONFIG}",
                    f"--verify.receivers={receiver}", f"severity={severity}", "alertname=X"])
    assert verified.returncode == 0, verified.stdout
    wrong = run(["amtool", "config", "routes", "test", f"--config.file={AM_CONFIG}",
                 "--verify.receivers=nobody", f"severity={severity}", "alertname=X"])
    assert wrong.returncode != 0


def test_every_rule_severity_routes_and_unlabelled_alerts_reach_the_team() -> None:
    for rule in alert_rules():
        severity = rule["labels"]["severity"]
        expected = "deadmansswitch" if rule["alert"] == "Watchdog" else RECEIVERS[severity]
        assert route(f"alertname={rule['alert']}", f"severity={severity}") == expected
    assert route("alertname=Hand-made") == "team"
    # The Watchdog goes to the dead man's switch alone, whatever its severity.
    assert route("alertname=Watchdog", "severity=critical") == "deadmansswitch"


def test_alertmanager_grouping_and_receivers() -> None:
    config = yaml.safe_load(AM_CONFIG.read_text())
    assert config["route"]["group_by"] == ["alertname", "cluster", "instance", "server"]
    routes = config["route"]["routes"]
    info = next(r for r in routes if r["matchers"] == ['severity="info"'])
    assert info["group_interval"] == "1h" and info["repeat_interval"] == "24h"
    # A digest: every info alert in one group, one message.
    assert info["group_by"] == ["severity"]
    watchdog = routes[0]
    assert watchdog["matchers"] == ['alertname="Watchdog"']
    assert watchdog["receiver"] == "deadmansswitch" and watchdog["repeat_interval"] == "1m"
    assert not watchdog.get("continue")
    oncall = next(r for r in routes if r["receiver"] == "oncall")
    assert oncall["continue"] is True
    by_name = {r["name"]: r for r in config["receivers"]}
    assert set(by_name) == {"oncall", "team", "digest", "chat", "deadmansswitch"}
    assert by_name["oncall"]["email_configs"] and by_name["oncall"]["webhook_configs"]
    assert by_name["team"]["email_configs"]
    dingtalk = ["http://dingtalk:8060/dingtalk/qatoolbox/send"]
    assert [w["url"] for w in by_name["team"]["webhook_configs"]] == dingtalk
    assert [w["url"] for w in by_name["chat"]["webhook_configs"]] == dingtalk
    assert "email_configs" not in by_name["chat"]
    assert by_name["digest"]["email_configs"] and "webhook_configs" not in by_name["digest"]
    switch = by_name["deadmansswitch"]["webhook_configs"][0]
    assert switch["send_resolved"] is False
    assert switch["http_config"]["authorization"]["credentials_file"].startswith("/")
    # Secrets come from files, never inline.
    assert "smtp_auth_password" not in config["global"]
    assert config["global"]["smtp_auth_password_file"].startswith("/")
    text = AM_CONFIG.read_text()
    assert "auth_password:" not in text and "access_token" not in text


def test_grafana_url_is_set_in_one_place() -> None:
    texts = [p.read_text() for p in sorted((ALERTMANAGER_DIR / "templates").glob("*.tmpl"))]
    assert sum(t.count("localhost:3000") for t in texts) == 1
    assert 'template "qatoolbox.dashboard_link"' in (
        ALERTMANAGER_DIR / "templates" / "dingtalk.tmpl").read_text()


SAMPLE_DATA = {
    "receiver": "oncall", "status": "firing", "externalURL": "http://am.example:9093",
    "groupLabels": {"alertname": "PostgresDown", "instance": "db1:9786"},
    "commonLabels": {"alertname": "PostgresDown", "instance": "db1:9786", "severity": "critical"},
    "commonAnnotations": {},
    "alerts": [{
        "status": "firing",
        "labels": {"alertname": "PostgresDown", "instance": "db1:9786", "severity": "critical"},
        "annotations": {"summary": "PostgreSQL unreachable from db1:9786",
                        "description": "... (qatoolbox_postgres_up = 0).",
                        "runbook_url": RUNBOOK_PREFIX + "postgresdown",
                        "dashboard": "qatoolbox-postgres"},
        "startsAt": "2026-11-28T15:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example:9090/graph"}],
}


@pytest.mark.parametrize("template", [
    "qatoolbox.text", "qatoolbox.email.html", "ding.link.content"])
def test_templates_render_summary_value_instance_runbook_and_dashboard(
        template: str, workdir: Path) -> None:
    data = workdir / "data.json"
    data.write_text(json.dumps(SAMPLE_DATA))
    result = run(["amtool", "template", "render", "--template.glob=templates/*.tmpl",
                  f"--template.text={{{{ template \"{template}\" . }}}}",
                  f"--template.data={data}"], cwd=ALERTMANAGER_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for part in ("PostgreSQL unreachable from db1:9786", "qatoolbox_postgres_up = 0",
                 "db1:9786", RUNBOOK_PREFIX + "postgresdown", "/d/qatoolbox-postgres"):
        assert part in out, (part, out)
    subject = run(["amtool", "template", "render", "--template.glob=templates/*.tmpl",
                   '--template.text={{ template "qatoolbox.subject" . }}',
                   f"--template.data={data}"], cwd=ALERTMANAGER_DIR)
    assert subject.stdout.strip() == "[FIRING:1] CRITICAL PostgresDown on db1:9786"


# --- inhibitions (a real Alertmanager with the repository's routes and inhibit rules) --------

@pytest.fixture(scope="module")
def alertmanager() -> Iterator[AlertmanagerServer]:
    from tests.harness import tempdir

    with tempdir() as base:
        config = alertmanager_test_config(base, webhook_url=None, group_wait="1h",
                                          group_interval="1h")
        server = AlertmanagerServer(base, config).start()
        try:
            yield server
        finally:
            server.stop()


def alert(name: str, severity: str, instance: str, **labels: str) -> dict[str, Any]:
    """An alert as Prometheus sends it; instance "" for the service-level ones."""
    base = {"alertname": name, "severity": severity, "job": "qatoolbox"}
    if instance:
        base["instance"] = instance
    return {"labels": {**base, **labels}, "annotations": {"summary": name}}


INHIBITION_CASES: list[tuple[str, list[dict[str, Any]], set[str], set[str]]] = [
    ("critical twin by family",
     [alert("HostCpuUsageCritical", "critical", "i1", family="HostCpuUsage"),
      alert("HostCpuUsageHigh", "warning", "i1", family="HostCpuUsage"),
      alert("HostCpuUsageHigh", "warning", "i1b", family="HostCpuUsage"),
      alert("HostMemoryUsageHigh", "warning", "i1", family="HostMemoryUsage")],
     {"HostCpuUsageHigh@i1"},
     {"HostCpuUsageCritical@i1", "HostCpuUsageHigh@i1b", "HostMemoryUsageHigh@i1"}),
    ("same name, critical over warning",
     [alert("CustomThing", "critical", "i2"), alert("CustomThing", "warning", "i2"),
      alert("CustomThing", "warning", "i2b")],
     {"CustomThing@i2/warning"}, {"CustomThing@i2/critical", "CustomThing@i2b/warning"}),
    ("disk pair by mountpoint",
     [alert("HostDiskUsageCritical", "critical", "i3", family="HostDiskUsage", mountpoint="/"),
      alert("HostDiskUsageHigh", "warning", "i3", family="HostDiskUsage", mountpoint="/"),
      alert("HostDiskUsageHigh", "warning", "i3", family="HostDiskUsage", mountpoint="/data")],
     {"HostDiskUsageHigh@i3:/"}, {"HostDiskUsageHigh@i3:/data", "HostDiskUsageCritical@i3:/"}),
    ("unrelated critical does not silence a warning",
     [alert("ProcessGroupDown", "critical", "i4", group="web"),
      alert("HostHighLoad", "warning", "i4")],
     set(), {"ProcessGroupDown@i4", "HostHighLoad@i4"}),
    # PostgreSQL and Redis alerts name their server, not an exporter (docs/scaling.md).
    ("PostgresDown silences the other Postgres alerts of its server",
     [alert("PostgresDown", "critical", "", cluster="c5", server="db5"),
      alert("PostgresLockWaits", "warning", "", cluster="c5", server="db5"),
      alert("PostgresConnectionsExhausted", "critical", "", cluster="c5", server="db5",
            family="PostgresConnections"),
      alert("PostgresConnectionsExhausted", "critical", "", cluster="c5b", server="db5",
            family="PostgresConnections"),
      alert("PostgresRestarted", "info", "", cluster="c5", server="db5"),
      alert("ExporterCollectorFailing", "warning", "i5", cluster="c5", collector="postgres"),
      alert("ExporterCollectorFailing", "warning", "i5", cluster="c5", collector="host"),
      alert("RedisLowHitRatio", "warning", "", cluster="c5", server="r5"),
      alert("BusinessQueryFailing", "warning", "i5", cluster="c5", server="db5",
            query="qatoolbox_users"),
      alert("PostgresLockWaits", "warning", "", cluster="c5", server="db5b")],
     {"PostgresLockWaits@db5", "PostgresConnectionsExhausted@db5/c5", "PostgresRestarted@db5",
      "ExporterCollectorFailing@i5:postgres", "BusinessQueryFailing@i5"},
     {"PostgresDown@db5", "ExporterCollectorFailing@i5:host", "RedisLowHitRatio@r5",
      "PostgresLockWaits@db5b", "PostgresConnectionsExhausted@db5/c5b"}),
    ("RedisDown silences the other Redis alerts of its server",
     [alert("RedisDown", "critical", "", cluster="c6", server="r6"),
      alert("RedisLowHitRatio", "warning", "", cluster="c6", server="r6"),
      alert("RedisMemoryHigh", "warning", "", cluster="c6", server="r6b"),
      alert("PostgresLockWaits", "warning", "", cluster="c6", server="r6"),
      alert("ExporterCollectorFailing", "warning", "i6", cluster="c6", collector="redis")],
     {"RedisLowHitRatio@r6", "ExporterCollectorFailing@i6"},
     {"RedisDown@r6", "RedisMemoryHigh@r6b", "PostgresLockWaits@r6"}),
    ("a critical PostgreSQL alert silences its warning twin on that server only",
     [alert("PostgresConnectionsExhausted", "critical", "", cluster="c12", server="db12",
            family="PostgresConnections"),
      alert("PostgresTooManyConnections", "warning", "", cluster="c12", server="db12",
            family="PostgresConnections"),
      alert("PostgresTooManyConnections", "warning", "", cluster="c12", server="db12b",
            family="PostgresConnections")],
     {"PostgresTooManyConnections@db12"},
     {"PostgresConnectionsExhausted@db12", "PostgresTooManyConnections@db12b"}),
    ("ExporterDown silences everything from its instance",
     [alert("ExporterDown", "critical", "i7"), alert("PostgresDown", "critical", "i7"),
      alert("HostDiskUsageHigh", "warning", "i7", family="HostDiskUsage", mountpoint="/"),
      alert("ActiveUsersLow", "info", "i7"), alert("HostHighLoad", "warning", "i7b")],
     {"PostgresDown@i7", "HostDiskUsageHigh@i7:/", "ActiveUsersLow@i7"},
     {"ExporterDown@i7", "HostHighLoad@i7b"}),
    ("the fast SLO burn silences the slow one of the same SLO only",
     [alert("SloErrorBudgetBurnFast", "critical", "", slo="availability",
            sloth_id="qatoolbox-requests-availability"),
      alert("SloErrorBudgetBurnSlow", "warning", "", slo="availability",
            sloth_id="qatoolbox-requests-availability"),
      alert("SloErrorBudgetBurnSlow", "warning", "", slo="latency",
            sloth_id="qatoolbox-requests-latency")],
     {"SloErrorBudgetBurnSlow@:availability"},
     {"SloErrorBudgetBurnFast@:availability", "SloErrorBudgetBurnSlow@:latency"}),
    ("a traffic drop silences the anomaly; no web process silences both",
     [alert("HttpTrafficDrop", "critical", "i8"), alert("HttpTrafficAnomaly", "warning", "i8"),
      alert("ProcessGroupDown", "critical", "i9", group="web"),
      alert("HttpTrafficDrop", "critical", "i9"), alert("HttpTrafficAnomaly", "warning", "i9"),
      alert("ProcessGroupDown", "critical", "i10", group="celery"),
      alert("HttpTrafficDrop", "critical", "i10")],
     {"HttpTrafficAnomaly@i8", "HttpTrafficDrop@i9", "HttpTrafficAnomaly@i9"},
     {"HttpTrafficDrop@i8", "ProcessGroupDown@i9:web", "ProcessGroupDown@i10:celery",
      "HttpTrafficDrop@i10"}),
    ("nothing silences the Watchdog",
     [alert("Watchdog", "none", ""), alert("ExporterDown", "critical", "i11")],
     set(), {"Watchdog@", "ExporterDown@i11"}),
]


def key(labels: dict[str, str], keys: set[str]) -> str:
    """A readable id for an alert that matches the ids used in INHIBITION_CASES."""
    base = f"{labels['alertname']}@{labels.get('instance') or labels.get('server', '')}"
    for candidate in (base, f"{base}/{labels['severity']}", f"{base}/{labels.get('cluster')}",
                      f"{base}:{labels.get('mountpoint', '')}",
                      f"{base}:{labels.get('collector', '')}",
                      f"{base}:{labels.get('slo', '')}", f"{base}:{labels.get('group', '')}"):
        if candidate in keys:
            return candidate
    return base


@pytest.mark.parametrize(("case", "alerts", "inhibited", "active"), INHIBITION_CASES,
                         ids=[c[0] for c in INHIBITION_CASES])
def test_inhibitions(alertmanager: AlertmanagerServer, case: str, alerts: list[dict[str, Any]],
                     inhibited: set[str], active: set[str]) -> None:
    alertmanager.post_alerts(alerts)
    names = {a["labels"]["alertname"] for a in alerts}
    where = {(a["labels"].get("instance", ""), a["labels"].get("server", "")) for a in alerts}
    ids = inhibited | active

    def read() -> tuple[list[dict[str, Any]], dict[str, bool]]:
        got = [a for a in alertmanager.alerts()
               if (a["labels"].get("instance", ""), a["labels"].get("server", "")) in where
               and (a["labels"].get("instance") or a["labels"].get("server")
                    or a["labels"]["alertname"] in names)]
        return got, {key(a["labels"], ids): bool(a["status"]["inhibitedBy"]) for a in got}

    # Alertmanager learns of a new source alert through an asynchronous subscription, so a read
    # right after the POST may not show the inhibition yet: wait for it, then check exactly.
    deadline = time.monotonic() + 10
    got, state = read()
    while {k for k, v in state.items() if v} != inhibited and time.monotonic() < deadline:
        time.sleep(0.2)
        got, state = read()
    assert len(got) == len(alerts), got
    assert set(state) == ids, state
    assert {k for k, v in state.items() if v} == inhibited, (case, state)


# --- every metric a rule reads is one the exporter exposes ------------------------------------

# Families that a scrape of a fresh PostgreSQL cannot show: the business defaults need
# QAToolBox's tables, statements need pg_stat_statements, replication lag a replica. They are
# checked against the documented metric lists (docs/<area>.md) and the shipped business
# defaults instead. HTTP and Celery task families are scraped for real: the test records
# traffic through exporter.instrument first.
NOT_IN_A_FRESH_SCRAPE = (
    "qatoolbox_postgres_statement",                # pg_stat_statements (issue 3)
    "qatoolbox_postgres_replication_lag_seconds",  # only on a replica (issue 3)
    "qatoolbox_postgres_replica_lag_bytes",        # only on a primary with replicas
    "qatoolbox_postgres_table_",                   # only with user tables
    "qatoolbox_postgres_replication_slot_",        # only with replication slots
    "qatoolbox_postgres_wal_last_",                # only once archiving succeeded or failed
    "qatoolbox_redis_master_link_up",              # only on a Redis replica
    "qatoolbox_chat_", "qatoolbox_time_capsules", "qatoolbox_users",  # QAToolBox tables (issue 5)
)
AREA_DOCS = ["postgres.md", "redis.md", "business.md", "app.md"]
BUSINESS_DEFAULTS = ROOT / "exporter" / "business_defaults.yml"


def documented_names() -> set[str]:
    names: set[str] = set()
    for doc in AREA_DOCS:
        path = ROOT / "docs" / doc
        if path.exists():
            names |= set(re.findall(r"\bqatoolbox_[a-z0-9_]+", path.read_text()))
    if BUSINESS_DEFAULTS.exists():
        for query in yaml.safe_load(BUSINESS_DEFAULTS.read_text()).get("queries", []):
            names.add(query["metric"])
    return names


def base_names(name: str) -> set[str]:
    """The name and, for histogram series, the family name."""
    out = {name}
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            out.add(name.removesuffix(suffix))
    return out


def test_every_metric_in_the_rules_is_exposed(
    postgres: PostgresServer, redis_server: RedisServer, workdir: Path,
    exporter_factory: Callable[..., ExporterProcess],
) -> None:
    metrics_dir = workdir / "app-metrics"
    metrics_dir.mkdir()
    record_app_traffic(metrics_dir)
    exporter = exporter_factory(
        config={"app": {"multiprocess_dirs": [str(metrics_dir)]}},
        env={**postgres.env(), "REDIS_URL": redis_server.url})
    scrape = exporter.scrape()
    for up in ("qatoolbox_postgres_up", "qatoolbox_redis_up"):
        assert scrape.value(up) == 1, exporter.logs()[-2000:]
    assert scrape.value("qatoolbox_exporter_collector_success", collector="app") == 1
    scraped = scrape.names()
    documented = documented_names()
    problems = []
    for name, rules in sorted(rule_series_names().items()):
        if name in PROMETHEUS_SERIES or name in scraped or name.startswith(
                SELF_MONITORING_PREFIXES):
            continue
        if not name.startswith("qatoolbox_"):
            problems.append(f"{name} (in {sorted(rules)}): not an exporter metric")
        elif not (name.startswith(NOT_IN_A_FRESH_SCRAPE) and base_names(name) & documented):
            problems.append(f"{name} (in {sorted(rules)}): neither scraped nor documented")
    assert not problems, "\n".join(problems)
