"""Redis behind Sentinel: the transport and the backend follow a failover
without a restart, and ``durability="replicated"`` refuses what no replica holds.

The test starts its own primary, replica and three Sentinels on free loopback
ports (:class:`reliability.redis_sentinel.SentinelGroup`) and stops them at the
end; the machine's shared Redis is never touched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.connection import SSLConnection
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from mqtasks import PublishError
from mqtasks._redis_sentinel import connection_pool, database, parse_sentinel_url
from mqtasks._url import mask_url, redact
from mqtasks.backend.redis import RedisBackend
from mqtasks.exceptions import ConfigurationError
from mqtasks.transport import RedisTransport
from mqtasks.transport.tls import TLSOptions
from reliability.redis_sentinel import SentinelGroup
from tests._helpers.brokers import unique_name
from tests._helpers.redis import Inbox, envelope, make_transport

pytestmark = pytest.mark.integration

#: Seconds a publish may take here (a WAIT with no replica lasts about this long).
PUBLISH_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A primary, a replica and three Sentinels of this module's own."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    sentinels = SentinelGroup(Path(tmp_path_factory.mktemp("sentinel")), down_after_ms=1000)
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.stop()


def _transport(group: SentinelGroup, **options: object) -> RedisTransport:
    return make_transport(
        "{" + unique_name("sentinel") + "}",
        group.url,
        publish_timeout=PUBLISH_TIMEOUT,
        **options,
    )


# -- the URL ------------------------------------------------------------------------


def test_sentinel_url_is_parsed_into_sentinels_service_and_database() -> None:
    url = "rediss+sentinel://app:pw%40x@s1:26380,s2,[::1]:26381/mymaster/3?sentinel_password=sp"
    parsed = parse_sentinel_url(url)
    assert parsed.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (parsed.service, parsed.db, parsed.tls) == ("mymaster", 3, True)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == ("app", "pw@x", "sp")
    assert database(url) == 3
    assert "pw" not in repr(parsed) and "sp" not in repr(parsed)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:secretpw1@s1:26379/",
        "redis+sentinel://:secretpw1@s1:26379/mymaster/zero",
        "redis+sentinel://:secretpw1@/mymaster/0",
        "redis+sentinel://:secretpw1@s1:99999/mymaster/0",
        "redis+sentinel://:secretpw1@s1/mymaster/0?socket_timeout=3",
    ],
)
def test_a_bad_sentinel_url_is_refused_with_its_password_masked(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connection_pool(url, tls=TLSOptions())
    assert "secretpw1" not in str(info.value)
    assert "redis+sentinel://:**@" in str(info.value)


def test_rediss_sentinel_verifies_tls_to_the_data_nodes_and_the_sentinels() -> None:
    pool = connection_pool("rediss+sentinel://:pw@s1:26379/mymaster/2", tls=TLSOptions())
    assert isinstance(pool, SentinelConnectionPool)
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert pool.connection_kwargs["db"] == 2
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert issubclass(sentinel.connection_class, SSLConnection)
    assert sentinel.connection_kwargs["ssl_check_hostname"] is True


def test_both_passwords_of_a_sentinel_url_are_masked() -> None:
    url = "redis+sentinel://:datapw123@s1:26379,s2:26379/mymaster/0?sentinel_password=sentpw456"
    for text in (mask_url(url), redact(f"failed on {url}: boom"), repr(RedisTransport(url))):
        assert "datapw123" not in text and "sentpw456" not in text, text
    assert mask_url(url) == "redis+sentinel://:**@s1:26379,s2:26379/mymaster/0"


# -- against a Sentinel group -----------------------------------------------------


def test_replicated_publish_raises_when_no_replica_acknowledges(group: SentinelGroup) -> None:
    transport = _transport(group, durability="replicated")
    plain = _transport(group)
    try:
        transport.publish("q", envelope(1))  # a replica is there: WAIT 1 returns 1
        assert not any("replica" in w for w in transport.check_broker())
        replica = group.other(group.primary())
        replica.kill()
        # Given no replica, a replicated publish reaches the primary but is refused
        with pytest.raises(PublishError, match="no replica acknowledged") as info:
            transport.publish("q", envelope(2))
        assert info.value.task_id == "m2"
        assert group.password not in str(info.value)
        results = transport.publish_many([("q", envelope(3)), ("q", envelope(4))])
        assert all(isinstance(r, PublishError) for r in results), results
        assert any("no connected replica" in w for w in transport.check_broker())
        # while a plain publish is accepted by the primary alone
        plain.publish("q", envelope(5))
    finally:
        if group.other(group.primary()).proc is None:
            group.restart(group.other(group.primary()))
        transport.close()
        plain.close()
    assert group.wait_synced(30) is not None


def test_transport_and_backend_follow_a_failover_without_a_restart(group: SentinelGroup) -> None:
    transport = _transport(group, durability="replicated")
    backend = RedisBackend(group.url, key_prefix=unique_name("sentinel-backend") + ":")
    inbox = Inbox(transport, ["q"], prefetch=4)
    try:
        transport.publish("q", envelope(1))
        inbox.pump(lambda: inbox.ids() == ["m1"])
        backend.client().set(backend.key("k"), b"before")
        old = group.primary()
        # When the primary is killed and the Sentinels promote the replica
        old.kill()
        assert group.wait_failover(old.port, 30) is not None
        group.restart(old)  # back as a replica, so that WAIT 1 can succeed again
        assert group.primary() is not old
        # Then the same transport, consumer and backend work on the new primary
        transport.publish("q", envelope(2))
        inbox.pump(lambda: inbox.ids() == ["m1", "m2"], timeout=30)
        assert backend.client().get(backend.key("k")) == b"before"
        backend.client().set(backend.key("k"), b"after")
        assert backend.client().get(backend.key("k")) == b"after"
    finally:
        inbox.consumer.close()
        transport.close()
        backend.close()
