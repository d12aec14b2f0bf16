"""Basic auth: bcrypt checks with a cache of successes, and the guard that bounds their cost."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from exporter.config import ConfigError

# Successful checks remembered; more distinct working credentials than this are not expected.
AUTH_CACHE_SIZE = 64


class Authenticator:
    """Checks HTTP basic credentials against bcrypt hashes, with a cache of successes."""

    def __init__(self, users: Mapping[str, str]) -> None:
        try:
            import bcrypt
        except ImportError:
            raise ConfigError(["basic_auth_users: needs the bcrypt package "
                               "(pip install 'qatoolbox-exporter[auth]')"]) from None
        self._bcrypt = bcrypt
        self._users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        self._cost = max(int(h[4:6]) for h in self._users.values())
        self._dummy: bytes | None = None
        # The cache holds keyed digests, not passwords: a memory dump does not reveal them.
        self._key = os.urandom(32)  # secrets' source, without hashlib loaded at start
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def _dummy_hash(self) -> bytes:
        # Made lazily: the first unknown user pays for it, not every reload.
        with self._lock:
            if self._dummy is None:
                salt = self._bcrypt.gensalt(rounds=self._cost)
                self._dummy = self._bcrypt.hashpw(os.urandom(16), salt)
            return self._dummy

    def check_header(self, header: str | None) -> bool:
        """Whether an Authorization header carries valid credentials."""
        verdict = self.precheck(header)
        return verdict if isinstance(verdict, bool) else self.verify(verdict)

    def precheck(self, header: str | None) -> bool | bytes:
        """What can be told without bcrypt: True for credentials that passed before (cached),
        False for a header that cannot be right (missing, not Basic, not base64), otherwise the
        decoded credentials, for verify()."""
        if not header:
            return False
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            credentials = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return True if self._cached(credentials) else credentials

    def check(self, credentials: bytes) -> bool:
        """Whether b"user:password" is valid."""
        return self._cached(credentials) or self.verify(credentials)

    def _digest(self, credentials: bytes) -> bytes:
        # hashlib and hmac load libcrypto: only a config with basic auth pays for it.
        import hashlib
        import hmac

        return hmac.new(self._key, credentials, hashlib.sha256).digest()

    def _cached(self, credentials: bytes) -> bool:
        digest = self._digest(credentials)
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return True
        return False

    def verify(self, credentials: bytes) -> bool:
        """The bcrypt check of b"user:password" (remembered when it passes)."""
        digest = self._digest(credentials)
        user, sep, password = credentials.partition(b":")
        hashed = self._users.get(user) if sep else None
        # An unknown user costs one bcrypt check too: response times do not reveal user names.
        ok = self._checkpw(password, hashed if hashed is not None else self._dummy_hash())
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._cache[digest] = None
                while len(self._cache) > AUTH_CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok

    def _checkpw(self, password: bytes, hashed: bytes) -> bool:
        if len(password) > 72:
            # bcrypt ignores bytes past 72 (and bcrypt 5 refuses them): never a match, same work.
            self._bcrypt.checkpw(password[:72], hashed)
            return False
        return bool(self._bcrypt.checkpw(password, hashed))

    def cached(self) -> int:
        """How many successful checks are remembered."""
        with self._lock:
            return len(self._cache)


def client_key(address: str) -> str:
    """The unit a client is counted in: its IPv4 address, or its IPv6 /64 (one host usually
    holds a whole /64, and could otherwise rotate addresses at will)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class AuthGuard:
    """Bounds what basic-auth guessing can cost, for the whole process and across reloads.

    A bcrypt check is deliberately slow (cost 14: over a second of CPU), so a request with
    credentials that are not in the cache of successes is admitted to a small verification
    stage: at most `parallel` checks run at once (half the CPUs), a few more may wait up to
    `wait` seconds, and anything beyond gets 503 at once. Requests waiting here hold no request
    slot, so guessers cannot take the slots Prometheus needs. Each client (an IPv4 address or
    an IPv6 /64) also has a budget of checks: `burst`, then one per `interval`; a failed check
    spends one, a successful one is refunded. Over budget: 429 without any bcrypt work.
    """

    # Clients whose budget is remembered (least recently seen dropped first).
    MAX_CLIENTS = 4096

    def __init__(self, *, parallel: int | None = None, waiting: int | None = None,
                 burst: int = 10, interval: float = 1.0, wait: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.parallel = parallel if parallel is not None else max(1, _cpus() // 2)
        self.capacity = self.parallel + (waiting if waiting is not None else 2 * self.parallel)
        self.burst = burst
        self.interval = interval
        self.wait = wait
        self.checks = 0  # bcrypt checks run, for tests and benchmarks
        self._clock = clock
        self._running = threading.BoundedSemaphore(self.parallel)
        self._lock = threading.Lock()
        self._staged = 0
        self._budgets: OrderedDict[str, list[float]] = OrderedDict()  # key: [tokens, updated]

    def admit(self, client: str) -> tuple[int, float] | None:
        """None when the client may have a check now (a place is reserved for it: call
        verify() next); otherwise the status to answer (503 or 429) and the seconds after
        which to try again."""
        key = client_key(client)
        with self._lock:
            if self._staged >= self.capacity:
                return 503, 1.0
            now = self._clock()
            budget = self._budgets.pop(key, None) or [float(self.burst), now]
            budget[0] = min(float(self.burst), budget[0] + (now - budget[1]) / self.interval)
            budget[1] = now
            self._budgets[key] = budget
            while len(self._budgets) > self.MAX_CLIENTS:
                self._budgets.popitem(last=False)
            if budget[0] < 1.0:
                return 429, (1.0 - budget[0]) * self.interval
            budget[0] -= 1.0
            self._staged += 1
            return None

    def verify(self, authenticator: Authenticator, credentials: bytes,
               client: str) -> bool | None:
        """The bcrypt check of an admitted request: whether the credentials are valid, or None
        when no check could start within `wait` seconds (answer 503)."""
        ok: bool | None = None
        try:
            if not self._running.acquire(timeout=self.wait):
                return None
            try:
                ok = authenticator.verify(credentials)
            finally:
                self._running.release()
            with self._lock:
                self.checks += 1
            return ok
        finally:
            with self._lock:
                self._staged -= 1
                budget = self._budgets.get(client_key(client))
                if ok is not False and budget is not None:
                    budget[0] = min(float(self.burst), budget[0] + 1.0)

    def staged(self) -> int:
        """Requests admitted and not finished with their check."""
        with self._lock:
            return self._staged
