"""The redis collector on its own RESP client against the same collector on redis-py.

Extracts the exporter package of a git revision from before the change (`--before`, default
13a8318, the last one on redis-py) next to the working tree's, starts a throwaway
redis-server filled with QAToolBox-style keys and a Celery queue, and runs each version in
child processes, alternating (before, after, after, before, ...) so that both see the same
machine load: import cost (`-X importtime` of the collector module, RSS added by importing it
and making its client), CPU of the scrape thread per collect(), CPU of one full key-group
count, and peak RSS. Last, the sorted sample names and labels of one scrape of each version
are compared: they must be the same. Then the whole exporter of each version, with only its
redis collector, scraped in turn with Prometheus' request: latency, CPU and peak RSS.

Examples:
    .venv/bin/python -m bench.redis_client
    .venv/bin/python -m bench.redis_client --keys 200000 --scrapes 300 --rounds 4 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.redis_compare import key_group_timing, start_redis
from bench.scrape import Target, _free_port, _wait_up, report
from bench.scrape import measure as measure_scrapes
from exporter.collectors import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "13a8318"

# Runs in a child with the version's package first on sys.path. Prints one JSON object.
CHILD = r"""
import gc, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
url, scrapes = sys.argv[2], int(sys.argv[3])

def rss(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

import exporter.collectors  # the table, the config and the runner: loaded whatever is enabled
base = rss()
started = time.perf_counter()
import exporter.collectors.redis as module
imported_ms = (time.perf_counter() - started) * 1000
from exporter.config import Secret
from exporter.collectors.redis_config import RedisConfig
cfg = RedisConfig(url=Secret(url), key_scan_interval=3600.0, key_scan_time_budget=600.0)
collector = module.RedisCollector(cfg, 10.0)
client = module.connect(url, 10.0)  # what the scrape builds on first use
import_rss = rss() - base
assert module.__file__.startswith(sys.argv[1]), module.__file__
list(collector.collect())          # connects, starts the key count
cpu0 = time.process_time()
while True:                        # the count's CPU: this thread sleeps meanwhile
    samples = {s.name: s.value for f in collector.collect() for s in f.samples}
    if samples.get("qatoolbox_redis_key_group_scan_complete") == 1:
        break
    time.sleep(0.05)
count_cpu = time.process_time() - cpu0
for _ in range(5):
    list(collector.collect())
cpu = []
for _ in range(scrapes):
    t0 = time.thread_time()
    list(collector.collect())
    cpu.append(time.thread_time() - t0)
series = sorted({(s.name, tuple(sorted(s.labels.items())))
                 for f in collector.collect() for s in f.samples})
collector.close()
print(json.dumps({"import_ms": imported_ms, "import_rss_mb": import_rss,
                  "scrape_cpu_ms": statistics.median(cpu) * 1000,
                  "count_cpu_ms": count_cpu * 1000, "peak_rss_mb": rss("VmHWM"),
                  "modules": sorted(m for m in ("redis", "ssl", "asyncio") if m in sys.modules),
                  "series": series}))
"""


def import_time_us(side: Path) -> int:
    """Cumulative -X importtime of exporter.collectors.redis in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         f"import sys; sys.path.insert(0, {str(side)!r}); import exporter.collectors; "
         f"import exporter.collectors.redis"],
        capture_output=True, text=True, check=True, cwd=side)
    for line in done.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "exporter.collectors.redis":
            return int(parts[1])
    raise SystemExit("no importtime line for exporter.collectors.redis")


def run_child(side: Path, url: str, scrapes: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(side), url, str(scrapes)],
                          capture_output=True, text=True, check=False, cwd=side, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"child for {side} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    result["import_us"] = import_time_us(side)
    return result


def extract(revision: str, into: Path) -> Path:
    """The exporter package as it was at revision, under into."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "exporter"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def start_exporter(side: Path, port: int, name: str,
                   config: Path) -> tuple[subprocess.Popen[bytes], Target]:
    """`python -m exporter` of one version with only its redis collector."""
    listen = _free_port()
    flags = [f"--no-collector.{c}" for c in DEFAULTS if c != "redis"]
    flags += ["--config.file", str(config)]
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "PYTHONPATH": str(side)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{listen}",
         *flags], cwd=side, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = Target(name, f"http://127.0.0.1:{listen}/metrics", proc.pid)
    _wait_up(target.url, proc)
    return proc, target


FIELDS = (("import_us", "import of the collector module (-X importtime, cumulative)", "µs"),
          ("import_rss_mb", "RSS added by the import and a client", "MB"),
          ("scrape_cpu_ms", "CPU of the scrape thread per collect(), median", "ms"),
          ("count_cpu_ms", "CPU of one full key-group count", "ms"),
          ("peak_rss_mb", "peak RSS of the child", "MB"))


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both versions, interleaved, against one filled Redis."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="git revision on redis-py")
    parser.add_argument("--keys", type=int, default=200_000, help="keys to fill Redis with")
    parser.add_argument("--scrapes", type=int, default=300, help="collect() calls per child")
    parser.add_argument("--rounds", type=int, default=4, help="children per version")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qatb-bench-resp-") as tmp:
        before = extract(args.before, Path(tmp) / "before")
        server, port = start_redis(Path(tmp), args.keys)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
            for i in range(args.rounds):
                order = [("before", before), ("after", ROOT)]
                for name, side in order if i % 2 == 0 else order[::-1]:
                    runs[name].append(run_child(side, url, args.scrapes))
            procs = []
            try:
                targets = []
                # One key count each, before the measured scrapes: a count starting again
                # (every 60 s by default) in one exporter's window would add its 0.4 s of CPU.
                config = Path(tmp) / "redis.yml"
                config.write_text("redis:\n  key_scan_interval: 1h\n  key_scan_time_budget: 60s\n")
                for name, side in (("before", before), ("after", ROOT)):
                    proc, target = start_exporter(side, port, f"exporter {name}", config)
                    procs.append(proc)
                    targets.append(target)
                for target in targets:
                    key_group_timing(target)
                measure_scrapes(targets, args.scrapes)
                whole = report(targets, args.scrapes, args.markdown)
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(10)
        finally:
            server.terminate()
            server.wait(10)
    medians = {name: {key: statistics.median(float(r[key]) for r in results)
                      for key, _, _ in FIELDS} for name, results in runs.items()}
    same = runs["before"][-1]["series"] == runs["after"][-1]["series"]
    print(f"{args.keys} keys, {args.scrapes} collect() per child, {args.rounds} children per "
          f"version, interleaved; medians over children\n")
    if args.markdown:
        print(f"| measure | before ({args.before}, redis-py) | after (exporter/resp.py) | "
              f"after/before |")
        print("|---|---|---|---|")
    for key, label, unit in FIELDS:
        b, a = medians["before"][key], medians["after"][key]
        ratio = a / b if b else float("nan")
        if args.markdown:
            print(f"| {label} | {b:.2f} {unit} | {a:.2f} {unit} | {ratio:.2f} |")
        else:
            print(f"{label}: before {b:.2f} {unit}, after {a:.2f} {unit}, ratio {ratio:.2f}")
    print(f"\nmodules loaded after import, before: {runs['before'][0]['modules']}, "
          f"after: {runs['after'][0]['modules']}")
    series = runs["after"][-1]["series"]
    print(f"sorted sample names and labels of one scrape: {'identical' if same else 'DIFFERENT'}"
          f" ({len(series)} samples)")
    if not same:
        old = {tuple(map(str, s)) for s in runs["before"][-1]["series"]}
        new = {tuple(map(str, s)) for s in series}
        print("only before:", sorted(old - new)[:20])
        print("only after:", sorted(new - old)[:20])
    print(f"\nThe whole exporter, redis collector only, {args.scrapes} scrapes each in turn "
          f"(Prometheus' request):\n")
    print(whole)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
