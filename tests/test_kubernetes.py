"""deploy/kubernetes/: the overlays build, validate against the Kubernetes schemas, carry the
repository's rules (which pass promtool) and dashboards, and run the exporter as issue 17
asks (host PID, read-only /proc and /sys, probes, measured resources, non-root read-only
containers, passwords from a Secret)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.harness import ROOT
from tests.k8s_schemas import CUSTOM
from tests.kustomize import KustomizeError, build, key

K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"host": K8S / "overlays" / "host", "service": K8S / "overlays" / "service"}
# The oldest Kubernetes the manifests must suit (CronJob timeZone, seccompProfile: 1.27+).
KUBERNETES_VERSION = "1.27.0"


def objects(overlay: str) -> list[dict[str, Any]]:
    return build(OVERLAYS[overlay])


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def workload(overlay: str) -> dict[str, Any]:
    (found,) = [o for o in objects(overlay) if o["kind"] in ("DaemonSet", "Deployment")]
    return found


def exporter_config(overlay: str) -> dict[str, Any]:
    (config,) = [o for o in by_kind(objects(overlay), "ConfigMap")
                 if o["metadata"]["name"] == f"qatoolbox-exporter-{overlay}"]
    return dict(yaml.safe_load(config["data"]["config.yml"]))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_builds_and_validates_against_the_schemas(overlay: str) -> None:
    objs = objects(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"ServiceAccount", "ConfigMap", "Service", "ServiceMonitor",
            "PrometheusRule"} <= kinds
    assert kinds & {"DaemonSet", "Deployment"}
    problems = []
    for obj in objs:
        schema = CUSTOM.get((obj["apiVersion"], obj["kind"]))
        try:
            if schema is not None:
                jsonschema.validate(obj, schema)
            else:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            path = ".".join(map(str, exc.path))
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)
    assert all(o["metadata"].get("namespace") == "monitoring" for o in objs)


def test_schemas_refuse_what_the_api_server_would_drop_or_refuse() -> None:
    """The validation can fail: a misspelt field, a wrong type, a bad duration."""
    deployment = workload("service")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    (monitor,) = by_kind(objects("host"), "ServiceMonitor")
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["relabeling"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CUSTOM[("monitoring.coreos.com/v1", "ServiceMonitor")])
    rule = json.loads(json.dumps(by_kind(objects("host"), "PrometheusRule")[0]))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, CUSTOM[("monitoring.coreos.com/v1", "PrometheusRule")])


def test_the_kustomize_subset_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "patches: []\nresources: []\n")
    with pytest.raises(KustomizeError, match="patches"):
        build(tmp_path)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_python_build_equals_kubectl_kustomize(overlay: str) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(OVERLAYS[overlay])],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    theirs = {key(o): o for o in yaml.safe_load_all(result.stdout) if o}
    ours = {key(o): o for o in objects(overlay)}
    assert theirs == ours


def _rule_objects() -> list[dict[str, Any]]:
    return by_kind(objects("host"), "PrometheusRule")


def test_prometheus_rules_are_the_repository_rules_and_pass_promtool(tmp_path: Path) -> None:
    rules = {o["metadata"]["name"]: o for o in _rule_objects()}
    files = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
    assert set(rules) == {f"qatoolbox-{f.stem}" for f in files}
    for path in files:
        groups = rules[f"qatoolbox-{path.stem}"]["spec"]["groups"]
        assert groups == yaml.safe_load(path.read_text())["groups"], path.name
        out = tmp_path / path.name
        out.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run(["promtool", "check", "rules",
                             *map(str, sorted(tmp_path.glob("*.yml")))],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for obj in _rule_objects():
        assert obj["metadata"]["labels"]["qatoolbox.io/rules"] == "true"


def test_dashboard_config_maps_are_the_repository_dashboards() -> None:
    maps = {o["metadata"]["name"]: o for o in by_kind(objects("host"), "ConfigMap")
            if o["metadata"]["labels"].get("grafana_dashboard") == "1"}
    files = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert set(maps) == {f"qatoolbox-dashboard-{f.stem}" for f in files}
    for path in files:
        data = maps[f"qatoolbox-dashboard-{path.stem}"]["data"]
        assert data == {path.name: path.read_text()}
        assert len(path.read_bytes()) < 256 * 1024  # kubectl apply's annotation limit


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate_manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_manifests_are_current_and_drift_is_caught(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    result = subprocess.run([sys.executable, str(K8S / "generate_manifests.py"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    generator = _generator()
    for name in ("prometheusrules.yaml", "grafana-dashboards.yaml"):
        shutil.copy(K8S / "base" / name, tmp_path / name)
    generator.BASE = tmp_path
    assert generator.main(["--check"]) == 0
    stale = tmp_path / "prometheusrules.yaml"
    stale.write_text(stale.read_text().replace("> 0.80", "> 0.81", 1))
    assert generator.main(["--check"]) == 1
    assert "prometheusrules.yaml" in capsys.readouterr().err
    assert generator.main([]) == 0 and generator.main(["--check"]) == 0


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(obj["spec"]["template"]["spec"]["containers"])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_containers_are_probed_sized_non_root_and_read_only(overlay: str) -> None:
    obj = workload(overlay)
    pod = obj["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for container in _containers(obj):
        sec = container["securityContext"]
        assert sec["readOnlyRootFilesystem"] is True
        assert sec["allowPrivilegeEscalation"] is False
        assert sec["capabilities"]["drop"] == ["ALL"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz"
        requests = container["resources"]["requests"]
        # docs/scaling.md measured 45 MiB (host) and 52 MiB (service) resident.
        assert requests["memory"] == "64Mi" and requests["cpu"]
        assert container["resources"]["limits"]["memory"]
        args = container["args"]
        assert args == ["--config.file=/etc/qatoolbox-exporter/config.yml"]
    assert exporter_config(overlay)["collectors"]["scope"] == overlay


def test_host_daemonset_reads_the_node_read_only() -> None:
    ds = workload("host")
    assert ds["kind"] == "DaemonSet"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _containers(ds)[0]["volumeMounts"]}
    host = exporter_config("host")["host"]
    for name, host_path, key_ in (("proc", "/proc", "proc_path"), ("sys", "/sys", "sys_path"),
                                  ("root", "/", "root_path")):
        assert volumes[name]["hostPath"]["path"] == host_path
        assert mounts[name]["readOnly"] is True
        assert host[key_] == mounts[name]["mountPath"], key_


def test_service_deployment_reads_passwords_from_a_secret() -> None:
    deployment = workload("service")
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 1
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["secrets"]["secret"]["secretName"]
    mount = {m["name"]: m for m in _containers(deployment)[0]["volumeMounts"]}["secrets"]
    config = exporter_config("service")
    for section, item in (("postgres", "db-password"), ("redis", "redis-password")):
        assert config[section]["password_file"] == f"{mount['mountPath']}/{item}"
    assert "password" not in config["postgres"]
    assert "@" in config["redis"]["url"] and ":" not in config["redis"]["url"].split("@")[0][8:]
    assert secret == "qatoolbox-exporter-secrets"
    everything = yaml.safe_dump_all(objects("service"))
    assert "env:" not in everything or "PASSWORD=" not in everything
    for obj in objects("service"):
        assert obj["kind"] != "Secret", "secrets are made outside the repository"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_service_monitor_labels_match_the_rules(overlay: str) -> None:
    (monitor,) = by_kind(objects(overlay), "ServiceMonitor")
    service = next(o for o in by_kind(objects(overlay), "Service"))
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    targets = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert targets["job"]["replacement"] == "qatoolbox"  # rules read up{job="qatoolbox"}
    assert "cluster" in targets
    source = {"host": "__meta_kubernetes_pod_node_name",
              "service": "__meta_kubernetes_pod_name"}[overlay]
    assert targets["instance"]["sourceLabels"] == [source]


def test_report_cronjob_is_kept_and_valid() -> None:
    (cronjob,) = [o for o in yaml.safe_load_all((K8S / "report-cronjob.yaml").read_text()) if o]
    kubernetes_validate.validate(cronjob, KUBERNETES_VERSION, strict=True)
