"""Redis benchmark: this exporter's redis collector against redis_exporter, side by side.

Starts a throwaway redis-server on a free loopback port, fills it with QAToolBox-style keys
(200,000 by default) and a Celery queue, then runs both exporters against it with default
settings and scrapes them in turn: latency, series, bytes, CPU and peak RSS. A second part
times key-group counting: this exporter's background count (its published
scan_duration_seconds) against redis_exporter's --count-keys, which SCANs inside the scrape.

Examples:
    .venv/bin/python bench/redis_compare.py
    .venv/bin/python bench/redis_compare.py --keys 200000 --scrapes 300 --markdown
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scrape import Target, _free_port, _wait_up, families, report, scrape  # noqa: E402
from bench.scrape import measure as measure_scrapes  # noqa: E402
from exporter.collectors import DEFAULTS  # noqa: E402
from tests.harness import EXPORTER_PASSWORD, EXPORTER_ROLE, documented_acl_rules  # noqa: E402

FILL_GROUPS = ("user", "chat_room", "chat_message", "time_capsule", "heart_link", "stats", "api")

FILL_SCRIPT = """
local groups = {'user','chat_room','chat_message','time_capsule','heart_link','stats','api'}
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = first, last do
  local slot = i % 9
  local key
  if slot < 7 then
    key = 'qatoolbox:1:' .. groups[slot + 1] .. ':' .. i
  elseif slot == 7 then
    key = 'session:1:django.contrib.sessions.cache' .. i
  else
    key = 'celery-task-meta-' .. i
  end
  redis.call('SET', key, 'x')
end
return last - first + 1
"""


def start_redis(workdir: Path, keys: int) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server on a free port, filled with keys and a Celery queue."""
    import redis

    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.1)
    for first in range(0, keys, 50_000):  # chunks, so the server never blocks for long
        client.eval(FILL_SCRIPT, 0, first, min(keys, first + 50_000) - 1)
    client.lpush("celery", *range(20))
    client.lpush("celery\x06\x166", *range(5))
    for _ in range(1000):  # some traffic, so commandstats and latency have content
        client.get("qatoolbox:1:user:0")
        client.get("qatoolbox:1:user:missing")
    # This exporter logs in as docs/reliability.md's least-privilege ACL user, as deployed.
    client.execute_command("ACL", "SETUSER", EXPORTER_ROLE, *documented_acl_rules())
    return proc, port


def start_ours(port: int, extra_args: Sequence[str],
               name: str = "qatoolbox-exporter (redis)") -> tuple[subprocess.Popen[bytes], Target]:
    """This exporter with only its redis collector, default settings (plus extra_args)."""
    listen = _free_port()
    flags = [f"--no-collector.{name}" for name in DEFAULTS if name != "redis"]
    env = {**os.environ, "REDIS_URL": (f"redis://{EXPORTER_ROLE}:{EXPORTER_PASSWORD}"
                                       f"@127.0.0.1:{port}/0")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{listen}",
         *flags, *extra_args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = Target(name, f"http://127.0.0.1:{listen}/metrics", proc.pid)
    _wait_up(target.url, proc)
    return proc, target


def start_theirs(binary: str, port: int, name: str,
                 extra_args: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], Target]:
    """redis_exporter with default flags (plus extra_args) against the same server."""
    listen = _free_port()
    proc = subprocess.Popen(
        [binary, "--redis.addr", f"redis://127.0.0.1:{port}",
         "--web.listen-address", f"127.0.0.1:{listen}", *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = Target(name, f"http://127.0.0.1:{listen}/metrics", proc.pid)
    _wait_up(target.url, proc)
    return proc, target


# Each exporter's own account of the time it spent reading Redis in the scrape (no HTTP).
SELF_DURATION = {
    "qatoolbox": re.compile(
        rb'^qatoolbox_exporter_collector_duration_seconds\{collector="redis"\} (\S+)$', re.M),
    "redis_exporter": re.compile(rb"^redis_exporter_last_scrape_duration_seconds (\S+)$", re.M),
}


def measure(targets: Sequence[Target], scrapes: int, warmup: int = 5) -> dict[str, list[float]]:
    """Scrape the targets in turn (A, B, A, B, ...): latency, CPU, and each one's self-reported
    collection time."""
    own: dict[str, list[float]] = {t.name: [] for t in targets}
    for target in targets:
        target.latencies = []

    def self_reported(target: Target, body: bytes) -> None:
        kind = "qatoolbox" if target.name.startswith("qatoolbox") else "redis_exporter"
        match = SELF_DURATION[kind].search(body)
        if match:
            own[target.name].append(float(match.group(1)))

    measure_scrapes(targets, scrapes, warmup, on_body=self_reported)
    return own


def own_report(own: dict[str, list[float]]) -> str:
    """Median self-reported collection time of each exporter, and their ratio."""
    medians = {name: statistics.median(values) for name, values in own.items() if values}
    lines = [f"{name}: collection of Redis data (self-reported) median {m * 1000:.2f} ms"
             for name, m in medians.items()]
    names = list(medians)
    if len(names) == 2:
        ratio = medians[names[0]] / medians[names[1]]
        lines.append(f"self-reported collection time ratio {names[0]}/{names[1]}: {ratio:.2f}")
    return "\n".join(lines)


def sample(body: bytes, name: str) -> float | None:
    """The first sample called name in an exposition."""
    for family in families(body):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    return None


def key_group_timing(target: Target) -> float:
    """Seconds this exporter's last complete key-group count took (waits for one: on a busy
    machine the first count may stop at its 1 s budget and finish a minute later)."""
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        _, body = scrape(target.url)
        if sample(body, "qatoolbox_redis_key_group_scan_complete") == 1:
            return sample(body, "qatoolbox_redis_key_group_scan_duration_seconds") or 0.0
        time.sleep(0.2)
    raise SystemExit("no complete key group count within 200 s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run both exporters against one filled Redis and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000, help="keys to fill Redis with")
    parser.add_argument("--scrapes", type=int, default=300, help="scrapes per exporter")
    parser.add_argument("--count-scrapes", type=int, default=5,
                        help="scrapes of redis_exporter --count-keys to time")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--redis-exporter", default=shutil.which("prometheus-redis-exporter")
                        or "/usr/bin/prometheus-redis-exporter",
                        help="the redis_exporter binary")
    args = parser.parse_args(argv)
    if not os.access(args.redis_exporter, os.X_OK):
        parser.error("prometheus-redis-exporter not found (apt-get install "
                     "prometheus-redis-exporter) or pass --redis-exporter")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="qatb-bench-redis-") as tmp:
        try:
            server, port = start_redis(Path(tmp), args.keys)
            procs.append(server)
            ours_proc, ours = start_ours(port, [])
            procs.append(ours_proc)
            theirs_proc, theirs = start_theirs(args.redis_exporter, port, "redis_exporter")
            procs.append(theirs_proc)

            # The first key-group count runs in the background after the first scrape (then
            # once a minute); measure the steady state, not a scrape racing that count.
            ours_time = key_group_timing(ours)

            # Part 1: default settings, scraped in turn.
            own = measure([ours, theirs], args.scrapes)
            print(f"## Scrapes at default settings ({args.keys} keys, {args.scrapes} scrapes "
                  f"each)\n")
            print(report([ours, theirs], args.scrapes, args.markdown))
            print(own_report(own))

            # Part 2: counting keys by group.
            # The groups FILL_SCRIPT writes (the exporter finds them by structure by default).
            patterns = [f"qatoolbox:1:{g}:*" for g in FILL_GROUPS] + ["session:*"]
            count_proc, counting = start_theirs(
                args.redis_exporter, port, "redis_exporter --count-keys",
                ["--count-keys", ",".join(f"db0={p}" for p in patterns)])
            procs.append(count_proc)
            times = [scrape(counting.url)[0] for _ in range(args.count_scrapes)]
            _, body = scrape(counting.url)
            counted = sum(s.value for f in families(body) for s in f.samples
                          if s.name == "redis_keys_count")
            print(f"\n## Key groups at {args.keys} keys ({len(patterns)} patterns)\n")
            print(f"qatoolbox-exporter: background count, {ours_time * 1000:.0f} ms, "
                  f"outside the scrape path")
            print(f"redis_exporter --count-keys: scrape median "
                  f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, "
                  f"max {max(times) * 1000:.0f}), {counted:.0f} keys counted, on every scrape")
            count_proc.terminate()

            # Part 3: worst case for this exporter, a count under way during most scrapes
            # (interval 1 s instead of 60 s): the scrape shares the process with the SCAN loop.
            config = Path(tmp) / "busy.yml"
            config.write_text("redis:\n  key_scan_interval: 1s\n")
            busy_proc, busy = start_ours(port, ["--config.file", str(config)],
                                         "qatoolbox-exporter (redis, counting every 1 s)")
            procs.append(busy_proc)
            key_group_timing(busy)
            own = measure([busy, theirs], args.scrapes)
            print(f"\n## Scrapes while counting key groups every second ({args.scrapes} "
                  f"scrapes each)\n")
            print(report([busy, theirs], args.scrapes, args.markdown))
            print(own_report(own))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
