"""Topic exchanges (events) on every transport that routes them: memory, the local
RabbitMQ and the local Redis. Bindings, fan-out to each matching queue once,
``*`` and ``#``, unroutable events, unbinding, and a consumer receiving what
was emitted; ``redis+kombu://`` refuses.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mqtasks import (
    ConfigurationError,
    ConnectionFailed,
    PublishError,
    PublishNacked,
    QueueSpec,
    Unroutable,
)
from mqtasks.testing import fake_redis_app
from mqtasks.transport import Transport, resolve
from mqtasks.transport.base import DLQ_SUFFIX, Delivery
from mqtasks.transport.envelope import Envelope
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.redis import RedisTransport
from mqtasks.transport.redis.element import encode_element, priority_level
from mqtasks.transport.redis.exchanges import exchange_key
from mqtasks.transport.redis.scripts import TOPIC
from mqtasks.transport.tls import TLSOptions
from mqtasks.transport.topic import check_pattern, topic_matches
from reliability.pki import make_pki
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.servers import start_rabbitmq_tls, start_redis, stop
from tests._helpers.wait import wait_for
from tests.transport.test_topic import CASES

KINDS = [
    "memory",
    pytest.param("amqp", marks=pytest.mark.integration),
    pytest.param("redis", marks=pytest.mark.integration),
]


def delete_exchange(transport: Transport, exchange: str) -> None:
    """Remove what a test declared for ``exchange`` beyond its queues."""
    for pattern, queue in transport.bindings(exchange):
        transport.unbind(exchange, pattern, queue)
    if isinstance(transport, KombuTransport) and not transport.capabilities.in_process:
        with transport.connection() as conn:
            conn.default_channel.exchange_delete(exchange)
    if isinstance(transport, RedisTransport):
        transport.publisher().delete(exchange_key(transport, exchange))


def rabbitmqctl(*args: str) -> list[list[str]]:
    """Rows of ``rabbitmqctl <args>`` on the local RabbitMQ node (tab-separated)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line]


class Events:
    """A transport and the exchange and queues of one test, all deleted at the end."""

    def __init__(self, url: str, **tls: Any) -> None:
        options: dict[str, Any] = {"tls": TLSOptions(**tls)} if tls else {}
        self.transport = resolve(url, publish_timeout=5.0, **options)
        self.exchange = unique_name("ex").replace("-", ".")
        self.queues: list[str] = []

    def queue(self, label: str, **options: Any) -> QueueSpec:
        spec = QueueSpec(unique_name(label), **options)
        self.queues.append(spec.name)
        return spec

    def counts(self) -> dict[str, int]:
        return self.transport.message_counts([QueueSpec(q) for q in self.queues])

    def close(self) -> None:
        try:
            delete_exchange(self.transport, self.exchange)
            names = self.queues + [q + DLQ_SUFFIX for q in self.queues]
            self.transport.delete([QueueSpec(n) for n in names])
        finally:
            self.transport.close()


@pytest.fixture(params=KINDS)
def events(request: pytest.FixtureRequest) -> Iterator[Events]:
    """A transport of each kind that routes events, with a run-unique exchange."""
    made = Events(require_broker(request.param))
    yield made
    made.close()


def envelope(n: int, **kwargs: Any) -> Envelope:
    return Envelope(body=b'{"n":%d}' % n, message_id=f"ev-{unique_name('m')}-{n}", **kwargs)


def receive(transport: Transport, spec: QueueSpec, count: int) -> list[Delivery]:
    """Consume ``count`` deliveries of ``spec`` with the transport's own consumer; ack them."""
    got: list[Delivery] = []
    consumer = transport.consumer([spec], prefetch=10)
    consumer.start(got.append)

    def arrived() -> bool:
        consumer.drain(0.05)
        return len(got) >= count

    try:
        wait_for(
            arrived,
            lambda: f"{count} deliveries; got {len(got)}",
            10.0,
            interval=0,
        )
        for delivery in got:
            consumer.ack(delivery)
        consumer.drain(0.05)
    finally:
        consumer.close()
    return got


def test_a_key_matching_two_bindings_reaches_each_queue_once(events: Events) -> None:
    t, ex = events.transport, events.exchange
    orders, audit, other = events.queue("orders"), events.queue("audit"), events.queue("other")
    t.bind(ex, "order.*", orders)
    t.bind(ex, "order.created", audit)
    t.bind(ex, "#.created", audit)  # a second match of the same queue: still one copy
    t.bind(ex, "invoice.#", other)
    # When an event matches orders once and audit twice
    got = t.emit(ex, "order.created", envelope(1))
    # Then each of the two queues holds it once, the third none
    assert got in (2, -1)
    assert events.counts() == {orders.name: 1, audit.name: 1, other.name: 0}


def test_star_is_one_word_and_hash_any_number(events: Events) -> None:
    t, ex = events.transport, events.exchange
    star, hash_ = events.queue("star"), events.queue("hash")
    t.bind(ex, "order.*", star)
    t.bind(ex, "order.#", hash_)
    for key in ("order", "order.created", "order.created.eu"):
        t.emit(ex, key, envelope(0))
    assert events.counts() == {star.name: 1, hash_.name: 3}


def test_no_matching_binding_raises_unroutable_or_drops_when_not_mandatory(
    events: Events,
) -> None:
    t, ex = events.transport, events.exchange
    spec = events.queue("orders")
    t.bind(ex, "order.*", spec)
    sent = envelope(1)
    with pytest.raises(Unroutable, match="NOT published") as info:
        t.emit(ex, "invoice.paid", sent)
    assert info.value.task_id == sent.message_id
    assert t.emit(ex, "invoice.paid", envelope(2), mandatory=False) in (0, -1)
    assert events.counts() == {spec.name: 0}


def test_unbind_stops_delivery_and_bindings_lists_what_is_bound(events: Events) -> None:
    t, ex = events.transport, events.exchange
    a, b = events.queue("a"), events.queue("b")
    t.bind(ex, "x.#", a)
    t.bind(ex, "x.*", b)
    t.bind(ex, "x.*", b)  # idempotent
    assert t.bindings(ex) == [("x.#", a.name), ("x.*", b.name)]
    t.unbind(ex, "x.*", b.name)
    t.unbind(ex, "x.*", b.name)  # absent: nothing
    assert t.bindings(ex) == [("x.#", a.name)]
    t.emit(ex, "x.y", envelope(1))
    assert events.counts() == {a.name: 1, b.name: 0}


def test_a_consumer_receives_the_emitted_envelope_with_headers_intact(events: Events) -> None:
    t, ex = events.transport, events.exchange
    spec = events.queue("sub")
    t.bind(ex, "user.signed_up", spec)
    headers = {"mqtasks-event": "user.signed_up", "mqtasks-task": "user.signed_up", "n": 3}
    sent = envelope(7, headers=headers)
    t.emit(ex, "user.signed_up", sent)
    (delivery,) = receive(t, spec, 1)
    assert delivery.body == sent.body
    assert delivery.message_id == sent.message_id
    assert dict(delivery.headers) == headers
    assert delivery.content_type == sent.content_type


def test_priorities_are_respected_like_publish(events: Events) -> None:
    t, ex = events.transport, events.exchange
    spec = events.queue("prio", queue_type="classic", max_priority=9)
    t.bind(ex, "job", spec)
    for p in (None, 1, 9, 5):
        t.emit(ex, "job", envelope(p or 0, priority=p))
    got = receive(t, spec, 4)
    assert [d.body for d in got] == [b'{"n":9}', b'{"n":5}', b'{"n":1}', b'{"n":0}']


def test_bad_patterns_keys_and_exchanges_are_refused(events: Events) -> None:
    t, ex = events.transport, events.exchange
    spec = events.queue("q")
    with pytest.raises(ValueError, match="empty word"):
        t.bind(ex, "a..b", spec)
    with pytest.raises(ValueError, match="Exchange name"):
        t.bind("", "a", spec)
    with pytest.raises(ValueError, match="control character"):
        t.emit(ex, "a\nb", envelope(1))


@pytest.mark.integration
def test_redis_kombu_refuses_events_naming_the_schemes_that_route_them() -> None:
    url = require_broker("redis").replace("redis://", "redis+kombu://", 1)
    t = resolve(url)
    try:
        assert t.capabilities.exchanges is False
        for call in (
            lambda: t.bind("ev", "a.*", QueueSpec("q")),
            lambda: t.unbind("ev", "a.*", "q"),
            lambda: t.bindings("ev"),
            lambda: t.emit("ev", "a.b", envelope(1)),
        ):
            with pytest.raises(ConfigurationError, match=r"amqp://, redis:// or memory://"):
                call()
    finally:
        t.close()


def test_memory_reset_forgets_bindings() -> None:
    t = resolve("memory://")
    t.bind("ev", "a.*", QueueSpec("q"))
    t.reset()
    assert t.bindings("ev") == []


def exchange_bindings(exchange: str) -> list[tuple[str, str]]:
    """``(pattern, queue)`` bindings of ``exchange`` as RabbitMQ lists them, sorted."""
    rows = rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
    return sorted((row[2], row[1]) for row in rows if row[0] == exchange)


@pytest.mark.integration
def test_rabbitmq_holds_a_durable_topic_exchange_and_the_bindings(amqp_url: str) -> None:
    events = Events(amqp_url)
    ex = events.exchange
    try:
        t = events.transport
        a, b = events.queue("a"), events.queue("b")
        t.bind(ex, "order.*", a)
        t.bind(ex, "#", b)
        exchanges = {
            row[0]: row[1:] for row in rabbitmqctl("list_exchanges", "name", "type", "durable")
        }
        assert exchanges[ex] == ["topic", "true"]
        assert exchange_bindings(ex) == [("#", b.name), ("order.*", a.name)]
        # The queue is declared as declare() declares it: a quorum queue with its dead letters
        queues = {row[0]: row[1:] for row in rabbitmqctl("list_queues", "name", "type", "durable")}
        assert queues[a.name] == ["quorum", "true"]
        assert a.name + DLQ_SUFFIX in queues
        t.unbind(ex, "order.*", a.name)
        assert exchange_bindings(ex) == [("#", b.name)]
    finally:
        events.close()
    assert ex not in [row[0] for row in rabbitmqctl("list_exchanges", "name")]


# -- redis:// ------------------------------------------------------------------------


@pytest.fixture
def redis_events(redis_url: str) -> Iterator[Events]:
    """The local Redis with a run-unique exchange; its keys deleted at the end."""
    made = Events(redis_url)
    yield made
    made.close()


def redis_client(events: Events) -> redis.Redis[bytes]:
    transport = events.transport
    assert isinstance(transport, RedisTransport)
    return transport.publisher()


def _lua_matches(client: redis.Redis[bytes], pattern: str, keys: list[str]) -> list[bool]:
    """The Redis Lua matcher's verdict on ``pattern`` against each of ``keys``."""
    driver = (
        TOPIC
        + """
local p, out = words(ARGV[1]), {}
for i = 2, #ARGV do out[#out + 1] = matches(p, words(ARGV[i])) and 1 or 0 end
return out
"""
    )
    replies = client.eval(driver, 0, pattern, *keys)  # type: ignore[no-untyped-call]
    return [bool(r) for r in replies]


def test_the_lua_matcher_agrees_with_topic_matches(redis_events: Events) -> None:
    """On the table of cases, then on every small pattern and key (run in the real Redis)."""
    client = redis_client(redis_events)
    for pattern, key, expected in CASES:
        assert _lua_matches(client, pattern, [key]) == [expected], (pattern, key)
    keys = [""] + [
        ".".join(ws) for n in range(1, 5) for ws in itertools.product(["a", "b", ""], repeat=n)
    ]
    checked = 0
    for n in range(1, 5):
        for ws in itertools.product(["a", "b", "*", "#"], repeat=n):
            pattern = ".".join(ws)
            verdicts = [topic_matches(pattern, key) for key in keys]
            assert _lua_matches(client, pattern, keys) == verdicts, pattern
            checked += len(keys)
    assert checked > 10_000


def test_the_emit_script_routes_as_topic_matches_does(redis_events: Events) -> None:
    """End to end through bind and emit: one queue per pattern, a key per case."""
    t, ex = redis_events.transport, redis_events.exchange
    patterns = sorted({p for p, _, _ in CASES if " " not in p and "*" not in p.replace(".*", "")})
    specs = {}
    for pattern in patterns:
        try:
            check_pattern(pattern)
        except ValueError:
            continue
        specs[pattern] = redis_events.queue("m")
        t.bind(ex, pattern, specs[pattern])
    for key in sorted({k for _, k, _ in CASES}):
        t.purge(list(specs.values()))
        expected = sorted(s.name for p, s in specs.items() if topic_matches(p, key))
        got = t.emit(ex, key, envelope(1), mandatory=False)
        counts = t.message_counts(list(specs.values()))
        assert got == len(expected), key
        assert sorted(q for q, n in counts.items() if n) == expected, key


def test_emit_pushes_into_all_matching_queues_or_none(redis_events: Events) -> None:
    t, ex = redis_events.transport, redis_events.exchange
    assert isinstance(t, RedisTransport)
    a, broken, c = redis_events.queue("a"), redis_events.queue("broken"), redis_events.queue("c")
    for spec in (a, broken, c):
        t.bind(ex, "order.#", spec)
    # Given one of three matching queues is a key of another type
    redis_client(redis_events).set(t.queue_key(broken.name), "not a list")
    # When an event is emitted to all three
    with pytest.raises(PublishError, match="WRONGTYPE") as info:
        t.emit(ex, "order.created", envelope(1))
    # Then it fails, and no queue holds it: the pushes before the failure were undone
    assert broken.name in str(info.value)
    redis_client(redis_events).delete(t.queue_key(broken.name))
    assert redis_events.counts() == {a.name: 0, broken.name: 0, c.name: 0}
    # And once the key is a list again, all three get the next one
    assert t.emit(ex, "order.created", envelope(2)) == 3
    assert redis_events.counts() == {a.name: 1, broken.name: 1, c.name: 1}


def test_a_priority_emit_fails_whole_when_a_level_list_is_broken(redis_events: Events) -> None:
    t, ex = redis_events.transport, redis_events.exchange
    assert isinstance(t, RedisTransport)
    a, b = redis_events.queue("a"), redis_events.queue("b")
    t.bind(ex, "#", a)
    t.bind(ex, "#", b)
    redis_client(redis_events).set(t.level_key(b.name, 4), "x")
    with pytest.raises(PublishError, match="WRONGTYPE"):
        t.emit(ex, "k", envelope(1, priority=4))
    redis_client(redis_events).delete(t.level_key(b.name, 4))
    assert redis_events.counts() == {a.name: 0, b.name: 0}


def take_ready(client: redis.Redis[bytes], t: RedisTransport, queue: str) -> list[bytes]:
    """Remove and return every element of ``queue``'s ready lists (any priority level)."""
    pipe = client.pipeline(transaction=True)
    for key in t.ready_keys(queue):
        pipe.lrange(key, 0, -1)
    pipe.delete(*t.ready_keys(queue))
    return [e for found in pipe.execute()[:-1] for e in found]


def test_emitted_elements_are_those_publish_writes(redis_events: Events) -> None:
    """Same bytes as publish: consumers, dead letters and status read them unchanged;
    a queue's max_priority lowers the level as a publish's would."""
    t, ex = redis_events.transport, redis_events.exchange
    assert isinstance(t, RedisTransport)
    plain, capped = redis_events.queue("plain"), redis_events.queue("capped", max_priority=3)
    t.bind(ex, "#", plain)
    t.bind(ex, "#", capped)
    client = redis_client(redis_events)
    for sent in (
        envelope(1, headers={"mqtasks-event": "x", "k": [1, {"a": None}]}),
        envelope(2, priority=7),
    ):
        t.emit(ex, "x", sent)
        for spec in (plain, capped):
            level = priority_level(sent.priority, spec.max_priority)
            emitted = take_ready(client, t, spec.name)
            t.publish(spec.name, sent)
            published = take_ready(client, t, spec.name)
            assert emitted == published == [encode_element(sent, level)]
    assert redis_events.counts() == {plain.name: 0, capped.name: 0}


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a redis-server of this module's own (its command statistics are ours)."""
    proc, port = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield port
    stop(proc)


@pytest.mark.integration
def test_an_emit_is_one_command_from_the_client(private_redis: int) -> None:
    """``INFO commandstats`` counts the client's EVALSHA and, apart, what the script ran."""
    t = resolve(f"redis://127.0.0.1:{private_redis}/0")
    assert isinstance(t, RedisTransport)
    probe: redis.Redis[bytes] = redis.Redis(port=private_redis)
    try:
        specs = [QueueSpec(f"sub{i}") for i in range(3)]
        for spec in specs:
            t.bind("events", "order.*", spec)
        t.bind("events", "invoice.#", QueueSpec("other"))
        t.emit("events", "order.created", envelope(0))  # loads the script once
        probe.config_resetstat()
        for n in range(10):
            assert t.emit("events", "order.created", envelope(n)) == 3
        stats = probe.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        calls = {k: v for k, v in calls.items() if k != "info" and not k.startswith("config")}
        # Client: one EVALSHA per emit. Redis, inside it: HGETALL, then an LPUSH per subscriber.
        assert calls == {"evalsha": 10, "hgetall": 10, "lpush": 30}
        assert sum(calls.values()) / 10 <= 2 + len(specs)
    finally:
        probe.flushall()
        probe.close()
        t.close()


# -- failures ---------------------------------------------------------------------------


@pytest.mark.integration
def test_rabbitmq_nacks_an_emit_into_a_full_queue(amqp_url: str) -> None:
    events = Events(amqp_url)
    try:
        t, ex = events.transport, events.exchange
        full = events.queue("full", queue_type="classic", max_length=1)
        t.bind(ex, "job.#", full)
        t.emit(ex, "job.a", envelope(1))
        with pytest.raises(PublishNacked, match="NOT enqueued"):
            t.emit(ex, "job.a", envelope(2))
        assert events.counts() == {full.name: 1}
    finally:
        events.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    "url", ["amqp://guest:pw-Zq81x@127.0.0.1:1//", "redis://:pw-Zq81x@127.0.0.1:1/0"]
)
def test_emit_during_an_outage_fails_in_bounded_time_with_a_transport_error(url: str) -> None:
    t = resolve(url, publish_retries=1, publish_timeout=2, connect_timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises((PublishError, ConnectionFailed)) as info:
            t.emit("events", "a.b", envelope(1))
        assert time.monotonic() - started < 15
        assert "pw-Zq81x" not in str(info.value)
    finally:
        t.close()


@pytest.mark.integration
@pytest.mark.slow
def test_amqps_emits_through_the_pooled_path_with_the_same_outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Over TLS a publish goes through the producer pool, not the shared confirming
    channel: an emit there is confirmed, returned when unroutable, and received."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    proc, tls_port, _ = start_rabbitmq_tls(tmp_path_factory.mktemp("rabbit"), pki)
    try:
        events = Events(f"amqps://guest:guest@localhost:{tls_port}//", ca_file=str(pki.ca))
        try:
            t, ex = events.transport, events.exchange
            assert t.uses_tls
            a, b = events.queue("a"), events.queue("b")
            t.bind(ex, "order.*", a)
            t.bind(ex, "#.created", b)
            assert t.emit(ex, "order.created", envelope(1, headers={"k": "v"})) == -1
            with pytest.raises(Unroutable):
                t.emit(ex, "invoice.paid", envelope(2))
            assert t.emit(ex, "invoice.paid", envelope(3), mandatory=False) == -1
            assert events.counts() == {a.name: 1, b.name: 1}
            (delivery,) = receive(t, a, 1)
            assert dict(delivery.headers) == {"k": "v"}
        finally:
            events.close()
    finally:
        stop(proc)


@pytest.mark.integration
def test_rebinding_a_queue_with_another_max_priority_caps_every_binding_of_it(
    redis_events: Events,
) -> None:
    t, ex = redis_events.transport, redis_events.exchange
    assert isinstance(t, RedisTransport)
    spec = redis_events.queue("capped", max_priority=8)
    t.bind(ex, "a.#", spec)
    t.bind(ex, "b.#", QueueSpec(spec.name, max_priority=2))
    client = redis_client(redis_events)
    # An emit matching the first pattern only is capped at the queue's new max_priority
    sent = envelope(1, priority=7)
    assert t.emit(ex, "a.x", sent) == 1
    assert take_ready(client, t, spec.name) == [encode_element(sent, 2)]


def test_fake_redis_routes_events_as_redis_does() -> None:
    """``mqtasks.testing.fake_redis_app`` runs the same script on fakeredis."""
    app = fake_redis_app("t")
    t = app.transport
    try:
        t.bind("ev", "a.*", QueueSpec("q1"))
        t.bind("ev", "#", QueueSpec("q2"))
        assert t.emit("ev", "a.b", envelope(1)) == 2
        assert t.emit("ev", "c", envelope(2)) == 1
        with pytest.raises(Unroutable):
            t.emit("other", "a.b", envelope(3))
        assert isinstance(t, RedisTransport)
        t.publisher().set(t.queue_key("q2"), "x")
        with pytest.raises(PublishError, match="queue q2: WRONGTYPE"):
            t.emit("ev", "a.b", envelope(4))
        assert t.message_counts([QueueSpec("q1")]) == {"q1": 1}
    finally:
        app.close()


@pytest.mark.integration
def test_an_emit_to_a_full_redis_fails_and_stores_nothing(private_redis: int) -> None:
    """Under ``noeviction`` a Redis past ``maxmemory`` refuses the first push; the
    script then pushes nothing and the emit raises PublishError."""
    t = resolve(f"redis://127.0.0.1:{private_redis}/1")
    assert isinstance(t, RedisTransport)
    probe: redis.Redis[bytes] = redis.Redis(port=private_redis, db=1)
    try:
        specs = [QueueSpec("a"), QueueSpec("b")]
        for spec in specs:
            t.bind("events", "#", spec)
        probe.config_set("maxmemory-policy", "noeviction")
        probe.config_set("maxmemory", 1)
        with pytest.raises(PublishError, match="OOM"):
            t.emit("events", "x", envelope(1))
        probe.config_set("maxmemory", 0)
        assert t.message_counts(specs) == {"a": 0, "b": 0}
        assert t.emit("events", "x", envelope(2)) == 2
    finally:
        probe.config_set("maxmemory", 0)
        probe.flushall()
        probe.close()
        t.close()
