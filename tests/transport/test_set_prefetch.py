"""A live consumer's prefetch bound changes: raised, more arrives; lowered, the excess drains.

What autoscaling needs of every transport (``Consumer.set_prefetch``): a
consumer whose bound is raised receives more unacknowledged deliveries at once;
lowered, it receives nothing until fewer than the new bound are held, and then
holds no more than the new bound. On RabbitMQ the bound is split over the
queues' consumers, so a consumer of two queues is checked too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from mqtasks import QueueSpec
from mqtasks.transport.base import Delivery
from tests._helpers.brokers import require_broker
from tests._helpers.redis import reliable_url
from tests.transport.test_dynamic_consume import KINDS, RECONNECTING, Broker, Inbox, broker_of


def _held(inbox: Inbox, settled: list[Delivery]) -> list[Delivery]:
    return [d for d in inbox.got if d not in settled]


def _ack(inbox: Inbox, settled: list[Delivery], count: int) -> None:
    for delivery in _held(inbox, settled)[:count]:
        assert inbox.consumer.ack(delivery)
        settled.append(delivery)


def _fill(broker: Broker, specs: list[QueueSpec], per_queue: int) -> None:
    broker.transport.declare(specs)
    for spec in specs:
        for i in range(per_queue):
            broker.publish(spec, f"{spec.name}-{i}")


def _kinds() -> list[str]:
    return [*KINDS, "redis+kombu"]


@contextlib.contextmanager
def _broker(kind: str) -> Iterator[Broker]:
    if kind != "redis+kombu":
        with broker_of(kind) as broker:
            yield broker
        return
    require_broker("redis")
    broker = Broker(kind, reliable_url().replace("redis://", "redis+kombu://", 1))
    try:
        yield broker
    finally:
        broker.close()


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("kind", _kinds())
def test_raised_prefetch_receives_more_unacked(kind: str, queues: int) -> None:
    with _broker(kind) as broker:
        specs = [broker.spec(f"pf{i}") for i in range(queues)]
        _fill(broker, specs, 20)
        inbox = broker.consumer(specs, prefetch=2)
        inbox.take(2)
        inbox.settle_round()
        assert len(inbox.got) == 2, "the first bound holds"

        # When the bound is raised, nothing being settled
        inbox.consumer.set_prefetch(8)
        inbox.take(8)
        inbox.settle_round()

        # Then the consumer holds the new bound, no more
        assert len(inbox.got) == 8
        assert inbox.consumer.prefetch == 8
        if queues == 2:
            assert {d.queue for d in inbox.got} == {s.name for s in specs}


@pytest.mark.parametrize("queues", [1, 2])
@pytest.mark.parametrize("kind", _kinds())
def test_lowered_prefetch_holds_the_new_bound_once_the_excess_is_settled(
    kind: str, queues: int
) -> None:
    with _broker(kind) as broker:
        specs = [broker.spec(f"pf{i}") for i in range(queues)]
        _fill(broker, specs, 20)
        settled: list[Delivery] = []
        inbox = broker.consumer(specs, prefetch=8)
        inbox.take(8)

        # When the bound is lowered below what is held, and some are settled
        inbox.consumer.set_prefetch(3)
        _ack(inbox, settled, 4)
        inbox.settle_round()

        # Then nothing more came while 4 (over 3) are still held
        assert len(inbox.got) == 8
        assert len(_held(inbox, settled)) == 4

        # And once the excess is settled, the consumer fills up to the new bound only
        _ack(inbox, settled, 3)
        inbox.pump(lambda: len(_held(inbox, settled)) >= 3, "3 held again")
        inbox.settle_round()
        assert len(_held(inbox, settled)) == 3
        for _ in range(3):  # and keeps to it while deliveries come and go
            _ack(inbox, settled, 2)
            inbox.pump(lambda: len(_held(inbox, settled)) >= 3, "3 held again")
            inbox.settle_round()
            assert len(_held(inbox, settled)) == 3


@pytest.mark.parametrize("kind", ["memory"])
def test_prefetch_below_one_is_refused(kind: str) -> None:
    with _broker(kind) as broker:
        inbox = broker.consumer([broker.spec("pf")], prefetch=2)
        with pytest.raises(ValueError, match="at least 1"):
            inbox.consumer.set_prefetch(0)
        assert inbox.consumer.prefetch == 2


@pytest.mark.parametrize("kind", _kinds())
def test_a_cancelled_consumer_receives_nothing_after_its_bound_was_raised(kind: str) -> None:
    with _broker(kind) as broker:
        specs = [broker.spec("pf")]
        _fill(broker, specs, 20)
        settled: list[Delivery] = []
        inbox = broker.consumer(specs, prefetch=2)
        inbox.take(2)
        inbox.consumer.set_prefetch(6)  # amqp: a second consumer of the queue, for 4 more
        inbox.take(6)

        # When the consumer is cancelled (a worker stopping) and what it held is settled
        inbox.consumer.cancel()
        _ack(inbox, settled, 6)
        inbox.settle_round()

        # Then nothing more came, through any of the queue's consumers
        assert len(inbox.got) == 6
        assert broker.transport.message_counts(specs) == {specs[0].name: 14}


@pytest.mark.parametrize("kind", RECONNECTING)
def test_a_reconnect_keeps_the_new_bound(kind: str) -> None:
    with broker_of(kind) as broker:
        specs = [broker.spec("pf")]
        _fill(broker, specs, 20)
        inbox = broker.consumer(specs, prefetch=2)
        inbox.take(2)
        inbox.consumer.set_prefetch(5)
        inbox.take(5)

        # When the broker drops the consumer's connection
        assert broker.cut() >= 1
        consumer = inbox.consumer

        def live() -> list[Delivery]:
            return [d for d in inbox.got if d.generation == consumer.generation]

        # Then, connected again, it holds the new bound (RabbitMQ took the old ones back)
        inbox.pump(lambda: len(live()) >= 5, "5 deliveries of the new connection")
        inbox.settle_round()
        assert len(live()) == 5
        assert consumer.prefetch == 5
