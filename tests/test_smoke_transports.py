"""End to end on every transport: delay() in, the task runs, the worker acks."""

from __future__ import annotations

import threading

from mqtasks.testing import drain, running_worker


def test_delayed_tasks_run_once_each(app) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    @app.task
    def record(n: int) -> None:
        with lock:
            seen.append(n)

    for n in range(50):
        record.delay(n)
    with running_worker(app) as worker:
        drain(worker)
    assert sorted(seen) == list(range(50))
