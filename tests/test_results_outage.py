"""A result backend that goes down while a worker stores results: the message is
deferred, never acknowledged with its result missing, and the result is stored once
the backend is back. The backend is a redis-server of the test's own, stopped and
started again on the same loopback port (the shared Redis is never touched)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from mqtasks import App, Results
from mqtasks.testing import running_worker
from tests._helpers.brokers import require_broker
from tests._helpers.servers import start_redis, stop
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], int]]:
    """A redis-server of this test's own: ([its process, or the restarted one], port)."""
    proc, port = start_redis(tmp_path)
    procs = [proc]
    yield procs, port
    for p in procs:
        stop(p)


@pytest.mark.parametrize("broker", ["memory", "amqp"])
def test_backend_down_while_storing_defers_the_message_until_the_result_is_stored(
    broker: str,
    private_redis: tuple[list[subprocess.Popen[bytes]], int],
    make_app: Callable[..., App],
    tmp_path: Path,
) -> None:
    procs, port = private_redis
    app = make_app(
        require_broker(broker),
        backend=f"redis://127.0.0.1:{port}/0",
        middleware=[Results(defer_delay=0.2, max_defer_delay=0.5)],
    )
    runs: list[int] = []

    @app.task
    def add(x: int, y: int) -> int:
        runs.append(1)
        return x + y

    with structlog.testing.capture_logs() as logs, running_worker(app):
        # Given a worker that started with its backend up, then the backend stops
        stop(procs[0])
        # When a task runs and its result cannot be stored
        handle = add.delay(3, 4)
        wait_for(lambda: len(runs) >= 2, "the task deferred and run again")
        failed = [e for e in logs if e["event"] == "result.store_failed"]
        assert failed and failed[0]["task_id"] == handle.id and failed[0]["state"] == "SUCCEEDED"
        deferred = [e for e in logs if e["event"] == "task.deferred"]
        assert deferred and deferred[0]["reason"] == "result_store_failed"
        # Then, once the backend is back, the result is stored and get() returns it
        restarted, _ = start_redis(tmp_path, port=port)
        procs.append(restarted)
        assert handle.get(timeout=20) == 7
    assert not [e for e in logs if e["event"] in ("task.defer_failed", "task.undecided")]
