"""Bounded, loopback-only traffic for the QAToolBox demo: a mix of fast, slow, 4xx and 5xx.

    python examples/loadgen/loadgen.py --url http://127.0.0.1:8000 --rate 50 --duration 60

Requests start on a fixed schedule (open loop, `rate` per second) for `duration` seconds;
when `concurrency` requests are already waiting, the scheduled one is skipped and counted, so
a slow server never makes the generator pile up work. Only loopback addresses are accepted.
Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import random
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_RATE = 2000.0
MAX_DURATION = 3600.0
MAX_CONCURRENCY = 64

DEFAULT_WEIGHTS = {"fast": 70, "write": 10, "slow": 5, "client_error": 12, "server_error": 3}


@dataclass(frozen=True)
class Request:
    """One request to send: method, path, JSON body."""

    method: str
    path: str
    body: dict[str, object] | None = None


def _fast(rng: random.Random, rooms: Sequence[str]) -> Request:
    if rng.random() < 0.7:
        return Request("GET", f"/rooms/?limit={rng.choice((10, 20, 50))}")
    return Request("GET", "/rooms/?status=active&limit=20")


def _write(rng: random.Random, rooms: Sequence[str]) -> Request:
    room = rng.choice(rooms) if rooms else str(uuid.uuid4())
    return Request("POST", f"/rooms/{room}/messages/",
                   {"content": f"load {rng.randrange(10**6)}", "message_type": "text"})


def _slow(rng: random.Random, rooms: Sequence[str]) -> Request:
    # Around QAToolBox's 2 s slow-request line, a few past it.
    return Request("GET", f"/slow/?seconds={rng.uniform(0.2, 2.6):.2f}")


def _client_error(rng: random.Random, rooms: Sequence[str]) -> Request:
    choice = rng.randrange(4)
    if choice == 0:
        return Request("POST", f"/rooms/{uuid.uuid4()}/messages/", {"content": "x"})  # 404
    if choice == 1:
        return Request("POST", "/login/", {"username": "nobody", "password": "wrong"})  # 401
    if choice == 2:
        return Request("POST", "/capsules/", {"title": "anonymous"})  # 401: no user
    return Request("GET", f"/no/such/page/{rng.randrange(1000)}")  # 404, no route


def _server_error(rng: random.Random, rooms: Sequence[str]) -> Request:
    return Request("GET", "/fail/")


KINDS: dict[str, Callable[[random.Random, Sequence[str]], Request]] = {
    "fast": _fast, "write": _write, "slow": _slow, "client_error": _client_error,
    "server_error": _server_error,
}


@dataclass
class Stats:
    """What was sent and what came back."""

    statuses: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    skipped: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else 0.0

        return {"sent": sum(self.statuses.values()) + self.errors, "statuses": dict(self.statuses),
                "kinds": dict(self.kinds), "skipped": self.skipped,
                "connection_errors": self.errors,
                "latency_seconds": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)}}


def loopback_target(url: str) -> tuple[str, int]:
    """Host and port of url; raise ValueError unless every address it names is loopback."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http:// URL, got {url!r}")
    port = parts.port or 80
    host = parts.hostname
    # Never resolve other names: a lookup could already leave the machine.
    if host == "localhost":
        addresses = [str(info[4][0]) for info in socket.getaddrinfo(host, port,
                                                                    type=socket.SOCK_STREAM)]
    else:
        addresses = [host]
    try:
        loopback = bool(addresses) and all(
            ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host} is not a loopback address; refusing to send traffic")
    return parts.hostname, port


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local = threading.local()

    def send(self, request: Request) -> int:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port,
                                                                timeout=self.timeout)
        body = None if request.body is None else json.dumps(request.body).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            conn.request(request.method, request.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            raise


def discover_rooms(client: Client) -> list[str]:
    """Room ids to post messages to (empty when the demo has none)."""
    conn = http.client.HTTPConnection(client.host, client.port, timeout=client.timeout)
    try:
        conn.request("GET", "/rooms/?status=active&limit=200")
        response = conn.getresponse()
        data = json.loads(response.read() or b"{}") if response.status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return []
    finally:
        conn.close()
    return [str(r["room_id"]) for r in data.get("rooms", []) if r.get("room_id")]


def run(url: str, rate: float, duration: float, *, concurrency: int = 16,
        weights: dict[str, int] | None = None, seed: int | None = None,
        timeout: float = 15.0) -> Stats:
    """Send traffic; return the stats."""
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be in (0, {MAX_RATE:g}]")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION:g}]")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}]")
    weights = dict(weights or DEFAULT_WEIGHTS)
    unknown = set(weights) - set(KINDS)
    if unknown or not any(w > 0 for w in weights.values()):
        raise ValueError(f"weights: unknown kinds {sorted(unknown)} or all zero")
    host, port = loopback_target(url)
    client = Client(host, port, timeout)
    rng = random.Random(seed)
    rooms = discover_rooms(client) if weights.get("write") else []
    kinds = [k for k in weights if weights[k] > 0]
    stats = Stats()
    slots = threading.BoundedSemaphore(concurrency)

    def one(kind: str, request: Request) -> None:
        start = time.perf_counter()
        try:
            status = client.send(request)
        except (OSError, http.client.HTTPException):
            with stats.lock:
                stats.errors += 1
        else:
            with stats.lock:
                stats.statuses[str(status)] += 1
                stats.kinds[kind] += 1
                stats.latencies.append(time.perf_counter() - start)
        finally:
            slots.release()

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="loadgen") as pool:
        for i in range(int(rate * duration)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
            request = KINDS[kind](rng, rooms)
            if not slots.acquire(blocking=False):
                stats.skipped += 1
                continue
            pool.submit(one, kind, request)
    return stats


def parse_weights(text: str) -> dict[str, int]:
    """"fast=70,slow=5" -> {"fast": 70, "slow": 5}."""
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        weights[name.strip()] = int(value)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback base URL")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    parser.add_argument("--weights", type=parse_weights, default=DEFAULT_WEIGHTS,
                        help="share of each kind: " + ",".join(f"{k}={v}" for k, v in
                                                                DEFAULT_WEIGHTS.items()))
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    args = parser.parse_args(argv)
    try:
        stats = run(args.url, args.rate, args.duration, concurrency=args.concurrency,
                    weights=args.weights, seed=args.seed)
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats.summary(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
