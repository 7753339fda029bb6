"""Broker URL -> transport."""

from __future__ import annotations

import pytest

from mqtasks import App, ConfigurationError, QueueSpec, UnknownTransport
from mqtasks.transport import (
    AmqpTransport,
    MemoryTransport,
    RedisKombuTransport,
    RedisTransport,
    resolve,
)


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("amqp://guest:guest@127.0.0.1//", AmqpTransport),
        ("redis://127.0.0.1:6379/0", RedisTransport),
        ("rediss://127.0.0.1:6380/0", RedisTransport),
        ("redis+kombu://127.0.0.1:6379/0", RedisKombuTransport),
        ("memory://", MemoryTransport),
    ],
)
def test_scheme_picks_the_transport(url: str, cls: type) -> None:
    assert isinstance(resolve(url), cls)


def test_unknown_scheme_names_the_supported_ones_and_the_closest() -> None:
    with pytest.raises(UnknownTransport) as info:
        resolve("amqp2://127.0.0.1//")
    message = str(info.value)
    assert "'amqp2'" in message
    assert "Did you mean 'amqp'?" in message
    for scheme in ("amqp", "amqps", "redis", "rediss", "memory"):
        assert scheme in message


def test_unknown_scheme_surfaces_at_first_use_of_the_app() -> None:
    app = App("x", broker="zeromq://127.0.0.1:5555")
    with pytest.raises(ConfigurationError, match="Supported URL schemes"):
        _ = app.transport


def test_quorum_queues_refuse_priorities_with_a_way_out() -> None:
    with pytest.raises(ConfigurationError, match="queue_type='classic'"):
        AmqpTransport("amqp://127.0.0.1//").queue_arguments(QueueSpec("q", max_priority=5))


def test_amqp_queue_arguments() -> None:
    t = AmqpTransport("amqp://127.0.0.1//")
    spec = QueueSpec("q", queue_type="classic", max_priority=9, message_ttl=1.5, max_length=10)
    dead_letters = {"x-dead-letter-exchange": "mqtasks.dlx", "x-dead-letter-routing-key": "q"}
    assert t.queue_arguments(spec) == {
        **dead_letters,
        "x-max-priority": 9,
        "x-message-ttl": 1500,
        "x-max-length": 10,
        "x-overflow": "reject-publish",
    }
    assert t.queue_arguments(QueueSpec("q")) == {
        **dead_letters,
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert "x-dead-letter-exchange" not in t.queue_arguments(QueueSpec("q.dlq"))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis+kombu://h:1/0", "memory://"])
def test_brokers_without_ttl_or_max_length_say_so(url: str) -> None:
    with pytest.raises(ConfigurationError, match="use amqp://"):
        resolve(url).queue_arguments(QueueSpec("q", max_length=10))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "q", "max_priority": 0},
        {"name": "q", "message_ttl": 0},
        {"name": "q", "max_length": 0},
        {"name": "q", "overflow": "drop-tail"},
    ],
)
def test_queue_spec_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        QueueSpec(**kwargs)  # type: ignore[arg-type]


def test_the_old_name_of_the_redis_transport_still_resolves_with_a_warning() -> None:
    import mqtasks.transport

    with pytest.warns(DeprecationWarning, match="now mqtasks.transport.RedisTransport"):
        old = mqtasks.transport.ReliableRedisTransport
    assert old is RedisTransport


def test_kafka_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(ConfigurationError, match="StreamSpec") as info:
        App("kafka-app", broker="kafka://127.0.0.1:9092").transport  # noqa: B018
    assert not isinstance(info.value, UnknownTransport)
