"""redis://: delays held by Redis (countdowns, retries), against the local Redis.

A delayed message waits in the queue's sorted set, scored by its due time on
Redis' clock, and a consumer of the queue moves it to the ready list when due
in one script. These tests check timing, ordering without head-of-line
blocking, survival of a consumer that dies, no double delivery between
consumers, the counts, and purge/delete. Each runs under a key prefix of its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mqtasks import App, PublishError, QueueSpec, Retry
from mqtasks.testing import running_worker
from mqtasks.transport import RedisTransport
from mqtasks.transport.base import Delivery
from tests._helpers.brokers import unique_name
from tests._helpers.redis import FAST, Inbox, envelope, key_prefix, make_transport, reliable_url
from tests._helpers.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix (hash tag) of this test's own; its keys are deleted afterwards."""
    with key_prefix("rd") as tag:
        yield tag


@pytest.fixture
def transport(prefix: str) -> Iterator[RedisTransport]:
    t = make_transport(prefix)
    yield t
    t.close()


def arrivals(inbox: Inbox) -> dict[str | None, float]:
    """Wrap the inbox's callback to record each delivery's arrival time."""
    times: dict[str | None, float] = {}
    record = inbox.consumer._on_delivery
    assert record is not None

    def on_delivery(delivery: Delivery) -> None:
        times[delivery.message_id] = time.monotonic()
        record(delivery)

    inbox.consumer._on_delivery = on_delivery
    return times


def test_a_delayed_message_is_held_then_delivered_on_time(
    transport: RedisTransport,
) -> None:
    q = unique_name("q")
    inbox = Inbox(transport, [q], prefetch=10)
    times = arrivals(inbox)
    sent = time.monotonic()
    transport.publish(q, envelope(1), delay=1.0)
    assert transport.message_counts([QueueSpec(q)]) == {q: 0}
    assert transport.delayed_counts([QueueSpec(q)]) == {q: 1}
    inbox.pump(lambda: len(inbox.got) == 1, timeout=5)
    assert 1.0 - 0.01 <= times["m1"] - sent <= 1.5
    assert transport.delayed_counts([QueueSpec(q)]) == {q: 0}
    assert inbox.got[0].body == b'{"n":1}' and not inbox.got[0].redelivered
    inbox.consumer.ack(inbox.got[0])
    inbox.consumer.close()


def test_a_short_delay_is_not_blocked_by_a_long_one(transport: RedisTransport) -> None:
    a, b = unique_name("a"), unique_name("b")
    inbox = Inbox(transport, [a, b], prefetch=10)
    times = arrivals(inbox)
    sent = time.monotonic()
    transport.publish(a, envelope(1), delay=60)
    transport.publish(a, envelope(2), delay=0.3)
    transport.publish(b, envelope(3), delay=0.4)
    inbox.pump(lambda: len(inbox.got) == 2, timeout=5)
    assert inbox.ids() == ["m2", "m3"]
    assert 0.29 <= times["m2"] - sent <= 0.8 and 0.39 <= times["m3"] - sent <= 0.9
    assert transport.delayed_counts([QueueSpec(a), QueueSpec(b)]) == {a: 1, b: 0}
    inbox.consumer.ack_many(inbox.got)
    inbox.consumer.close()


def test_due_order_is_kept_across_several_moves(
    transport: RedisTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Published latest-due first, and more due at once than one script call moves.
    monkeypatch.setattr(RedisTransport, "promote_batch", 4)
    q = unique_name("q")
    items = [(q, envelope(n)) for n in range(15)]
    results = transport.publish_many(items, delays=[0.3 - n * 0.01 for n in range(15)])
    assert results == [None] * 15
    time.sleep(0.35)  # all due before the consumer starts
    inbox = Inbox(transport, [q], prefetch=20)
    inbox.pump(lambda: len(inbox.got) == 15, timeout=5)
    assert inbox.ids() == [f"m{n}" for n in reversed(range(15))]
    inbox.consumer.ack_many(inbox.got)
    inbox.consumer.close()


def test_delayed_messages_survive_a_consumer_that_dies(prefix: str) -> None:
    q = unique_name("q")
    first = make_transport(prefix, transport_options=FAST)
    dead = Inbox(first, [q], prefetch=10)
    dead.pump(lambda: True)
    first.publish(q, envelope(1), delay=0.5)
    first.publish(q, envelope(2), delay=0.1)
    dead.pump(lambda: len(dead.got) == 1, timeout=5)
    assert dead.ids() == ["m2"]
    dead.consumer._drop()  # killed: no close, no restore; m1 is still held by Redis
    first.close()
    time.sleep(0.6)  # m1 falls due while no consumer runs

    restarted = make_transport(prefix, transport_options=FAST)
    assert restarted.delayed_counts([QueueSpec(q)]) == {q: 1}
    inbox = Inbox(restarted, [q], prefetch=10)
    # m1 from the delayed set; m2 back from the dead consumer once its liveness expires.
    inbox.pump(lambda: len(inbox.got) == 2, timeout=5)
    assert inbox.ids() == ["m1", "m2"]
    assert [d.redelivered for d in inbox.got] == [False, True]
    inbox.consumer.ack_many(inbox.got)
    inbox.consumer.close()
    restarted.close()


def test_two_consumers_never_deliver_a_delayed_message_twice(prefix: str) -> None:
    q = unique_name("q")
    n = 200
    publisher = make_transport(prefix)
    transports = [make_transport(prefix) for _ in range(2)]
    inboxes = [Inbox(t, [q], prefetch=n) for t in transports]
    items = [(q, envelope(i)) for i in range(n)]
    assert (
        publisher.publish_many(items, delays=[0.05 + (i % 20) * 0.02 for i in range(n)])
        == [None] * n
    )

    def total() -> int:
        return sum(len(i.got) for i in inboxes)

    errors: list[BaseException] = []

    def pump(inbox: Inbox) -> None:
        try:
            inbox.pump(lambda: total() >= n, timeout=10)
            listening = time.monotonic() + 0.3  # go on fetching: a late duplicate shows up
            while time.monotonic() < listening:
                inbox.consumer.wait(0.05, -1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=(i,)) for i in inboxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errors
    ids = [m for i in inboxes for m in i.ids()]
    assert len(ids) == n and len(set(ids)) == n
    assert all(i.got for i in inboxes), "both consumers should have moved or taken some"
    for inbox, tr in zip(inboxes, transports, strict=True):
        inbox.consumer.ack_many(inbox.got)
        inbox.consumer.close()
        tr.close()
    publisher.close()


def test_counts_purge_and_delete_cover_delayed_messages(
    transport: RedisTransport,
) -> None:
    a, b = unique_name("a"), unique_name("b")
    specs = [QueueSpec(a), QueueSpec(b)]
    transport.publish(a, envelope(1), delay=30)
    transport.publish(a, envelope(2), delay=60)
    transport.publish(a, envelope(3))
    transport.publish(a, envelope(4), delay=0)  # zero: now
    transport.publish(b, envelope(5), delay=30)
    assert transport.message_counts(specs) == {a: 2, b: 0}
    assert transport.delayed_counts(specs) == {a: 2, b: 1}
    assert transport.purge([QueueSpec(a)]) == 4
    assert transport.message_counts(specs) == {a: 0, b: 0}
    assert transport.delayed_counts(specs) == {a: 0, b: 1}
    transport.delete([QueueSpec(b)])
    assert transport.delayed_counts(specs) == {a: 0, b: 0}


def test_delay_arguments(transport: RedisTransport) -> None:
    q = unique_name("q")
    # The same envelope again while it is held (a retry after a lost reply) is stored once.
    transport.publish(q, envelope(1), delay=30)
    transport.publish(q, envelope(1), delay=30)
    assert transport.delayed_counts([QueueSpec(q)]) == {q: 1}
    for bad in (math.inf, math.nan):
        with pytest.raises(PublishError, match="finite"):
            transport.publish(q, envelope(2), delay=bad)
    results = transport.publish_many([(q, envelope(3)), (q, envelope(4))], delays=[None, math.inf])
    assert results[0] is None and isinstance(results[1], PublishError)
    with pytest.raises(ValueError):
        transport.publish_many([(q, envelope(5))], delays=[])
    assert transport.message_counts([QueueSpec(q)]) == {q: 1}


def test_countdown_and_retry_run_through_the_worker(
    make_app: Callable[..., App], prefix: str
) -> None:
    app = make_app(reliable_url(), transport_options={"key_prefix": prefix})
    starts: dict[str, list[float]] = {"later": [], "again": []}
    done = threading.Event()

    @app.task
    def later() -> None:
        starts["later"].append(time.monotonic())

    @app.task(max_retries=1)
    def again() -> None:
        starts["again"].append(time.monotonic())
        if len(starts["again"]) == 1:
            raise Retry(countdown=0.5)
        done.set()

    with running_worker(app, concurrency=2):
        sent = time.monotonic()
        later.apply_async(countdown=0.7)
        again.delay()
        assert done.wait(10)
        wait_for(lambda: starts["later"], "the countdown task to start", 5, 0.01)
    assert 0.7 - 0.01 <= starts["later"][0] - sent <= 1.2
    first, second = starts["again"]
    assert 0.5 - 0.01 <= second - first <= 1.0
