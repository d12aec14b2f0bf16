"""The documentation tells the truth: every exposed family is documented, the README's
configuration example is valid, and the README's two commands exist as written."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors import DEFAULTS
from exporter.config import load_config
from tests.grafana_queries import documented_metric_names
from tests.harness import ROOT, ExporterProcess, PostgresServer, RedisServer

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _family_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_every_exposed_family_is_documented(
    postgres: PostgresServer, redis_server: RedisServer,
    exporter_factory: Callable[..., ExporterProcess], workdir: Path,
) -> None:
    # As an operator runs it: the least-privilege role and ACL user of docs/reliability.md.
    postgres.create_exporter_role()
    env = {**postgres.exporter_env(), "REDIS_URL": redis_server.create_exporter_user()}
    exporter = exporter_factory(env=env, config={"app": {"multiprocess_dirs": [str(workdir)]}})
    scrape = exporter.scrape()
    assert scrape.value("qatoolbox_postgres_up") == 1
    assert scrape.value("qatoolbox_redis_up") == 1
    assert "permission denied" not in exporter.logs()
    assert "command refused" not in exporter.logs()
    exposed = _family_names(scrape.text)
    missing = sorted(exposed - documented_metric_names())
    assert not missing, f"exposed but documented nowhere (README.md, docs/*.md): {missing}"


def test_readme_configuration_example_is_valid(workdir: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if b.startswith("web:"))
    path = workdir / "example.yml"
    path.write_text(example)
    config = load_config(str(path), {}, DEFAULTS)
    # The example spells out the defaults: it must describe what runs without a file.
    assert config == load_config(None, {}, DEFAULTS)
    assert yaml.safe_load(example)["web"]["listen_address"] == ":9786"


def test_readme_names_the_two_commands_and_they_exist() -> None:
    for command in ("./scripts/run", "./scripts/test"):
        assert f"\n{command}\n" in README, command
        assert os.access(ROOT / command, os.X_OK), command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test" in ci


def test_every_flag_is_documented_in_the_readme() -> None:
    from exporter.cli import build_parser

    flags = {opt for action in build_parser()._actions for opt in action.option_strings
             if opt.startswith("--") and opt not in ("--help",)}
    generated = {f for f in flags if f.startswith(("--collector.", "--no-collector."))}
    missing = sorted(f for f in flags - generated if f"`{f}" not in README)
    assert not missing, f"flags missing from the README: {missing}"
    assert "`--collector.<name>` / `--no-collector.<name>`" in README
    for name in DEFAULTS:
        assert f"| `{name}` |" in README, f"collector {name} missing from the README table"
