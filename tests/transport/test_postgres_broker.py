"""The ``postgresql://`` broker beyond the contract: NOTIFY wake-ups, delays in
``run_at``, leases of killed workers, the delivery limit, dead letters and the outbox.

Every test uses queues of its own on the shared table (``mqtasks_messages``);
the ``make_app`` and ``crash`` fixtures delete their rows afterwards.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import tenacity

from mqtasks import App, ConfigurationError, PublishError, QueueSpec, Reject
from mqtasks.dlq import list_dead_letters, replay_dead_letters
from mqtasks.testing import drain, running_worker
from mqtasks.transport.postgres import PostgresTransport
from reliability.proxy import TcpProxy
from tests import crash_app
from tests._helpers.brokers import POSTGRES_URL, require_broker, unique_name
from tests._helpers.crash import Crash
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_app(make_app: Callable[..., App]) -> Callable[..., App]:
    """A factory of apps on the local PostgreSQL, with transport options."""
    url = require_broker("postgresql")

    def make(**options: Any) -> App:
        return make_app(url, transport_options=options)

    return make


def transport_of(app: App) -> PostgresTransport:
    transport = app.transport
    assert isinstance(transport, PostgresTransport)
    return transport


# -- the outbox -------------------------------------------------------------------


def test_connection_on_another_broker_is_refused(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")

    @app.task
    def record(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"needs the postgresql:// broker"):
        record.delay(1, connection=object())  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match=r"memory:// keeps its messages elsewhere"):
        record.apply_async((1,), connection=object())
    assert app.transport.message_counts([app.queue(record.queue)]) == {record.queue: 0}


def test_a_rolled_back_transaction_publishes_nothing_a_committed_one_publishes(
    pg_app: Callable[..., App],
) -> None:
    app = pg_app()
    ran: list[int] = []

    @app.task
    def record(n: int) -> None:
        ran.append(n)

    spec = app.queue(record.queue)
    with psycopg.connect(POSTGRES_URL) as conn:
        # Given a task sent inside a transaction that rolls back
        with conn.transaction():
            record.apply_async((1,), connection=conn)
            raise psycopg.Rollback()
        # Then nothing was published
        assert app.transport.message_counts([spec]) == {record.queue: 0}
        # Given one sent inside a transaction that commits
        with conn.transaction():
            handle = record.delay(2, connection=conn)  # type: ignore[call-arg]
            # (invisible to others until the commit)
            assert app.transport.message_counts([spec]) == {record.queue: 0}
        # Then it is published once committed, and a worker runs it
        assert app.transport.message_counts([spec]) == {record.queue: 1}
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert ran == [2]
    assert handle.id


def test_a_failed_insert_leaves_the_callers_transaction_usable(
    pg_app: Callable[..., App],
) -> None:
    app = pg_app()

    @app.task
    def record(n: int) -> None: ...

    spec = app.queue(record.queue)
    with psycopg.connect(POSTGRES_URL) as conn, conn.transaction():
        # A NUL character is refused by jsonb: the insert fails under its savepoint
        with pytest.raises(PublishError, match="NOT enqueued"):
            record.apply_async((1,), headers={"x-note": "a\x00b"}, connection=conn)
        # and the caller's transaction goes on, publishing the next one
        assert conn.execute("SELECT 1").fetchone() == (1,)
        record.apply_async((2,), connection=conn)
    assert app.transport.message_counts([spec]) == {record.queue: 1}


def test_a_tasks_own_connection_parameter_is_an_argument(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")
    got: list[str] = []

    @app.task
    def connect(connection: str) -> None:
        got.append(connection)

    connect.delay(connection="db-1")
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert got == ["db-1"]


def test_connection_to_another_database_is_refused(pg_app: Callable[..., App]) -> None:
    app = pg_app()

    @app.task
    def record(n: int) -> None: ...

    other = POSTGRES_URL.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(other) as conn, pytest.raises(ConfigurationError, match="database"):
        record.apply_async((1,), connection=conn)


def test_connection_with_a_uniqueness_claim_is_refused(pg_app: Callable[..., App]) -> None:
    app = pg_app()

    @app.task
    def record(n: int) -> None: ...

    with psycopg.connect(POSTGRES_URL) as conn, pytest.raises(ConfigurationError, match="claim"):
        record.apply_async((1,), connection=conn, idempotency_key="k")


# -- waking, delays, priorities ---------------------------------------------------------


def test_a_waiting_worker_is_woken_by_notify_not_by_the_poll(pg_app: Callable[..., App]) -> None:
    """With a 60 s fallback poll, a task sent to an idle worker runs within seconds."""
    app = pg_app(poll_interval=60.0)
    ran = threading.Event()

    @app.task
    def wake(n: int) -> None:
        if n:
            ran.set()

    with running_worker(app, concurrency=1) as worker:
        # Given a worker that has fetched, found its queue empty, and sleeps
        wake.delay(0)
        drain(worker)
        # When a task is sent
        wake.delay(1)
        # Then the NOTIFY wakes it long before the poll would
        assert ran.wait(10), "the task was not run within 10 s of its publish"


def test_a_notify_read_during_the_fetch_query_wakes_the_consumer(
    pg_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg reads a NOTIFY that arrives while a query runs into its own buffer,
    where ``select()`` on the socket cannot see it: the consumer must look there."""
    from mqtasks.transport.postgres.consumer import PostgresConsumer

    app = pg_app(poll_interval=60.0)

    @app.task
    def job() -> None: ...

    spec = app.queue(job.queue)
    app.transport.declare([spec])
    received: list[Any] = []
    consumer = app.transport.consumer([spec], prefetch=4)
    assert isinstance(consumer, PostgresConsumer)
    consumer.start(received.append)
    original = PostgresConsumer._fetch
    sent: list[str] = []

    def fetch_then_publish(self: PostgresConsumer) -> bool:
        found = original(self)
        if not sent:
            # A task published after the fetch's snapshot, whose NOTIFY the
            # consumer's connection reads during its next query (here, at once)
            sent.append(job.delay().id)
            time.sleep(0.1)
            assert self._conn is not None
            self._conn.execute("SELECT 1")
        return found

    monkeypatch.setattr(PostgresConsumer, "_fetch", fetch_then_publish)
    try:
        consumer.wait(30.0, -1)  # one turn: it must not sleep on the socket for 30 s
        assert [d.message_id for d in received] == sent
    finally:
        consumer.close()


def test_a_delay_is_held_in_the_table_until_run_at(pg_app: Callable[..., App]) -> None:
    app = pg_app()
    ran_at: list[float] = []

    @app.task
    def later() -> None:
        ran_at.append(time.time())

    spec = app.queue(later.queue)
    with running_worker(app, concurrency=1) as worker:
        sent_at = time.time()
        later.apply_async(countdown=1.5)
        # Held: not ready, counted as delayed, due in about 1.5 s on the server's clock
        assert app.transport.message_counts([spec]) == {later.queue: 0}
        assert app.transport.delayed_counts([spec]) == {later.queue: 1}
        with psycopg.connect(POSTGRES_URL) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM run_at - now()) FROM mqtasks_messages WHERE queue = %s",
                [later.queue],
            ).fetchone()
        assert row is not None and 0.5 < float(row[0]) <= 1.5
        drain(worker)
    [when] = ran_at
    assert when - sent_at >= 1.4  # run no earlier than its run_at


def test_a_retry_waits_in_the_table(pg_app: Callable[..., App]) -> None:
    app = pg_app()
    attempts: list[int] = []

    @app.task(max_retries=1, retry_backoff=tenacity.wait_fixed(1.0))
    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    spec = app.queue(flaky.queue)
    flaky.delay()
    with running_worker(app, concurrency=1) as worker:
        wait_for(
            lambda: app.transport.delayed_counts([spec]) == {flaky.queue: 1},
            "the retry to be held",
            10,
            0.02,
        )
        drain(worker, raise_errors=False)
    assert len(attempts) == 2


def test_higher_priorities_are_fetched_first(pg_app: Callable[..., App]) -> None:
    app = pg_app()
    order: list[int] = []

    @app.task
    def rank(n: int) -> None:
        order.append(n)

    for priority in (0, 5, 9, 1):
        rank.apply_async((priority,), priority=priority)
    with running_worker(app, concurrency=1, prefetch=1) as worker:
        drain(worker)
    assert order == [9, 5, 1, 0]


# -- dead letters and statistics ----------------------------------------------------


def test_dead_letters_are_browsed_in_place_and_replayed(pg_app: Callable[..., App]) -> None:
    app = pg_app()
    runs: list[str] = []

    @app.task
    def refuse(tag: str) -> None:
        runs.append(tag)
        if len(runs) == 1:
            raise Reject("not today")

    refuse.delay("a")
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    # The dead letter is a row of <queue>.dlq, read twice without being taken
    for _ in range(2):
        [entry] = list_dead_letters(app, refuse.queue)
        assert (entry.reason, entry.detail) == ("rejected", "not today")
    stats = app.transport.queue_stats([app.queue(refuse.queue)])[refuse.queue]
    assert (stats.ready, stats.delayed, stats.dead_lettered) == (0, 0, 1)
    # Replayed, it runs again and the dead-letter queue is empty
    assert replay_dead_letters(app, refuse.queue) == 1
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert runs == ["a", "a"]
    assert list_dead_letters(app, refuse.queue) == []


def test_queue_stats_count_the_consumers_of_each_queue(pg_app: Callable[..., App]) -> None:
    app = pg_app()
    spec, other = app.queue(app.settings.default_queue), app.queue(unique_name("other"))
    consumer = app.transport.consumer([spec], prefetch=1)
    consumer.start(lambda delivery: None)
    try:
        consumer.drain(0.01)
        stats = app.transport.queue_stats([spec, other])
        assert (stats[spec.name].consumers, stats[other.name].consumers) == (1, 0)
        # A queue added while consuming counts it, a removed one no longer
        consumer.add_queue(other)
        consumer.remove_queue(spec.name)
        consumer.drain(0.01)
        stats = app.transport.queue_stats([spec, other])
        assert (stats[spec.name].consumers, stats[other.name].consumers) == (0, 1)
    finally:
        consumer.close()
    assert app.transport.queue_stats([other])[other.name].consumers == 0


def test_events_are_refused_clearly(pg_app: Callable[..., App]) -> None:
    app = pg_app()
    with pytest.raises(ConfigurationError, match="cannot route events"):
        app.emit("order.created", {"id": 1})


# -- killed workers: leases and the delivery limit -------------------------------------


def crash_on_postgres(crash: Callable[[str], Crash], **options: Any) -> Crash:
    """A crash set-up on PostgreSQL whose leases run out fast."""
    c = crash("postgresql")
    c.options = {"lease": 1.5, "poll_interval": 0.25, **options}
    c.app = crash_app.make_app(c.url, c.queue, c.options)
    return c


def test_a_sigkilled_workers_task_comes_back_after_its_lease(
    crash: Callable[[str], Crash],
) -> None:
    c = crash_on_postgres(crash)
    spec = c.app.queue(c.queue)
    # Given a worker whose task SIGKILLs it while holding the message
    worker = c.start("-c", "1", "--prefetch", "1", MQTASKS_DELIVERY_LIMIT="0")
    worker.wait_started()
    handle = c.app.tasks[crash_app.KILL].delay("doom")
    assert worker.wait(30) == -signal.SIGKILL
    # Then the row is leased to the dead worker, then ready again once the lease ran out
    stats = c.app.transport.queue_stats([spec])[c.queue]
    assert (stats.ready, stats.unacked) in ((0, 1), (1, 0))
    wait_for(lambda: c.app.transport.message_counts([spec]) == {c.queue: 1}, "the lease", 10)
    # And its next delivery is counted as the second
    consumer = c.app.transport.consumer([spec], prefetch=1)
    got: list[Any] = []
    consumer.start(got.append)
    try:
        wait_for(lambda: consumer.drain(0.05) or got, "a delivery")  # type: ignore[func-returns-value]
        [delivery] = got
        assert (delivery.message_id, delivery.delivery_count) == (handle.id, 2)
        assert delivery.redelivered
        assert consumer.ack(delivery)
    finally:
        consumer.close()
    assert c.app.transport.queue_stats([spec])[c.queue].unacked == 0


def test_a_task_that_kills_its_worker_is_dead_lettered_after_the_limit(
    crash: Callable[[str], Crash],
) -> None:
    c = crash_on_postgres(crash)
    # Given supervised workers (a dead child is replaced) and a limit of 3
    parent = c.start("--processes", "2", "-c", "1", "--prefetch", "1", MQTASKS_DELIVERY_LIMIT="3")
    parent.wait_started(2)
    # When a task SIGKILLs its worker process every time it runs
    c.app.tasks[crash_app.KILL].delay("doom")
    parent.wait_log("task.dead_lettered", timeout=60)
    # Then it ran 3 times and is dead-lettered with its reason, not run a 4th time
    assert len(c.events("start", "doom")) == 3
    [entry] = list_dead_letters(c.app, c.queue)
    assert entry.reason == "delivery_limit"
    assert entry.detail is not None and "delivered 4 times" in entry.detail
    # And the workers go on with other tasks
    c.app.tasks[crash_app.PING].delay("after")
    wait_for(lambda: c.events("ping", "after"), "the ping to run")
    assert c.app.transport.message_counts([c.app.queue(c.queue)]) == {c.queue: 0}


def test_ordered_tasks_keep_each_keys_order(make_app: Callable[..., App]) -> None:
    """Partition queues are consumed and handed over with add_queue/remove_queue."""
    app = make_app(
        require_broker("postgresql"),
        backend=POSTGRES_URL,
        backend_key_prefix=unique_name("ordering") + ":",
        ordering_lease_ttl=1.5,
        ordering_gap_timeout=0.5,
    )
    runs: dict[int, list[int]] = {0: [], 1: [], 2: []}

    @app.task(ordering_key="account", partitions=2)
    def post(account: int, n: int) -> None:
        runs[account].append(n)

    for n in range(10):
        for account in runs:
            post.delay(account, n)
    with running_worker(app, concurrency=4) as worker:
        wait_for(lambda: sum(map(len, runs.values())) == 30, "30 runs", 30)
        drain(worker)
    assert runs == {account: list(range(10)) for account in runs}


def test_the_table_is_created_once_by_transports_starting_together() -> None:
    url = require_broker("postgresql")
    prefix = f"mqt_{unique_name('t').replace('-', '_')}_"
    transports = [
        PostgresTransport(url, transport_options={"table_prefix": prefix}) for _ in range(6)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(transports))

    def declare(transport: PostgresTransport) -> None:
        barrier.wait(10)
        try:
            transport.declare([QueueSpec("q")])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(t,)) for t in transports]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        assert transports[0].table == f"{prefix}messages"
        assert transports[0].message_counts([QueueSpec("q")]) == {"q": 0}
    finally:
        for transport in transports[1:]:
            transport.close()
        transports[0].drop_table()


def test_a_commit_not_on_disk_is_warned_about() -> None:
    url = require_broker("postgresql")
    for options, warned in (("", False), ("?options=-c%20synchronous_commit%3Doff", True)):
        transport = PostgresTransport(url + options)
        try:
            assert any("synchronous_commit" in w for w in transport.check_broker()) is warned
        finally:
            transport.close()


def test_connections_killed_by_the_server_are_replaced_without_a_duplicate(
    make_app: Callable[..., App],
) -> None:
    name = unique_name("apn")
    app = make_app(require_broker("postgresql") + f"?application_name={name}")
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    @app.task
    def slow(n: int) -> None:
        runs.append(n)
        started.set()
        release.wait(10)

    spec = app.queue(slow.queue)
    slow.delay(1)
    with running_worker(app, concurrency=1) as worker:
        assert started.wait(10)
        # When the server ends every connection of the app (the worker's and the publishers')
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                [name],
            ).fetchone()
        assert killed is not None and killed[0] >= 2
        release.set()
        # Then a publish goes through, and the running task's ack lands after the reconnect
        slow.delay(2)
        drain(worker, timeout=20)
    assert runs == [1, 2]
    stats = app.transport.queue_stats([spec])[slow.queue]
    assert (stats.ready, stats.unacked, stats.delayed) == (0, 0, 0)


# -- a server that stops answering -------------------------------------------------------


def _delete_directly(make_app: Callable[..., App], queue: str) -> None:
    """Delete ``queue``'s rows (and its consumers') past the proxy, which the
    teardown's cleanup, going through the closed proxy, could not reach."""
    direct = make_app(POSTGRES_URL, default_queue=queue)
    direct.transport.delete([direct.queue(queue)])


def test_a_publish_through_a_black_hole_fails_within_its_timeout(
    make_app: Callable[..., App],
) -> None:
    """TCP keepalives never trip on a peer that still acknowledges (a stuck proxy, a
    frozen server): the publish has a deadline of its own."""
    require_broker("postgresql")
    proxy = TcpProxy(5432)
    queue = unique_name("default")
    try:
        app = make_app(proxy.url_for(POSTGRES_URL), publish_timeout=2.0, default_queue=queue)

        @app.task
        def job() -> None: ...

        job.delay()  # connected, the pool warm
        proxy.blackhole()
        outcome: list[BaseException] = []

        def publish() -> None:
            try:
                job.delay()
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=publish, daemon=True)
        waiter.start()
        waiter.join(2.0 + 5.0)  # not the minutes TCP would take, nor forever
        assert outcome, "delay() was still waiting on the black hole"
        assert isinstance(outcome[0], PublishError), outcome
        proxy.blackhole(False)
        job.delay()  # and the next publish takes a new connection
    finally:
        _delete_directly(make_app, queue)
        proxy.close()


def test_a_consumer_through_a_black_hole_counts_its_connection_lost(
    make_app: Callable[..., App],
) -> None:
    require_broker("postgresql")
    proxy = TcpProxy(5432)
    queue = unique_name("default")
    try:
        app = make_app(proxy.url_for(POSTGRES_URL), heartbeat=1.0, default_queue=queue)
        spec = app.queue(app.settings.default_queue)
        app.transport.declare([spec])
        consumer = app.transport.consumer([spec], prefetch=1)
        consumer.start(lambda delivery: None)
        lost: list[BaseException] = []
        original = consumer._lost  # type: ignore[attr-defined]

        def lost_then_stop(exc: BaseException) -> None:
            lost.append(exc)
            consumer._cancelled = True  # no reconnect loop through the black hole
            original(exc)

        consumer._lost = lost_then_stop  # type: ignore[attr-defined]
        consumer.drain(0.1)
        proxy.blackhole()
        consumer._renew_at = 0.0  # type: ignore[attr-defined]  # its next turn queries
        consumer.drain(0.5)  # waits at most its heartbeat for an answer
        assert [type(e).__name__ for e in lost] == ["DeadlineExceeded"]
    finally:
        _delete_directly(make_app, queue)
        proxy.close()
