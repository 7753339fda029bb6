"""Broadcast tasks: every running worker of the task's queue runs each call once."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mqtasks import App, ConfigurationError, Unroutable, Worker
from mqtasks.broadcast import (
    BROADCAST_EXCHANGE,
    BroadcastHandle,
    queue_name,
    require_broadcast,
    worker_queue,
)
from mqtasks.exceptions import Reject, Retry
from mqtasks.message import current_message
from mqtasks.task import BASE_OPTIONS
from mqtasks.transport.amqp import AmqpTransport
from mqtasks.transport.base import Capabilities
from mqtasks.transport.queue import DLQ_SUFFIX, QueueSpec
from mqtasks.transport.redis import RedisTransport
from mqtasks.transport.redis.exchanges import live_key
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.cli import PYTHON
from tests._helpers.faults import close_amqp_connections
from tests._helpers.wait import wait_for

BROKERS = [
    "memory",
    pytest.param("amqp", marks=pytest.mark.integration),
    pytest.param("redis", marks=pytest.mark.integration),
]


@pytest.fixture(params=BROKERS)
def bc_app(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> App:
    """An app on each broker, without a result backend."""
    return make_app(require_broker(request.param), backend=None)


class Runs:
    """What the broadcast task ran: ``(worker queue, argument, attempt)``, thread-safe."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, int]] = []
        self.lock = threading.Lock()

    def add(self, value: Any) -> None:
        message = current_message()
        assert message is not None
        with self.lock:
            self.items.append((message.queue, value, message.attempt))

    def by_queue(self) -> dict[str, list[Any]]:
        with self.lock:
            found: dict[str, list[Any]] = {}
            for queue, value, _ in self.items:
                found.setdefault(queue, []).append(value)
            return {q: sorted(v) for q, v in found.items()}

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """A factory of started workers, stopped at teardown."""
    started: list[Worker] = []

    def start(app: App, **options: Any) -> Worker:
        options.setdefault("concurrency", 1)
        worker = Worker(app, collect_errors=True, **options)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=5)


def own_queue(worker: Worker) -> str:
    """The worker's one broadcast queue."""
    (spec,) = worker.broadcast.specs
    return spec.name


def queue_exists(app: App, name: str) -> bool:
    """Whether the broker has queue ``name`` (on Redis: a list of it, as lists need no declaring).

    On RabbitMQ the check (a passive declare) renews an ``x-expires`` queue's lease.
    """
    transport = app.transport
    if isinstance(transport, RedisTransport):
        base = transport.queue_key(name)
        keys = [base, *(f"{base}#{k}" for k in range(1, 10))]
        return bool(transport.publisher().exists(*keys))
    return bool(transport.queue_stats([QueueSpec(name)])[name].exists)


def bound_queues(app: App) -> set[str]:
    """The queues bound to the broadcast exchange: all of them on redis:// and memory://; on
    RabbitMQ, which lists no bindings over AMQP, those this process bound and did not unbind."""
    return {q for _, q in app.transport.bindings(BROADCAST_EXCHANGE)}


def rabbitmq(app: App) -> bool:
    return isinstance(app.transport, AmqpTransport)


# -- fan-out -------------------------------------------------------------------------


def test_every_worker_runs_each_call_once(bc_app: App, workers: Callable[..., Worker]) -> None:
    runs = Runs()

    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    first, second = workers(bc_app), workers(bc_app)
    assert own_queue(first) != own_queue(second)
    handles = [reload.delay(1), reload.delay(2)]
    first_handle = handles[0]
    assert isinstance(first_handle, BroadcastHandle)
    if rabbitmq(bc_app):
        assert first_handle.routed is None  # RabbitMQ confirms without a count
    else:
        assert first_handle.routed == 2
    wait_for(lambda: len(runs) >= 4, "four runs")
    wait_for(lambda: first.idle and second.idle, "both workers idle")
    assert runs.by_queue() == {own_queue(first): [1, 2], own_queue(second): [1, 2]}
    # Nothing went through the task's own queue.
    assert bc_app.transport.message_counts([bc_app.queue(reload.queue)])[reload.queue] == 0


@pytest.mark.parametrize("broker", ["memory", pytest.param("redis", marks=pytest.mark.integration)])
def test_the_broadcast_exchange_setting_is_used(
    broker: str, make_app: Callable[..., App], workers: Callable[..., Worker]
) -> None:
    exchange = unique_name("bx")
    app = make_app(require_broker(broker), backend=None, broadcast_exchange=exchange)
    runs = Runs()

    @app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    worker = workers(app)
    try:
        assert {q for _, q in app.transport.bindings(exchange)} == {own_queue(worker)}
        assert not app.transport.bindings(BROADCAST_EXCHANGE) or own_queue(worker) not in {
            q for _, q in app.transport.bindings(BROADCAST_EXCHANGE)
        }
        reload.delay(7)
        wait_for(lambda: len(runs) >= 1, "the call ran")
        assert runs.by_queue() == {own_queue(worker): [7]}
    finally:
        worker.stop(timeout=5)
    assert app.transport.bindings(exchange) == []


def test_the_two_exchanges_must_differ() -> None:
    with pytest.raises(ConfigurationError, match="exchange each"):
        App("t", broker="memory://", events_exchange="x.same", broadcast_exchange="x.same")


def test_a_worker_started_later_does_not_get_earlier_calls(
    bc_app: App, workers: Callable[..., Worker]
) -> None:
    runs = Runs()

    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    early = workers(bc_app)
    reload.delay(1)
    wait_for(lambda: len(runs) >= 1, "the first run")
    late = workers(bc_app)
    reload.delay(2)
    wait_for(lambda: len(runs) >= 3, "three runs")
    wait_for(lambda: early.idle and late.idle, "both workers idle")
    assert runs.by_queue() == {own_queue(early): [1, 2], own_queue(late): [2]}


def test_workers_of_other_queues_do_not_get_it(bc_app: App, workers: Callable[..., Worker]) -> None:
    runs = Runs()
    other = unique_name("other")

    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    @bc_app.task(queue=other)
    def unrelated() -> None: ...

    elsewhere = workers(bc_app, queues=[other])
    assert elsewhere.broadcast.specs == []
    mine = workers(bc_app, queues=[reload.queue])
    reload.delay(1)
    wait_for(lambda: len(runs) >= 1, "the run")
    wait_for(lambda: mine.idle, "the worker idle")
    assert runs.by_queue() == {own_queue(mine): [1]}


# -- no worker, a stopped worker, a dead worker ------------------------------------------


def test_no_running_worker_is_unroutable(bc_app: App) -> None:
    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None: ...

    with pytest.raises(Unroutable, match="no running worker serves it"):
        reload.delay()


def test_a_stopped_worker_unbinds_and_deletes_its_queue(
    bc_app: App, workers: Callable[..., Worker]
) -> None:
    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None: ...

    worker = workers(bc_app)
    name = own_queue(worker)
    assert name in bound_queues(bc_app)
    if not isinstance(bc_app.transport, RedisTransport):  # on Redis, an empty queue has no list
        assert queue_exists(bc_app, name)
    worker.stop()
    assert name not in bound_queues(bc_app)
    if not bc_app.transport.capabilities.in_process:  # memory:// keeps an empty, unbound queue
        assert not queue_exists(bc_app, name)
    with pytest.raises(Unroutable):
        reload.delay()


@pytest.mark.integration
def test_rabbitmq_lists_no_queue_or_binding_of_a_stopped_worker(
    amqp_url: str, make_app: Callable[..., App], workers: Callable[..., Worker]
) -> None:
    """Seen by RabbitMQ itself: the worker's queue is non-durable, expiring, and gone after stop."""
    app = make_app(amqp_url, backend=None)

    @app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None: ...

    worker = workers(app)
    name = own_queue(worker)

    def rabbitmqctl(*args: str) -> str:
        return subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
        ).stdout

    queues = rabbitmqctl("list_queues", "name", "durable", "arguments")
    (line,) = [row for row in queues.splitlines() if row.startswith(name + "\t")]
    assert "\tfalse\t" in line and "x-expires" in line
    bindings = rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
    assert f"{BROADCAST_EXCHANGE}\t{name}\t{reload.name}" in bindings
    assert name + DLQ_SUFFIX not in queues  # its dead letters go to the task queue's
    worker.stop()
    assert name not in rabbitmqctl("list_queues", "name")
    assert name not in rabbitmqctl("list_bindings", "destination_name")


def test_a_dead_workers_queue_stops_receiving(bc_app: App, workers: Callable[..., Worker]) -> None:
    """A queue bound like a worker's that nobody keeps live (its worker died) gets nothing
    once it expires, and is removed; the live workers still get every call."""
    runs = Runs()

    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    # Given a worker that bound its queue and died (nothing keeps it live)
    dead = worker_queue(bc_app.queue(reload.queue), "deadbeef0000", expires=0.5)
    bc_app.transport.bind(BROADCAST_EXCHANGE, reload.name, dead)
    transport = bc_app.transport
    # and left a retry held for a delay
    retry = reload.message((0,)).encode(max_size=bc_app.settings.max_message_size)
    transport.publish(dead.name, retry, delay=60)
    if isinstance(transport, RedisTransport):
        wait_for(lambda: not transport.publisher().exists(live_key(transport, dead.name)), "expiry")
    elif rabbitmq(bc_app):
        # Checked less often than it expires: a check renews its lease.
        wait_for(lambda: not queue_exists(bc_app, dead.name), "RabbitMQ to delete it", interval=1.5)
    else:
        time.sleep(0.6)  # memory://: its binding is live 0.5 s after the bind
    # When a call is made with no live worker, then with one
    with pytest.raises(Unroutable):
        reload.delay(1)
    live = workers(bc_app)
    reload.delay(2)
    # Then only the live worker runs it, and the dead one's binding and queue are gone
    wait_for(lambda: len(runs) >= 1, "the run")
    wait_for(lambda: live.idle, "the worker idle")
    assert runs.by_queue() == {own_queue(live): [2]}
    if not rabbitmq(bc_app):  # on RabbitMQ the binding went with the queue (checked above)
        assert dead.name not in bound_queues(bc_app)
        assert transport.message_counts([dead]).get(dead.name, 0) == 0
    assert not queue_exists(bc_app, dead.name)
    if isinstance(transport, RedisTransport):
        assert not transport.publisher().exists(transport.delayed_key(dead.name))


def test_a_running_worker_keeps_its_queue_live_past_its_expiry(
    bc_app: App, workers: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker binds again every third of the expiry, so it keeps getting calls."""
    monkeypatch.setattr("mqtasks.broadcast.QUEUE_EXPIRES", 0.6)
    runs = Runs()

    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    worker = workers(bc_app)
    assert worker.broadcast.specs[0].expires == 0.6
    time.sleep(1.5)  # past two expiries
    reload.delay(1)
    wait_for(lambda: len(runs) >= 1, "the run")
    assert runs.by_queue() == {own_queue(worker): [1]}


@pytest.mark.integration
def test_a_worker_that_reconnects_keeps_its_queue_and_binding(
    amqp_url: str, make_app: Callable[..., App], workers: Callable[..., Worker]
) -> None:
    """RabbitMQ: the queue outlives a lost connection (it is not exclusive nor auto-deleted)."""
    app = make_app(amqp_url, backend=None)
    runs = Runs()

    @app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    worker = workers(app)
    consumer = worker._consumer
    assert consumer is not None
    generation = consumer.generation
    # When RabbitMQ closes every connection of this process
    assert close_amqp_connections() >= 1
    wait_for(lambda: consumer.generation > generation, "the worker to reconnect")
    # Then a call still reaches it, through the same queue
    reload.delay(1)
    wait_for(lambda: len(runs) >= 1, "the run")
    assert runs.by_queue() == {own_queue(worker): [1]}


#: A worker process that binds its broadcast queue, expiring after 1 s, and runs until killed.
KILLED_WORKER = """
import sys, threading
import mqtasks.broadcast
from mqtasks import App, Worker

mqtasks.broadcast.QUEUE_EXPIRES = 1.0
url, queue, name = sys.argv[1:4]
app = App("t", broker=url, default_queue=queue)
app.task(broadcast=True, name=name)(lambda: None)
Worker(app, concurrency=1).start()
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["amqp", "redis"])
def test_a_killed_workers_queue_stops_receiving(broker: str, make_app: Callable[..., App]) -> None:
    """A worker killed with SIGKILL cleans nothing up: the broker drops its queue all the same."""
    app = make_app(require_broker(broker), backend=None)

    @app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None: ...

    # Given a worker in another process, bound and consuming
    process = subprocess.Popen(
        [PYTHON, "-c", KILLED_WORKER, app.settings.broker_url, reload.queue, reload.name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # its logs first
            if line.strip() == "ready":
                break
        assert process.poll() is None, "the worker process exited"
        reload.delay()
        # When it is killed
        process.kill()
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    # Then, once its queue expired, nothing is bound for the task any more
    def unroutable() -> bool:
        try:
            reload.delay()
        except Unroutable:
            return True
        return False

    wait_for(unroutable, "the killed worker's queue to stop receiving", interval=0.5)


# -- retries and dead letters -------------------------------------------------------------


def test_a_retry_goes_back_to_the_same_workers_queue(
    bc_app: App, workers: Callable[..., Worker]
) -> None:
    runs = Runs()

    @bc_app.task(broadcast=True, name=unique_name("reload"), max_retries=2)
    def reload(n: int) -> None:
        runs.add(n)
        message = current_message()
        assert message is not None
        if message.attempt == 1:
            raise Retry(countdown=0.2)

    first, second = workers(bc_app), workers(bc_app)
    reload.delay(7)
    wait_for(lambda: len(runs) >= 4, "two attempts on each worker")
    wait_for(lambda: first.idle and second.idle, "both workers idle")
    with runs.lock:
        attempts = Counter((queue, attempt) for queue, _, attempt in runs.items)
    assert attempts == {
        (own_queue(first), 1): 1,
        (own_queue(first), 2): 1,
        (own_queue(second), 1): 1,
        (own_queue(second), 2): 1,
    }


def test_dead_letters_go_to_the_task_queues_dead_letter_queue(
    bc_app: App, workers: Callable[..., Worker]
) -> None:
    @bc_app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None:
        raise Reject("not today")

    first, second = workers(bc_app), workers(bc_app)
    handle = reload.delay()
    wait_for(lambda: len(bc_app.dead_letters(reload.queue)) >= 2, "a dead letter from each worker")
    wait_for(lambda: first.idle and second.idle, "both workers idle")
    letters = bc_app.dead_letters(reload.queue)
    assert [d.id for d in letters] == [handle.id, handle.id]
    assert {d.reason for d in letters} == {"rejected"}
    for worker in (first, second):
        assert not queue_exists(bc_app, own_queue(worker) + DLQ_SUFFIX)


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def mem_app(make_app: Callable[..., App]) -> App:
    """An app on memory:// with a memory result backend."""
    return make_app("memory://", backend="memory://")


def test_the_handle_has_no_result(mem_app: App, workers: Callable[..., Worker]) -> None:
    @mem_app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None: ...

    workers(mem_app)
    handle = reload.delay()
    with pytest.raises(ConfigurationError, match="broadcast task"):
        handle.get(timeout=1)
    assert reload.options["ignore_result"] is True


def test_adelay_broadcasts_too(mem_app: App, workers: Callable[..., Worker]) -> None:
    runs = Runs()

    @mem_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None:
        runs.add(n)

    first, second = workers(mem_app), workers(mem_app)
    handle = asyncio.run(reload.adelay(3))
    assert isinstance(handle, BroadcastHandle) and handle.routed == 2
    wait_for(lambda: len(runs) >= 2, "two runs")
    assert runs.by_queue() == {own_queue(first): [3], own_queue(second): [3]}
    wait_for(lambda: first.idle and second.idle, "both workers idle")
    first.stop()
    second.stop()
    with pytest.raises(Unroutable):
        asyncio.run(reload.adelay(4))


@pytest.mark.parametrize(
    "options",
    [
        {"unique_for": 60},
        {"idempotent": True},
        {"ignore_result": False},
        {"broadcast": "yes"},
    ],
)
def test_options_refused_with_broadcast(mem_app: App, options: dict[str, Any]) -> None:
    options = {"broadcast": True, **options}
    with pytest.raises(ConfigurationError, match="broadcast"):

        @mem_app.task(name=unique_name("reload"), **options)
        def reload() -> None: ...


def test_ordering_key_refused_with_broadcast(mem_app: App) -> None:
    if "ordering_key" not in BASE_OPTIONS:
        pytest.skip("no ordered tasks in this version")
    with pytest.raises(ConfigurationError):

        @mem_app.task(name=unique_name("reload"), broadcast=True, ordering_key="key")
        def reload(key: str) -> None: ...


def test_calls_refused_for_a_broadcast_task(mem_app: App) -> None:
    @mem_app.task(broadcast=True, name=unique_name("reload"))
    def reload(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match="idempotency_key"):
        reload.apply_async((1,), idempotency_key="k")
    with pytest.raises(ConfigurationError, match="countdown"):
        reload.apply_async((1,), countdown=5)
    with pytest.raises(ConfigurationError, match="queue="):
        reload.apply_async((1,), queue=unique_name("elsewhere"))
    for make_signature in (reload.s, reload.si):
        with pytest.raises(ConfigurationError, match="chain, group or chord"):
            make_signature(1)
    with pytest.raises(ConfigurationError, match="map"):
        reload.map([1, 2])


def test_a_name_that_is_no_routing_key_is_refused(mem_app: App) -> None:
    with pytest.raises(ConfigurationError, match="routes its calls"):

        @mem_app.task(broadcast=True, name="bad..name")
        def reload() -> None: ...


def test_redis_kombu_refuses_broadcast_tasks(make_app: Callable[..., App]) -> None:
    app = make_app("redis+kombu://127.0.0.1:6379/0", backend=None)
    with pytest.raises(ConfigurationError, match="cannot run broadcast tasks"):

        @app.task(broadcast=True, name=unique_name("reload"))
        def reload() -> None: ...

    with pytest.raises(ConfigurationError, match="expires"):
        app.transport.queue_arguments(QueueSpec(unique_name("q"), expires=5.0))
    with pytest.raises(ConfigurationError, match="cannot run broadcast tasks"):
        require_broadcast(Capabilities(exchanges=True), "redis+kombu")


def test_a_worker_refuses_to_start_on_a_broker_that_cannot_broadcast(
    mem_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @mem_app.task(broadcast=True, name=unique_name("reload"))
    def reload() -> None: ...

    monkeypatch.setattr(mem_app.transport, "capabilities", Capabilities(exchanges=True))
    with pytest.raises(ConfigurationError, match="cannot run broadcast tasks"):
        Worker(mem_app)


@pytest.mark.parametrize(
    "options",
    [
        {"expires": 0},
        {"expires": True},
        {"durable": False, "queue_type": "quorum"},
        {"dead_letter_queue": "other"},
        {"dead_letter_queue": DLQ_SUFFIX},
    ],
)
def test_queue_spec_checks_the_new_fields(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        QueueSpec("q", **options)


def test_worker_queue_spec() -> None:
    spec = worker_queue(QueueSpec("jobs", max_priority=5), "abc")
    assert spec.name == queue_name("jobs", "abc") == "jobs.bcast.abc"
    assert (spec.durable, spec.queue_type, spec.max_priority) == (False, "classic", 5)
    assert spec.expires is not None and spec.expires > 0
    assert spec.dead_letter_name == "jobs.dlq"
