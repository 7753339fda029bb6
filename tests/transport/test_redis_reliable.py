"""redis://: the transport contract, plus what the atomic fetch is for.

No message lost when a consumer's connection dies while it is blocked; a dead
consumer's messages back in the queue within seconds; a live consumer's long
task never delivered twice; prefetch bound; requeue to the head. Against the
local Redis, each test under a key prefix of its own, deleted at teardown.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from mqtasks import App, ConfigurationError, PublishError, QueueSpec
from mqtasks.testing import drain, running_worker
from mqtasks.transport import RedisTransport, resolve
from mqtasks.transport.base import Delivery, Envelope
from mqtasks.transport.redis import RedisDelivery, encode_element
from reliability.proxy import TcpProxy
from tests._helpers.brokers import REDIS_URL, RUN_ID, require_broker, unique_name
from tests._helpers.redis import (
    FAST,
    Inbox,
    envelope,
    key_prefix,
    make_transport,
    pump_until,
    reliable_url,
    scan_pattern,
)
from tests._helpers.wait import wait_for

from .test_contract import (  # run here against redis:// (see the app fixture)
    test_each_task_runs_once_and_is_acked,
    test_expired_task_is_not_run,
    test_reject_gives_the_message_up,
    test_stop_hands_back_prefetched_messages_and_finishes_the_running_one,
    test_task_exception_is_logged_acked_and_the_queue_flows_on,
    test_threads_run_tasks_concurrently,
)

__all__ = [
    "test_each_task_runs_once_and_is_acked",
    "test_expired_task_is_not_run",
    "test_reject_gives_the_message_up",
    "test_stop_hands_back_prefetched_messages_and_finishes_the_running_one",
    "test_task_exception_is_logged_acked_and_the_queue_flows_on",
    "test_threads_run_tasks_concurrently",
]


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix (hash tag) of this test's own; its keys are deleted afterwards."""
    with key_prefix("rr") as tag:
        yield tag


@pytest.fixture
def broker_url() -> str:
    """The contract tests' broker: the local Redis through redis://."""
    require_broker("redis")
    return reliable_url()


@pytest.fixture
def app(broker_url: str, make_app: Callable[..., App], prefix: str) -> App:
    return make_app(broker_url, transport_options={"key_prefix": prefix})


@pytest.fixture
def raw() -> Iterator[redis.Redis[bytes]]:
    client: redis.Redis[bytes] = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


pytestmark = pytest.mark.integration


# -- format and configuration (no server needed for these, but cheap) --------


def test_element_round_trips_every_envelope_field() -> None:
    env = Envelope(
        body=b"\x00\nopaque\xff",
        message_id="id-1",
        headers={"mqtasks-task": "t", "traceparent": "00-1", "n": 2},
        content_type="application/json",
        content_encoding="utf-8",
        priority=3,
    )
    d = RedisDelivery(encode_element(env), "q", 1, "p", "s")
    assert (d.body, d.message_id, dict(d.headers), d.priority) == (env.body, "id-1", env.headers, 3)
    assert (d.content_type, d.content_encoding, d.redelivered, d.refused) == (
        "application/json",
        "utf-8",
        False,
        None,
    )


def test_metadata_too_large_to_parse_is_refused_but_keeps_its_message_id() -> None:
    env = Envelope(body=b"{}", message_id="id-big", headers={"x": "v" * (2 * 1024 * 1024)})
    d = RedisDelivery(encode_element(env), "q", 1, "p", "s")
    assert (d.refused, d.message_id, d.body) == ("invalid_headers", "id-big", b"{}")


def test_unsupported_queue_options_and_unknown_options_are_configuration_errors() -> None:
    t = RedisTransport("redis://127.0.0.1:6379/0")
    for spec in (QueueSpec("q", message_ttl=1), QueueSpec("q", max_length=1)):
        with pytest.raises(ConfigurationError):
            t.declare([spec])
    t.declare([QueueSpec("q", max_priority=5)])  # honoured: it caps priorities
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        RedisTransport("redis://h/0", transport_options={"visibility_timeout": 5})


# -- consuming ------------------------------------------------------------------


def test_prefetch_bounds_what_a_consumer_holds(prefix: str, raw: redis.Redis[bytes]) -> None:
    t = make_transport(prefix)
    q = unique_name("pf")
    t.publish_many([(q, envelope(n)) for n in range(10)])
    inbox = Inbox(t, [q], prefetch=3)
    inbox.pump(lambda: len(inbox.got) == 3)
    for _ in range(10):
        inbox.consumer.wait(0.02, -1)
    # Then three are held, recorded in flight, and seven are still ready
    assert inbox.ids() == ["m0", "m1", "m2"]
    assert raw.llen(inbox.proc) == 3
    assert t.message_counts([QueueSpec(q)]) == {q: 7}
    # When one is acked, exactly one more arrives
    inbox.consumer.ack(inbox.got[0])
    inbox.pump(lambda: len(inbox.got) == 4)
    for _ in range(10):
        inbox.consumer.wait(0.02, -1)
    assert len(inbox.got) == 4
    assert raw.llen(inbox.proc) == 3
    inbox.consumer.close()
    assert t.message_counts([QueueSpec(q)]) == {q: 9}
    t.close()


def test_requeue_puts_the_message_back_at_the_head(prefix: str) -> None:
    t = make_transport(prefix)
    q = unique_name("rq")
    t.publish_many([(q, envelope(n)) for n in range(3)])
    inbox = Inbox(t, [q], prefetch=1)
    inbox.pump(lambda: len(inbox.got) == 1)
    first = inbox.got[0]
    assert (first.message_id, first.redelivered) == ("m0", False)
    # When it is requeued, the same message comes next, marked redelivered
    assert inbox.consumer.requeue(first)
    inbox.pump(lambda: len(inbox.got) == 2)
    assert (inbox.got[1].message_id, inbox.got[1].redelivered) == ("m0", True)
    # Then the rest follow in order, and reject drops
    assert inbox.consumer.reject(inbox.got[1])
    inbox.pump(lambda: len(inbox.got) == 3)
    inbox.consumer.ack(inbox.got[2])
    inbox.pump(lambda: len(inbox.got) == 4)
    inbox.consumer.ack(inbox.got[3])
    inbox.consumer.wait(0.01, -1)
    assert inbox.ids() == ["m0", "m0", "m1", "m2"]
    assert not inbox.consumer.ack(inbox.got[3])  # settled already
    inbox.consumer.close()
    assert t.message_counts([QueueSpec(q)]) == {q: 0}
    t.close()


def test_blocked_consumer_wakes_for_a_message_and_for_the_wake_pipe(prefix: str) -> None:
    import os

    t = make_transport(prefix)
    q = unique_name("blk")
    inbox = Inbox(t, [q], prefetch=2)
    inbox.consumer.wait(0.01, -1)  # nothing there: BLMOVE is now outstanding
    r, w = os.pipe()
    try:
        os.write(w, b"\0")
        started = time.monotonic()
        inbox.consumer.wait(5.0, r)
        assert time.monotonic() - started < 2.0  # woken by the pipe, not the timeout
        threading.Timer(0.2, lambda: t.publish(q, envelope(7))).start()
        started = time.monotonic()
        inbox.pump(lambda: len(inbox.got) == 1)
        assert inbox.ids() == ["m7"]
    finally:
        os.close(r)
        os.close(w)
    inbox.consumer.ack(inbox.got[0])
    inbox.consumer.close()
    t.close()


def test_graceful_close_returns_held_messages_at_once(prefix: str, raw: redis.Redis[bytes]) -> None:
    t = make_transport(prefix)
    q = unique_name("cl")
    t.publish_many([(q, envelope(n)) for n in range(3)])
    inbox = Inbox(t, [q], prefetch=2)
    inbox.pump(lambda: len(inbox.got) == 2)
    inbox.consumer.close()
    assert t.message_counts([QueueSpec(q)]) == {q: 3}
    assert not raw.hgetall(f"{prefix}:consumers")
    # And they come back oldest first, marked redelivered
    again = Inbox(t, [q], prefetch=3)
    again.pump(lambda: len(again.got) == 3)
    assert again.ids() == ["m0", "m1", "m2"]
    assert [d.redelivered for d in again.got] == [True, True, False]
    again.consumer.close()
    t.close()


def test_a_consumer_of_two_queues_gets_both_and_never_more_than_prefetch(prefix: str) -> None:
    t = make_transport(prefix)
    a, b = unique_name("qa"), unique_name("qb")
    inbox = Inbox(t, [a, b], prefetch=1)
    inbox.consumer.wait(0.01, -1)  # both blocked
    # When both queues receive a message at once
    t.publish_many([(a, envelope(1)), (b, envelope(2))])
    inbox.pump(lambda: len(inbox.got) == 1)
    for _ in range(5):
        inbox.consumer.wait(0.02, -1)
    assert len(inbox.got) == 1
    # Then the other is delivered once the first is settled
    inbox.consumer.ack(inbox.got[0])
    inbox.pump(lambda: len(inbox.got) == 2)
    assert sorted(inbox.ids()) == ["m1", "m2"]  # type: ignore[type-var]
    inbox.consumer.ack(inbox.got[1])
    inbox.consumer.close()
    assert t.message_counts([QueueSpec(a), QueueSpec(b)]) == {a: 0, b: 0}
    t.close()


def test_undecodable_elements_are_rejected_and_do_not_block(
    make_app: Callable[..., App], prefix: str, raw: redis.Redis[bytes]
) -> None:
    app = make_app(reliable_url(), transport_options={"key_prefix": prefix})
    good: list[int] = []

    @app.task
    def add(x: int, y: int) -> None:
        good.append(x + y)

    t = app.transport
    assert isinstance(t, RedisTransport)
    q = add.queue
    task = {"mqtasks-task": add.name}

    def poison(n: int, body: bytes, headers: dict[str, Any], **kw: Any) -> None:
        t.publish(q, Envelope(body=body, message_id=f"bad-{n}", headers=headers, **kw))

    # Given poison of every kind, interleaved with good tasks
    raw.lpush(t.queue_key(q), b"not an element at all")
    add.delay(1, 1)
    poison(1, b"{not json", task)
    poison(2, b'{"args":[],"kwargs":{}}', {"mqtasks-task": "no.such"})
    poison(3, b'{"args":[1],"kwargs":{}}', task)
    poison(4, b"\x80\x04.", task, content_type="application/x-python-serialize")
    poison(5, b'{"args":[1,2],"kwargs":{}}', {**task, "compression": "application/x-gzip"})
    poison(6, b'{"args":[1,2],"kwargs":{}}', {**task, "mqtasks-attempt": "abc"})
    poison(7, b'{"args":[1,2],"kwargs":{}}', {**task, "mqtasks-expires": time.time() - 60})
    add.delay(2, 2)
    # When a worker consumes them, then good tasks ran and poison was rejected with reasons
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
        reasons = sorted(getattr(exc, "reason", "?") for _, exc in worker.errors)
    assert sorted(good) == [2, 4]
    assert reasons == sorted(
        [
            "decode_error",
            "decode_error",
            "unknown_task",
            "invalid_arguments",
            "content_type",
            "compression_refused",
            "invalid_headers",
            "expired",
        ]
    )
    assert t.message_counts([app.queue(q)]) == {q: 0}


# -- priorities --------------------------------------------------------------


def keys_of(raw: redis.Redis[bytes], t: RedisTransport, queue: str) -> list[bytes]:
    """Every key of ``queue``'s ready lists and delayed set."""
    pattern = scan_pattern(t.queue_key(queue)) + "*"
    return sorted([*raw.scan_iter(match=pattern), *raw.scan_iter(match=t.delayed_key(queue))])


def test_every_priority_level_is_counted_purged_and_deleted(
    prefix: str, raw: redis.Redis[bytes]
) -> None:
    t = make_transport(prefix)
    q = unique_name("lv")
    spec = QueueSpec(q)
    for n, priority in enumerate([None, 0, 3, 9, 9, 12]):
        t.publish(q, envelope(n, priority=priority))
    t.publish(q, envelope(6, priority=5), delay=60)
    assert raw.exists(t.level_key(q, 3), t.level_key(q, 9)) == 2
    assert t.message_counts([spec]) == {q: 6}
    stats = t.queue_stats([spec])[q]
    assert (stats.ready, stats.delayed) == (6, 1)
    assert t.purge([spec]) == 7
    assert t.message_counts([spec]) == {q: 0} and keys_of(raw, t, q) == []
    t.publish(q, envelope(7, priority=4))
    t.publish(q, envelope(8, priority=2))
    t.publish(q, envelope(9, priority=1), delay=60)
    t.delete([spec])
    assert keys_of(raw, t, q) == []
    t.close()


def test_a_requeued_priority_message_comes_back_first_in_its_level(prefix: str) -> None:
    t = make_transport(prefix)
    q = unique_name("rqp")
    for n, priority in [(0, None), (1, 5), (2, 5), (3, 9)]:
        t.publish(q, envelope(n, priority=priority))
    inbox = Inbox(t, [q], prefetch=1)

    def next_delivery() -> Delivery:
        n = len(inbox.got) + 1
        inbox.pump(lambda: len(inbox.got) == n)
        return inbox.got[-1]

    # When the first message of each of the two higher levels is requeued,
    # then it comes next again, before the rest of its level
    for _ in range(2):
        first = next_delivery()
        assert inbox.consumer.requeue(first)
        again = next_delivery()
        assert (again.message_id, again.redelivered) == (first.message_id, True)
        inbox.consumer.ack(again)
    for _ in range(2):
        inbox.consumer.ack(next_delivery())
    inbox.consumer.wait(0.01, -1)
    assert inbox.ids() == ["m3", "m3", "m1", "m1", "m2", "m0"]
    assert [d.priority for d in inbox.got] == [9, 9, 5, 5, 5, None]
    inbox.consumer.close()
    assert t.message_counts([QueueSpec(q)]) == {q: 0}
    t.close()


def test_a_dead_consumers_priority_messages_return_to_their_level_counted(
    prefix: str,
) -> None:
    t = make_transport(prefix, transport_options=FAST)
    q = unique_name("deadp")
    for n, priority in [(0, None), (1, 9), (2, 5)]:
        t.publish(q, envelope(n, priority=priority))
    # Given a consumer that took the two high ones, then died without closing
    dead = Inbox(t, [q], prefetch=2)
    dead.pump(lambda: len(dead.got) == 2)
    assert dead.ids() == ["m1", "m2"]
    dead.consumer._drop()
    for n, priority in [(3, 9), (4, 5)]:
        t.publish(q, envelope(n, priority=priority))
    # When a sweep (by a consumer of another queue) puts them back
    sweeper = Inbox(t, [unique_name("other")], prefetch=1)
    sweeper.pump(lambda: t.message_counts([QueueSpec(q)]) == {q: 5})
    sweeper.consumer.close()
    # Then each is first in line at its own level, its delivery counted
    inbox = Inbox(t, [q], prefetch=5)
    inbox.pump(lambda: len(inbox.got) == 5)
    assert inbox.ids() == ["m1", "m3", "m2", "m4", "m0"]
    assert [d.delivery_count for d in inbox.got] == [2, 1, 2, 1, 1]
    for d in inbox.got:
        inbox.consumer.ack(d)
    inbox.consumer.close()
    t.close()


def test_blocked_consumers_wake_for_priority_messages_at_once(prefix: str) -> None:
    """A priority message is pushed to a list of its own, not the one consumers block
    on; the publish must wake them, without waiting for a poll or a BLMOVE timeout."""
    slow = {"block_timeout": 30.0, "delay_poll_interval": 30.0}
    t = make_transport(prefix, transport_options=slow)
    q = unique_name("wake")
    a, b = Inbox(t, [q], prefetch=1), Inbox(t, [q], prefetch=1)
    for inbox in (a, b):
        inbox.consumer.wait(0.01, -1)  # promote checked; now blocked in BLMOVE for 30 s
        assert inbox.consumer._sources[0].blocked_since is not None
    # When two priority messages arrive while both wait
    assert t.publish_many([(q, envelope(1, priority=5)), (q, envelope(2, priority=9))]) == [
        None,
        None,
    ]
    # Then each consumer gets one, well before any timeout would have woken it
    pump_until(lambda: len(a.got) + len(b.got) >= 2, [a, b], timeout=5)
    assert sorted([*a.ids(), *b.ids()]) == ["m1", "m2"]  # type: ignore[type-var]
    for inbox in (a, b):
        inbox.consumer.ack(inbox.got[0])
        inbox.consumer.close()
    t.close()


def test_a_queues_max_priority_caps_the_level_but_not_the_priority(
    prefix: str, raw: redis.Redis[bytes]
) -> None:
    t = make_transport(prefix)
    q = unique_name("cap")
    t.declare([QueueSpec(q, max_priority=3)])
    t.publish(q, envelope(1, priority=9))
    t.publish(q, envelope(2, priority=3))
    t.publish(q, envelope(3, priority=9), delay=0.01)
    assert not raw.exists(t.level_key(q, 9))
    inbox = Inbox(t, [q], prefetch=3)
    inbox.pump(lambda: len(inbox.got) == 3)
    # Ranked as 3, in order; the worker still sees the priority it was sent with
    assert [(d.message_id, d.priority) for d in inbox.got] == [("m1", 9), ("m2", 3), ("m3", 9)]
    for d in inbox.got:
        inbox.consumer.ack(d)
    inbox.consumer.close()
    t.close()


# -- faults ----------------------------------------------------------------------


class BlackHoleProxy(TcpProxy):
    """A TcpProxy that can also swallow what Redis sends, keeping the sockets open."""

    swallow = False

    def forward(self, src: socket.socket, data: bytes) -> bool:
        from_redis = src.getpeername()[1] == self.target[1]
        return not (from_redis and self.swallow)


def test_a_message_moved_for_a_consumer_whose_connection_dies_is_not_lost(
    prefix: str, raw: redis.Redis[bytes]
) -> None:
    proxy = BlackHoleProxy(urlsplit(REDIS_URL).port or 6379)
    t = make_transport(prefix, reliable_url(proxy.port))
    direct = make_transport(prefix)
    q = unique_name("lost")
    try:
        inbox = Inbox(t, [q], prefetch=2)
        inbox.consumer.wait(0.01, -1)  # blocked in BLMOVE through the proxy
        # Given Redis moves a message for the consumer but the reply never reaches it
        proxy.swallow = True
        direct.publish(q, envelope(1))
        proc = inbox.proc
        wait_for(lambda: raw.llen(proc), "Redis to move the message for the consumer", 5, 0.01)
        assert direct.message_counts([QueueSpec(q)]) == {q: 0}
        # When the connection is then cut
        proxy.swallow = False
        proxy.cut(refuse=False)
        # Then the consumer reconnects, finds the message recorded for it and gets it
        inbox.pump(lambda: len(inbox.got) == 1, timeout=15)
        assert inbox.ids() == ["m1"]
        assert inbox.consumer.generation == 1  # its records survived: nothing went stale
        inbox.consumer.ack(inbox.got[0])
        inbox.consumer.close()
        assert raw.llen(proc) == 0
        assert direct.message_counts([QueueSpec(q)]) == {q: 0}
    finally:
        proxy.close()
        t.close()
        direct.close()


def test_a_connection_cut_mid_task_causes_no_duplicate(
    make_app: Callable[..., App], prefix: str
) -> None:
    proxy = TcpProxy(urlsplit(REDIS_URL).port or 6379)
    app = make_app(reliable_url(proxy.port), transport_options={"key_prefix": prefix})
    runs: list[int] = []
    lock = threading.Lock()
    gate = threading.Event()

    @app.task
    def record(n: int) -> None:
        if n == 0:
            gate.wait(10)  # held unacked while the connection is cut
        with lock:
            runs.append(n)

    try:
        record.delay(0)
        with running_worker(app, concurrency=2) as worker:
            wait_for(lambda: worker.received >= 1, "the first task to be delivered", 10, 0.01)
            proxy.cut(refuse=False)
            gate.set()
            for n in range(1, 20):
                record.delay(n)
            drain(worker, timeout=30)
        # Then every task ran exactly once: the ack after the reconnect found its record
        assert sorted(runs) == list(range(20))
    finally:
        proxy.close()


def test_a_dead_consumers_messages_are_restored_within_seconds(
    make_app: Callable[..., App], prefix: str, raw: redis.Redis[bytes]
) -> None:
    app = make_app(reliable_url(), transport_options={"key_prefix": prefix, **FAST})
    ran: list[tuple[int, bool]] = []

    @app.task
    def job(n: int) -> None:
        ran.append((n, False))

    for n in range(3):
        job.delay(n)
    t = app.transport
    assert isinstance(t, RedisTransport)
    # Given a consumer that took two messages, then died without closing (SIGKILL)
    dead = Inbox(t, [job.queue], prefetch=2)
    dead.pump(lambda: len(dead.got) == 2)
    dead.consumer._drop()
    assert t.message_counts([app.queue(job.queue)]) == {job.queue: 1}
    # When a live worker runs, then all three run within a few seconds
    started = time.monotonic()
    with running_worker(app, concurrency=1) as worker:
        wait_for(lambda: len(ran) >= 3, lambda: f"all three to run; ran {ran}", 10)
        drain(worker)
    assert sorted(n for n, _ in ran) == [0, 1, 2]
    assert time.monotonic() - started < 8
    assert not raw.hgetall(f"{prefix}:consumers")
    assert not list(raw.scan_iter(match=scan_pattern(prefix) + ":proc:*"))


def test_a_long_task_of_a_live_worker_is_not_delivered_twice(
    make_app: Callable[..., App], prefix: str
) -> None:
    url = reliable_url()
    opts = {"key_prefix": prefix, **FAST}
    app1 = make_app(url, transport_options=opts)
    app2 = make_app(url, transport_options=opts, default_queue=app1.settings.default_queue)
    runs: list[str] = []

    def slow() -> None:
        runs.append(threading.current_thread().name)
        time.sleep(3.5)  # longer than liveness_ttl + sweeps, several times

    task1 = app1.task(name="slow")(slow)
    app2.task(name="slow")(slow)
    task1.delay()
    with running_worker(app1, concurrency=1) as w1, running_worker(app2, concurrency=1) as w2:
        wait_for(lambda: runs, "the slow task to start", 10, 0.01)
        drain(w1, timeout=15)
        drain(w2, timeout=15)
    assert len(runs) == 1


def test_publish_to_a_frozen_redis_raises_within_the_timeout(prefix: str) -> None:
    proxy = BlackHoleProxy(urlsplit(REDIS_URL).port or 6379)
    t = make_transport(prefix, reliable_url(proxy.port), publish_timeout=1.0)
    try:
        t.publish(unique_name("fz"), envelope(1))  # connects while Redis answers
        proxy.swallow = True
        started = time.monotonic()
        with pytest.raises(PublishError, match="m2"):
            t.publish(unique_name("fz"), envelope(2))
        assert time.monotonic() - started < 2.0
    finally:
        proxy.close()
        t.close()


def test_redis_urls_select_this_transport_and_kombus_stays_selectable() -> None:
    from mqtasks.transport import RedisKombuTransport

    assert isinstance(resolve("redis://127.0.0.1:6379/0"), RedisTransport)
    assert isinstance(resolve("redis+kombu://127.0.0.1:6379/0"), RedisKombuTransport)
    t = resolve("rediss://u:pw@127.0.0.1:6380/3")
    assert isinstance(t, RedisTransport)
    assert t.redis_url == "rediss://u:pw@127.0.0.1:6380/3"
    assert "pw" not in repr(t)


_ = RUN_ID  # the prefixes above embed it through unique_name


def test_acks_collected_before_a_connection_dies_at_close_are_still_sent(
    prefix: str, raw: redis.Redis[bytes]
) -> None:
    """A close whose connection fails while cancelling tries once more, not redelivering."""
    proxy = TcpProxy(urlsplit(REDIS_URL).port or 6379)
    t = make_transport(prefix, reliable_url(proxy.port))
    direct = make_transport(prefix)
    q = unique_name("close-ack")
    try:
        inbox = Inbox(t, [q], prefetch=2)
        direct.publish(q, envelope(1))
        inbox.pump(lambda: len(inbox.got) == 1)
        proc = inbox.proc
        # Given an ack collected (sent with the next fetch) for the one message held
        inbox.consumer.ack(inbox.got[0])
        assert raw.llen(proc) == 1
        # When the connection is cut just before the consumer closes
        proxy.cut(refuse=False)
        inbox.consumer.close()
        # Then the ack went out on a new connection: nothing is left to deliver again
        assert raw.llen(proc) == 0
        assert direct.message_counts([QueueSpec(q)]) == {q: 0}
    finally:
        proxy.close()
        t.close()
        direct.close()


def test_deleting_a_redis_kombu_queue_removes_its_lists(raw: redis.Redis[bytes]) -> None:
    """kombu deletes only queues its channel bound; the transport's delete binds first."""
    app = App("kombu-delete", broker=REDIS_URL.replace("redis://", "redis+kombu://", 1))
    name = unique_name("kombu-delete")

    @app.task(queue=name, max_retries=0)
    def job(n: int) -> None: ...

    try:
        job.delay(1)
        job.apply_async((2,), priority=7)
        assert list(raw.scan_iter(f"{name}*"))
        app.transport.delete([app.queue(name)])
        assert list(raw.scan_iter(f"{name}*")) == []
    finally:
        for key in raw.scan_iter(f"{name}*"):
            raw.delete(key)
        app.close()
