"""The contract every transport meets: memory, the local RabbitMQ, the local Redis,
the ``redis://`` transport on fakeredis (what ``mqtasks.testing.fake_redis_app`` offers),
``sqs://`` on a local moto server (what SQS cannot do is refused: ``test_sqs.py``),
the local PostgreSQL as a broker, and ``sqlite://`` on a file of the test run's own.

Publish, consume, ack after the task; bad input rejected with its reason and
never blocking the queue; unstarted prefetched messages handed back on stop.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import kombu
import pytest

from mqtasks import App, Reject, current_message
from mqtasks.testing import drain, running_worker
from mqtasks.transport.kombu import KombuTransport
from tests._helpers.brokers import require_broker
from tests._helpers.publish import raw_publish
from tests._helpers.wait import wait_for


@pytest.fixture(params=["memory", "amqp", "redis", "fakeredis", "sqs", "postgresql", "sqlite"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each transport in turn, and ``redis://`` on fakeredis as well."""
    return require_broker(request.param)


def reasons(worker: Any) -> list[str]:
    return [getattr(exc, "reason", type(exc).__name__) for _, exc in worker.errors]


def test_each_task_runs_once_and_is_acked(app: App) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    @app.task
    def record(n: int) -> None:
        with lock:
            seen.append(n)

    handles = [record.delay(n) for n in range(30)]
    assert len({h.id for h in handles}) == 30
    with running_worker(app, concurrency=4) as worker:
        drain(worker)
    assert sorted(seen) == list(range(30))
    assert app.transport.message_counts([app.queue(record.queue)]) == {record.queue: 0}


def test_task_exception_is_logged_acked_and_the_queue_flows_on(app: App) -> None:
    done: list[int] = []

    @app.task(max_retries=0)
    def maybe_fail(n: int) -> None:
        if n == 0:
            raise RuntimeError("boom")
        done.append(n)

    for n in range(5):
        maybe_fail.delay(n)
    with running_worker(app, concurrency=1) as worker:
        with pytest.raises(RuntimeError, match="boom"):
            drain(worker)
        drain(worker)
    assert sorted(done) == [1, 2, 3, 4]
    assert app.transport.message_counts([app.queue(maybe_fail.queue)])[maybe_fail.queue] == 0


def test_bad_input_is_rejected_with_its_reason_and_the_worker_keeps_going(
    app: App, tmp_path: Path
) -> None:
    good: list[int] = []

    @app.task
    def add(x: int, y: int) -> None:
        good.append(x + y)

    queue = add.queue
    app.declare([queue])
    marker = tmp_path / "pwned"
    headers = {"mqtasks-task": add.name}
    json_ct = {"content_type": "application/json", "content_encoding": "utf-8"}
    # Given poison of every kind, interleaved with good tasks
    raw_publish(app, queue, b"{not json", headers=headers, **json_ct)
    add.delay(1, 1)
    raw_publish(
        app, queue, b'{"args":[],"kwargs":{}}', headers={"mqtasks-task": "no.such"}, **json_ct
    )
    raw_publish(app, queue, b'{"args":[1],"kwargs":{}}', headers=headers, **json_ct)
    raw_publish(app, queue, _Pwn(str(marker)), serializer="pickle", headers=headers)
    raw_publish(
        app,
        queue,
        b"x: 1",
        headers=headers,
        content_type="application/x-yaml",
        content_encoding="utf-8",
    )
    raw_publish(
        app, queue, b'{"args":[1,2],"kwargs":{}}', headers=headers, compression="gzip", **json_ct
    )
    raw_publish(
        app,
        queue,
        b'{"args":[1,2],"kwargs":{}}',
        headers={**headers, "mqtasks-attempt": "abc"},
        **json_ct,
    )
    raw_publish(
        app,
        queue,
        b'{"args":[1,2],"kwargs":{}}',
        headers={**headers, "mqtasks-expires": time.time() - 60},
        **json_ct,
    )
    add.delay(2, 2)
    # When a worker consumes them
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
        # Then good tasks ran, poison was rejected with reasons, nothing is left
        assert sorted(good) == [2, 4]
        assert sorted(reasons(worker)) == sorted(
            [
                "decode_error",
                "unknown_task",
                "invalid_arguments",
                "content_type",
                "content_type",
                "compression_refused",
                "invalid_headers",
                "expired",
            ]
        )
    assert not marker.exists()
    assert app.transport.message_counts([app.queue(queue)])[queue] == 0


class _Pwn:
    """A pickle that would create a file if anyone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_reject_gives_the_message_up(app: App) -> None:
    @app.task
    def refuse() -> None:
        raise Reject("not today")

    refuse.delay()
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert app.transport.message_counts([app.queue(refuse.queue)])[refuse.queue] == 0


def test_stop_hands_back_prefetched_messages_and_finishes_the_running_one(app: App) -> None:
    started = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    @app.task
    def slow(n: int) -> None:
        started.set()
        release.wait(10)
        ran.append(n)

    for n in range(4):
        slow.delay(n)
    with running_worker(app, concurrency=1, prefetch=4, shutdown_timeout=10) as worker:
        assert started.wait(10)
        wait_for(lambda: worker.received == 4, "all four to be prefetched", 5, 0.01)
        # When the worker is told to stop while one task runs and three wait
        stopper = threading.Thread(target=worker.stop)
        stopper.start()
        # (it hands the three back at once, without waiting for the running one)
        wait_for(lambda: worker.settled == 3, "the three waiting to be handed back", 5, 0.01)
        release.set()
        stopper.join(10)
        assert worker.clean_exit
    # Then the running task finished and the others are back on the queue
    assert ran == [0]
    spec = app.queue(slow.queue)
    wait_for(
        lambda: app.transport.message_counts([spec]) == {slow.queue: 3},
        lambda: f"3 messages back on the queue; {app.transport.message_counts([spec])}",
        5,
    )


def test_threads_run_tasks_concurrently(app: App) -> None:
    barrier = threading.Barrier(4, timeout=10)

    @app.task
    def meet() -> None:
        barrier.wait()

    for _ in range(4):
        meet.delay()
    with running_worker(app, concurrency=4) as worker:
        drain(worker)


def test_expired_task_is_not_run(app: App) -> None:
    ran: list[int] = []

    @app.task
    def late() -> None:
        ran.append(1)

    late.apply_async(expires=0.01)
    expired_at = time.time() + 0.01  # not before its expiry, set from an earlier clock reading
    wait_for(lambda: time.time() > expired_at, "the task to expire", 1, 0.01)
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
        assert reasons(worker) == ["expired"]
    assert ran == []


def test_worker_pid_is_ours() -> None:
    # Guards the CLI tests' assumption that worker threads live in this process.
    assert os.getpid() > 0


def test_kombu_connection_is_the_transports(app: App) -> None:
    if not isinstance(app.transport, KombuTransport):
        # mqtasks' Redis transport speaks to Redis without kombu: it has no kombu connection.
        assert not hasattr(app.transport, "connection")
        return
    conn = app.transport.connection()
    assert isinstance(conn, kombu.Connection)
    conn.release()


def test_a_worker_declares_the_dead_letter_queue_itself(app: App) -> None:
    """Dead letters need no publisher to have declared ``<queue>.dlq`` first."""
    name = app.settings.default_queue

    @app.task
    def fine() -> None: ...

    # Given a worker on a broker where nobody has declared anything yet
    app.transport.delete([app.queue(name), app.queue(name + ".dlq")])
    app.transport.forget_declared()
    with running_worker(app, concurrency=1) as worker:
        # When a producer other than mqtasks sends poison straight to the queue
        raw_publish(app, name, b"{not json", content_type="application/json", message_id="p-1")
        drain(worker, timeout=20, raise_errors=False)
    # Then it is dead-lettered with its own reason, at the first attempt
    [entry] = app.dead_letters(name)
    assert (entry.id, entry.reason) == ("p-1", "invalid_headers")


def test_a_dead_letter_queue_deleted_while_the_worker_runs_is_declared_again(app: App) -> None:
    name = app.settings.default_queue

    @app.task
    def fine() -> None: ...

    with running_worker(app, concurrency=1) as worker:
        # Given an operator who deletes the dead-letter queue under a running worker
        app.transport.delete([app.queue(name + ".dlq")])
        raw_publish(app, name, b"{not json", content_type="application/json", message_id="p-2")
        drain(worker, timeout=20, raise_errors=False)
    [entry] = app.dead_letters(name)
    assert (entry.id, entry.reason) == ("p-2", "invalid_headers")


def test_a_task_reads_its_own_message(app: App) -> None:
    seen: list[tuple[str, int, str, bool, int | None]] = []

    @app.task(max_retries=1, retry_backoff=0)
    def introspect() -> None:
        msg = current_message()
        assert msg is not None
        seen.append((msg.id, msg.attempt, msg.queue, msg.redelivered, msg.delivery_count))
        if msg.attempt == 1:
            raise RuntimeError("once more")

    handle = introspect.delay()
    assert current_message() is None  # outside a task
    with running_worker(app, concurrency=1) as worker:
        drain(worker, timeout=20, raise_errors=False)
    queue = introspect.queue
    assert seen == [(handle.id, 1, queue, False, 1), (handle.id, 2, queue, False, 1)]
