"""Retries with broker-held backoff, and dead letters with their reasons."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import tenacity

from mqtasks import App, ConfigurationError, QueueSpec, Reject, Retry
from mqtasks.deadletter import HEADER_DEATH_EXCEPTION, HEADER_DEATH_REASON, HEADER_DEATH_TRACEBACK
from mqtasks.dlq import list_dead_letters
from mqtasks.message import HEADER_ATTEMPT
from mqtasks.retry import RetryPolicy
from mqtasks.testing import drain, running_worker
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.redis import RedisDelivery, RedisTransport
from tests import crash_app
from tests._helpers.brokers import require_broker
from tests._helpers.crash import Crash
from tests._helpers.publish import raw_publish
from tests._helpers.wait import wait_for


@pytest.fixture(params=["memory", "amqp", "redis"])
def retry_app(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> App:
    """An app on a transport whose broker holds delays."""
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    return make_app(require_broker(request.param))


@dataclass
class Entry:
    """A dead-letter entry as read back from the broker."""

    headers: dict[str, Any]
    body: bytes
    message_id: str | None


def dead_letters(app: App, queue: str, *, expect: int, timeout: float = 10.0) -> list[Entry]:
    """Take ``expect`` entries off the broker's dead-letter queue, waiting up to ``timeout`` s."""
    transport = app.transport
    if isinstance(transport, RedisTransport):
        client = redis.Redis.from_url(transport.redis_url)
        key = transport.queue_key(queue + ".dlq")
        entries: list[Entry] = []

        def take() -> bool:
            while len(entries) < expect and (element := client.rpop(key)) is not None:
                d = RedisDelivery(element, queue, 1, "", "")
                entries.append(Entry(dict(d.headers), d.body, d.message_id))
            return len(entries) == expect

        try:
            wait_for(take, lambda: f"{expect} dead letters; got {len(entries)}", timeout)
        finally:
            client.close()
        return entries
    return [
        Entry(dict(m.headers), m.body, m.properties.get("message_id"))
        for m in _kombu_dead_letters(app, queue, expect=expect, timeout=timeout)
    ]


def _kombu_dead_letters(app: App, queue: str, *, expect: int, timeout: float) -> list[Any]:
    got: list[Any] = []
    assert isinstance(app.transport, KombuTransport)
    with app.transport.connection() as conn:
        channel = conn.channel()

        def take() -> bool:
            while len(got) < expect:
                message = channel.basic_get(queue + ".dlq", no_ack=False)
                if message is None:
                    return False
                if not hasattr(message, "ack"):  # py-amqp's own message: let kombu wrap it
                    message = channel.message_to_python(message)
                got.append(message)
                message.ack()
            return True

        wait_for(take, lambda: f"{expect} dead letters; got {len(got)}", timeout)
    return got


def headers_of(entry: Entry) -> dict[str, Any]:
    return entry.headers


def test_policy_counts_attempts_exactly() -> None:
    policy = RetryPolicy(max_retries=3, backoff=tenacity.wait_exponential(multiplier=0.2))
    error = RuntimeError("x")
    assert [policy.next_delay(a, error) for a in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, None]
    assert RetryPolicy(max_retries=0).next_delay(1, error) is None
    picky = RetryPolicy(retry_on=(TimeoutError,), dont_retry_on=(ValueError,))
    assert picky.next_delay(1, TimeoutError()) is not None
    assert picky.next_delay(1, ValueError()) is None
    assert RetryPolicy(backoff=0.3).next_delay(1, error) == 0.3


def test_default_backoff_is_exponential_with_jitter_and_capped() -> None:
    policy = RetryPolicy(max_retries=20)
    delays = [policy.next_delay(a, RuntimeError()) for a in range(1, 20)]
    assert all(d is not None and 0 < d <= 301 for d in delays)
    assert delays[0] is not None and delays[0] < 3
    assert delays[-1] is not None and delays[-1] >= 300


def test_always_failing_task_runs_max_retries_plus_one_times_then_dead_letters(
    retry_app: App,
) -> None:
    starts: list[float] = []

    @retry_app.task(max_retries=3, retry_backoff=tenacity.wait_exponential(multiplier=0.2))
    def always_fails(n: int) -> None:
        starts.append(time.monotonic())
        raise RuntimeError(f"broken {n}")

    handle = always_fails.delay(7)
    with running_worker(retry_app, concurrency=1) as worker:
        [entry] = dead_letters(retry_app, always_fails.queue, expect=1, timeout=30)
        drain(worker, timeout=30, raise_errors=False)
    # Then exactly max_retries + 1 attempts, never earlier than the backoff
    assert len(starts) == 4
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    for gap, expected in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert expected <= gap < expected + 5
    headers = headers_of(entry)
    assert headers[HEADER_DEATH_REASON] == "max_retries_exceeded"
    assert headers[HEADER_ATTEMPT] == 4
    assert headers[HEADER_DEATH_EXCEPTION] == "RuntimeError: broken 7"
    assert "raise RuntimeError" in headers[HEADER_DEATH_TRACEBACK]
    assert entry.message_id == handle.id
    assert retry_app.transport.message_counts([retry_app.queue(always_fails.queue)]) == {
        always_fails.queue: 0
    }


def test_reject_and_non_retryable_errors_go_straight_to_the_dead_letters(retry_app: App) -> None:
    runs: list[str] = []

    @retry_app.task
    def refuse() -> None:
        runs.append("refuse")
        raise Reject("bad order")

    @retry_app.task(dont_retry_on=(ValueError,))
    def invalid() -> None:
        runs.append("invalid")
        raise ValueError("no")

    refuse.delay()
    invalid.delay()
    with running_worker(retry_app, concurrency=1):
        entries = dead_letters(retry_app, refuse.queue, expect=2, timeout=20)
    reasons = sorted(headers_of(e)[HEADER_DEATH_REASON] for e in entries)
    assert reasons == ["not_retryable", "rejected"]
    assert sorted(runs) == ["invalid", "refuse"]  # one attempt each


def test_retry_with_a_countdown_is_held_by_the_broker(retry_app: App) -> None:
    starts: list[float] = []

    @retry_app.task(max_retries=1)
    def once_more() -> None:
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise Retry(countdown=0.5)

    once_more.delay()
    with running_worker(retry_app, concurrency=1) as worker:
        wait_for(lambda: starts and worker.idle, "the first attempt to end, its retry held")
        # No worker thread sleeps and no message is held while the retry waits.
        assert worker.running == 0
        wait_for(lambda: len(starts) == 2, "the second attempt")
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.5


def test_countdown_task_does_not_run_early(retry_app: App) -> None:
    started: list[float] = []
    event = threading.Event()

    @retry_app.task
    def later() -> None:
        started.append(time.monotonic())
        event.set()

    with running_worker(retry_app, concurrency=1):
        sent = time.monotonic()
        later.apply_async(countdown=1.0)
        assert event.wait(15)
    assert started[0] - sent >= 1.0


def test_a_retry_that_would_start_after_expiry_is_dead_lettered_as_expired(
    retry_app: App,
) -> None:
    runs: list[int] = []

    @retry_app.task(max_retries=5, retry_backoff=2.0)
    def short_lived() -> None:
        runs.append(1)
        raise RuntimeError("down")

    # Published once the worker runs, and a second of slack on either side: the
    # first attempt may start up to 1 s late (a loaded machine) and the second
    # still runs before expiry, while the third, due at t=4, is always past it.
    with running_worker(retry_app, concurrency=1):
        short_lived.apply_async(expires=3.0)
        [entry] = dead_letters(retry_app, short_lived.queue, expect=1, timeout=20)
    assert headers_of(entry)[HEADER_DEATH_REASON] == "expired"
    assert len(runs) == 2  # t=0 and t=2; the next, at t=4, is past expiry


def test_bad_input_lands_in_the_dead_letters_with_its_reason(retry_app: App) -> None:
    @retry_app.task
    def add(x: int, y: int) -> None: ...

    retry_app.declare([add.queue])
    raw_publish(
        retry_app,
        add.queue,
        b'{"args":[1],"kwargs":{}}',
        headers={"mqtasks-task": add.name},
        content_type="application/json",
        content_encoding="utf-8",
        message_id="short-1",
    )
    with running_worker(retry_app, concurrency=1):
        [entry] = dead_letters(retry_app, add.queue, expect=1, timeout=20)
    assert headers_of(entry)[HEADER_DEATH_REASON] == "invalid_arguments"
    assert entry.body == b'{"args":[1],"kwargs":{}}'


def test_short_delay_is_not_blocked_by_a_long_one(amqp_url, make_app) -> None:
    app = make_app(amqp_url)
    order: list[str] = []
    done = threading.Event()

    @app.task
    def mark(label: str) -> None:
        order.append(label)
        done.set()

    app.declare([mark.queue])
    mark.apply_async(args=("hour",), countdown=3600)
    sent = time.monotonic()
    mark.apply_async(args=("second",), countdown=1)
    with running_worker(app, concurrency=1):
        assert done.wait(20)
    assert order == ["second"]
    assert time.monotonic() - sent < 20


def test_a_queue_ttl_shorter_than_the_retry_schedule_is_refused_before_work_moves(
    amqp_url, make_app
) -> None:
    app = make_app(amqp_url)
    name = app.settings.default_queue
    app.add_queue(QueueSpec(name, message_ttl=5.0))

    @app.task(max_retries=3, retry_backoff=tenacity.wait_fixed(2))
    def slow_to_give_up() -> None: ...

    slow_to_give_up.delay()
    with pytest.raises(ConfigurationError) as caught:
        running_worker(app, concurrency=1).__enter__()
    text = str(caught.value)
    assert f"Queue {name!r}" in text and "slow_to_give_up" in text
    assert "message_ttl is 5 s" in text and "3 retries can wait up to 6 s" in text
    assert app.transport.message_counts([app.queue(name)]) == {name: 1}  # nothing moved

    app.add_queue(QueueSpec(name, message_ttl=6.0))  # a schedule that fits passes
    app.check([name])


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_a_retry_pending_when_its_worker_is_killed_still_runs(
    kind: str, crash: Callable[[str], Crash]
) -> None:
    c = crash(kind)
    first = c.start("-c", "1")
    first.wait_started()
    # Given a task whose first attempt failed: its retry is published, held by
    # the broker for 2 s, and the first attempt acknowledged
    c.app.tasks[crash_app.FLAKY].delay("f")
    first.wait_log("task.retried")
    if kind == "redis":
        spec = c.app.queue(c.queue)
        transport = c.app.transport
        assert isinstance(transport, RedisTransport)
        client = transport.publisher()
        wait_for(
            lambda: (
                transport.delayed_counts([spec]) == {c.queue: 1}
                and not any(client.llen(k) for k in client.scan_iter(c.proc_pattern(), count=1000))
                and transport.message_counts([spec]) == {c.queue: 0}
            ),
            "the retry alone in the delayed set, the first attempt acked",
        )
    # When the worker is killed while the retry waits
    first.signal(signal.SIGKILL)
    assert first.wait(5) == -signal.SIGKILL
    # Then a new worker runs the second attempt
    second = c.start("-c", "1")
    second.wait_started()
    wait_for(lambda: c.events("attempt2", "f"), "the second attempt to start", timeout=30)
    assert c.events("attempt1", "f")[0] == first.pid
    assert c.events("attempt2", "f") == [second.pid]
    wait_for(lambda: c.events("finish", "f"), "the second attempt to finish")
    assert c.events("finish", "f")[-1] == second.pid
    assert list_dead_letters(c.app, c.queue) == []


@pytest.mark.integration
def test_a_retry_the_transport_cannot_delay_is_dead_lettered_not_looped(make_app) -> None:
    url = require_broker("redis").replace("redis://", "redis+kombu://", 1)
    app = make_app(url)
    runs: list[int] = []

    @app.task(max_retries=3, retry_backoff=0)  # passes the start-up check
    def wants_a_pause() -> None:
        runs.append(1)
        raise Retry(countdown=5)

    wants_a_pause.delay()
    name = app.settings.default_queue
    seen: list[Any] = []

    def dead_lettered() -> bool:
        seen[:] = list_dead_letters(app, name)
        return len(seen) == 1

    with running_worker(app, concurrency=1):
        wait_for(dead_lettered, "the dead letter")
    [entry] = seen
    assert entry.reason == "retry_unsupported"
    assert entry.detail is not None and "redis://" in entry.detail
    assert runs == [1]
