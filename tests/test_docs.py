"""The documentation tells the truth: every exposed family is documented, the README's
configuration example is valid and names every configuration key (or its section's reference
does), the README's two commands exist as written, every test the docs cite exists, and every
link between the docs leads somewhere."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors import DEFAULTS
from exporter.collectors.business_config import MAX_BUSINESS_CONCURRENCY
from exporter.config import Config, load_config
from tests.grafana_queries import documented_metric_names
from tests.harness import ROOT, ExporterProcess, PostgresServer, RedisServer, documented_block

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
    from exporter.cliflags import build_parser

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


# --- configuration keys ---------------------------------------------------------------------------

# Sections whose keys the README leaves to a reference of their own (linked from the README).
SECTION_REFERENCES = {"postgres": "docs/postgres.md", "redis": "docs/redis.md",
                      "business": "docs/business.md", "app": "docs/app.md"}


def _config_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """Every key path of the configuration dataclasses; items of a list of sections as
    `section.list[].key`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("derived"):
            # Set from another key (Config.scope from collectors.scope), not a key itself.
            continue
        path = f"{prefix}{field.name}"
        yield path
        kind = hints[field.name]
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            yield from _config_keys(typing.cast(type, kind), f"{path}.")
        elif typing.get_origin(kind) is tuple and args and dataclasses.is_dataclass(args[0]):
            yield from _config_keys(typing.cast(type, args[0]), f"{path}[].")


def _example_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            yield from _example_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for item in node:
            yield from _example_keys(item, f"{prefix.rstrip('.')}[].")


def test_every_configuration_key_is_documented() -> None:
    """Each key of the configuration dataclasses is in the README's example, or (for the
    sections with a reference of their own) named in that reference: a key added to
    exporter/config.py without a word in the docs fails here."""
    blocks = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    example = set(_example_keys(yaml.safe_load(next(b for b in blocks if b.startswith("web:")))))
    missing = []
    for path in _config_keys(Config):
        if path in example or path.startswith("collectors."):
            continue
        reference = SECTION_REFERENCES.get(path.split(".", 1)[0])
        leaf = path.rsplit(".", 1)[-1].removeprefix("[]")
        text = (ROOT / reference).read_text(encoding="utf-8") if reference else ""
        if f"`{leaf}`" not in text and f"{leaf}:" not in text:
            missing.append(path)
    assert not missing, f"configuration keys in neither the README's example nor their " \
                        f"section's reference: {missing}"


def test_the_configuration_key_walk_sees_new_keys() -> None:
    """The check above would notice a key it was not told about (nested ones included)."""
    keys = set(_config_keys(Config))
    assert {"web.header_timeout", "business.allow_superuser", "host.filesystem.fs_types_exclude",
            "process.groups[].cmdline", "business.queries[].max_rows",
            "redis.key_groups[].patterns"} <= keys


# --- tests cited by the docs ----------------------------------------------------------------------

# A test file (`tests/test_x.py`, `test_x.py`, or a glob such as `tests/test_app*.py`),
# optionally with `::test_name`; `::test_name` alone, which means the last file named before
# it; or a bare `test_name`, which some test file must define.
_CITATION = re.compile(r"(?P<file>(?:tests/)?test_\w+\*?\.py)(?:::(?P<qualified>test_\w+))?"
                       r"|::(?P<continued>test_\w+)|\b(?P<bare>test_\w+)\b")


def _defined_tests() -> dict[str, set[str]]:
    """Test function name -> the files under tests/ that define it."""
    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        for name in re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.M):
            defined.setdefault(name, set()).add(path.relative_to(ROOT / "tests").as_posix())
    return defined


def cited_tests_missing(text: str, defined: dict[str, set[str]], files: set[str]) -> list[str]:
    """The citations in text that name no existing test (or no test in the file named); files
    are the test files there are, relative to tests/."""
    missing = []
    last_file: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        for match in _CITATION.finditer(line):
            if match["file"]:
                last_file = match["file"].removeprefix("tests/")
                if not fnmatch.filter(files, last_file):
                    missing.append(f"line {number}: no file tests/{last_file}")
                name = match["qualified"]
                if name and last_file not in defined.get(name, ()):
                    missing.append(f"line {number}: {name} is not in tests/{last_file}")
            elif match["continued"]:
                name = match["continued"]
                if last_file is None or last_file not in defined.get(name, ()):
                    missing.append(f"line {number}: ::{name} is not in tests/{last_file}")
            elif match["bare"] not in defined:
                missing.append(f"line {number}: no test {match['bare']}")
    return missing


def test_every_test_the_docs_cite_exists() -> None:
    """docs/reliability.md (and every other doc) backs its claims with test names: a renamed
    or removed test must fail here, not leave the claim standing without evidence."""
    defined = _defined_tests()
    files = {p.relative_to(ROOT / "tests").as_posix() for p in (ROOT / "tests").rglob("*.py")}
    problems = {path.relative_to(ROOT).as_posix(): cited_tests_missing(path.read_text(), defined,
                                                                       files)
                for path in DOCS}
    problems = {path: missing for path, missing in problems.items() if missing}
    assert not problems, problems
    reliability = (ROOT / "docs" / "reliability.md").read_text()
    assert len(_CITATION.findall(reliability)) > 100  # the check reads what the doc cites


def test_the_citation_check_catches_what_it_should() -> None:
    defined = {"test_a": {"test_x.py"}, "test_b": {"test_y.py"}}
    files = {"test_x.py", "test_y.py"}

    def missing(text: str) -> list[str]:
        return cited_tests_missing(text, defined, files)

    assert not missing("`test_a`, `tests/test_x.py::test_a`, `::test_a`, `tests/test_*.py`")
    assert missing("`test_gone`") == ["line 1: no test test_gone"]
    assert missing("`tests/test_x.py::test_b`") == ["line 1: test_b is not in tests/test_x.py"]
    assert missing("`tests/test_y.py::test_b`,\n`::test_a`") == [
        "line 2: ::test_a is not in tests/test_y.py"]
    assert missing("`tests/test_z.py`") == ["line 1: no file tests/test_z.py"]


# --- links between the docs -----------------------------------------------------------------------


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to -."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_links_between_the_docs_lead_somewhere() -> None:
    """A relative link in the README or docs/ names a file that exists and, with #anchor, a
    heading in it (the threat model links into the sections that hold the detail)."""
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc.resolve()
            missing_anchor = (dest.exists() and bool(anchor) and dest.suffix == ".md"
                              and anchor not in _anchors(dest.read_text(encoding="utf-8")))
            if not dest.exists() or missing_anchor:
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken


def _architecture_paths() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def _readme_layout_paths() -> list[str]:
    block = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README has no Layout block"
    paths = []
    for line in block[1].splitlines():
        match = re.match(r"( *)(\S+)", line)
        if match is None or len(match[1]) > 2:  # deeper: a description's continuation
            continue
        indent, name = match[1], match[2].rstrip(",")
        for part in name.split(","):
            if part:
                paths.append(f"exporter/{part}" if indent else part)
    return paths


def test_architecture_lists_files_that_exist() -> None:
    """docs/architecture.md and README's Layout name files that exist, and every module of
    the package (exporter/*.py, exporter/collectors/*.py) is in docs/architecture.md."""
    listed = _architecture_paths()
    assert len(listed) > 20
    missing = [p for p in [*listed, *_readme_layout_paths()] if not (ROOT / p).exists()]
    assert missing == [], missing
    modules = sorted(str(p.relative_to(ROOT)) for pattern in ("exporter/*.py",
                                                               "exporter/collectors/*.py")
                     for p in ROOT.glob(pattern))
    unlisted = [m for m in modules if m not in listed and m != "exporter/__init__.py"]
    assert unlisted == [], f"add to docs/architecture.md: {unlisted}"


# Names the docs mention only as history (what a metric replaced), emitted by nothing.
RETIRED_METRICS = {"qatoolbox_chat_rooms_stale"}


def test_every_documented_metric_name_is_written_in_full_in_the_code() -> None:
    """grep finds the module that emits a metric from its name in the docs: no name is built
    by prefixing or from a table of suffixes. A histogram's or counter's sample suffix may be
    left to the family; recording rules (with a colon) are Prometheus', not ours; paths such
    as examples/qatoolbox_demo/ are not metrics. (Was postgres and business only, issue 18.)"""
    name = re.compile(r"(?<![:\w/])qatoolbox_\w*[a-z0-9](?![:\w/])")
    documented: set[str] = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        documented |= set(name.findall(doc.read_text()))
    code = "\n".join(p.read_text() for p in (ROOT / "exporter").rglob("*.py"))
    code += "\n".join(p.read_text() for p in (ROOT / "exporter").rglob("*.yml"))
    assert len(documented) > 140  # the check sees the docs' tables
    suffix = re.compile(r"_(?:bucket|count|sum|created)$")
    # The application's counters are named as prometheus_client's Counter names them,
    # without the _total their samples carry.
    instrument = "\n".join(p.read_text() for p in (ROOT / "exporter" / "instrument").glob("*.py"))
    missing = sorted(n for n in documented - RETIRED_METRICS
                     if n not in code and suffix.sub("", n) not in code
                     and f'"{n.removesuffix("_total")}"' not in instrument)
    assert missing == []


def test_each_metric_family_comes_from_one_collector() -> None:
    """A family name written in one collector's modules (collectors/<name>*.py) is written in
    no other collector's: two collectors never emit the same family (prefixes they reserve,
    ending with `_`, may be shared)."""
    owners: dict[str, set[str]] = {}
    literal = re.compile(r'"(qatoolbox_[a-z0-9_]*[a-z0-9])"')
    for path in (ROOT / "exporter" / "collectors").glob("*.py"):
        if path.name == "__init__.py":
            continue
        collector = path.stem.split("_")[0]
        for name in literal.findall(path.read_text()):
            owners.setdefault(name, set()).add(collector)
    assert len(owners) > 100
    assert {n: sorted(c) for n, c in owners.items() if len(c) > 1} == {}
