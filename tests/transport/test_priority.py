"""Message priorities: higher first on every broker that takes them, so code tested
on ``memory://`` orders its tasks as it will on Redis or RabbitMQ.

Each test publishes to a fresh queue that no worker consumes yet, then starts one
worker thread, so the order the tasks run in is the order the broker hands them
out. RabbitMQ orders only a classic queue declared with ``max_priority`` (quorum
queues of RabbitMQ 3.x have no message priorities), so the queue is configured
that way for every broker: the portable configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import structlog.testing

from mqtasks import App, QueueSpec, RetryPolicy
from mqtasks.testing import drain, running_worker
from mqtasks.transport.redis import RedisTransport
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.wait import wait_for


def kinds(*names: str) -> list[Any]:
    """The brokers to run on; those other than memory are marked ``integration``."""
    return [pytest.param(n, marks=pytest.mark.integration) if n != "memory" else n for n in names]


def broker(kind: str) -> str:
    """The URL of ``kind``; ``redis+kombu`` is the local Redis through kombu's transport."""
    if kind == "redis+kombu":
        return require_broker("redis").replace("redis://", "redis+kombu://", 1)
    return require_broker(kind)


class Recorder:
    """A task on a fresh priority queue that records the order its calls run in."""

    def __init__(self, make_app: Callable[..., App], kind: str, max_priority: int | None) -> None:
        self.queue = unique_name("prio")
        spec = QueueSpec(self.queue, queue_type="classic", max_priority=max_priority)
        # No retries: kombu's Redis transport cannot hold a retry's wait, so a
        # worker there refuses tasks whose retries would wait.
        self.app = make_app(broker(kind), queues=[spec], retry_policy=RetryPolicy(max_retries=0))
        self.order: list[str] = []

        @self.app.task(queue=self.queue)
        def record(label: str) -> None:
            self.order.append(label)

        self.task = record

    def send(self, calls: list[tuple[str, int | None]], countdown: float | None = None) -> None:
        """Publish ``record(label)`` with each priority, in the order given."""
        for label, priority in calls:
            self.task.apply_async(args=(label,), priority=priority, countdown=countdown)

    def run(self) -> list[str]:
        """Run every queued call on one worker thread; return the labels in run order."""
        with running_worker(self.app, concurrency=1, prefetch=1) as worker:
            drain(worker)
        return self.order


@pytest.mark.parametrize("kind", kinds("memory", "redis", "amqp", "redis+kombu"))
def test_higher_priorities_are_consumed_first(kind: str, make_app: Callable[..., App]) -> None:
    tasks = Recorder(make_app, kind, max_priority=9)
    # Given low, then high priorities, queued while no worker runs
    tasks.send(
        [
            ("none", None),
            ("p0", 0),
            ("p2", 2),
            ("p5", 5),
            ("p9", 9),
            ("p12", 12),  # above the queue's maximum: counts as 9
            ("p5b", 5),
        ],
    )
    # When a worker consumes them, then higher priorities run first, in sending order
    # among equals; no priority counts as the lowest
    assert tasks.run() == ["p9", "p12", "p5", "p5b", "p2", "none", "p0"]


@pytest.mark.parametrize("kind", kinds("memory", "redis", "redis+kombu"))
def test_the_redis_brokers_and_memory_order_priorities_without_max_priority(
    kind: str, make_app: Callable[..., App]
) -> None:
    """Not RabbitMQ: there a queue declared without ``max_priority`` is first in, first out."""
    tasks = Recorder(make_app, kind, max_priority=None)
    # The first message finds the queue empty: on redis:// it waits in the list
    # consumers block on, and must still rank by its priority among those after it
    tasks.send([("p5", 5), ("p0", 0), ("p1", 1), ("p9", 9), ("none", None), ("p5b", 5)])
    assert tasks.run() == ["p9", "p5", "p5b", "p1", "p0", "none"]


@pytest.mark.parametrize("kind", kinds("memory", "redis", "amqp"))
def test_priorities_above_max_priority_count_as_max_priority(
    kind: str, make_app: Callable[..., App]
) -> None:
    """As on RabbitMQ, ``max_priority`` caps: above it, messages rank with it, in order."""
    tasks = Recorder(make_app, kind, max_priority=3)
    tasks.send([("p1", 1), ("p5", 5), ("p3", 3), ("p9", 9), ("p0", 0)])
    assert tasks.run() == ["p5", "p3", "p9", "p1", "p0"]


@pytest.mark.parametrize("kind", kinds("memory", "redis", "amqp"))
def test_a_delayed_message_keeps_its_priority(kind: str, make_app: Callable[..., App]) -> None:
    tasks = Recorder(make_app, kind, max_priority=9)
    # Given high-priority messages held for a short delay, and low ones sent after them
    tasks.send([("late8", 8), ("late9", 9)], countdown=0.3)
    tasks.send([("now0", None), ("now1", 1)])
    # When the held ones are due before a worker starts
    wait_until_due(tasks.app, tasks.queue, held=2, total=4)
    # Then the worker runs them first: they kept their priority while held
    assert tasks.run() == ["late9", "late8", "now1", "now0"]


def wait_until_due(app: App, queue: str, *, held: int, total: int) -> None:
    """Wait until the ``held`` delayed messages are due (at most 10 s).

    ``redis://`` moves a due message to its queue only when a consumer looks, so
    there the wait is for Redis' clock to pass their due times; the other brokers
    move them by themselves, so the wait is for all ``total`` to be ready.
    """
    transport = app.transport
    spec = app.queue(queue)

    def due() -> bool:
        if isinstance(transport, RedisTransport):
            client = transport.publisher()
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros / 1000
            return client.zcount(transport.delayed_key(queue), "-inf", now_ms) == held
        return transport.message_counts([spec]) == {queue: total}

    wait_for(due, "the delayed messages to fall due", 10, 0.02)


def test_a_priority_the_broker_would_ignore_is_reported_once_per_queue() -> None:
    """RabbitMQ quorum queues have no priorities: sending one is said, not dropped silently."""
    app = App("prio-warn", broker=require_broker("amqp"))
    quorum = unique_name("prio-quorum")
    ranked = unique_name("prio-classic")
    app.add_queue(QueueSpec(ranked, queue_type="classic", max_priority=9))

    @app.task(queue=quorum)
    def plain() -> None: ...

    @app.task(queue=ranked)
    def ranked_task() -> None: ...

    try:
        with structlog.testing.capture_logs() as logs:
            plain.apply_async(priority=9)
            plain.apply_async(priority=1)
            ranked_task.apply_async(priority=9)
        ignored = [e for e in logs if e["event"] == "publish.priority_ignored"]
        assert [e["queue"] for e in ignored] == [quorum]
        assert "max_priority" in ignored[0]["reason"]
    finally:
        cleanup(app)
