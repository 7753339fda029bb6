"""A worker installs the flow control its app's tasks declare, with no middleware given.

The circuits and limits are tested in depth in test_circuits.py and
test_limits.py, with the middleware placed by hand; here the default worker
of an app that declares them keeps them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from click.testing import CliRunner

from mqtasks import App, CircuitBreaker
from mqtasks.cli import cli
from mqtasks.middleware import Circuits, Limits, with_flow_control
from mqtasks.middleware.circuits import close_circuit, open_circuit
from mqtasks.middleware.limits import slots_key
from mqtasks.testing import running_worker
from tests import flow_status_app
from tests._helpers.wait import wait_for


def test_a_plain_worker_keeps_a_declared_circuit(make_app: Callable[..., App]) -> None:
    breaker = CircuitBreaker("dep", reset_timeout=1.0)
    app = make_app("memory://", backend="memory://", circuits=[breaker])
    ran: list[int] = []

    @app.task(circuit="dep")
    def call(n: int) -> None:
        ran.append(n)

    # Given the circuit forced open before the worker starts
    open_circuit(app, "dep")
    with running_worker(app, concurrency=2):
        call.delay(1)
        # Then the task waits (deferred through the broker), not run
        time.sleep(1.0)
        assert ran == []
        # And once the circuit is closed it runs
        close_circuit(app, "dep")
        wait_for(lambda: ran == [1], "the task to run after the circuit closed", 60)


def test_a_plain_worker_keeps_a_declared_concurrency_limit(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")
    lock = threading.Lock()
    running, most, done = [0], [0], []

    @app.task(concurrency_limit=1)
    def export(n: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        done.append(n)

    # Given four threads and four tasks limited to one at a time
    with running_worker(app, concurrency=4):
        for n in range(4):
            export.delay(n)
        wait_for(lambda: len(done) == 4, "the four tasks", 60)
    # Then never two ran at once
    assert most[0] == 1


def test_flow_control_is_added_once_and_only_when_declared(make_app: Callable[..., App]) -> None:
    plain = make_app("memory://", backend="memory://")

    @plain.task
    def nothing() -> None: ...

    assert with_flow_control([], plain) == []
    app = make_app("memory://", backend="memory://", circuits=[CircuitBreaker("dep")])

    @app.task(circuit="dep", rate_limit="5/s")
    def both() -> None: ...

    added = with_flow_control([], app)
    assert [type(mw) for mw in added] == [Circuits, Limits]
    mine = Limits()
    assert with_flow_control([mine], app)[0] is mine
    assert [type(mw) for mw in with_flow_control([mine], app)] == [Limits, Circuits]


def test_status_shows_each_limit_s_use_and_each_circuit() -> None:
    app = flow_status_app.app
    # Given a slot held, tokens taken and the circuit forced open
    app.backend.acquire_slot(slots_key(flow_status_app.heavy_export.name), "w1", limit=5, ttl=30)
    open_circuit(app, "partner")
    runner = CliRunner()
    target = "tests.flow_status_app:app"
    shown = runner.invoke(cli, ["status", "-A", target, "--json"])
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.output.splitlines()[-1])
    limits = {(e["task"], e["kind"]): e for e in document["limits"]}
    # Then each limit is listed with its use
    assert limits[(flow_status_app.heavy_export.name, "concurrency")]["held"] == 1
    rate = limits[(flow_status_app.call_partner.name, "rate")]
    assert rate["limit"] == "10/1s" and 0 <= rate["tokens"] <= rate["capacity"]
    assert limits[(flow_status_app.notify.name, "rate")]["per"] == "user_id"
    # And the circuit with its state
    assert [(c["name"], c["state"]) for c in document["circuits"]] == [("partner", "open")]
    text = runner.invoke(cli, ["status", "-A", target])
    assert text.exit_code == 0, text.output
    assert "1 of 5 slots held" in text.output and "a bucket per user_id" in text.output
    assert "partner" in text.output and "open (forced)" in text.output
