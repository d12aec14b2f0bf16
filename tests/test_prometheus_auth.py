"""A real Prometheus scrapes real exporters behind TLS, basic auth and client certificates, with
the scrape settings prometheus/prometheus.yml shows in its commented example."""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ExporterProcess, wait_for
from tests.promstack import (
    PROMETHEUS_DIR,
    PrometheusServer,
    prometheus_test_config,
    running,
)
from tests.test_web_security import (
    bcrypt_hash,
    client_context,
    make_ca,
    make_cert,
    only_collectors,
    request,
)

MARKER = "    # With --web.config.file"
SECRETS = "/etc/prometheus/secrets"
PASSWORD = "scrape-pass-5d1c"
WRONG_PASSWORD = "wrong-pass-9e27"


def example_job(mutual_tls: bool) -> dict[str, Any]:
    """The qatoolbox job of prometheus/prometheus.yml with its commented TLS and basic-auth
    example uncommented; with mutual_tls, also the client certificate lines inside it."""
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert text.count(MARKER) == 1
    head, example = text.split(MARKER)
    lines = []
    for commented in example.splitlines()[1:]:
        if not commented.startswith("    #"):
            break
        line = commented.replace("    #   ", "    ", 1)
        if mutual_tls:
            line = re.sub(r"^(\s+)# ((cert_file|key_file): )", r"\1\2", line)
        lines.append(line)
    config = yaml.safe_load(head + "\n".join(lines) + "\n")
    return next(s for s in config["scrape_configs"] if s["job_name"] == "qatoolbox")


def test_example_has_a_commented_client_certificate_variant() -> None:
    """The client certificate lines are YAML too, inside tls_config, pointing at two files."""
    plain, mutual = example_job(mutual_tls=False), example_job(mutual_tls=True)
    assert plain["scheme"] == "https" and set(plain["tls_config"]) == {"ca_file"}
    assert plain["basic_auth"] == {"username": "prometheus",
                                   "password_file": f"{SECRETS}/exporter-password"}
    assert set(mutual["tls_config"]) == {"ca_file", "cert_file", "key_file"}
    assert mutual["tls_config"]["ca_file"] == plain["tls_config"]["ca_file"]
    assert {k: v for k, v in mutual.items() if k != "tls_config"} == \
        {k: v for k, v in plain.items() if k != "tls_config"}
    files = [mutual["tls_config"][k] for k in ("ca_file", "cert_file", "key_file")]
    assert all(f.startswith(SECRETS + "/") for f in files) and len(set(files)) == 3


def _in(directory: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The example's settings (scheme, tls_config, basic_auth) with the secrets in directory."""
    settings = {k: v for k, v in job.items() if k in ("scheme", "tls_config", "basic_auth")}
    text = yaml.safe_dump(settings).replace(SECRETS, str(directory))
    return dict(yaml.safe_load(text))


def _start(workdir: Path, name: str, web: str) -> ExporterProcess:
    directory = workdir / name
    directory.mkdir()
    (directory / "web.yml").write_text(web)
    return ExporterProcess(directory, args=["--web.config.file", str(directory / "web.yml"),
                                            *only_collectors("host")]).start(wait=False)


@pytest.fixture
def exporters(workdir: Path) -> Iterator[tuple[dict[str, ExporterProcess], Path]]:
    """Two exporters with basic auth and TLS, one also requiring client certificates; and the
    secrets folder Prometheus reads (CA, client certificate and key, passwords)."""
    pki = workdir / "pki"
    pki.mkdir()
    ca = make_ca(pki, "ca")
    server = make_cert(pki, "server", ca)  # SAN IP:127.0.0.1, the targets' address
    client = make_cert(pki, "prometheus", ca, san="DNS:prometheus")
    secrets = workdir / "secrets"
    secrets.mkdir()
    (secrets / "exporter-ca.pem").write_bytes(ca[0].read_bytes())
    mutual = _in(secrets, example_job(mutual_tls=True))["tls_config"]
    Path(mutual["cert_file"]).write_bytes(client[0].read_bytes())
    Path(mutual["key_file"]).write_bytes(client[1].read_bytes())
    (secrets / "exporter-password").write_text(PASSWORD + "\n")  # as `echo pw > file` writes
    (secrets / "wrong-password").write_text(WRONG_PASSWORD + "\n")

    tls = f"tls_server_config:\n  cert_file: {server[0]}\n  key_file: {server[1]}\n"
    users = f"basic_auth_users:\n  prometheus: '{bcrypt_hash(PASSWORD, cost=10)}'\n"
    started = {
        "tls": _start(workdir, "tls", tls + users),
        "mtls": _start(workdir, "mtls", tls + f"  client_ca_file: {ca[0]}\n"
                       "  client_auth_type: RequireAndVerifyClientCert\n" + users),
    }
    try:
        for name, process in started.items():
            context = client_context(ca[0], client if name == "mtls" else None)
            wait_for(lambda p=process, c=context: request(p.port, "/healthz", context=c)[0]
                     == 200, 20, f"exporter {name}")
        yield started, secrets
    finally:
        for process in started.values():
            process.stop()


def _job(name: str, settings: dict[str, Any], port: int) -> dict[str, Any]:
    return {"job_name": name, **copy.deepcopy(settings),
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}


@pytest.mark.integration
def test_prometheus_scrapes_with_the_documented_tls_basic_auth_and_client_certs(
        workdir: Path, exporters: tuple[dict[str, ExporterProcess], Path]) -> None:
    started, secrets = exporters
    plain = _in(secrets, example_job(mutual_tls=False))
    mutual = _in(secrets, example_job(mutual_tls=True))
    wrong = copy.deepcopy(plain)
    wrong["basic_auth"]["password_file"] = str(secrets / "wrong-password")

    # The repository's prometheus/ folder; its qatoolbox job (file_sd) gets the example's
    # settings and the TLS exporter as its target.
    config_file = prometheus_test_config(workdir, [f"127.0.0.1:{started['tls'].port}"])
    config = yaml.safe_load(config_file.read_text())
    config.pop("rule_files", None)  # the rules are tested elsewhere; here only scraping counts
    job = next(s for s in config["scrape_configs"] if s["job_name"] == "qatoolbox")
    job.update(plain)
    config["scrape_configs"] += [
        _job("qatoolbox-mtls", mutual, started["mtls"].port),
        _job("wrong-password", wrong, started["tls"].port),
        _job("mtls-without-client-cert", plain, started["mtls"].port),
    ]
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run(["promtool", "check", "config", str(config_file)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    prometheus = PrometheusServer(workdir, config_file).start()
    with running(prometheus):
        prometheus.wait_targets_up("qatoolbox")
        prometheus.wait_targets_up("qatoolbox-mtls")

        def scraped(job: str) -> dict[str, Any]:
            return next(t for t in prometheus.targets() if t["labels"]["job"] == job
                        and t["lastScrape"] != "0001-01-01T00:00:00Z")

        wait_for(lambda: scraped("wrong-password") and scraped("mtls-without-client-cert"), 20,
                 "the refused jobs scraped once")
        for job in ("qatoolbox", "qatoolbox-mtls"):
            assert prometheus.value(f'up{{job="{job}"}}') == 1, job
            series = prometheus.query(f'{{__name__=~"qatoolbox_.+", job="{job}"}}')
            names = {s["metric"]["__name__"] for s in series}
            assert "qatoolbox_exporter_collector_success" in names, names
        for job in ("wrong-password", "mtls-without-client-cert"):
            assert prometheus.value(f'up{{job="{job}"}}') == 0, job
            assert prometheus.query(f'{{__name__=~"qatoolbox_.+", job="{job}"}}') == [], job
        # Refused for the reason meant: the password, then the missing certificate.
        assert "401 Unauthorized" in scraped("wrong-password")["lastError"]
        assert "certificate required" in scraped("mtls-without-client-cert")["lastError"]

    for process in started.values():
        assert PASSWORD not in process.logs() and WRONG_PASSWORD not in process.logs()
