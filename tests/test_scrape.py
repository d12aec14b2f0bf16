"""ScrapeRunner: isolation, time budgets, single flight, fresh series and failure logging."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter import __version__
from exporter.scrape import ScrapeRunner, SingleFlight
from tests.harness import Samples, family_samples


def success(found: Samples, name: str) -> float | None:
    return found.get(("qatoolbox_exporter_collector_success", (("collector", name),)))


def gauge(name: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, "Test.", labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class Good:
    def __init__(self, name: str = "good") -> None:
        self.name = name
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        yield gauge(f"test_{self.name}", 1.0)


class Raising:
    name = "raising"

    def __init__(self) -> None:
        self.error = "boom"

    def collect(self) -> Iterator[Metric]:
        yield gauge("test_raising_partial", 1.0)
        raise RuntimeError(self.error)

    def failure_metrics(self) -> Iterable[Metric]:
        return [gauge("test_raising_up", 0.0)]


class Hanging:
    """Blocks until the test sets release."""

    name = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        self.entered.set()
        self.release.wait(30)
        yield gauge("test_hanging_up", 1.0)

    def failure_metrics(self) -> Iterable[Metric]:
        return [gauge("test_hanging_up", 0.0)]


@pytest.fixture
def hanging() -> Iterator[Hanging]:
    collector = Hanging()
    yield collector
    collector.release.set()  # let the worker thread end so the interpreter can exit


def test_failing_and_hanging_collectors_do_not_affect_others(hanging: Hanging) -> None:
    good, raising = Good(), Raising()
    runner = ScrapeRunner([good, raising, hanging], timeout=0.3)
    found = family_samples(runner.collect())
    assert found[("test_good", ())] == 1.0
    assert success(found, "good") == 1.0
    assert success(found, "raising") == 0.0
    assert success(found, "hanging") == 0.0
    # failure_metrics stand in for what failed; nothing partial from the raising collector
    assert found[("test_raising_up", ())] == 0.0
    assert found[("test_hanging_up", ())] == 0.0
    assert ("test_raising_partial", ()) not in found
    for name in ("good", "raising", "hanging"):
        assert ("qatoolbox_exporter_collector_duration_seconds", (("collector", name),)) in found
    assert found[("qatoolbox_exporter_scrape_timeout_seconds", ())] == 0.3
    assert found[("qatoolbox_exporter_build_info",
                  (("python_version", __import__("platform").python_version()),
                   ("version", __version__)))] == 1.0
    outcomes = runner.outcomes()
    assert outcomes["good"].success and outcomes["good"].error == ""
    assert outcomes["raising"].error == "RuntimeError: boom"
    assert outcomes["hanging"].error == "timed out after 0.3s"
    assert outcomes["hanging"].duration >= 0.3
    runner.close()


def test_timed_out_collector_is_not_run_again_while_in_flight(hanging: Hanging) -> None:
    good = Good()
    baseline = threading.active_count()
    runner = ScrapeRunner([good, hanging], timeout=0.2)
    runner.collect()
    assert hanging.entered.wait(5)
    for _ in range(30):
        found = family_samples(runner.collect())
        assert success(found, "good") == 1.0
        assert success(found, "hanging") == 0.0
        assert found[("test_hanging_up", ())] == 0.0
    assert hanging.calls == 1
    assert good.calls == 31
    # one worker per collector at most, however many scrapes piled up behind the stuck one
    assert threading.active_count() <= baseline + 2
    assert runner.outcomes()["hanging"].error == "previous run still in progress"

    hanging.release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = family_samples(runner.collect())
        if success(found, "hanging") == 1.0:
            break
        time.sleep(0.05)
    assert success(found, "hanging") == 1.0
    assert found[("test_hanging_up", ())] == 1.0
    assert hanging.calls == 2
    runner.close()


class Overlap:
    """Collectors that note how many of them run at the same moment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    def collector(self, name: str) -> Good:
        overlap = self

        class Counting(Good):
            def collect(self) -> Iterator[Metric]:
                with overlap.lock:
                    overlap.active += 1
                    overlap.most = max(overlap.most, overlap.active)
                time.sleep(0.01)
                with overlap.lock:
                    overlap.active -= 1
                yield from super().collect()

        return Counting(name)


def test_quick_collectors_run_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """No two quick collectors compete for the GIL: each starts once the one before is done."""
    monkeypatch.setattr("exporter.scrape.STAGGER", 30.0)  # "quick" whatever the machine's load
    overlap = Overlap()
    runner = ScrapeRunner([overlap.collector(f"c{i}") for i in range(4)], timeout=60)
    for _ in range(3):
        found = family_samples(runner.collect())
        assert all(success(found, f"c{i}") == 1.0 for i in range(4))
    assert overlap.most == 1
    runner.close()


def test_stuck_collector_delays_the_next_only_by_the_stagger(hanging: Hanging) -> None:
    """A stuck first collector does not hold back the others for the whole budget."""
    started: list[float] = []

    class Timed(Good):
        def collect(self) -> Iterator[Metric]:
            started.append(time.monotonic())
            yield from super().collect()

    runner = ScrapeRunner([hanging, Timed()], timeout=3)
    begun = time.monotonic()
    found = family_samples(runner.collect())
    assert success(found, "good") == 1.0
    assert success(found, "hanging") == 0.0
    # Generous: it starts STAGGER (0.05 s) after the stuck one, not when the budget ends.
    assert started and started[0] - begun < 1.5
    runner.close()


def test_quick_collectors_share_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick collectors run back to back on one pool thread (a hand-over per collector cost
    the serving thread 0.6 ms of thread switches per scrape), not on one thread each."""
    monkeypatch.setattr("exporter.scrape.STAGGER", 30.0)  # "quick" whatever the machine's load
    threads: list[int] = []

    class Where(Good):
        def collect(self) -> Iterator[Metric]:
            threads.append(threading.get_ident())
            yield from super().collect()

    runner = ScrapeRunner([Where(f"c{i}") for i in range(5)], timeout=60)
    handed = []
    submit = runner._pool.submit

    def counted(*args: Any, **kwargs: Any) -> Any:
        handed.append(1)
        return submit(*args, **kwargs)

    monkeypatch.setattr(runner._pool, "submit", counted)
    try:
        for _ in range(3):
            threads.clear()
            handed.clear()
            found = family_samples(runner.collect())
            assert all(success(found, f"c{i}") == 1.0 for i in range(5))
            assert len(threads) == 5 and len(set(threads)) == 1
            assert threads[0] != threading.get_ident()  # a pool thread, not the caller
            assert len(handed) == 1  # handed over once, not once per collector
    finally:
        runner.close()


def test_a_collector_not_started_by_the_deadline_runs_next_time(
        hanging: Hanging, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the budget shorter than the stagger, the collector after a stuck one is never
    started in that scrape: it counts as timed out, and the next scrape runs it (it is not
    left pending, which would read as a run still in progress for good)."""
    monkeypatch.setattr("exporter.scrape.STAGGER", 30.0)
    good = Good()
    runner = ScrapeRunner([hanging, good], timeout=0.3)
    try:
        found = family_samples(runner.collect())
        assert success(found, "hanging") == 0.0 and success(found, "good") == 0.0
        assert good.calls == 0
        assert runner.outcomes()["good"].error == "timed out after 0.3s"
        hanging.release.set()
        found = family_samples(runner.collect())
        assert success(found, "good") == 1.0 and good.calls == 1
    finally:
        runner.close()


def test_close_does_not_wait_for_a_stuck_collector(hanging: Hanging) -> None:
    runner = ScrapeRunner([hanging], timeout=0.1)
    runner.collect()
    started = time.monotonic()
    runner.close()
    assert time.monotonic() - started < 5


class Slow:
    """Counts runs; each run waits for the test's go-ahead."""

    name = "slow"

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        self.entered.set()
        self.release.wait(30)
        yield gauge("test_slow_run", float(self.calls))


def test_concurrent_callers_share_one_collection() -> None:
    slow = Slow()
    runner = ScrapeRunner([slow], timeout=20)
    results: list[list[Metric]] = []
    started = threading.Barrier(6)

    def scrape() -> None:
        started.wait()
        results.append(runner.collect())

    threads = [threading.Thread(target=scrape) for _ in range(5)]
    try:
        for thread in threads:
            thread.start()
        started.wait()
        assert slow.entered.wait(10)
        time.sleep(0.3)  # let the other callers reach collect() and queue behind the first
    finally:
        slow.release.set()
        for thread in threads:
            thread.join(10)
    assert len(results) == 5
    assert slow.calls == 1
    assert all(r is results[0] for r in results)
    # the next scrape after the shared one runs afresh
    found = family_samples(runner.collect())
    assert found[("test_slow_run", ())] == 2.0
    assert slow.calls == 2
    runner.close()


class Changing:
    """Labels change between scrapes; fails when told to."""

    name = "changing"

    def __init__(self) -> None:
        self.label = "a"
        self.fail = False

    def collect(self) -> Iterator[Metric]:
        if self.fail:
            raise OSError("gone")
        yield gauge("test_item", 1.0, item=self.label)


def test_no_stale_series_between_scrapes() -> None:
    changing = Changing()
    runner = ScrapeRunner([changing], timeout=5)
    found = family_samples(runner.collect())
    assert ("test_item", (("item", "a"),)) in found
    changing.label = "b"
    found = family_samples(runner.collect())
    assert ("test_item", (("item", "b"),)) in found
    assert ("test_item", (("item", "a"),)) not in found
    changing.fail = True
    found = family_samples(runner.collect())
    assert not [k for k in found if k[0] == "test_item"]
    assert success(found, "changing") == 0.0
    runner.close()


class BadFallback(Raising):
    name = "badfallback"

    def failure_metrics(self) -> Iterable[Metric]:
        raise ValueError("fallback broke")


def test_failure_metrics_that_raise_are_contained(caplog: pytest.LogCaptureFixture) -> None:
    runner = ScrapeRunner([BadFallback(), Good()], timeout=5)
    with caplog.at_level(logging.WARNING, logger="exporter.scrape"):
        found = family_samples(runner.collect())
    assert success(found, "badfallback") == 0.0
    assert success(found, "good") == 1.0
    assert any(r.getMessage() == "failure_metrics raised" for r in caplog.records)
    runner.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_logged_once_again_on_change_or_after_quiet_period_and_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    raising = Raising()
    runner = ScrapeRunner([raising, Good()], timeout=5, repeat_interval=300, clock=clock)

    def scrape(times: int = 1) -> list[logging.LogRecord]:
        caplog.clear()
        for _ in range(times):
            runner.collect()
            clock.now += 15
        return [r for r in caplog.records if r.name == "exporter.scrape"]

    with caplog.at_level(logging.INFO, logger="exporter.scrape"):
        first = scrape(5)
        assert [(r.levelno, r.getMessage()) for r in first] == [
            (logging.WARNING, "collector failed")]
        assert first[0].__dict__["collector"] == "raising"
        assert first[0].__dict__["err"] == "RuntimeError: boom"

        raising.error = "connection refused"
        changed = scrape(3)
        assert [r.__dict__["err"] for r in changed] == ["RuntimeError: connection refused"]

        clock.now += 300  # quiet period over: the same error is worth one more line
        again = scrape(3)
        assert [r.__dict__["err"] for r in again] == ["RuntimeError: connection refused"]

        raising.collect = lambda: iter([gauge("test_raising_ok", 1.0)])  # type: ignore[method-assign]
        recovered = scrape(4)
        assert [(r.levelno, r.getMessage(), r.__dict__["collector"]) for r in recovered] == [
            (logging.INFO, "collector recovered", "raising")]

        del raising.collect
        refailed = scrape(2)
        assert [r.getMessage() for r in refailed] == ["collector failed"]
    runner.close()


def test_every_enabled_collector_has_self_metrics_every_scrape() -> None:
    names = [f"c{i}" for i in range(6)]
    runner = ScrapeRunner([Good(n) for n in names], timeout=5)
    assert runner.names == names
    assert runner.outcomes() == {}
    for _ in range(3):
        found = family_samples(runner.collect())
        assert {dict(k[1])["collector"] for k in found
                if k[0] == "qatoolbox_exporter_collector_success"} == set(names)
        assert all(success(found, n) == 1.0 for n in names)
    runner.close()


class Sluggish:
    """Always takes longer than the runner's budget (a server that stopped answering)."""

    name = "sluggish"

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        time.sleep(0.25)
        yield gauge("test_sluggish", 1.0)


def test_collector_that_keeps_timing_out_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    sluggish = Sluggish()
    runner = ScrapeRunner([sluggish], timeout=0.1, repeat_interval=300, clock=Clock())
    with caplog.at_level(logging.INFO, logger="exporter.scrape"):
        for _ in range(12):
            found = family_samples(runner.collect())
            assert success(found, "sluggish") == 0.0
            time.sleep(0.05)
    assert sluggish.calls >= 2  # it ran again after its stuck run ended...
    warnings = [r for r in caplog.records if r.name == "exporter.scrape"]
    assert len(warnings) == 1, [r.__dict__.get("err") for r in warnings]  # ...same failure
    runner.close()


def test_single_flight_shares_per_key_and_shares_errors() -> None:
    flight: SingleFlight[str, list[str]] = SingleFlight()
    gate, entered = threading.Event(), threading.Event()
    calls: list[str] = []

    def work(key: str) -> list[str]:
        calls.append(key)
        entered.set()
        gate.wait(10)
        if key == "bad":
            raise ValueError("bad key")
        return [key]

    results: dict[str, list[object]] = {"a": [], "b": [], "bad": []}

    def call(key: str) -> None:
        try:
            results[key].append(flight.run(key, lambda: work(key)))
        except ValueError as exc:
            results[key].append(exc)

    leaders = [threading.Thread(target=call, args=(key,)) for key in ("a", "b", "bad")]
    for thread in leaders:
        entered.clear()
        thread.start()
        assert entered.wait(10)
    followers = [threading.Thread(target=call, args=(key,)) for key in ("a", "b", "bad") * 3]
    for thread in followers:
        thread.start()
    time.sleep(0.3)  # the followers reach run() and wait on the leaders
    gate.set()
    for thread in leaders + followers:
        thread.join(10)
    assert sorted(calls) == ["a", "b", "bad"]  # one run per key, whatever the callers
    assert all(r is results["a"][0] for r in results["a"]) and len(results["a"]) == 4
    assert all(r is results["b"][0] for r in results["b"]) and len(results["b"]) == 4
    assert len(results["bad"]) == 4 and all(isinstance(r, ValueError) for r in results["bad"])
    # Once a run is over, the next call runs afresh.
    assert flight.run("a", lambda: ["again"]) == ["again"]


# --- exporter.lean: imported by exporter.scrape before prometheus_client ---------------------


LEAN_CHECK = """
import sys
import exporter.scrape  # the exporter's first prometheus_client import goes through lean
heavy = [m for m in ("prometheus_client.exposition", "http.server", "urllib.request", "ssl",
                     "wsgiref") if m in sys.modules]
print("heavy:", heavy)
from prometheus_client.core import GaugeMetricFamily
assert "prometheus_client.exposition" not in sys.modules
# Any name of the package itself runs the real __init__, once: every use still works.
from prometheus_client import CollectorRegistry, Counter, generate_latest
import prometheus_client
registry = CollectorRegistry()
Counter("lean_total", "Test.", registry=registry).inc()
assert b"lean_total 1.0" in generate_latest(registry)
assert prometheus_client.REGISTRY is not None
try:
    prometheus_client.no_such_name
except AttributeError:
    print("missing: AttributeError")
"""


def test_prometheus_client_loads_without_its_package_init() -> None:
    """What the exporter imports of prometheus_client leaves out the exposition module and
    what it pulls in (http.server's client half, urllib.request, ssl: ~5 MB), and every other
    use of the package still works."""
    import subprocess
    import sys

    from tests.harness import ROOT

    done = subprocess.run([sys.executable, "-c", LEAN_CHECK], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout
    assert "missing: AttributeError" in done.stdout


def test_defer_package_init_leaves_an_imported_package_alone() -> None:
    import prometheus_client

    from exporter import lean

    assert lean.defer_package_init("prometheus_client") is False
    assert lean.defer_package_init("no_such_package_here") is False
    assert prometheus_client.generate_latest is not None


def test_malloc_arenas_limited_on_glibc() -> None:
    from exporter import lean

    assert lean.limit_malloc_arenas() is True
