"""Rate and concurrency limits (mqtasks.middleware.limits) with real workers: on memory://
with the memory backend, and on RabbitMQ and Redis with the Redis result backend."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import structlog

from mqtasks import App
from mqtasks.backend import Backend
from mqtasks.message import current_message
from mqtasks.middleware.limits import Limits, limit_status, rate_bucket, slots_key
from mqtasks.middleware.statsd import sanitize
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys
from tests._helpers.statsd import StatsdServer
from tests._helpers.wait import wait_for
from tests.backend.conftest import drop_tables, postgres_url, table_prefix


@pytest.fixture(
    params=[
        "memory",
        pytest.param("postgresql", marks=pytest.mark.integration),
        pytest.param("amqp", marks=pytest.mark.integration),
        pytest.param("redis", marks=pytest.mark.integration),
    ]
)
def limited_app(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Iterator[App]:
    """An app on memory:// with the memory backend, then with the PostgreSQL backend
    (tables of its own, dropped after); then RabbitMQ and Redis with the Redis backend
    (under a key prefix of its own, deleted after)."""
    if request.param == "memory":
        yield make_app("memory://", backend="memory://")
        return
    if request.param == "postgresql":
        tables = table_prefix()
        app = make_app("memory://", backend=postgres_url(tables))
        yield app
        app.close()
        drop_tables(tables)
        return
    url = require_broker(request.param)
    require_broker("redis")
    prefix = unique_name("limits") + ":"
    app = make_app(url, backend=REDIS_URL, backend_key_prefix=prefix)
    yield app
    app.close()
    delete_keys(prefix)


def install(app: App, **options: Any) -> Limits:
    """Install Limits in the app's middleware, as a worker of the app does."""
    limits = Limits.for_app(app, **options)
    assert limits is not None
    app.middleware.append(limits)
    return limits


def run_workers(
    app: App,
    workers: int,
    timeout: float,
    until: Callable[[], bool],
    *,
    raise_errors: bool = True,
    **options: Any,
) -> None:
    """Start ``workers`` workers, wait ``until`` the tasks ran and the queue is drained, stop them.

    ``until`` first: RabbitMQ's delayed messages are not counted by ``drain``.
    """
    with ExitStack() as stack:
        started = [stack.enter_context(running_worker(app, **options)) for _ in range(workers)]
        deadline = time.monotonic() + timeout
        wait_for(until, "the tasks to run", timeout=timeout)
        for worker in started:
            left = max(1.0, deadline - time.monotonic())
            drain(worker, timeout=left, raise_errors=raise_errors)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` in any ``window`` seconds."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` (start, end) running at one moment."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = best = 0
    for _, step in edges:
        running += step
        best = max(best, running)
    return best


# -- rate limits ------------------------------------------------------------------------------


def test_a_rate_limit_holds_across_two_workers(limited_app: App) -> None:
    app = limited_app
    ran: list[float] = []
    lock = threading.Lock()

    @app.task(rate_limit="10/s")
    def call(n: int) -> None:
        with lock:
            ran.append(time.monotonic())

    install(app)
    for n in range(20):
        call.delay(n)
    run_workers(app, 2, 30, lambda: len(ran) == 20, concurrency=4)

    assert len(ran) == 20
    # One token at once (the burst of 10/s is 1), then one every 0.1 s.
    assert max(ran) - min(ran) >= 1.7
    assert max_in_window(ran) <= 12


def test_tokens_taken_ahead_keep_a_high_rate(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")
    ran: list[float] = []
    lock = threading.Lock()

    @app.task(rate_limit="400/s")  # 20 tokens in SPARE_TTL: taken up to 16 at once
    def call(n: int) -> None:
        with lock:
            ran.append(time.monotonic())

    install(app)
    for n in range(600):
        call.delay(n)
    run_workers(app, 2, 30, lambda: len(ran) == 600, concurrency=4)

    # 40 at once (the burst), then 400 a second.
    assert max(ran) - min(ran) >= (600 - 40) / 400 * 0.95
    assert max_in_window(ran) <= 400 * 1.05 + 40 + 2 * 16


def test_rate_key_buckets_are_independent(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")
    ran: dict[str, list[float]] = {"a": [], "b": []}

    @app.task(rate_limit="1/s", rate_key="user")
    def notify(user: str, text: str = "") -> None:
        ran[user].append(time.monotonic())

    install(app)
    start = time.monotonic()
    notify.delay("a")
    notify.delay("a", text="again")
    notify.delay(user="b")
    run_workers(app, 1, 20, lambda: len(ran["a"]) + len(ran["b"]) == 3, concurrency=4)

    assert ran["b"][0] - start < 0.5  # not behind user a's bucket
    assert ran["a"][1] - ran["a"][0] >= 0.9
    assert app.backend.peek_tokens(rate_bucket(notify.name, "b", keyed=True), rate=1, capacity=1)


def test_a_long_wait_is_deferred_through_the_broker_and_keeps_its_attempt(
    limited_app: App,
) -> None:
    app = limited_app
    order: list[tuple[str, int]] = []

    @app.task(rate_limit="1/2s", max_retries=0)
    def rated(n: int) -> None:
        message = current_message()
        assert message is not None
        order.append(("rated", message.attempt))

    @app.task
    def plain(n: int) -> None:
        order.append(("plain", n))

    install(app)
    rated.delay(1)
    rated.delay(2)
    for n in range(3):
        plain.delay(n)
    with structlog.testing.capture_logs() as logs:
        # One thread: the deferred task does not hold it, the plain ones run meanwhile.
        run_workers(app, 1, 30, lambda: len(order) == 5, concurrency=1)

    assert [kind for kind, _ in order].count("rated") == 2
    assert order[-1] == ("rated", 1)  # ran last, on its first attempt: no retry used
    assert [e for e in order if e[0] == "plain"] == [("plain", 0), ("plain", 1), ("plain", 2)]
    deferred = [e for e in logs if e["event"] == "task.deferred"]
    assert deferred and {e["reason"] for e in deferred} == {"rate_limited"}
    assert all(e["delay"] >= 1.0 for e in deferred)


# -- concurrency limits -------------------------------------------------------------------------


def test_a_concurrency_limit_holds_across_two_workers(limited_app: App) -> None:
    app = limited_app
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    @app.task(concurrency_limit=2)
    def export(n: int) -> None:
        start = time.monotonic()
        time.sleep(0.2)
        with lock:
            spans.append((start, time.monotonic()))

    install(app)
    for n in range(12):
        export.delay(n)
    run_workers(app, 2, 60, lambda: len(spans) == 12, concurrency=4)

    assert len(spans) == 12
    assert max_overlap(spans) == 2  # never more, and the limit is used
    assert app.backend.slots_held(slots_key(export.name)) == 0


def test_a_slot_held_by_a_dead_holder_frees_after_its_ttl(limited_app: App) -> None:
    app = limited_app
    ran: list[float] = []

    @app.task(concurrency_limit=1)
    def export() -> None:
        ran.append(time.monotonic())

    install(app)
    # A worker took the only slot and was SIGKILLed: nobody releases or renews it.
    taken = time.monotonic()
    assert app.backend.acquire_slot(slots_key(export.name), "killed", limit=1, ttl=1.5)[0]
    export.delay()
    run_workers(app, 1, 30, lambda: len(ran) == 1)

    assert len(ran) == 1 and ran[0] - taken >= 1.4
    assert app.backend.slots_held(slots_key(export.name)) == 0


_HOLDER = """
import pathlib, sys, time
from mqtasks import App
from mqtasks.middleware.statsd import sanitize
from mqtasks.middleware.limits import Limits
from mqtasks.worker import Worker

url, prefix, queue, started = sys.argv[1:5]
app = App("t", broker=url, backend=url, backend_key_prefix=prefix, default_queue=queue,
          transport_options={"key_prefix": prefix + "broker"})

@app.task(name="limits.hold", concurrency_limit=1)
def hold() -> None:
    pathlib.Path(started).write_text("1")
    time.sleep(120)

app.middleware.append(Limits.for_app(app, slot_ttl=1.5))
Worker(app, concurrency=1).start()
time.sleep(300)
"""


@pytest.mark.integration
def test_the_slot_of_a_sigkilled_worker_frees_itself(
    make_app: Callable[..., App], tmp_path: Path
) -> None:
    url = require_broker("redis")
    prefix = unique_name("limits-kill") + ":"
    app = make_app(
        url,
        backend=url,
        backend_key_prefix=prefix,
        transport_options={"key_prefix": prefix + "broker"},
    )

    @app.task(name="limits.hold", concurrency_limit=1)
    def hold() -> None: ...

    script, started = tmp_path / "holder.py", tmp_path / "started"
    script.write_text(_HOLDER)
    argv = [sys.executable, str(script), url, prefix, app.settings.default_queue, str(started)]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        hold.delay()
        wait_for(started.exists, "the task to start in the worker subprocess", timeout=30)
        time.sleep(3.5)  # past twice the slot's ttl: its worker renews it
        assert app.backend.slots_held(slots_key("limits.hold")) == 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        assert app.backend.slots_held(slots_key("limits.hold")) == 1
        wait_for(
            lambda: app.backend.slots_held(slots_key("limits.hold")) == 0,
            "the killed worker's slot to expire",
        )
        # Renewed every 0.5 s until the kill: it lasted 1 to 1.5 s more (polls: +0.1 s).
        assert 0.8 <= time.monotonic() - killed <= 2.5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        app.close()
        delete_keys(prefix)


def test_a_long_task_keeps_its_slot_past_the_ttl(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")
    spans: list[tuple[float, float]] = []

    @app.task(concurrency_limit=1)
    def long(n: int) -> None:
        start = time.monotonic()
        time.sleep(1.5 if n == 0 else 0.05)
        spans.append((start, time.monotonic()))

    install(app, slot_ttl=0.6)  # renewed every 0.2 s while the task runs
    long.delay(0)
    time.sleep(0.05)
    long.delay(1)
    run_workers(app, 1, 30, lambda: len(spans) == 2, concurrency=2)

    assert len(spans) == 2 and max_overlap(spans) == 1


def test_no_slot_leaks_through_deferrals_skips_or_a_hard_time_limit(
    limited_app: App,
) -> None:
    app = limited_app
    ran: list[str] = []

    @app.task(concurrency_limit=1, rate_limit="1/s", idempotent=True)
    def both(n: int) -> None:
        ran.append(f"both-{n}")

    @app.task(concurrency_limit=1, time_limit=0.5, max_retries=0)
    def hangs() -> None:
        time.sleep(5)

    install(app, slot_ttl=60)  # an expiry could not hide a leak
    first = both.delay(1)
    both.delay(2)  # slot taken, token refused: deferred, its slot given back
    both.apply_async((1,), task_id=first.id)  # skipped by Idempotency after Limits
    hangs.delay()

    def done() -> bool:
        return len(ran) == 2 and app.backend.slots_held(slots_key(hangs.name)) == 0

    run_workers(app, 1, 30, done, raise_errors=False, concurrency=3)

    assert sorted(ran) == ["both-1", "both-2"]
    assert app.backend.slots_held(slots_key(both.name)) == 0
    wait_for(lambda: app.backend.slots_held(slots_key(hangs.name)) == 0, "the slot's release")


def counted(server: StatsdServer, stat: str) -> bool:
    """Whether ``server`` received counter ``stat`` at least once."""
    return server.count(stat) >= 1


def test_waits_are_counted_in_statsd_and_logged_at_debug(
    make_app: Callable[..., App], statsd_server: StatsdServer
) -> None:
    app = make_app("memory://", backend="memory://", statsd_url=statsd_server.url)
    ran: list[str] = []

    @app.task(rate_limit="1/2s")
    def rated() -> None:
        ran.append("rated")

    @app.task(concurrency_limit=1)
    def single() -> None:
        time.sleep(0.3)
        ran.append("single")

    for _ in range(2):
        rated.delay()
        single.delay()
    with structlog.testing.capture_logs() as logs:
        run_workers(app, 1, 30, lambda: len(ran) == 4, concurrency=4)

    for event, task in (("rate_limited", rated), ("concurrency_limited", single)):
        [*found] = [e for e in logs if e["event"] == f"task.{event}"]
        assert found and {e["log_level"] for e in found} == {"debug"}
        assert all(e["delay"] > 0 for e in found)
        stat = f"mqtasks.task.{event}.{sanitize(task.name)}"
        statsd_server.wait_for(functools.partial(counted, statsd_server, stat), stat)


# -- status, and what a limit costs --------------------------------------------------------------


def test_limit_status_shows_each_limit_and_its_use(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")

    @app.task(rate_limit="50/s", concurrency_limit=3)
    def a() -> None: ...

    @app.task(rate_limit="5/m", rate_key="user")
    def b(user: int) -> None: ...

    @app.task
    def c() -> None: ...

    assert Limits.for_app(app) is not None
    app.backend.take_token(rate_bucket(a.name), rate=50, capacity=5, max_wait=0)
    app.backend.acquire_slot(slots_key(a.name), "x", limit=3, ttl=30)
    status = limit_status(app)
    assert [(s["task"], s["kind"]) for s in status] == [
        (a.name, "rate"),
        (a.name, "concurrency"),
        (b.name, "rate"),
    ]
    assert status[0]["capacity"] == 5 and 3.9 < status[0]["tokens"] <= 4.1
    assert status[1] == {"task": a.name, "kind": "concurrency", "limit": 3, "held": 1}
    assert status[2]["per"] == "user" and "tokens" not in status[2]


def test_no_limits_no_middleware(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")

    @app.task
    def plain() -> None: ...

    assert Limits.for_app(app) is None


class _Counting:
    """Counts the calls of each public method of a backend object (its round trips)."""

    def __init__(self, backend: Backend) -> None:
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        for name in dir(Backend):  # the interface's operations: each a round trip
            method = getattr(backend, name)
            if name.startswith("_") or not callable(method) or name in ("close", "migrate"):
                continue
            setattr(backend, name, self._wrap(name, method))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args, **kwargs)

        return counted


@pytest.mark.integration
def test_a_rate_limit_far_above_the_rate_costs_one_backend_operation_per_task(
    make_app: Callable[..., App],
) -> None:
    url = require_broker("redis")
    prefix = unique_name("limits-ops") + ":"
    app = make_app(url, backend=REDIS_URL, backend_key_prefix=prefix)
    try:
        ran: list[int] = []

        @app.task(rate_limit="100000/s")
        def limited(n: int) -> None:
            ran.append(n)

        @app.task
        def free(n: int) -> None:
            ran.append(n)

        install(app)
        counter = _Counting(app.backend)
        tasks = 40
        counts = {}
        for task in (free, limited):
            before = dict(counter.calls)
            for n in range(tasks):
                task.delay(n)
            ran.clear()
            run_workers(app, 1, 30, lambda: len(ran) == tasks, concurrency=4)
            counts[task.name] = {
                k: v - before.get(k, 0) for k, v in counter.calls.items() if v - before.get(k, 0)
            }
        extra = {
            k: v - counts[free.name].get(k, 0)
            for k, v in counts[limited.name].items()
            if v != counts[free.name].get(k, 0)
        }
        # Results' writes may be batched differently run to run: count the rest.
        extra.pop("store_results", None)
        extra.pop("store_result", None)
        # The limit is the only new operation, at most one per task: fewer, as a
        # bucket far from its limit hands out several tokens at once.
        assert set(extra) == {"take_token"}
        assert 1 <= extra["take_token"] <= tasks
    finally:
        app.close()
        delete_keys(prefix)
