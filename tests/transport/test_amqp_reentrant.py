"""A delivery handed on while another is being handed on waits for it.

Handing a delivery on may wait for a reply from RabbitMQ (an ordered delivery
handed back cancels its queue's consumer; a queue added is subscribed), and
py-amqp delivers what arrives meanwhile from inside that wait. Handled there,
each delivery could wait again, one stack level deeper each time: with a full
prefetch window that ended in a RecursionError that stopped the worker's I/O
thread.
"""

from __future__ import annotations

import contextlib
import time

from mqtasks import QueueSpec
from mqtasks.transport import resolve
from mqtasks.transport.base import Delivery, Envelope
from tests._helpers.brokers import require_broker, unique_name

MESSAGES = 300


def test_deliveries_arriving_during_a_broker_round_trip_are_not_handled_inside_it() -> None:
    transport = resolve(require_broker("amqp"), publish_timeout=5.0)
    spec = QueueSpec(unique_name("reentrant"))
    transport.declare([spec])
    consumer = transport.consumer([spec], prefetch=MESSAGES)
    got: list[str] = []
    depth = [0, 0]  # now, deepest

    def on_delivery(delivery: Delivery) -> None:
        depth[0] += 1
        depth[1] = max(depth[1], depth[0])
        try:
            got.append(delivery.body.decode())
            # A round trip to RabbitMQ, as a cancel or a consume is: what is
            # buffered behind it arrives meanwhile.
            consumer._consumer.channel.basic_qos(0, MESSAGES, False)  # type: ignore[attr-defined]
            consumer.ack(delivery)
        finally:
            depth[0] -= 1

    try:
        failed = transport.publish_many(
            [
                (spec.name, Envelope(body=str(n).encode(), message_id=str(n)))
                for n in range(MESSAGES)
            ]
        )
        assert not any(failed)
        consumer.start(on_delivery)
        deadline = time.monotonic() + 60
        while len(got) < MESSAGES and time.monotonic() < deadline:
            consumer.drain(0.2)
        assert got == [str(n) for n in range(MESSAGES)]  # in order, each once
        assert depth[1] == 1
    finally:
        with contextlib.suppress(Exception):
            consumer.close()
        with contextlib.suppress(Exception):
            transport.delete([spec, QueueSpec(spec.name + ".dlq")])
        transport.close()
