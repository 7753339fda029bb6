"""A live consumer adds and removes queues, and hands deliveries back in order.

What ordered processing by key needs of every transport: ``add_queue`` and
``remove_queue`` on a consumer that is draining (held deliveries of a removed
queue stay settleable; the prefetch bound holds over all queues; a reconnect
consumes the current queues), ``requeue_ordered`` putting deliveries back in
their order ahead of the queue's other messages, and RabbitMQ's
single-active-consumer queues handing over to the standby consumer in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest

from mqtasks import ConfigurationError, QueueSpec
from mqtasks.transport import Transport, resolve
from mqtasks.transport.base import Consumer, Delivery, Envelope
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.faults import close_amqp_connections, kill_redis_connections
from tests._helpers.redis import key_prefix, reliable_url
from tests._helpers.wait import wait_for

QueueType = Literal["quorum", "classic"]


class Broker:
    """A transport of one kind and the queues of one test, deleted at the end."""

    def __init__(self, kind: str, url: str, queue_type: QueueType | None = None, **opts: Any):
        self.kind = kind
        self.url = url
        self.queue_type = queue_type
        self.transport: Transport = resolve(url, publish_timeout=5.0, **opts)
        self.names: list[str] = []
        self.consumers: list[Consumer] = []

    def spec(self, label: str, **options: Any) -> QueueSpec:
        """A run-unique queue of this test."""
        spec = QueueSpec(unique_name(label), queue_type=self.queue_type, **options)
        self.names.append(spec.name)
        return spec

    def publish(self, spec: QueueSpec, label: str) -> None:
        self.transport.publish(spec.name, Envelope(body=label.encode(), message_id=label))

    def consumer(self, specs: list[QueueSpec], prefetch: int) -> Inbox:
        inbox = Inbox(self.transport.consumer(specs, prefetch=prefetch))
        self.consumers.append(inbox.consumer)
        return inbox

    def cut(self) -> int:
        """Have the broker drop this process's connections; return how many."""
        if self.kind == "redis":
            return kill_redis_connections(self.url)
        return close_amqp_connections()

    def close(self) -> None:
        for consumer in self.consumers:
            with contextlib.suppress(Exception):
                consumer.close()
        with contextlib.suppress(Exception):
            names = self.names + [n + ".dlq" for n in self.names]
            self.transport.delete([QueueSpec(n) for n in names])
        self.transport.close()


class Inbox:
    """A consumer driven by the test, as the worker's I/O thread drives it."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.got: list[Delivery] = []
        consumer.start(self.got.append)

    def labels(self, start: int = 0) -> list[str]:
        return [d.body.decode() for d in self.got[start:]]

    def pump(self, done: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        def step() -> bool:
            self.consumer.drain(0.05)
            return done()

        wait_for(step, lambda: f"{what}; got {self.labels()}", timeout, interval=0)

    def take(self, count: int, timeout: float = 15.0) -> None:
        """Drain until ``count`` deliveries in all have arrived."""
        self.pump(lambda: len(self.got) >= count, f"{count} deliveries", timeout)

    def settle_round(self, rounds: int = 10) -> None:
        """Drain a few more times, so that what could still arrive does."""
        for _ in range(rounds):
            self.consumer.drain(0.03)


@contextlib.contextmanager
def broker_of(kind: str) -> Iterator[Broker]:
    if kind == "memory":
        made = Broker(kind, require_broker("memory"))
    elif kind == "redis":
        with key_prefix("dyn") as prefix:
            made = Broker(kind, reliable_url(), transport_options={"key_prefix": prefix})
            try:
                yield made
            finally:
                made.close()
        return
    else:
        queue_type: QueueType = "classic" if kind == "amqp-classic" else "quorum"
        made = Broker("amqp", require_broker("amqp"), queue_type)
    try:
        yield made
    finally:
        made.close()


KINDS = ["memory", "redis", "amqp-quorum", "amqp-classic"]
#: Kinds whose connection the broker can cut.
RECONNECTING = ["redis", "amqp-quorum"]


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A transport of each kind that consumes dynamically (RabbitMQ with both queue types)."""
    with broker_of(request.param) as made:
        yield made


def test_requeue_ordered_redelivers_in_order_ahead_of_later_messages(broker: Broker) -> None:
    spec = broker.spec("ord")
    broker.transport.declare([spec])
    for n in range(5):
        broker.publish(spec, f"m{n}")
    inbox = broker.consumer([spec], prefetch=5)
    inbox.take(5)
    assert inbox.labels() == ["m0", "m1", "m2", "m3", "m4"]
    # Given a sixth message ready behind the five held
    broker.publish(spec, "m5")
    inbox.settle_round()
    assert len(inbox.got) == 5
    # When the last four are handed back in order (then the first is acked)
    inbox.consumer.requeue_ordered(inbox.got[1:5])
    assert inbox.consumer.ack(inbox.got[0])
    # Then they come again in their order, before the sixth
    inbox.take(10)
    assert inbox.labels(5) == ["m1", "m2", "m3", "m4", "m5"]
    inbox.consumer.ack_many(inbox.got[5:])
    inbox.settle_round(3)
    inbox.consumer.close()
    assert broker.transport.message_counts([spec]) == {spec.name: 0}


def test_requeue_ordered_of_an_added_queue_does_not_wait_for_other_queues(
    broker: Broker,
) -> None:
    """A partition's hand-back comes back at once while deliveries of other queues are held."""
    base, part = broker.spec("base"), broker.spec("part")
    broker.transport.declare([base])
    broker.publish(base, "b0")
    inbox = broker.consumer([base], prefetch=10)
    inbox.take(1)
    inbox.consumer.add_queue(part)
    for n in range(4):
        broker.publish(part, f"p{n}")
    inbox.take(5)
    # When three of the added queue's are handed back while b0 stays held
    inbox.consumer.requeue_ordered(inbox.got[2:5])
    assert inbox.consumer.ack(inbox.got[1])
    broker.publish(part, "p4")
    # Then they come again in order, before a message published after them
    inbox.take(9)
    assert inbox.labels(5) == ["p1", "p2", "p3", "p4"]
    inbox.consumer.ack_many(inbox.got[5:])
    assert inbox.consumer.ack(inbox.got[0])
    inbox.settle_round(3)
    inbox.consumer.close()
    assert broker.transport.message_counts([base, part]) == {base.name: 0, part.name: 0}


def test_an_added_queue_is_consumed_and_a_removed_one_stops(broker: Broker) -> None:
    first, added = broker.spec("a"), broker.spec("b")
    broker.transport.declare([first])
    inbox = broker.consumer([first], prefetch=10)
    inbox.settle_round(2)
    # When a queue is added to the live consumer (declared by it)
    inbox.consumer.add_queue(added)
    inbox.consumer.add_queue(added)  # twice: consumed once
    broker.publish(first, "a0")
    broker.publish(added, "b0")
    inbox.take(2)
    assert sorted((d.queue, d.body) for d in inbox.got) == [
        (first.name, b"a0"),
        (added.name, b"b0"),
    ]
    held_b = next(d for d in inbox.got if d.queue == added.name)
    # When it is removed while a delivery of it is held
    inbox.consumer.remove_queue(added.name)
    inbox.consumer.remove_queue(unique_name("never-consumed"))  # unknown: nothing
    broker.publish(added, "b1")
    broker.publish(first, "a1")
    inbox.take(3)
    inbox.settle_round()
    # Then nothing more comes from it, the held one still settles, and nothing was requeued
    assert inbox.labels(2) == ["a1"]
    assert broker.transport.message_counts([added]) == {added.name: 1}
    assert inbox.consumer.ack(held_b)
    inbox.consumer.ack_many([d for d in inbox.got if d is not held_b])
    inbox.settle_round(3)
    inbox.consumer.close()
    assert broker.transport.message_counts([first, added]) == {first.name: 0, added.name: 1}


def test_a_held_delivery_of_a_removed_queue_can_be_requeued_and_rejected(broker: Broker) -> None:
    spec, other = broker.spec("rm"), broker.spec("keep")
    broker.transport.declare([spec, other])
    broker.publish(spec, "x0")
    broker.publish(spec, "x1")
    inbox = broker.consumer([spec, other], prefetch=4)
    inbox.take(2)
    inbox.consumer.remove_queue(spec.name)
    # When the held deliveries are settled after the removal
    assert inbox.consumer.requeue(inbox.got[0])
    assert inbox.consumer.reject(inbox.got[1])
    inbox.settle_round()
    # Then the requeued one waits in its queue, not delivered to this consumer again
    assert len(inbox.got) == 2
    assert broker.transport.message_counts([spec]) == {spec.name: 1}
    inbox.consumer.close()


def test_prefetch_bounds_the_deliveries_held_over_added_queues(broker: Broker) -> None:
    specs = [broker.spec(f"pf{i}") for i in range(3)]
    broker.transport.declare(specs[:1])
    inbox = broker.consumer(specs[:1], prefetch=3)
    for spec in specs[1:]:
        inbox.consumer.add_queue(spec)
    for spec in specs:
        for n in range(4):
            broker.publish(spec, f"{spec.name[-3:]}-{n}")
    inbox.take(3)
    inbox.settle_round(20)
    # Then three are held in all, not three per queue
    assert len(inbox.got) == 3
    # When one is acked, exactly one more comes
    inbox.consumer.ack(inbox.got[0])
    inbox.take(4)
    inbox.settle_round(20)
    assert len(inbox.got) == 4
    inbox.consumer.close()


def test_a_queue_added_to_a_full_window_waits_for_room(broker: Broker) -> None:
    a, b = broker.spec("full"), broker.spec("late")
    broker.transport.declare([a])
    for n in range(4):
        broker.publish(a, f"a{n}")
    inbox = broker.consumer([a], prefetch=2)
    inbox.take(2)
    # When a queue is added while the window is full
    inbox.consumer.add_queue(b)
    for n in range(2):
        broker.publish(b, f"b{n}")
    inbox.settle_round()
    assert len(inbox.got) == 2
    # Then, settling one at a time, never more than two are held, and all arrive
    acked = 0
    while acked < 6:
        assert len(inbox.got) - acked <= 2, inbox.labels()
        inbox.consumer.ack(inbox.got[acked])
        acked += 1
        if acked < 6:
            inbox.take(min(6, acked + 1))
    inbox.settle_round()
    assert len(inbox.got) == 6
    assert sorted(inbox.labels()) == ["a0", "a1", "a2", "a3", "b0", "b1"]
    inbox.consumer.close()


@pytest.mark.parametrize("kind", RECONNECTING)
def test_a_reconnect_consumes_the_current_queues(kind: str) -> None:
    with broker_of(kind) as broker:
        kept, added, removed = broker.spec("kept"), broker.spec("added"), broker.spec("removed")
        broker.transport.declare([kept, removed])
        inbox = broker.consumer([kept, removed], prefetch=10)
        inbox.settle_round(2)
        inbox.consumer.add_queue(added)
        inbox.consumer.remove_queue(removed.name)
        # When the broker drops the consumer's connections
        assert broker.cut() >= 1
        inbox.settle_round(3)
        for spec in (kept, added, removed):
            broker.publish(spec, spec.name[-12:])
        inbox.take(2)
        inbox.settle_round()
        # Then it consumes the added queue and not the removed one
        assert sorted(d.queue for d in inbox.got) == sorted([kept.name, added.name])
        assert broker.transport.message_counts([removed]) == {removed.name: 1}
        inbox.consumer.ack_many(inbox.got)
        inbox.settle_round(3)
        inbox.consumer.close()


def test_memory_reconnect_consumes_the_current_queues() -> None:
    with broker_of("memory") as broker:
        kept, added, removed = broker.spec("kept"), broker.spec("added"), broker.spec("removed")
        broker.transport.declare([kept, removed])
        inbox = broker.consumer([kept, removed], prefetch=10)
        inbox.consumer.add_queue(added)
        inbox.consumer.remove_queue(removed.name)
        # When the consumer builds its connection anew (memory:// is never cut)
        inbox.consumer._reconnect()  # type: ignore[attr-defined]
        for spec in (kept, added, removed):
            broker.publish(spec, spec.name[-12:])
        inbox.take(2)
        inbox.settle_round()
        assert sorted(d.queue for d in inbox.got) == sorted([kept.name, added.name])
        assert broker.transport.message_counts([removed]) == {removed.name: 1}
        inbox.consumer.close()


def test_redis_kombu_refuses_to_change_its_queues_while_consuming() -> None:
    require_broker("redis")
    url = reliable_url().replace("redis://", "redis+kombu://", 1)
    transport = resolve(url)
    consumer = transport.consumer([QueueSpec(unique_name("rk"))], prefetch=1)
    with pytest.raises(ConfigurationError, match="cannot change its queues while consuming"):
        consumer.add_queue(QueueSpec(unique_name("rk")))
    with pytest.raises(ConfigurationError, match="cannot change its queues while consuming"):
        consumer.remove_queue("anything")
    transport.close()


@pytest.mark.parametrize(
    ("queue_type", "delivery_limit"),
    [
        ("quorum", None),
        # A classic queue's redeliveries are counted by republishing them to the
        # back of the queue (amqp/delivery_count.py); uncounted, they keep their places.
        ("classic", 0),
    ],
)
def test_single_active_consumer_delivers_to_one_and_hands_over_in_order(
    queue_type: QueueType, delivery_limit: int | None
) -> None:
    with broker_of(f"amqp-{queue_type}") as broker:
        spec = broker.spec("sac", single_active_consumer=True, delivery_limit=delivery_limit)
        broker.transport.declare([spec])
        active = broker.consumer([spec], prefetch=2)
        active.settle_round(3)
        standby = broker.consumer([spec], prefetch=10)
        standby.settle_round(3)
        for n in range(6):
            broker.publish(spec, f"s{n}")
        # Then only the first consumer gets deliveries
        active.take(2)
        standby.settle_round()
        active.settle_round()
        assert active.labels() == ["s0", "s1"]
        assert standby.got == []
        active.consumer.ack(active.got[0])
        active.take(3)
        assert active.labels() == ["s0", "s1", "s2"]
        # When the active one closes holding s1 and s2
        active.consumer.close()
        # Then the standby takes over, from s1 on, in order
        standby.take(5)
        standby.settle_round()
        assert standby.labels() == ["s1", "s2", "s3", "s4", "s5"]
        standby.consumer.ack_many(standby.got)
        standby.settle_round(3)


def test_redis_a_dead_consumers_deliveries_of_a_removed_queue_are_restored() -> None:
    """A removed queue's processing list stays registered while deliveries of it are held."""
    import redis

    from tests._helpers.brokers import REDIS_URL

    with broker_of("redis") as broker:
        a, b, c = broker.spec("a"), broker.spec("b"), broker.spec("c")
        broker.transport.declare([a, b])
        broker.publish(b, "b0")
        inbox = broker.consumer([a, b], prefetch=5)
        inbox.take(1)
        # Given a delivery of b held, b removed and c added
        inbox.consumer.remove_queue(b.name)
        inbox.consumer.add_queue(c)
        broker.publish(c, "c0")
        inbox.take(2)
        held_b, held_c = inbox.got
        assert (held_b.queue, held_c.queue) == (b.name, c.name)
        assert held_b.proc_key != held_c.proc_key  # type: ignore[attr-defined]
        # When the consumer dies (its liveness key gone) and another one sweeps
        raw = redis.Redis.from_url(REDIS_URL)
        raw.delete(broker.transport.alive_key(inbox.consumer.consumer_id))  # type: ignore[attr-defined]
        raw.close()
        other = broker.consumer([broker.spec("other")], prefetch=1)
        other.settle_round(2)
        # Then both held messages are back in their queues
        counts = broker.transport.message_counts([b, c])
        assert counts == {b.name: 1, c.name: 1}


@pytest.mark.parametrize("kind", ["amqp-quorum", "amqp-classic"])
def test_a_delivery_sent_while_a_removed_queue_is_cancelled_keeps_its_channel_open(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ may send a delivery of an added queue while its consumer is being
    cancelled: it is handed on, stays settleable, and the queue's channel closes only
    once it is settled; the window it held is whole again for the next queue."""
    import time

    with broker_of(kind) as broker:
        base, added, later = broker.spec("base"), broker.spec("gone"), broker.spec("next")
        broker.transport.declare([base])
        inbox = broker.consumer([base], prefetch=2)
        consumer: Any = inbox.consumer
        consumer.add_queue(added)
        inbox.settle_round(3)
        cancel = consumer._cancel_queue

        def cancel_after_a_delivery_was_sent(name: str, main: Any) -> None:
            if name == added.name and not inbox.got:
                broker.publish(added, "in-flight")
                time.sleep(0.3)  # RabbitMQ sends it before it reads the cancel
            cancel(name, main)

        monkeypatch.setattr(consumer, "_cancel_queue", cancel_after_a_delivery_was_sent)
        # When the queue is removed and a delivery of it arrives during the cancel
        consumer.remove_queue(added.name)
        assert inbox.labels() == ["in-flight"]
        # Then it is still held on an open channel: the ack reaches RabbitMQ
        assert consumer.ack(inbox.got[0])
        inbox.settle_round(3)
        # And the window it took is free again: a queue added next is consumed
        consumer.add_queue(later)
        broker.publish(later, "later-0")
        inbox.take(2)
        assert inbox.labels() == ["in-flight", "later-0"]
        consumer.ack(inbox.got[1])
        inbox.settle_round(3)
        consumer.close()
        assert broker.transport.message_counts([added, later]) == {added.name: 0, later.name: 0}
