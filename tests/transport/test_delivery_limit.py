"""Crash loops end: a message that keeps coming back is dead-lettered, not looped."""

from __future__ import annotations

import time

import pytest

from mqtasks import ConfigurationError, QueueSpec
from mqtasks.transport import resolve


def test_a_message_delivered_past_its_limit_lands_in_the_dead_letters(
    amqp_url, make_app, queue_name
) -> None:
    name = queue_name("crashy")
    app = make_app(amqp_url, queues=[QueueSpec(name, delivery_limit=2)])

    @app.task(queue=name)
    def crashes() -> None: ...

    handle = crashes.delay()
    deliveries = 0
    with app.transport.connection() as conn:
        channel = conn.channel()
        # Given a worker that dies with the message every time (it never acks;
        # a requeue is what RabbitMQ does when a consumer's connection dies)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            raw = channel.basic_get(name, no_ack=False)
            if raw is None:
                if app.transport.message_counts([QueueSpec(name + ".dlq")])[name + ".dlq"]:
                    break
                time.sleep(0.05)
                continue
            deliveries += 1
            channel.basic_reject(raw.delivery_tag, requeue=True)
        # Then after limit + 1 deliveries it is in the dead-letter queue, with the
        # broker's reason, and no longer in the work queue
        dead = channel.basic_get(name + ".dlq", no_ack=True)
    assert deliveries == 3
    assert dead is not None
    assert dead.properties["message_id"] == handle.id
    [death] = dead.properties["application_headers"]["x-death"]
    assert death["reason"] == "delivery_limit"
    assert app.transport.message_counts([app.queue(name)]) == {name: 0}


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis+kombu://h:1/0", "memory://"])
def test_brokers_that_do_not_count_deliveries_say_so(url: str) -> None:
    with pytest.raises(ConfigurationError, match="delivery_limit"):
        resolve(url).queue_arguments(QueueSpec("q", delivery_limit=3))


def test_classic_rabbitmq_queues_do_not_count_deliveries() -> None:
    with pytest.raises(ConfigurationError, match="queue_type='quorum'"):
        resolve("amqp://127.0.0.1//").queue_arguments(
            QueueSpec("q", queue_type="classic", delivery_limit=3)
        )
