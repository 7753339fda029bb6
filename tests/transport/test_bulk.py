"""Bulk sends: map()/starmap()/send_many() with confirms pipelined."""

from __future__ import annotations

import threading

import pytest

from mqtasks import App, BulkPublishError, EncodeError, Unroutable
from mqtasks.testing import drain, running_worker


def test_map_sends_every_call_and_each_runs_once(app: App) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    @app.task
    def square(n: int) -> None:
        with lock:
            seen.append(n * n)

    handles = square.map(range(300))
    assert len({h.id for h in handles}) == 300
    with running_worker(app, concurrency=4) as worker:
        drain(worker)
    assert sorted(seen) == sorted(n * n for n in range(300))


def test_starmap_checks_every_call_before_sending_any(app: App) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    app.declare([add.queue])
    with pytest.raises(TypeError):
        add.starmap([(1, 2), (3,)])
    with pytest.raises(EncodeError, match="Argument 'y'"):
        add.starmap([(1, 2), (3, {4})])
    assert app.transport.message_counts([app.queue(add.queue)])[add.queue] == 0
    assert len(add.starmap([(1, 2), (3, 4)], priority=3)) == 2
    assert app.transport.message_counts([app.queue(add.queue)])[add.queue] == 2


def test_bulk_send_to_a_vanished_queue_reports_each_message(amqp_url, make_app) -> None:
    app = make_app(amqp_url)

    @app.task
    def f(n: int) -> None: ...

    f.delay(0)
    app.transport.delete([app.queue(f.queue)])
    app.transport._declared.add(f.queue)  # the app still believes it is declared
    with pytest.raises(BulkPublishError) as info:
        f.map(range(5))
    assert info.value.sent == []
    assert len(info.value.failed) == 5
    assert all(isinstance(e, Unroutable) for e in info.value.failed.values())
    # The queue is declared again on the next send
    assert len(f.map(range(5))) == 5
