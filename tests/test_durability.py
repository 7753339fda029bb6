"""The ``durability`` setting: ``local`` or ``replicated``, refused where the broker
cannot wait for a replica, and ``WAIT 1`` on the ``redis://`` publish path."""

from __future__ import annotations

import pytest

from mqtasks import App, PublishError, QueueSpec
from mqtasks.config import Settings
from mqtasks.exceptions import ConfigurationError
from mqtasks.transport import RedisTransport
from tests._helpers.brokers import require_broker
from tests._helpers.redis import envelope, key_prefix, make_transport


def test_durability_is_local_by_default_and_read_from_the_environment() -> None:
    assert Settings().durability == "local"
    settings = Settings.from_env(
        {"MQTASKS_DURABILITY": "replicated", "MQTASKS_BROKER_URL": "redis://127.0.0.1:6379/0"}
    )
    assert settings.durability == "replicated"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://localhost:6380/0",
        "redis+sentinel://s1:26379,s2:26379/mymaster/0",
        "rediss+sentinel://s1:26379/mymaster/0",
    ],
)
def test_replicated_is_accepted_on_the_redis_transport(url: str) -> None:
    assert Settings(broker_url=url, durability="replicated").durability == "replicated"


def test_an_unknown_durability_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'local' or 'replicated'"):
        Settings(broker_url="redis://127.0.0.1:6379/0", durability="fsync")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="'local' or 'replicated'"):
        Settings.from_env({"MQTASKS_DURABILITY": "always"})
    with pytest.raises(ConfigurationError, match="'local' or 'replicated'"):
        RedisTransport("redis://127.0.0.1:6379/0", durability="quorum")


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("amqp://guest:hunter2pw@127.0.0.1:5672//", "quorum queues"),
        ("memory://", "durability='local'"),
        ("redis+kombu://:hunter2pw@127.0.0.1:6379/0", "redis+kombu:// cannot wait"),
        ("sqs://127.0.0.1:4566", "durability='local'"),
    ],
)
def test_replicated_on_a_broker_that_cannot_wait_for_a_replica_is_refused(
    url: str, hint: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(broker_url=url, durability="replicated")
    assert hint in str(info.value)
    assert "hunter2pw" not in str(info.value)
    assert Settings(broker_url=url).durability == "local"


def test_replicated_publish_on_a_redis_without_replicas_raises_within_its_timeout() -> None:
    """The local Redis has no replica: ``WAIT 1`` returns 0 and nothing is silently accepted."""
    with key_prefix("durability") as prefix:
        transport = make_transport(prefix, durability="replicated", publish_timeout=0.5)
        local = make_transport(prefix, publish_timeout=0.5)
        try:
            if int(local.publisher().info("replication").get("connected_slaves", 0)):
                pytest.fail("the local Redis has a replica; this test needs one without")
            with pytest.raises(PublishError, match="no replica acknowledged") as info:
                transport.publish("q", envelope(1))
            assert info.value.task_id == "m1"
            assert transport.durability == "replicated"
            assert any("no connected replica" in w for w in transport.check_broker())
            local.publish("q", envelope(2))  # local durability: the primary's reply suffices
            assert local.message_counts([QueueSpec("q")]) == {"q": 2}
        finally:
            transport.close()
            local.close()


def test_the_app_gives_its_durability_to_the_transport_and_delay_waits_for_a_replica() -> None:
    """``App(durability="replicated")``: ``delay()`` itself raises when no replica has it."""
    with key_prefix("durability-app") as prefix:
        app = App(
            "durability",
            broker=require_broker("redis"),
            durability="replicated",
            publish_timeout=0.5,
            transport_options={"key_prefix": prefix},
        )

        @app.task(name="durability.noop")
        def noop() -> None: ...

        try:
            assert getattr(app.transport, "durability", None) == "replicated"
            with pytest.raises(PublishError, match="no replica acknowledged"):
                noop.delay()
        finally:
            app.close()
