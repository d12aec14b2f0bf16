"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine on this machine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.grafana_queries import GRAFANA, ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
BUILT = {name for name, svc in SERVICES.items() if "build" in svc}
# Images the demo profile builds once and reuses (demo-web builds qatoolbox-demo).
OWN_IMAGES = {SERVICES[name]["image"] for name in BUILT}


def substitute(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} interpolation with an empty environment."""
    def repl(match: re.Match[str]) -> str:
        body = match.group(1)
        for sep in (":-", "-"):
            if sep in body:
                return body.split(sep, 1)[1]
        return ""
    return re.sub(r"\$\{([^}]*)\}", repl, text)


def volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    out = []
    for spec in service.get("volumes", []):
        parts = substitute(spec).split(":")
        source, target = parts[0], parts[1]
        mode = parts[2] if len(parts) > 2 else "rw"
        out.append((source, target, mode))
    return out


def container_port(service: dict[str, Any], port: int) -> bool:
    """Whether the service publishes or listens on port inside its container."""
    published = {int(substitute(p).split(":")[-1]) for p in service.get("ports", [])}
    return port in published


def test_parses_with_the_expected_services() -> None:
    assert {"postgres", "redis", "qatoolbox-exporter", "prometheus", "alertmanager",
            "grafana"} <= set(SERVICES)
    assert SERVICES["dingtalk"]["profiles"] == ["dingtalk"]
    for name in ("demo-web", "demo-worker", "loadgen"):
        assert SERVICES[name]["profiles"] == ["demo"], name
    for name in ("postgres", "redis", "qatoolbox-exporter", "prometheus", "alertmanager",
                 "grafana"):
        assert "profiles" not in SERVICES[name], f"{name} must start without a profile"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_pinned(name: str) -> None:
    image = SERVICES[name]["image"]
    assert ":" in image, f"{name}: image {image} has no tag"
    tag = image.rsplit(":", 1)[1]
    assert tag not in {"latest", "main", "master", "edge", "nightly"}, f"{name}: {image}"
    if image in OWN_IMAGES:
        return
    # A version with at least major.minor.patch, not a floating "16" or "7".
    assert re.match(r"v?\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"


def test_image_versions() -> None:
    def major(service: str) -> int:
        return int(SERVICES[service]["image"].rsplit(":", 1)[1].lstrip("v").split(".")[0])
    assert major("prometheus") == 3
    assert major("grafana") in (11, 12)


def test_dockerfile_base_pinned_non_root_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    external = [b for b in bases if ":" in b]
    assert external and all(re.search(r":\d+\.\d+\.\d+-slim", b) for b in external), bases
    stages = re.split(r"^FROM ", text, flags=re.M)
    final = stages[-1]
    assert final.startswith("base AS exporter"), "docker build . must give the exporter"
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", final, re.M), "exporter must not run as root"
    assert "HEALTHCHECK" in final
    demo = next(s for s in stages if s.startswith("base AS demo"))
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", demo, re.M)
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    assert ".venv" not in text and "*" in ignore.splitlines()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_healthcheck_and_dependencies(name: str) -> None:
    svc = SERVICES[name]
    check = svc.get("healthcheck")
    assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
    deps = svc.get("depends_on", {})
    assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
    for dep, cond in deps.items():
        assert dep in SERVICES, f"{name} depends on unknown {dep}"
        assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}: {cond}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_mounts(name: str) -> None:
    declared = set(COMPOSE.get("volumes", {}))
    for source, target, mode in volumes(SERVICES[name]):
        if source.startswith((".", "/")):
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} not in the repository"
            # Configuration and host views are read-only; data lives in named volumes.
            assert mode == "ro", f"{name}: bind mount {source} -> {target} must be :ro"
        else:
            assert source in declared, f"{name}: volume {source} is not declared"


def test_data_lives_in_named_volumes() -> None:
    data_paths = {"postgres": "/var/lib/postgresql/data", "redis": "/data",
                  "prometheus": "/prometheus", "alertmanager": "/alertmanager",
                  "grafana": "/var/lib/grafana"}
    for name, path in data_paths.items():
        sources = {t: s for s, t, _ in volumes(SERVICES[name])}
        assert path in sources and not sources[path].startswith((".", "/")), name


def test_prometheus_targets_match_services() -> None:
    prom = SERVICES["prometheus"]
    mounts = {t: s for s, t, _ in volumes(prom)}
    assert mounts["/etc/prometheus"] == "./prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert container_port(prom, 9090)
    for am in PROMETHEUS["alerting"]["alertmanagers"]:
        for target in am["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            assert host in SERVICES and container_port(SERVICES[host], int(port)), target
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    for target in jobs["prometheus"]["static_configs"][0]["targets"]:
        assert target.rsplit(":", 1)[1] == "9090"
    # file_sd targets of the exporter job, read from the files the config names.
    sd_targets = []
    for sd in jobs["qatoolbox"]["file_sd_configs"]:
        for pattern in sd["files"]:
            for path in (ROOT / "prometheus").glob(pattern):
                for group in yaml.safe_load(path.read_text(encoding="utf-8")):
                    sd_targets += group["targets"]
    assert sd_targets
    for target in sd_targets:
        host, port = target.rsplit(":", 1)
        assert host in SERVICES, f"file_sd target {target} is not a compose service"
        assert container_port(SERVICES[host], int(port)), target


def test_grafana_provisioning() -> None:
    grafana = SERVICES["grafana"]
    mounts = {t: s for s, t, _ in volumes(grafana)}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/provider.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == "./grafana/dashboards"
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GRAFANA_ADMIN_PASSWORD" in env["GF_SECURITY_ADMIN_PASSWORD"]
    ds = (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    assert "${PROMETHEUS_URL}" in ds and env["PROMETHEUS_URL"] == "http://prometheus:9090"


def test_qatoolbox_environment() -> None:
    env_example = (ROOT / ".env.example").read_text(encoding="utf-8")
    for var in ("DB_NAME", "DB_USER", "DB_PASSWORD", "REDIS_URL", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{var}=", env_example, re.M), var
    for name in ("qatoolbox-exporter", "demo-web", "demo-worker"):
        env = SERVICES[name]["environment"]
        for var in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD", "REDIS_URL"):
            assert var in env, f"{name}: {var}"
    # Every ${VAR} the compose file reads is explained in .env.example.
    used = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))
    missing = {v for v in used if not re.search(rf"^#? ?{v}=", env_example, re.M)}
    assert not missing, f"not in .env.example: {sorted(missing)}"


def test_exporter_service_hardened() -> None:
    svc = SERVICES["qatoolbox-exporter"]
    assert svc["read_only"] is True
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    config = next(s for s, t, _ in volumes(svc) if t == "/etc/qatoolbox-exporter/config.yml")
    assert Path(ROOT / config).is_file()


def test_exporter_config_is_valid() -> None:
    # The compose stack's exporter config passes the exporter's own validation.
    from tests.harness import run_exporter

    result = run_exporter(["--config.file", str(ROOT / "deploy/compose/exporter.yml"),
                           "--config.check"])
    assert result.returncode == 0, result.stderr


def unit_settings() -> dict[str, list[str]]:
    """The systemd unit's settings, every value of repeated keys kept."""
    settings: dict[str, list[str]] = {}
    text = (ROOT / "deploy/systemd/qatoolbox-exporter.service").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_hardened() -> None:
    unit = unit_settings()
    assert unit["User"] == ["qatoolbox-exporter"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["yes"] and unit["PrivateTmp"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert "ProtectProc" not in unit, "the process collector needs other users' /proc entries"
    assert any("--config.file" in v for v in unit["ExecStart"])
    assert unit["RestartPreventExitStatus"] == ["2"]


def test_systemd_unit_exposure() -> None:
    # systemd's own audit of the sandbox: "OK" is an exposure below 3 out of 10.
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes",
         str(ROOT / "deploy/systemd/qatoolbox-exporter.service")],
        capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr[-500:]
    assert float(match.group(1)) < 3.0


def test_demo_load_stays_on_loopback() -> None:
    # examples/loadgen refuses non-loopback URLs: it must share demo-web's network namespace.
    loadgen = SERVICES["loadgen"]
    assert loadgen["network_mode"] == "service:demo-web"
    assert "ports" not in loadgen
    assert "--url http://127.0.0.1:8000" in " ".join(loadgen["command"])
    assert (ROOT / "examples/loadgen/loadgen.py").is_file()
    assert SERVICES["demo-web"]["environment"]["GUNICORN_BIND"].endswith(":8000")


def test_dingtalk_bridge_matches_alertmanager() -> None:
    # Alertmanager posts to the bridge's target by service name; the bridge renders our template.
    am = (ROOT / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8")
    bridge = yaml.safe_load((ROOT / "deploy/compose/dingtalk.yml").read_text(encoding="utf-8"))
    (target,) = bridge["targets"]
    assert f"http://dingtalk:8060/dingtalk/{target}/send" in am
    assert "--web.listen-address=:8060" in SERVICES["dingtalk"]["command"]
    mounts = {t: s for s, t, _ in volumes(SERVICES["dingtalk"])}
    for template in bridge["templates"]:
        folder, name = template.rsplit("/", 1)
        assert (ROOT / mounts[folder] / name).is_file(), template
