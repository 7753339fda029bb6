"""Ordered processing by key, end to end: real workers (two in one process) on memory://,
RabbitMQ and Redis, with the memory:// result backend, or a Redis one for the real brokers."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from mqtasks import App
from mqtasks.exceptions import ConfigurationError
from mqtasks.ordering import HEADER_OSEQ
from mqtasks.ordering.publish import route
from mqtasks.ordering.queues import partitions_of
from mqtasks.testing import drain, running_worker
from mqtasks.transport.base import DLQ_SUFFIX
from mqtasks.worker import Worker
from tests._helpers.brokers import REDIS_URL, require_broker, unique_name
from tests._helpers.redis import delete_keys, scan_pattern
from tests._helpers.wait import wait_for

#: The Redis result backend of the real brokers' tests: a database of its own.
BACKEND_URL = REDIS_URL.rsplit("/", 1)[0] + "/10"

#: Short enough for a test to see partitions move and gaps skipped.
FAST = {"ordering_lease_ttl": 1.5, "ordering_gap_timeout": 0.5}


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test starts; stopped at teardown."""
    made: list[Worker] = []
    yield made
    for worker in made:
        worker.stop()


@pytest.fixture
def ordered_apps(
    make_app: Callable[..., App], workers: list[Worker]
) -> Iterator[Callable[..., App]]:
    """A factory of apps for ordered tasks, with a result backend (memory:// on
    memory://, else Redis under a key prefix of its own).

    At teardown, once the test's workers stopped, every queue of the apps' tasks
    is deleted with its partition queues and their dead-letter queues, and the
    backend's keys: the partitions are declared by the workers, beyond what
    ``make_app`` knows to delete.
    """
    made: list[tuple[App, str | None]] = []

    def make(url: str, **overrides: Any) -> App:
        if url.startswith("memory"):
            app = make_app(url, **{"backend": "memory://", **FAST, **overrides})
            made.append((app, None))
            return app
        require_broker("redis")
        prefix = overrides.pop("backend_key_prefix", None) or unique_name("ordering") + ":"
        app = make_app(
            url, **{"backend": BACKEND_URL, "backend_key_prefix": prefix, **FAST, **overrides}
        )
        made.append((app, prefix))
        return app

    yield make
    for worker in workers:
        worker.stop()
    workers.clear()
    for app, prefix in made:
        if prefix is None:
            continue
        delete_ordered_queues(app)
        app.close()
        delete_backend_keys(prefix)
        broker_prefix = app.settings.transport_options.get("key_prefix")
        if broker_prefix is not None:  # the redis:// transport's own keys
            delete_keys(str(broker_prefix))


def delete_ordered_queues(app: App) -> None:
    """Delete the queues of ``app``'s tasks, their partition queues and their ``.dlq``."""
    queues = app.task_queues()
    names = {*queues, *partitions_of(app, queues)}
    names |= {name + DLQ_SUFFIX for name in names}
    app.transport.delete([app.queue(name) for name in sorted(names)])


@pytest.fixture
def ordered_app(broker_url: str, ordered_apps: Callable[..., App]) -> App:
    """An app on each broker in turn, from :func:`ordered_apps`."""
    return ordered_apps(broker_url)


def delete_backend_keys(prefix: str) -> None:
    """Delete the keys under ``prefix`` of the tests' Redis result backend."""
    client = redis.Redis.from_url(BACKEND_URL)
    try:
        keys = list(client.scan_iter(match=scan_pattern(prefix) + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class Log:
    """What the tasks ran, in order, from every worker thread."""

    def __init__(self) -> None:
        self.runs: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def add(self, *item: Any) -> None:
        with self._lock:
            self.runs.append(item)

    def of(self, key: Any) -> list[Any]:
        with self._lock:
            return [item[1] for item in self.runs if item[0] == key]

    def __len__(self) -> int:
        with self._lock:
            return len(self.runs)


def started(app: App, **options: Any) -> Worker:
    options.setdefault("concurrency", 4)
    options.setdefault("shutdown_timeout", 10.0)
    worker = Worker(app, collect_errors=True, **options)
    worker.start()
    return worker


def owned(worker: Worker) -> set[str]:
    """The partition queues ``worker`` consumes now."""
    assert worker._ordering is not None
    return worker._ordering.consumed


def dead_letters(app: App, queue: str, reason: str | None = None) -> list[Any]:
    return [d for d in app.dead_letters(queue) if reason is None or d.reason == reason]


# -- failure paths ---------------------------------------------------------------------


def test_a_failing_task_holds_its_key_while_other_keys_go_on(
    ordered_app: App, workers: list[Worker]
) -> None:
    app, log = ordered_app, Log()
    queue = unique_name("ledger")
    attempts: dict[int, int] = {}
    release = threading.Event()

    @app.task(queue=queue, ordering_key="account", partitions=1, max_retries=50, retry_backoff=0.1)
    def post(account: int, n: int) -> None:
        if account == 1 and n == 1 and not release.is_set():
            attempts[n] = attempts.get(n, 0) + 1
            raise RuntimeError("not yet")
        log.add(account, n)

    # Given keys 1 and 2 on one partition, and key 1's second task failing
    for n in range(4):
        post.delay(1, n)
        post.delay(2, n)
    workers.append(started(app))
    # Then key 2 runs to its end while key 1 waits behind its failing task
    wait_for(lambda: log.of(2) == [0, 1, 2, 3], "key 2 to run")
    wait_for(lambda: attempts.get(1, 0) >= 3, "retries of key 1's task")
    assert log.of(1) == [0]
    # When it succeeds, key 1's later tasks follow, in order
    release.set()
    wait_for(lambda: log.of(1) == [0, 1, 2, 3], lambda: f"key 1 to finish: {log.of(1)}")
    assert dead_letters(app, queue) == []


def test_a_retry_waits_in_place_with_the_next_attempt_number(
    ordered_app: App, workers: list[Worker]
) -> None:
    from mqtasks.message import current_message

    app, log = ordered_app, Log()
    queue = unique_name("ledger")

    @app.task(queue=queue, ordering_key="account", partitions=2, max_retries=2, retry_backoff=0.1)
    def post(account: int, n: int) -> None:
        message = current_message()
        assert message is not None
        log.add(account, (n, message.attempt))
        if n == 0 and message.attempt < 3:
            raise RuntimeError("again")

    post.delay(7, 0)
    post.delay(7, 1)
    workers.append(started(app))
    wait_for(lambda: len(log) == 4, lambda: f"4 runs: {log.runs}")
    assert log.of(7) == [(0, 1), (0, 2), (0, 3), (1, 1)]


def test_a_held_retry_handed_back_keeps_its_attempt_number(
    ordered_app: App, workers: list[Worker]
) -> None:
    from mqtasks.exceptions import Retry
    from mqtasks.message import current_message

    app, log = ordered_app, Log()
    queue = unique_name("ledger")

    @app.task(queue=queue, ordering_key="account", partitions=1, max_retries=3)
    def post(account: int, n: int) -> None:
        message = current_message()
        assert message is not None
        log.add(account, (n, message.attempt))
        if message.attempt == 1:
            raise Retry(countdown=60.0)

    post.delay(7, 0)
    post.delay(7, 1)
    # Given a first attempt that failed and waits in place, unacked, for its retry
    first = started(app)
    workers.append(first)
    wait_for(lambda: log.of(7) == [(0, 1)], lambda: f"the first attempt: {log.runs}")
    wait_for(lambda: first._ordering is not None and len(first._ordering.lanes) == 2, "held")
    # When its worker stops, handing the message back, and another takes the partition
    assert first.stop() is True
    workers.append(started(app))
    # Then the broker's copy (attempt 1) runs as attempt 2, and the key goes on after it
    wait_for(lambda: len(log.of(7)) >= 2, lambda: f"two runs: {log.runs}")
    wait_for(lambda: len(log.of(7)) >= 3, lambda: f"three runs: {log.runs}")
    assert log.of(7) == [(0, 1), (0, 2), (1, 1)]


def test_a_dead_letter_lets_its_key_continue_by_default(
    ordered_app: App, workers: list[Worker]
) -> None:
    app, log = ordered_app, Log()
    queue = unique_name("ledger")

    @app.task(queue=queue, ordering_key="account", partitions=2, max_retries=0)
    def post(account: int, n: int) -> None:
        if n == 1:
            raise ValueError("bad entry")
        log.add(account, n)

    for n in range(4):
        post.delay(3, n)
    workers.append(started(app))
    wait_for(lambda: log.of(3) == [0, 2, 3], lambda: f"key 3: {log.of(3)}")
    [entry] = wait_for(lambda: dead_letters(app, queue), "the dead letter")
    assert entry.reason == "max_retries_exceeded"
    # In the base queue's dead-letter queue (listed above), saying which partition it left
    assert entry.queue.startswith(f"{queue}.p")


def test_halt_dead_letters_the_keys_later_tasks_until_the_halting_one_is_replayed(
    ordered_app: App, workers: list[Worker]
) -> None:
    app, log = ordered_app, Log()
    queue = unique_name("ledger")
    broken = threading.Event()
    broken.set()

    @app.task(
        queue=queue,
        ordering_key="account",
        partitions=2,
        max_retries=0,
        ordering_on_dead_letter="halt",
    )
    def post(account: int, n: int) -> None:
        if account == 5 and n == 1 and broken.is_set():
            raise ValueError("bad entry")
        log.add(account, n)

    # Given key 5 whose second task fails for good, and key 6 beside it
    handles = [post.delay(5, n) for n in range(4)]
    for n in range(3):
        post.delay(6, n)
    workers.append(started(app))
    # Then key 5's later tasks are dead-lettered, ordering_halted; key 6 is not halted
    wait_for(lambda: len(dead_letters(app, queue)) == 3, "three dead letters")
    wait_for(lambda: log.of(6) == [0, 1, 2], "key 6")
    assert log.of(5) == [0]
    reasons = {d.id: d.reason for d in dead_letters(app, queue)}
    assert reasons[handles[1].id] == "max_retries_exceeded"
    assert reasons[handles[2].id] == reasons[handles[3].id] == "ordering_halted"
    # When the halting task is replayed (and fixed), the key resumes
    broken.clear()
    assert app.replay_dead_letters(queue, ids=[handles[1].id]) == 1
    wait_for(lambda: log.of(5) == [0, 1], lambda: f"key 5: {log.of(5)}")
    post.delay(5, 9)
    wait_for(lambda: log.of(5) == [0, 1, 9], lambda: f"key 5: {log.of(5)}")


def _publish_routed(app: App, message: Any) -> None:
    envelope = message.encode(max_size=app.settings.max_message_size)
    app.transport.declare([app.queue(message.queue)])
    app.transport.publish(message.queue, envelope)


def test_a_sequence_gap_is_skipped_after_the_timeout_and_a_late_arrival_dead_lettered(
    ordered_app: App, workers: list[Worker]
) -> None:
    app, log = ordered_app, Log()
    queue = unique_name("ledger")

    @app.task(queue=queue, ordering_key="account", partitions=1)
    def post(account: int, n: int) -> None:
        log.add(account, n)

    # Given three calls numbered 1, 2, 3, of which 2 is held back by its publisher
    one, two, three = (route(app, post.message((4, n))) for n in (1, 2, 3))
    assert [m.headers[HEADER_OSEQ] for m in (one, two, three)] == [1, 2, 3]
    _publish_routed(app, one)
    workers.append(started(app))
    wait_for(lambda: log.of(4) == [1], "the first")
    _publish_routed(app, three)
    # Then 3 waits for the gap timeout, and runs
    wait_for(lambda: log.of(4) == [1, 3], lambda: f"the third: {log.of(4)}")
    # When 2 arrives after all, it is dead-lettered, never run out of order
    _publish_routed(app, two)
    [entry] = wait_for(lambda: dead_letters(app, queue), "the late arrival's dead letter")
    assert entry.id == two.id and entry.reason == "sequence_gap"
    assert log.of(4) == [1, 3]


def test_a_replayed_dead_letter_runs_after_what_is_queued_for_its_key(
    ordered_app: App, workers: list[Worker]
) -> None:
    app, log = ordered_app, Log()
    queue = unique_name("ledger")
    failing = threading.Event()
    failing.set()

    @app.task(queue=queue, ordering_key="account", partitions=2, max_retries=0)
    def post(account: int, n: int) -> None:
        if n == 0 and failing.is_set():
            raise ValueError("bad")
        log.add(account, n)

    first = post.delay(8, 0)
    worker = started(app)
    workers.append(worker)
    wait_for(lambda: dead_letters(app, queue), "the dead letter")
    worker.stop()
    # Given later tasks of the key queued while no worker runs
    failing.clear()
    for n in (1, 2):
        post.delay(8, n)
    # When the dead letter is replayed, to the base queue
    assert app.replay_dead_letters(queue, ids=[first.id]) == 1
    workers.append(started(app))
    # Then it runs after what was queued for its key
    wait_for(lambda: log.of(8) == [1, 2, 0], lambda: f"key 8: {log.of(8)}")


# -- order across workers -----------------------------------------------------------------


def backlog(app: App, queue: str, *, keys: int, calls: int, partitions: int, pause: float) -> Log:
    """Register an ordered task on ``queue`` and publish ``calls`` calls of each of ``keys`` keys."""
    log = Log()

    @app.task(queue=queue, ordering_key="account", partitions=partitions)
    def post(account: int, n: int) -> None:
        time.sleep(pause)
        log.add(account, n)

    with app.publishing():
        for n in range(calls):
            for account in range(keys):
                post.delay(account, n)
    return log


def test_two_workers_keep_each_keys_order(ordered_app: App, workers: list[Worker]) -> None:
    app = ordered_app
    log = backlog(app, unique_name("ledger"), keys=10, calls=30, partitions=8, pause=0.002)
    workers.extend([started(app), started(app)])
    wait_for(lambda: len(log) >= 300, lambda: f"300 runs, {len(log)} so far", timeout=60)
    for account in range(10):
        assert log.of(account) == list(range(30)), account
    consumed = [owned(w) for w in workers]
    wait_for(lambda: all(consumed) and not set.intersection(*consumed), "a share each")


def test_a_second_worker_takes_partitions_over_without_breaking_order(
    ordered_app: App, workers: list[Worker]
) -> None:
    app, log = ordered_app, Log()
    queue = unique_name("ledger")

    @app.task(queue=queue, ordering_key="account", partitions=4)
    def post(account: int, n: int) -> None:
        time.sleep(0.005)
        log.add(account, n)

    first = started(app, concurrency=2)
    workers.append(first)
    wait_for(lambda: len(owned(first)) == 4, "the first worker to own every partition")
    stop = threading.Event()

    def publish() -> None:
        n = 0
        while not stop.is_set():
            for account in range(6):
                post.delay(account, n)
            n += 1
            time.sleep(0.01)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        time.sleep(0.3)
        # When a second worker joins, it gets a share of the partitions
        second = started(app, concurrency=2)
        workers.append(second)
        wait_for(lambda: len(owned(second)) == 2, "the second worker's share")
        wait_for(lambda: len(owned(first)) == 2, "the first worker's share")
        time.sleep(0.3)
    finally:
        stop.set()
        publisher.join()
    total = sum(len(post_calls) for post_calls in [log.of(a) for a in range(6)])
    assert total > 0
    # Then every key ran in order, nothing lost
    wait_for(
        lambda: (
            all(log.of(a) == list(range(len(log.of(a)))) for a in range(6))
            and app_is_drained(app, queue, 4, workers)
        ),
        lambda: (
            f"order kept and drained: {[anomalies(log.of(a)) for a in range(6)]}, owned "
            f"{[sorted(owned(w)) for w in workers]}, idle {[w.idle for w in workers]}, ready "
            f"{partition_counts(app, queue, 4)}"
        ),
        timeout=30,
    )


def anomalies(runs: list[Any]) -> list[tuple[int, Any, Any]]:
    """Where ``runs`` is not 0, 1, 2...: (index, expected, found)."""
    return [(i, i, n) for i, n in enumerate(runs) if n != i][:5]


def partition_counts(app: App, queue: str, partitions: int) -> dict[str, int]:
    from mqtasks.ordering import partition_name

    specs = [app.queue(partition_name(queue, i, partitions)) for i in range(partitions)]
    return app.transport.message_counts(specs)


def app_is_drained(app: App, queue: str, partitions: int, workers: list[Worker]) -> bool:
    counts = partition_counts(app, queue, partitions)
    return sum(counts.values()) == 0 and all(w.idle for w in workers)


def test_a_stopped_worker_hands_its_partitions_back_and_another_continues_in_order(
    ordered_app: App, workers: list[Worker]
) -> None:
    app = ordered_app
    log = backlog(app, unique_name("ledger"), keys=4, calls=40, partitions=4, pause=0.01)
    first, second = started(app, concurrency=2), started(app, concurrency=2)
    workers.extend([first, second])
    wait_for(lambda: len(log) >= 20, "some runs")
    # When one worker stops gracefully, mid-way
    assert first.stop() is True
    # Then the other takes every partition and finishes each key in order
    wait_for(lambda: len(owned(second)) == 4, "the other to own every partition")
    wait_for(lambda: len(log) >= 160, lambda: f"160 runs, {len(log)}", timeout=60)
    for account in range(4):
        assert log.of(account) == list(range(40)), account


# -- the broker's side ------------------------------------------------------------------------


@pytest.mark.integration
def test_partition_queues_are_single_active_consumer_on_rabbitmq(
    ordered_apps: Callable[..., App], workers: list[Worker]
) -> None:
    app = ordered_apps(require_broker("amqp"))
    queue = unique_name("ledger")

    @app.task(queue=queue, ordering_key="account", partitions=2)
    def post(account: int) -> None: ...

    assert app.queue(f"{queue}.p1").single_active_consumer
    post.delay(1)
    workers.append(started(app))
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name", "arguments"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"rabbitmqctl unavailable: {exc}")
    lines = [line for line in out.splitlines() if line.startswith(f"{queue}.p")]
    assert len(lines) == 2, out  # no dead-letter queues of their own: the base queue's
    assert all("x-single-active-consumer" in line for line in lines), out
    assert all(f'"x-dead-letter-routing-key","{queue}"' in line for line in lines), out


# -- refusals ----------------------------------------------------------------------------------


def test_ordered_tasks_need_a_result_backend(make_app: Callable[..., App]) -> None:
    app = make_app("memory://")
    with pytest.raises(ConfigurationError, match="backend='redis://"):

        @app.task(ordering_key="account")
        def post(account: int) -> None: ...


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ordering_key": "acount"}, "must name a parameter"),
        ({"ordering_key": "account", "priority": 5}, "take no priority"),
        ({"ordering_key": "account", "partitions": 0}, "from 1 to 1024"),
        ({"ordering_key": "account", "partitions": 1025}, "from 1 to 1024"),
        ({"ordering_key": "account", "ordering_on_dead_letter": "stop"}, "'continue' or 'halt'"),
        ({"partitions": 4}, "go with ordering_key"),
        ({"ordering_key": "account", "broadcast": True}, "broadcast"),
    ],
)
def test_ordering_options_are_checked_at_decoration(
    make_app: Callable[..., App], options: dict[str, Any], match: str
) -> None:
    app = make_app("memory://", backend="memory://")
    with pytest.raises(ConfigurationError, match=match):

        @app.task(**options)
        def post(account: int) -> None: ...


def test_the_ordered_tasks_of_a_queue_share_its_partition_count(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://")

    @app.task(queue="ledger", ordering_key="account", partitions=8)
    def post(account: int) -> None: ...

    with pytest.raises(ConfigurationError, match="same number"):

        @app.task(queue="ledger", ordering_key="account", partitions=4)
        def void(account: int) -> None: ...


def test_a_call_with_a_delay_priority_or_other_queue_is_refused(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://", backend="memory://")

    @app.task(ordering_key="account")
    def post(account: int) -> None: ...

    with pytest.raises(ConfigurationError, match="countdown or eta"):
        post.apply_async((1,), countdown=5)
    with pytest.raises(ConfigurationError, match="priority"):
        post.apply_async((1,), priority=3)
    with pytest.raises(ConfigurationError, match="cannot go to"):
        post.apply_async((1,), queue=unique_name("other"))
    with pytest.raises(ConfigurationError, match="countdown or eta"):
        post.s(1).apply_async(countdown=5)


def test_subscribers_refuse_an_ordering_key(make_app: Callable[..., App]) -> None:
    app = make_app("memory://", backend="memory://")
    with pytest.raises(ConfigurationError, match="ordering_key"):

        @app.on("order.*", ordering_key="payload")
        def audit(payload: dict[str, Any]) -> None: ...


@pytest.mark.integration
def test_a_worker_on_redis_kombu_refuses_ordered_tasks(make_app: Callable[..., App]) -> None:
    url = require_broker("redis").replace("redis://", "redis+kombu://", 1)
    app = make_app(url, backend="memory://", delivery_limit=0)

    @app.task(ordering_key="account", max_retries=0)
    def post(account: int) -> None: ...

    worker = Worker(app, concurrency=1)
    with pytest.raises(ConfigurationError, match="add_queue"):
        worker.start()


def test_drain_waits_for_the_partitions_too(ordered_app: App) -> None:
    app = ordered_app
    log = backlog(app, unique_name("ledger"), keys=3, calls=10, partitions=4, pause=0.0)
    with running_worker(app, concurrency=2) as worker:
        drain(worker)
        assert len(log) == 30


# -- takeover from a killed worker ------------------------------------------------------------


@pytest.mark.integration
def test_redis_takeover_without_delay_sweeps_the_killed_consumers_messages_back_first(
    ordered_apps: Callable[..., App], workers: list[Worker]
) -> None:
    """ordering_takeover_delay=0 on redis://: the new owner's add_queue sweeps the dead
    consumer's messages back to the partition's head before its first fetch."""
    from mqtasks.ordering.keys import lease_name, owner_key
    from mqtasks.transport import RedisTransport
    from tests._helpers.redis import Inbox

    # The periodic sweep is far off: only the sweep of add_queue can restore in time.
    prefix = "{" + unique_name("takeover") + "}"
    options = {"key_prefix": prefix, "liveness_ttl": 1.0, "sweep_interval": 600.0}
    app = ordered_apps(
        require_broker("redis"),
        transport_options=options,
        ordering_lease_ttl=2.0,
        ordering_takeover_delay=0.0,
    )
    assert isinstance(app.transport, RedisTransport)
    queue, log = unique_name("ledger"), Log()

    @app.task(queue=queue, ordering_key="account", partitions=1)
    def post(account: int, n: int) -> None:
        log.add(account, n)

    partition = f"{queue}.p0"
    app.transport.declare([app.queue(partition), app.queue(queue)])
    for n in range(4):
        post.delay(1, n)
    # Given a worker that took the partition and its four messages, then was killed:
    # its lease runs on until it expires, its messages sit in its processing list.
    app.backend.acquire_lease(lease_name(queue, 0), "dead:1:worker", 2.0)
    app.backend.put(owner_key(queue, 0), b"dead:1:worker", 60.0)
    dead = Inbox(app.transport, [partition], prefetch=8)
    dead.pump(lambda: len(dead.got) == 4)
    dead.consumer._drop()  # its sockets close; no ack, no close: as SIGKILL leaves it
    for n in range(4, 8):
        post.delay(1, n)
    # When a worker takes the partition over once the lease expired, without delay
    workers.append(started(app))
    # Then the killed worker's four run first, in order, and nothing is dead-lettered
    wait_for(lambda: len(log) >= 4, lambda: f"4 runs: {log.runs}")
    assert log.of(1)[:4] == [0, 1, 2, 3]
    wait_for(lambda: len(log) >= 8, lambda: f"8 runs: {log.runs}")
    assert log.of(1) == list(range(8))
    assert dead_letters(app, queue) == []
