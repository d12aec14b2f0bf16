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
from exporter.config import MAX_BUSINESS_CONCURRENCY, load_config
from tests.grafana_queries import documented_metric_names
from tests.harness import ROOT, ExporterProcess, PostgresServer, RedisServer, documented_block

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


def test_one_tested_copy_of_the_least_privilege_role_and_acl() -> None:
    """The role SQL and the ACL line the tests run live in docs/reliability.md; any other doc
    shows the same ACL line or links there, never a role of its own (an untested copy drifted:
    it granted whole tables, auth_user.password included, and CONFIG GET)."""
    sql = documented_block("least-privilege-sql")
    acl = documented_block("least-privilege-redis").strip()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.name == "reliability.md":
            continue
        text = path.read_text()
        assert "CREATE ROLE qatoolbox_exporter" not in text, path
        for line in text.splitlines():
            if line.startswith("ACL SETUSER"):
                assert line == acl, (path, line)
    # The connection limit fits the postgres collector's one connection, the business
    # collector's largest concurrency, and one more.
    limit = re.search(r"CONNECTION LIMIT (\d+)", sql)
    assert limit is not None and int(limit.group(1)) >= 1 + MAX_BUSINESS_CONCURRENCY + 1
    assert "+config|get" not in acl
