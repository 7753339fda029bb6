"""RabbitMQ queue depths are read over one kept connection, made again after an error.

The autoscaler and the StatsD gauges read ``message_counts`` every few
seconds; each reading used to open and close a connection of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from mqtasks import QueueSpec
from mqtasks.exceptions import QueueNotFound
from mqtasks.transport import Transport, resolve
from mqtasks.transport.base import Envelope
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.faults import close_amqp_connections, own_local_ports


@pytest.fixture
def amqp() -> Iterator[Transport]:
    transport = resolve(require_broker("amqp"), publish_timeout=5.0)
    try:
        yield transport
    finally:
        transport.close()


def test_readings_share_one_connection(amqp: Transport) -> None:
    spec = QueueSpec(unique_name("counts"))
    amqp.declare([spec])
    try:
        amqp.publish(spec.name, Envelope(body=b"x", message_id="m1"))
        before = own_local_ports(5672)
        assert amqp.message_counts([spec]) == {spec.name: 1}
        kept = own_local_ports(5672)
        # Then the reading left one connection open for the next ones
        assert len(kept - before) == 1
        for _ in range(4):
            assert amqp.message_counts([spec]) == {spec.name: 1}
            # And the next readings go over it: no connection opened or closed
            assert own_local_ports(5672) == kept
    finally:
        amqp.delete([spec, QueueSpec(spec.name + ".dlq")])


def test_a_reading_after_the_broker_closed_the_connection_makes_a_new_one(
    amqp: Transport,
) -> None:
    spec = QueueSpec(unique_name("counts-cut"))
    amqp.declare([spec])
    try:
        assert amqp.message_counts([spec]) == {spec.name: 0}
        # When RabbitMQ closes the kept connection (and the publishing ones)
        assert close_amqp_connections() >= 1
        # Then the next reading still answers, over a new connection
        assert amqp.message_counts([spec]) == {spec.name: 0}
    finally:
        amqp.delete([spec, QueueSpec(spec.name + ".dlq")])


def test_a_missing_queue_is_reported_and_the_next_reading_works(amqp: Transport) -> None:
    spec = QueueSpec(unique_name("counts-ok"))
    amqp.declare([spec])
    try:
        with pytest.raises(QueueNotFound):
            amqp.message_counts([QueueSpec(unique_name("never-declared"))])
        # The channel the missing queue closed is not reused
        assert amqp.message_counts([spec]) == {spec.name: 0}
    finally:
        with contextlib.suppress(Exception):
            amqp.delete([spec, QueueSpec(spec.name + ".dlq")])
