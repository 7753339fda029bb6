"""A worker whose broker connection is cut reconnects and loses nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from mqtasks import App
from mqtasks.testing import drain, running_worker
from tests._helpers.faults import close_amqp_connections, kill_redis_connections
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


def _run_through_a_cut(app: App, cut: Callable[[], int]) -> None:
    seen: list[int] = []
    lock = threading.Lock()
    gate = threading.Event()

    @app.task
    def record(n: int) -> None:
        if n == 0:
            gate.wait(10)  # hold one message unacked while the connection is cut
        with lock:
            seen.append(n)

    record.delay(0)
    with running_worker(app, concurrency=2) as worker:
        wait_for(lambda: worker.received >= 1, "the worker to take the first task", 10, 0.01)
        # When the broker drops the worker's connection mid-task
        assert cut() >= 1
        gate.set()
        for n in range(1, 20):
            record.delay(n)
        drain(worker, timeout=30)
    # Then every task ran; the interrupted one at least once (at-least-once)
    assert set(seen) == set(range(20))
    assert app.transport.message_counts([app.queue(record.queue)])[record.queue] == 0


def test_worker_survives_rabbitmq_closing_its_connection(amqp_url, make_app) -> None:
    _run_through_a_cut(make_app(amqp_url), close_amqp_connections)


def test_worker_survives_redis_killing_its_connections(redis_url, make_app) -> None:
    app = make_app(redis_url)
    _run_through_a_cut(app, lambda: kill_redis_connections(redis_url))


def test_heartbeats_flow_while_the_prefetch_window_is_full(amqp_url, make_app) -> None:
    """The broker's heartbeat frames must not park the I/O thread (regression)."""
    import structlog

    app = make_app(amqp_url, heartbeat=1.0)
    runs: list[int] = []

    @app.task
    def slow(n: int) -> None:
        runs.append(n)
        time.sleep(2.5)  # several heartbeat intervals with the window full

    slow.delay(1)
    slow.delay(2)
    with (
        structlog.testing.capture_logs() as logs,
        running_worker(app, concurrency=1, prefetch=1) as worker,
    ):
        drain(worker, timeout=30)
    assert sorted(runs) == [1, 2]  # each once: the connection was never dropped
    assert not [e for e in logs if e["event"].startswith("broker.")], logs
