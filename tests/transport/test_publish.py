"""Publishing: confirmed, routed or refused loudly, bounded during outages."""

from __future__ import annotations

import time

import pytest

from mqtasks import App, PublishError, PublishNacked, QueueSpec, RetryPolicy, Unroutable
from mqtasks.testing import drain, running_worker
from tests._helpers.brokers import require_broker
from tests._helpers.faults import own_local_ports

pytestmark = pytest.mark.integration


def test_publish_to_a_deleted_queue_raises_unroutable(amqp_url, make_app) -> None:
    app = make_app(amqp_url)

    @app.task
    def f() -> None: ...

    f.delay()
    # Given the queue disappears behind the app's back (an operator deleted it)
    app.transport.delete([app.queue(f.queue)])
    app.transport._declared.add(f.queue)  # the app still believes it is declared
    # Then the broker returns the message and delay() says it was not enqueued
    with pytest.raises(Unroutable, match="NOT enqueued") as info:
        f.delay()
    assert info.value.task_id
    # And the next call declares the queue again and succeeds
    f.delay()
    assert app.transport.message_counts([app.queue(f.queue)]) == {f.queue: 1}


@pytest.mark.parametrize(
    "url", ["amqp://guest:pw-Zq81x@127.0.0.1:1//", "redis://:pw-Zq81x@127.0.0.1:1/0"]
)
def test_publish_during_an_outage_raises_in_bounded_time(url: str) -> None:
    app = App("x", broker=url, publish_retries=1, publish_timeout=2, connect_timeout=1)

    @app.task
    def f() -> None: ...

    started = time.monotonic()
    with pytest.raises(PublishError) as info:
        f.delay()
    assert time.monotonic() - started < 15
    assert "NOT enqueued" in str(info.value) or "cannot reach" in str(info.value)
    assert "pw-Zq81x" not in str(info.value)
    app.close()


@pytest.mark.parametrize("kind", ["amqp", "redis+kombu"])
def test_higher_priorities_run_first_on_both_brokers(kind: str, make_app, queue_name) -> None:
    name = queue_name("prio")
    url = require_broker(kind.partition("+")[0])
    if kind == "redis+kombu":
        url = url.replace("redis://", "redis+kombu://", 1)
    # No retries: kombu's Redis transport cannot hold a retry's backoff, so a worker
    # there refuses tasks whose retries would wait.
    app = make_app(
        url,
        queues=[QueueSpec(name, queue_type="classic", max_priority=9)],
        retry_policy=RetryPolicy(max_retries=0),
    )
    order: list[int] = []

    @app.task(queue=name)
    def job(p: int) -> None:
        order.append(p)

    job.apply_async(args=(-1,))  # no priority: the lowest
    for p in (1, 9, 3, 6):
        job.apply_async(args=(p,), priority=p)
    with running_worker(app, concurrency=1, prefetch=1) as worker:
        drain(worker)
    assert order == [9, 6, 3, 1, -1]


def test_queue_arguments_reach_rabbitmq(amqp_url, make_app, queue_name) -> None:
    name = queue_name("bounded")
    app = make_app(
        amqp_url,
        queues=[QueueSpec(name, queue_type="classic", max_length=2, overflow="reject-publish")],
    )

    @app.task(queue=name)
    def job() -> None: ...

    job.delay()
    job.delay()
    # A full queue with reject-publish nacks: delay() must not pretend it worked
    with pytest.raises(PublishNacked, match="NOT enqueued"):
        job.delay()
    assert app.transport.message_counts([app.queue(name)]) == {name: 2}


def test_a_full_quorum_queue_takes_one_more_then_refuses_every_publish(
    amqp_url, make_app, queue_name
) -> None:
    """What RabbitMQ promises for a quorum queue with ``reject-publish``: the
    limit is not enforced strictly. The queue takes every message up to
    ``max_length`` and then at least one more; only once it is over the limit
    does it tell each publishing channel to refuse, and from then on every
    publish is nacked while it stays full. How far past the limit it goes
    depends on the messages in flight when it fills (one here: each
    ``delay()`` waits for its confirm), a small number that RabbitMQ does not
    bound. A classic queue holds exactly ``max_length`` (the test above)."""
    limit = 3
    name = queue_name("bounded")
    app = make_app(
        amqp_url,
        queues=[QueueSpec(name, queue_type="quorum", max_length=limit, overflow="reject-publish")],
    )

    @app.task(queue=name)
    def job() -> None: ...

    # Given a quorum queue filled to its limit, plus the one it always lets past
    for _ in range(limit + 1):
        job.delay()
    # When publishing goes on, one message at a time
    accepted = limit + 1
    refused = False
    while not refused and accepted < limit + 20:  # the test's patience, not a promise
        try:
            job.delay()
        except PublishNacked:
            refused = True
        else:
            accepted += 1
    # Then the queue refuses, loudly, and keeps refusing while it is full
    assert refused, f"{accepted} messages taken, no refusal"
    for _ in range(3):
        with pytest.raises(PublishNacked, match="NOT enqueued"):
            job.delay()
    # And every accepted message is there; no refused one is
    assert app.transport.message_counts([app.queue(name)]) == {name: accepted}


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_publishing_reuses_pooled_connections(kind: str, make_app) -> None:
    url = require_broker(kind)
    port = 5672 if kind == "amqp" else 6379
    app = make_app(url)

    @app.task
    def f(n: int) -> None: ...

    f.delay(0)  # opens the pool
    before = own_local_ports(port)
    for n in range(200):
        f.delay(n)
    after = own_local_ports(port)
    # No connection was opened (nor closed) for any of the 200 messages.
    assert after == before
    assert len(after) >= 1


def test_worker_warns_when_redis_would_lose_tasks(redis_url, make_app) -> None:
    import redis
    import structlog

    from mqtasks.testing import running_worker

    client = redis.Redis.from_url(redis_url)
    persistent = client.config_get("appendonly").get("appendonly") == "yes"
    client.close()
    app = make_app(redis_url)
    with structlog.testing.capture_logs() as logs, running_worker(app):
        pass
    details = [e["detail"] for e in logs if e["event"] == "broker.unsafe_config"]
    # The machine's shared Redis runs with appendonly no: the worker must say so.
    assert any("appendonly" in d for d in details) is not persistent, logs
