"""Threads calling ``delay()`` at once share one confirming channel on RabbitMQ.

Each caller still returns only once the broker has confirmed its own message,
and a connection lost while confirms are outstanding loses nothing: every
caller either returns (its message is in the queue) or raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from mqtasks import App, PublishError
from mqtasks.testing import running_worker
from mqtasks.transport.amqp import AmqpTransport
from tests._helpers.faults import close_amqp_connections, own_local_ports
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


def _publish_from_threads(
    send: Callable[[int], object],
    threads: int,
    each: int,
    during: Callable[[], None] | None = None,
) -> tuple[set[int], list[BaseException]]:
    """Call ``send(n)`` for up to ``threads * each`` distinct n, from ``threads`` threads.

    With ``during``, it runs in this thread meanwhile and the publishers stop once it
    returns. Return the n whose ``send`` returned, and the errors raised.
    """
    stop = threading.Event()
    done: set[int] = set()
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def run(first: int) -> None:
        start.wait(10)
        for n in range(first, first + each):
            if stop.is_set():
                return
            try:
                send(n)
            except PublishError as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    done.add(n)

    workers = [threading.Thread(target=run, args=(k * each,)) for k in range(threads)]
    for t in workers:
        t.start()
    start.wait(10)
    if during is not None:
        during()
        stop.set()
    for t in workers:
        t.join(120)
        assert not t.is_alive(), "a publisher is stuck"
    return done, errors


def test_threads_share_one_connection_and_each_waits_for_its_own_confirm(
    amqp_url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(amqp_url)

    @app.task
    def job(n: int) -> None: ...

    job.delay(-1)  # opens the shared connection
    transport = app.transport
    assert isinstance(transport, AmqpTransport)
    before = own_local_ports(5672)
    done, errors = _publish_from_threads(job.delay, threads=8, each=50)
    assert errors == []
    assert done == set(range(400))
    # One connection carried all 400, and the per-thread pool was never opened.
    assert own_local_ports(5672) == before
    assert transport._producers is None
    # Every caller returned after its confirm, so the broker has every message now.
    assert transport.message_counts([app.queue(job.queue)]) == {job.queue: 401}


def test_a_connection_closed_while_confirms_are_outstanding_loses_no_message(
    amqp_url: str, make_app: Callable[..., App]
) -> None:
    """RabbitMQ closes the shared connection twice while 8 threads publish: the
    unconfirmed messages are published again on a new connection, and every
    ``delay()`` that returned has its message run by a worker."""
    app = make_app(amqp_url, publish_timeout=20.0)
    seen: set[int] = set()
    lock = threading.Lock()

    @app.task
    def job(n: int) -> None:
        with lock:
            seen.add(n)

    job.delay(-1)
    closed: list[int] = []
    returned: list[int] = []

    def send(n: int) -> None:
        job.delay(n)
        returned.append(n)

    def more_published(what: str) -> None:
        """Wait until 50 more delay() calls have returned (confirms are flowing)."""
        before = len(returned)
        wait_for(lambda: len(returned) >= before + 50, what, 30)

    def cut() -> None:
        for _ in range(2):
            more_published("publishing before the cut")
            closed.append(close_amqp_connections())
        more_published("publishing to go on on the new connection")

    done, errors = _publish_from_threads(send, threads=8, each=100_000, during=cut)
    assert len(closed) == 2 and min(closed) >= 1, (
        "the connection was not cut twice while publishing"
    )
    assert errors == []  # each published again within its timeout
    assert len(done) > 100
    with running_worker(app, concurrency=4):
        wait_for(lambda: done <= seen, lambda: f"{len(done - seen)} tasks to run", 60)
    assert done - seen == set()


def test_a_forked_child_publishes_on_its_own_connection(
    amqp_url: str, make_app: Callable[..., App]
) -> None:
    """A child forked after the parent published (a pre-loading web server) must not
    write into the parent's connection: both go on publishing, and nothing is lost."""
    import os

    app = make_app(amqp_url)

    @app.task
    def job(n: int) -> None: ...

    job.delay(0)
    pid = os.fork()
    if pid == 0:  # the child: exit with 0 only if its publishes were confirmed
        code = 1
        try:
            for n in range(1, 51):
                job.delay(n)
            code = 0
        finally:
            os._exit(code)
    for n in range(51, 101):
        job.delay(n)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    transport = app.transport
    assert transport.message_counts([app.queue(job.queue)]) == {job.queue: 101}


def test_a_channel_that_fails_to_enter_confirm_mode_is_not_left_open(
    amqp_url: str, make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``confirm_select`` failing (a broker that refuses it, a connection lost
    meanwhile) must not leave its channel open: the publish is retried on a
    fresh connection, and no channel or connection is left behind."""
    import amqp

    app = make_app(amqp_url)

    @app.task
    def job(n: int) -> None: ...

    app.declare()
    before = own_local_ports(5672)
    real = amqp.Channel.confirm_select
    failures: list[int] = []

    def confirm_select(self: amqp.Channel, nowait: bool = False) -> None:
        if not failures:
            failures.append(self.channel_id)
            raise ConnectionResetError("confirm.select failed (test)")
        real(self, nowait)

    monkeypatch.setattr(amqp.Channel, "confirm_select", confirm_select)
    job.delay(1)  # the first attempt fails in confirm_select; the retry publishes
    assert failures, "confirm_select was not called"
    transport = app.transport
    assert isinstance(transport, AmqpTransport)
    connection = transport._pipeline._amqp
    channels = [cid for cid in connection.channels if cid != 0]
    assert len(channels) == 1, f"channels left open: {channels}"
    # One connection for the pipeline: the failed attempt's is closed.
    assert len(own_local_ports(5672) - before) == 1
    assert transport.message_counts([app.queue(job.queue)]) == {job.queue: 1}
