"""Crash loops end: a message that keeps coming back is dead-lettered, not looped.

A delivery counts when it ends without a settlement (the worker crashed, was
killed, went away holding it); a stopping worker handing back what it never
started does not count on ``redis://`` and ``memory://``. Past the queue's
``delivery_limit`` the worker dead-letters the message with reason
``delivery_limit`` instead of running it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mqtasks import App, ConfigurationError, PublishNacked, QueueSpec, Settings
from mqtasks.dlq import list_dead_letters
from mqtasks.testing import running_worker
from mqtasks.transport import resolve
from mqtasks.transport.amqp.delivery_count import HEADER_DELIVERY_COUNT, counted_returns
from mqtasks.transport.base import Delivery, Transport, broker_spec
from mqtasks.transport.envelope import Envelope
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.memory import MemoryTransport
from mqtasks.transport.redis import RedisDelivery, encode_element
from mqtasks.worker import Worker
from tests import crash_app
from tests._helpers.brokers import unique_name
from tests._helpers.cli import CliWorker
from tests._helpers.crash import Crash
from tests._helpers.redis import Inbox, envelope, key_prefix, make_transport
from tests._helpers.wait import wait_for

# -- configuration ----------------------------------------------------------------


def test_the_default_limit_comes_from_the_settings_and_a_queue_can_override_it() -> None:
    assert Settings().delivery_limit == 20
    app = App("t", broker="memory://", queues=[QueueSpec("own", delivery_limit=5)])
    assert app.delivery_limit("default") == 20
    assert app.delivery_limit("own") == 5
    assert app.delivery_limit("default.dlq") is None
    off = App("t", broker="memory://", delivery_limit=0, queues=[QueueSpec("q", delivery_limit=0)])
    assert off.delivery_limit("default") is None and off.delivery_limit("q") is None
    assert Settings.from_env({"MQTASKS_DELIVERY_LIMIT": "7"}).delivery_limit == 7


@pytest.mark.parametrize("bad", [-1, True, "3"])
def test_a_limit_that_is_not_a_count_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="delivery_limit"):
        QueueSpec("q", delivery_limit=bad)
    with pytest.raises(ConfigurationError, match="delivery_limit"):
        Settings(delivery_limit=bad)


@pytest.mark.parametrize("url", ["redis+kombu://h:1/0"])
def test_brokers_that_do_not_count_deliveries_say_so(url: str) -> None:
    with pytest.raises(ConfigurationError, match="does not count deliveries"):
        resolve(url).queue_arguments(QueueSpec("q", delivery_limit=3))


def test_classic_rabbitmq_queues_take_a_limit_their_consumers_count() -> None:
    """RabbitMQ has no x-delivery-limit for classic queues: mqtasks counts there."""
    args = resolve("amqp://127.0.0.1//").queue_arguments(
        QueueSpec("q", queue_type="classic", delivery_limit=3)
    )
    assert "x-delivery-limit" not in args


@pytest.mark.parametrize(
    ("value", "returns"),
    [(None, 0), (0, 0), (3, 3), (10_000, 10_000), (10_001, 0), (-1, 0), (True, 0), ("3", 0)],
)
def test_only_a_whole_count_within_bounds_is_read_from_the_header(value: Any, returns: int) -> None:
    headers = {} if value is None else {HEADER_DELIVERY_COUNT: value}
    assert counted_returns(headers) == returns


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "memory://"])
def test_redis_and_memory_count_deliveries_themselves(url: str) -> None:
    assert resolve(url).queue_arguments(QueueSpec("q", delivery_limit=3)) == {}


def test_a_limit_of_zero_is_off_and_never_a_queue_argument() -> None:
    amqp = resolve("amqp://127.0.0.1//")
    assert isinstance(amqp, KombuTransport)
    classic = QueueSpec("q", queue_type="classic", delivery_limit=0)
    assert "x-delivery-limit" not in amqp.queue_arguments(broker_spec(classic))
    assert amqp.kombu_queue(classic).queue_arguments is not None  # declared, no error
    # An inherited default never becomes a queue argument either (existing queues
    # keep their arguments); a quorum queue's own limit does.
    assert "x-delivery-limit" not in amqp.queue_arguments(QueueSpec("q"))
    assert amqp.queue_arguments(QueueSpec("q", delivery_limit=4))["x-delivery-limit"] == 4


# -- counting, per transport ---------------------------------------------------------


def test_redis_elements_carry_their_count() -> None:
    element = encode_element(envelope(1))
    assert RedisDelivery(element, "q", 1, "", "").delivery_count == 1
    counted = b"r12" + element[1:]
    delivery = RedisDelivery(counted, "q", 1, "", "")
    assert (delivery.delivery_count, delivery.message_id, delivery.body) == (13, "m1", b'{"n":1}')
    assert delivery.redelivered and delivery.refused is None
    garbage = RedisDelivery(b"r" + b"9" * 12 + element[1:], "q", 1, "", "")
    assert garbage.refused == "decode_error"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    with key_prefix("dl") as tag:
        yield tag


@pytest.mark.integration
def test_redis_counts_hand_backs_at_close_but_not_requeues(prefix: str) -> None:
    q = unique_name("q")
    transport = make_transport(prefix)
    transport.publish(q, envelope(1))
    counts: list[int | None] = []
    for settle in ("requeue", "close", "close", "ack"):
        inbox = Inbox(transport, [q], prefetch=1)
        inbox.pump(lambda inbox=inbox: len(inbox.got) == 1)  # type: ignore[misc]
        [delivery] = inbox.got
        counts.append(delivery.delivery_count)
        if settle == "requeue":
            inbox.consumer.requeue(delivery)
        elif settle == "ack":
            inbox.consumer.ack(delivery)
        inbox.consumer.close()  # hands back what is held, counted
    assert counts == [1, 1, 2, 3]
    assert transport.message_counts([QueueSpec(q)]) == {q: 0}
    transport.close()


def _deliver_one(transport: Transport, spec: QueueSpec) -> tuple[Any, Delivery]:
    """Start a consumer of ``spec`` and return it with the first delivery it hands on."""
    got: list[Delivery] = []
    consumer = transport.consumer([spec], prefetch=1)
    consumer.start(got.append)
    wait_for(lambda: consumer.drain(0.05) or got, "a delivery")  # type: ignore[func-returns-value]
    return consumer, got[0]


def test_memory_counts_hand_backs_at_close_but_not_requeues() -> None:
    transport = MemoryTransport("memory://")
    transport.declare([QueueSpec("q")])
    transport.publish("q", envelope(1))
    counts: list[int | None] = []
    for settle in ("requeue", "close", "close", "ack"):
        consumer, delivery = _deliver_one(transport, QueueSpec("q"))
        counts.append(delivery.delivery_count)
        if settle == "requeue":
            consumer.requeue(delivery)
        elif settle == "ack":
            consumer.ack(delivery)
        consumer.close()
    assert counts == [1, 1, 2, 3]
    assert transport.message_counts([QueueSpec("q")]) == {"q": 0}


def test_memory_worker_dead_letters_a_message_after_its_limit_and_keeps_working(
    make_app: Callable[..., App],
) -> None:
    app = make_app("memory://")
    name = app.settings.default_queue
    app.add_queue(QueueSpec(name, delivery_limit=3))
    release = threading.Event()
    runs: list[int] = []
    pings: list[int] = []

    @app.task
    def hangs() -> None:
        runs.append(1)
        release.wait(30)

    @app.task
    def ping() -> None:
        pings.append(1)

    hangs.delay()
    try:
        # Given workers that go away while the task runs (as if it had killed them)
        for n in range(1, 4):
            worker = Worker(app, concurrency=1, prefetch=1)
            worker.start()
            wait_for(lambda n=n: len(runs) == n, "the task to start")  # type: ignore[misc]
            assert worker.stop(timeout=0) is False  # abandoned: handed back at close
        # When the next worker gets it, over the limit of 3
        ping.delay()
        with running_worker(app, concurrency=1, prefetch=1):
            wait_for(lambda: pings and app.dead_letters(name), "the ping and the dead letter")
    finally:
        release.set()
    # Then it was not run a 4th time, it is dead-lettered, and other tasks still run
    [entry] = app.dead_letters(name)
    assert len(runs) == 3 and pings == [1]
    assert entry.reason == "delivery_limit" and entry.task == hangs.name
    assert entry.detail is not None and "delivered 4 times" in entry.detail
    assert entry.headers["mqtasks-death-queue"] == name


@pytest.mark.integration
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_rabbitmq_counts_every_return_on_quorum_and_classic_queues(
    amqp_url: str, make_app: Callable[..., App], queue_name: Callable[[str], str], queue_type: Any
) -> None:
    """A quorum queue counts in x-delivery-count; on a classic queue, which only
    flags a redelivery, the consumer republishes it with its count raised."""
    name = queue_name("counted")
    app = make_app(amqp_url, queues=[QueueSpec(name, queue_type=queue_type)])

    @app.task(queue=name)
    def job() -> None: ...

    handle = job.delay()
    counts: list[int | None] = []
    for settle in ("requeue", "close", "close", "ack"):
        consumer, delivery = _deliver_one(app.transport, app.queue(name))
        counts.append(delivery.delivery_count)
        assert delivery.message_id == handle.id
        assert HEADER_DELIVERY_COUNT not in delivery.headers  # never seen past the transport
        consumer.cancel()  # so that a requeued message goes to the next consumer
        if settle == "requeue":
            consumer.requeue(delivery)
        elif settle == "ack":
            consumer.ack(delivery)
        consumer.close()  # hands back what is held: counted
    assert counts == [1, 2, 3, 4]
    assert app.transport.message_counts([app.queue(name)]) == {name: 0}


@pytest.mark.integration
def test_a_recount_the_broker_refuses_hands_the_message_on_with_its_count_so_far(
    amqp_url: str,
    make_app: Callable[..., App],
    queue_name: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = queue_name("counted")
    app = make_app(amqp_url, queues=[QueueSpec(name, queue_type="classic")])

    @app.task(queue=name)
    def job() -> None: ...

    job.delay()
    transport = app.transport
    consumer, delivery = _deliver_one(transport, app.queue(name))
    consumer.close()  # returned once
    # Given the copy that records the return cannot be published (a full queue)
    refused: list[Envelope] = []

    def refuse(queue: str, envelope: Envelope, **kwargs: Any) -> None:
        refused.append(envelope)
        raise PublishNacked("NOT enqueued: the broker refused it", task_id=envelope.message_id)

    monkeypatch.setattr(transport, "publish", refuse)
    with capture_logs() as logs:
        consumer, delivery = _deliver_one(transport, app.queue(name))
    # Then the message still runs, with the count it has at least, and says so
    assert delivery.delivery_count == 2 and delivery.redelivered
    assert [e.headers[HEADER_DELIVERY_COUNT] for e in refused] == [1]
    [event] = [e for e in logs if e["event"] == "delivery.count_failed"]
    assert event["delivery_count"] == 2 and "PublishNacked" in event["error"]
    consumer.ack(delivery)
    consumer.close()
    assert transport.message_counts([app.queue(name)]) == {name: 0}


# -- real worker processes that kill themselves ----------------------------------


@pytest.mark.integration
def test_rabbitmq_dead_letters_a_message_delivered_past_its_limit_itself(
    amqp_url: str, make_app: Callable[..., App], queue_name: Callable[[str], str]
) -> None:
    name = queue_name("crashy")
    app = make_app(amqp_url, queues=[QueueSpec(name, delivery_limit=2)])

    @app.task(queue=name)
    def crashes() -> None: ...

    handle = crashes.delay()
    deliveries = 0
    assert isinstance(app.transport, KombuTransport)
    with app.transport.connection() as conn:
        channel = conn.channel()

        def return_it_or_find_it_dead() -> bool:
            """Take the message and hand it back unsettled; true once it is dead-lettered."""
            nonlocal deliveries
            raw = channel.basic_get(name, no_ack=False)
            if raw is None:
                dlq = name + ".dlq"
                return bool(app.transport.message_counts([QueueSpec(dlq)])[dlq])
            deliveries += 1
            channel.basic_reject(raw.delivery_tag, requeue=True)
            return False

        # Given a consumer that never settles (no worker: the broker's own limit)
        wait_for(return_it_or_find_it_dead, lambda: f"the dead letter ({deliveries} returns)", 20)
        # Then after limit + 1 returns RabbitMQ dead-letters it, with its reason
        dead = channel.basic_get(name + ".dlq", no_ack=True)
    assert deliveries == 3
    assert dead is not None
    assert dead.properties["message_id"] == handle.id
    [death] = dead.properties["application_headers"]["x-death"]
    assert death["reason"] == "delivery_limit"
    assert app.transport.message_counts([app.queue(name)]) == {name: 0}


def live_children(parent: CliWorker) -> set[int]:
    """Pids of the supervisor's children that it has not seen die."""
    started = {e["pid"] for e in parent.logs("supervisor.child_started")}
    return started - {e["pid"] for e in parent.logs("supervisor.child_died")}


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has installed a SIGTERM handler (a worker past its start-up)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["amqp", "amqp-classic", "redis"])
def test_a_task_that_kills_its_worker_is_dead_lettered_after_the_limit(
    kind: str, crash: Callable[[str], Crash]
) -> None:
    c = crash(kind)
    # Given supervised workers (a dead child is replaced) and a limit of 3 from the settings
    parent = c.start("--processes", "2", "-c", "1", "--prefetch", "1", MQTASKS_DELIVERY_LIMIT="3")
    parent.wait_started(2)
    # When a task SIGKILLs its worker process every time it runs
    c.app.tasks[crash_app.KILL].delay("doom")
    parent.wait_log("task.dead_lettered", timeout=60)
    # Then it ran in exactly 3 processes and is dead-lettered, not run a 4th time
    starts = c.events("start", "doom")
    assert len(starts) == 3 and len(set(starts)) == 3
    [entry] = list_dead_letters(c.app, c.queue)
    assert entry.reason == "delivery_limit"
    assert entry.task == crash_app.KILL and entry.queue == c.queue
    assert entry.detail is not None and "delivered 4 times" in entry.detail
    assert {"mqtasks-death-worker", "mqtasks-death-failed-at"} <= set(entry.headers)
    # And the worker keeps running other tasks
    c.app.tasks[crash_app.PING].delay("after")
    wait_for(lambda: c.events("ping", "after"), "the ping to run")
    assert c.events("start", "doom") == starts
    # (every death noticed, and each replacement handling SIGTERM, before the stop)
    wait_for(lambda: len(parent.logs("supervisor.child_died")) == 3, "3 deaths noticed")
    wait_for(lambda: all(map(catches_sigterm, live_children(parent))), "children ready")
    parent.signal(signal.SIGTERM)
    assert parent.wait(15) == 0, parent.stderr()[-3000:]
    assert c.app.transport.message_counts([c.app.queue(c.queue)]) == {c.queue: 0}
