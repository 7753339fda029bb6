"""Circuit breakers across workers: the Circuits middleware with real workers on memory://
(memory backend), and on RabbitMQ and Redis with the Redis result backend; the
operator functions and ``mqtasks circuit``."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import ExitStack
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mqtasks import App, CircuitBreaker
from mqtasks.exceptions import ConfigurationError, SkipMessage
from mqtasks.middleware import Middleware, OpenTelemetryTracing, StatsdMetrics
from mqtasks.middleware.circuits import (
    Circuits,
    circuit_status,
    close_circuit,
    open_circuit,
)
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys
from tests._helpers.statsd import StatsdServer
from tests._helpers.wait import wait_for

Log = MutableMapping[str, Any]


def breaker(**options: Any) -> CircuitBreaker:
    options.setdefault("failure_threshold", 3)
    options.setdefault("window", 30)
    options.setdefault("reset_timeout", 1.5)
    options.setdefault("trip_on", (ConnectionError, TimeoutError))
    return CircuitBreaker("dep", **options)


class Seen(Middleware):
    """Records each message a worker takes: (id, attempt, outcome), outcome "skip"
    for a message a later middleware deferred, else "ok" or the exception's name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, int, str]] = []

    def after_process(
        self,
        worker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = (
            "ok"
            if exception is None
            else "skip"
            if isinstance(exception, SkipMessage)
            else type(exception).__name__
        )
        with self.lock:
            self.entries.append((message.id, message.attempt, outcome))

    def of(self, task_id: str) -> list[tuple[int, str]]:
        with self.lock:
            return [(a, o) for i, a, o in self.entries if i == task_id]


def install(app: App, seen: Seen | None = None) -> Seen:
    """Put a recorder (``seen``, or a new one) and then Circuits in the app's stack, as
    workers will (Circuits after the app's middleware), unless it is there already."""
    seen = seen or Seen()
    app.middleware.append(seen)
    circuits = Circuits.for_app(app)
    if circuits is not None:
        app.middleware.append(circuits)
    return seen


def events(logs: list[Log], *names: str) -> list[Log]:
    return [e for e in logs if e["event"] in names]


def state(app: App) -> str:
    [s] = circuit_status(app)
    return str(s["state"])


@pytest.fixture(
    params=[
        "memory",
        pytest.param("amqp", marks=pytest.mark.integration),
        pytest.param("redis", marks=pytest.mark.integration),
    ]
)
def make_capp(
    request: pytest.FixtureRequest, make_app: Callable[..., App]
) -> Iterator[Callable[..., App]]:
    """A factory of apps on one broker and one backend (memory://, memory backend; the
    local RabbitMQ or Redis, the Redis backend under a prefix of the test's own). Each
    call after the first makes a twin of the first: same queue and backend, its own
    objects (another worker process, as far as the circuit can tell); on memory the
    first app itself (memory stores are the app's own)."""
    kind = request.param
    prefix = unique_name("circuit") + ":"
    made: list[App] = []

    def make(**options: Any) -> App:
        if made and kind == "memory":
            return made[0]
        options.setdefault("circuits", [breaker()])
        if made:
            options["default_queue"] = made[0].settings.default_queue
        if kind == "memory":
            app = make_app("memory://", backend="memory://", **options)
        else:
            url = require_broker(kind)
            require_broker("redis")
            app = make_app(url, backend=REDIS_URL, backend_key_prefix=prefix, **options)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()
    if kind != "memory":
        delete_keys(prefix)


def define(app: App, down: threading.Event, runs: list[tuple[int, int]]) -> Any:
    log = structlog.get_logger("tests.circuits")

    @app.task(circuit="dep", max_retries=8, retry_backoff=1.0)
    def charge(n: int) -> int:
        log.info("test.ran", n=n)
        runs.append((n, 0))
        if down.is_set():
            raise ConnectionError("the dependency is down")
        return n

    return charge


def test_for_app_is_none_without_a_task_behind_a_circuit(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://", circuits=[breaker()])

    @app.task
    def plain() -> None: ...

    assert Circuits.for_app(app) is None

    @app.task(circuit="dep")
    def guarded() -> None: ...

    circuits = Circuits.for_app(app)
    assert isinstance(circuits, Circuits)
    # An app that installs one itself gets no second one from its workers
    app.middleware.append(circuits)
    assert Circuits.for_app(app) is None


def test_an_outage_opens_the_circuit_one_probe_at_a_time_until_it_closes(
    make_capp: Callable[..., App],
) -> None:
    first, second = make_capp(), make_capp()
    down = threading.Event()
    runs: list[tuple[int, int]] = []
    charge = define(first, down, runs)
    if second is not first:
        define(second, down, runs)
    seen = install(first)
    if second is not first:
        install(second, seen)

    down.set()
    with structlog.testing.capture_logs() as logs, ExitStack() as stack:
        # Two workers (two apps on one backend on real brokers)
        workers = [
            stack.enter_context(running_worker(app, concurrency=2)) for app in (first, second)
        ]
        # When failure_threshold tasks fail with a trip_on error, the circuit opens
        failing = [charge.delay(i) for i in range(3)]
        wait_for(lambda: state(first) == "open", "the circuit to open")
        assert len(runs) == 3
        # Tasks sent while it is open are deferred, not run, their attempt unchanged
        waiting = [charge.delay(i) for i in range(10, 13)]
        wait_for(lambda: all(seen.of(h.id) for h in waiting), "the waiting tasks to be deferred")
        # After reset_timeout one probe runs, fails, and opens it again
        wait_for(
            lambda: events(logs, "circuit.opened")[-1].get("reason") == "probe_failed",
            "the probe to fail",
        )
        assert state(first) == "open"
        # When the dependency is back, the next probe closes it and every task runs
        down.clear()
        wait_for(lambda: state(first) == "closed", "the circuit to close")
        assert sorted(h.get(timeout=20) for h in [*failing, *waiting]) == [0, 1, 2, 10, 11, 12]
        for worker in workers:
            drain(worker, raise_errors=False)

    transitions = [
        (e["event"], e.get("reason"))
        for e in events(logs, "circuit.opened", "circuit.half_open", "circuit.closed")
    ]
    # Each transition logged once, by the worker that made it
    assert transitions[:3] == [
        ("circuit.opened", "failures"),
        ("circuit.half_open", None),
        ("circuit.opened", "probe_failed"),
    ]
    assert transitions[-2:] == [("circuit.half_open", None), ("circuit.closed", "probe_succeeded")]
    assert transitions.count(("circuit.closed", "probe_succeeded")) == 1
    # While half-open, exactly one task ran (the probe); while open, none
    trail = events(logs, "test.ran", "circuit.opened", "circuit.half_open", "circuit.closed")
    compact = [(e["event"], e.get("reason") or e.get("n")) for e in trail]
    phase, ran = None, 0
    for e in trail:
        if e["event"] == "test.ran":
            ran += 1
            continue
        if phase == "circuit.half_open":
            assert ran == 1, f"{ran} tasks ran while half-open: {compact}"
        elif phase == "circuit.opened":
            assert ran == 0, f"{ran} tasks ran while open: {compact}"
        phase, ran = e["event"], 0
    # A deferral keeps the attempt number: only a failed run uses up an attempt
    for handle in [*failing, *waiting]:
        outcomes = seen.of(handle.id)
        assert outcomes[-1][1] == "ok", outcomes
        for (attempt, outcome), (following, _) in itertools.pairwise(outcomes):
            assert following == attempt + (outcome == "ConnectionError"), outcomes
    for handle in waiting:
        assert seen.of(handle.id)[0] == (1, "skip")
    assert not any(e["event"] == "task.dead_lettered" for e in logs)


def test_errors_that_are_not_trip_on_do_not_count(make_capp: Callable[..., App]) -> None:
    app = make_capp()
    runs: list[int] = []

    @app.task(circuit="dep", max_retries=0)
    def bad_input(n: int) -> None:
        runs.append(n)
        raise ValueError("the task's own bug")

    install(app)
    with running_worker(app) as worker:
        for i in range(6):
            bad_input.delay(i)
        drain(worker, raise_errors=False)
    assert len(runs) == 6
    [status] = circuit_status(app)
    assert status["state"] == "closed" and status["failures"] == 0


def test_forced_open_holds_every_task_until_closed(make_capp: Callable[..., App]) -> None:
    app = make_capp()
    runs: list[tuple[int, int]] = []
    charge = define(app, threading.Event(), runs)
    seen = install(app)
    open_circuit(app, "dep")
    [status] = circuit_status(app)
    assert status["state"] == "open" and status["forced"] and status["half_open_at"] is None
    with running_worker(app) as worker:
        handles = [charge.delay(i) for i in range(3)]
        # Deferred past reset_timeout (1.5 s) with no probe: a forced open lets none through
        wait_for(lambda: all(len(seen.of(h.id)) >= 2 for h in handles), "two deferrals each")
        assert runs == []
        close_circuit(app, "dep")
        assert sorted(h.get(timeout=20) for h in handles) == [0, 1, 2]
        drain(worker)
    assert state(app) == "closed"


def test_forced_open_for_seconds_goes_half_open_after(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://", circuits=[breaker()])

    @app.task(circuit="dep")
    def guarded() -> None: ...

    open_circuit(app, "dep", for_seconds=0.3)
    assert state(app) == "open"
    wait_for(lambda: state(app) == "half-open", "half-open after 0.3 s", timeout=5)


def test_the_operator_functions_refuse_an_unknown_circuit(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://", circuits=[breaker()])
    with pytest.raises(ConfigurationError, match=r"no circuit 'nope' \(declared: dep\)"):
        open_circuit(app, "nope")
    with pytest.raises(ConfigurationError, match="declared: dep"):
        close_circuit(app, "nope")
    with pytest.raises(ConfigurationError, match="positive"):
        open_circuit(app, "dep", for_seconds=0)


def test_transitions_reach_statsd_and_the_span(
    make_app: Callable[..., App], statsd_server: StatsdServer
) -> None:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    circuits = [breaker(failure_threshold=2, reset_timeout=60)]
    app = make_app("memory://", backend="memory://", circuits=circuits)
    app.middleware[:] = [OpenTelemetryTracing(provider), StatsdMetrics(statsd_server.url)]

    @app.task(circuit="dep", max_retries=0)
    def call(n: int) -> None:
        raise ConnectionError("down")

    seen = install(app)
    with running_worker(app, concurrency=1):
        call.delay(1)
        call.delay(2)
        wait_for(lambda: state(app) == "open", "the circuit to open")
        waiting = call.delay(3)
        wait_for(lambda: seen.of(waiting.id) == [(1, "skip")], "the task to be deferred")
    close_circuit(app, "dep")
    statsd_server.wait_for(
        lambda: statsd_server.count("mqtasks.circuit.closed.dep") == 1, "the closing"
    )
    assert statsd_server.count("mqtasks.circuit.opened.dep") == 1
    assert statsd_server.gauge("mqtasks.circuit.state.dep") == 0
    assert 2.0 in [v for v, t in statsd_server.stats("mqtasks.circuit.state.dep") if t == "g"]
    names = [e.name for span in exporter.get_finished_spans() for e in span.events]
    assert names.count("mqtasks.circuit.opened") == 1
    assert names.count("mqtasks.circuit.deferred") >= 1
    provider.shutdown()


# -- the command line ------------------------------------------------------------------


def cli_app() -> App:
    """The app ``mqtasks circuit -A tests.test_circuits:cli_app()`` loads: the memory
    backend, or the local Redis under the prefix in MQTASKS_TEST_CIRCUIT_PREFIX."""
    prefix = os.environ.get("MQTASKS_TEST_CIRCUIT_PREFIX")
    backend = {"backend": REDIS_URL, "backend_key_prefix": prefix} if prefix else {}
    return App(
        "circuit-cli",
        broker="memory://",
        **backend,  # type: ignore[arg-type]
        circuits=[CircuitBreaker("payments"), CircuitBreaker("mail")],
    )


def mqtasks(*args: str, prefix: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MQTASKS_TEST_CIRCUIT_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "mqtasks", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_the_cli_opens_and_closes_a_circuit_in_the_backend() -> None:
    require_broker("redis")
    prefix = unique_name("circuit-cli") + ":"
    os.environ["MQTASKS_TEST_CIRCUIT_PREFIX"] = prefix
    try:
        app = cli_app()
        target = "tests.test_circuits:cli_app()"
        done = mqtasks("circuit", "-A", target, "open", "payments", "--for", "120", prefix=prefix)
        assert done.returncode == 0, done.stderr
        assert "circuit payments forced open for 120 s" in done.stdout
        status = {s["name"]: s for s in circuit_status(app)}
        assert status["payments"]["state"] == "open" and status["payments"]["forced"]
        assert status["mail"]["state"] == "closed"
        shown = mqtasks("circuit", "status", "-A", target, prefix=prefix)
        assert shown.returncode == 0, shown.stderr
        assert "payments  open (forced)" in shown.stdout
        shown = mqtasks("circuit", "-A", target, "status", "--json", prefix=prefix)
        rows = {r["name"]: r for r in json.loads(shown.stdout)}
        assert rows["payments"]["forced"] and rows["mail"]["state"] == "closed"
        done = mqtasks("circuit", "-A", target, "close", "payments", prefix=prefix)
        assert done.returncode == 0, done.stderr
        assert {s["name"]: s["state"] for s in circuit_status(app)}["payments"] == "closed"
        app.close()
    finally:
        del os.environ["MQTASKS_TEST_CIRCUIT_PREFIX"]
        delete_keys(prefix)


def test_the_cli_says_which_circuits_exist_for_an_unknown_name() -> None:
    # In a process of its own, as the other CLI runs: the command configures
    # logging for its process (cached loggers at warning level would hide the
    # info events later tests capture).
    result = mqtasks("circuit", "-A", "tests.test_circuits:cli_app()", "open", "nope", prefix="")
    assert result.returncode == 2
    assert "no circuit 'nope' (declared: mail, payments)" in result.stderr


def test_the_cli_needs_an_app() -> None:
    result = mqtasks("circuit", "close", "payments", prefix="")
    assert result.returncode == 2
    assert "-A" in result.stderr
