"""Events: @app.on subscribers, app.emit(), topic routing, and `mqtasks declare`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from mqtasks import App, ConfigurationError, Middleware, Unroutable, Worker
from mqtasks.config import Settings
from mqtasks.events import HEADER_EVENT, EventHandle, build_message, current_event
from mqtasks.message import Message
from mqtasks.testing import drain, memory_app, reset, running_worker
from mqtasks.transport.base import DLQ_SUFFIX, QueueSpec, Transport
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.redis import RedisTransport
from mqtasks.transport.redis.exchanges import exchange_key
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.cli import MQTASKS, PYTHON, CliWorker, clean_env, run
from tests._helpers.wait import WAIT, wait_for

# -- fixtures ------------------------------------------------------------------------


BROKERS = [
    "memory",
    pytest.param("amqp", marks=pytest.mark.integration),
    pytest.param("redis", marks=pytest.mark.integration),
]


def delete_exchange(transport: Transport, exchange: str) -> None:
    """Remove the bindings of ``exchange`` and the exchange itself (its queues go with the app)."""
    for pattern, queue in transport.bindings(exchange):
        transport.unbind(exchange, pattern, queue)
    if isinstance(transport, KombuTransport) and not transport.capabilities.in_process:
        with transport.connection() as conn:
            conn.default_channel.exchange_delete(exchange)
    if isinstance(transport, RedisTransport):
        transport.publisher().delete(exchange_key(transport, exchange))


@pytest.fixture(params=BROKERS)
def ev_app(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Iterator[App]:
    """An app on each broker with events and an exchange of its own, deleted after the test."""
    url = require_broker(request.param)
    app = make_app(url, events_exchange=unique_name("x"), backend=None)
    yield app
    delete_exchange(app.transport, app.settings.events_exchange)


@pytest.fixture
def mem_app() -> Iterator[App]:
    """An app on memory://, without a result backend."""
    app = memory_app(backend=None)
    yield app
    reset(app)


class Recording(Middleware):
    """Records the publish hooks it sees."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Message]] = []

    def before_publish(self, app: App, message: Message) -> Message:
        self.calls.append(("before", message))
        return message.copy(headers={**message.headers, "x-recorded": "yes"})

    def after_publish(self, app: App, message: Message) -> None:
        self.calls.append(("after", message))

    def after_publish_error(self, app: App, message: Message, exception: BaseException) -> None:
        self.calls.append(("error", message))


# -- routing ---------------------------------------------------------------------------


def test_each_matching_subscriber_runs_an_event_once(ev_app: App) -> None:
    """Two subscribers with overlapping patterns each run it once; a third does not match."""
    seen: list[tuple[str, Any, str | None]] = []
    lock = threading.Lock()

    def record(who: str) -> Callable[[Any], None]:
        def handler(payload: Any) -> None:
            with lock:
                seen.append((who, payload, current_event()))

        handler.__name__ = who
        return handler

    # (Handlers made by one factory share their code: each needs a name of its own.)
    ev_app.on("order.*", queue=unique_name("star"), name="star")(record("star"))
    ev_app.on("order.#", queue=unique_name("hash"), name="hash")(record("hash"))
    ev_app.on("invoice.*", queue=unique_name("other"), name="other")(record("other"))

    with running_worker(ev_app) as worker:
        handle = ev_app.emit("order.created", {"id": 42})
        drain(worker)

    assert sorted(seen) == [
        ("hash", {"id": 42}, "order.created"),
        ("star", {"id": 42}, "order.created"),
    ]
    assert isinstance(handle, EventHandle)
    assert handle.event == "order.created"
    assert handle.routed in (2, None)  # None: the broker does not count (RabbitMQ)


def test_workers_on_one_subscriber_queue_share_its_events(ev_app: App) -> None:
    """Competing consumers: each event runs once, on one of the workers."""
    together = threading.Barrier(2, timeout=10)
    runs: list[int] = []

    @ev_app.on("job.*", queue=unique_name("jobs"))
    def job(payload: int) -> None:
        together.wait()  # passes only when both workers run one at the same time
        runs.append(payload)

    with (
        running_worker(ev_app, concurrency=1, prefetch=1) as first,
        running_worker(ev_app, concurrency=1, prefetch=1) as second,
    ):
        ev_app.emit("job.started", 1)
        ev_app.emit("job.started", 2)
        drain(first)
        drain(second)

    assert sorted(runs) == [1, 2]
    assert (first.received, second.received) == (1, 1)


def test_an_event_emitted_before_any_worker_waits_in_the_subscriber_queue(ev_app: App) -> None:
    ran: list[Any] = []

    @ev_app.on("user.signed_up", queue=unique_name("welcome"))
    def welcome(payload: Any) -> None:
        ran.append(payload)

    # Given no worker has started: emit declares the app's own bindings first
    handle = ev_app.emit("user.signed_up", "ada")
    assert handle.routed in (1, None)

    with running_worker(ev_app) as worker:
        drain(worker)
    assert ran == ["ada"]


def test_emit_with_no_subscriber_is_unroutable_unless_not_mandatory(ev_app: App) -> None:
    @ev_app.on("order.*", queue=unique_name("orders"))
    def orders(payload: Any) -> None: ...

    with pytest.raises(Unroutable, match=r"invoice\.paid"):
        ev_app.emit("invoice.paid", {"id": 1})

    handle = ev_app.emit("invoice.paid", {"id": 1}, mandatory=False)
    assert handle.routed in (0, None)
    assert ev_app.transport.message_counts([ev_app.queue(orders.queue)]) == {orders.queue: 0}


def test_aemit_publishes_from_asyncio_code(mem_app: App) -> None:
    got: list[Any] = []

    @mem_app.on("order.*")
    def orders(payload: Any) -> None:
        got.append(payload)

    async def main() -> list[EventHandle]:
        return list(await asyncio.gather(*(mem_app.aemit("order.created", i) for i in range(3))))

    with running_worker(mem_app) as worker:
        handles = asyncio.run(main())
        drain(worker)
    assert sorted(got) == [0, 1, 2]
    assert len({h.id for h in handles}) == 3
    with pytest.raises(Unroutable):
        asyncio.run(mem_app.aemit("nobody.listens", 1))


# -- failures -----------------------------------------------------------------------------


def test_a_failing_subscriber_retries_and_dead_letters_in_its_own_queue(ev_app: App) -> None:
    """The other subscriber of the same event succeeds; a replay runs the failed one again."""
    ok: list[Any] = []
    attempts: list[int] = []
    fixed = threading.Event()

    @ev_app.on("order.paid", queue=unique_name("ok"))
    def fine(payload: Any) -> None:
        ok.append(payload)

    @ev_app.on("order.*", queue=unique_name("bad"), max_retries=1, retry_backoff=0)
    def broken(payload: Any) -> None:
        from mqtasks import current_message

        message = current_message()
        assert message is not None
        attempts.append(message.attempt)
        if not fixed.is_set():
            raise RuntimeError("payment service down")

    with running_worker(ev_app) as worker:
        handle = ev_app.emit("order.paid", {"id": 7})
        drain(worker, raise_errors=False)

        assert ok == [{"id": 7}]
        assert attempts == [1, 2]
        [dead] = ev_app.dead_letters(broken.queue)
        assert (dead.id, dead.reason, dead.attempts) == (handle.id, "max_retries_exceeded", 2)
        assert dead.task == "order.paid"  # on the wire, an event names itself
        assert dead.headers[HEADER_EVENT] == "order.paid"
        assert ev_app.dead_letters(fine.queue) == []

        # When the dead letter is replayed, the subscriber of its queue runs it again
        worker.errors.clear()
        fixed.set()
        assert ev_app.replay_dead_letters(broken.queue) == 1
        drain(worker)
    assert attempts == [1, 2, 1]
    assert ok == [{"id": 7}]


def test_a_subscribers_priority_goes_with_the_event_and_its_retries(mem_app: App) -> None:
    seen: list[int | None] = []

    @mem_app.on("stock.*", priority=7, max_retries=1, retry_backoff=0)
    def restock(payload: Any) -> None:
        from mqtasks import current_message

        message = current_message()
        assert message is not None
        seen.append(message.priority)
        if message.attempt == 1:
            raise RuntimeError("warehouse busy")

    with running_worker(mem_app) as worker:
        mem_app.emit("stock.low", {"sku": 1})
        drain(worker, raise_errors=False)
    assert seen == [7, 7]


def test_subscribers_store_nothing_under_the_event_id_with_a_result_backend() -> None:
    app = memory_app()  # with a memory:// result backend
    ran: list[str] = []

    @app.on("order.*")
    def fine(payload: Any) -> None:
        ran.append("fine")

    @app.on("order.#", max_retries=1, retry_backoff=0)
    def broken(payload: Any) -> None:
        raise RuntimeError("down")

    try:
        with running_worker(app) as worker:
            handle = app.emit("order.created", 1)
            drain(worker, raise_errors=False)
        assert ran == ["fine"]
        assert [d.reason for d in app.dead_letters(broken.queue)] == ["max_retries_exceeded"]
        assert app.handle(handle.id).outcome() is None
    finally:
        reset(app)


def test_an_event_on_a_queue_without_subscriber_is_dead_lettered(ev_app: App) -> None:
    @ev_app.task(queue=unique_name("plain"))
    def plain(x: int) -> None: ...

    message = build_message(
        ev_app.settings.events_exchange, "order.created", {"id": 1}, headers=None, event_id=None
    )
    envelope = message.encode(max_size=ev_app.settings.max_message_size)
    with running_worker(ev_app) as worker:
        ev_app.transport.publish(plain.queue, envelope)
        drain(worker, raise_errors=False)
    [dead] = ev_app.dead_letters(plain.queue)
    assert (dead.id, dead.reason) == (message.id, "unknown_subscriber")
    assert "order.created" in (dead.detail or "")


def test_publish_middleware_runs_for_emit(mem_app: App) -> None:
    recording = Recording()
    mem_app.middleware.append(recording)
    got: list[Any] = []

    @mem_app.on("order.*")
    def orders(payload: Any) -> None:
        from mqtasks import current_message

        message = current_message()
        assert message is not None
        got.append(message.headers.get("x-recorded"))

    with running_worker(mem_app) as worker:
        handle = mem_app.emit("order.created", 1)
        drain(worker)
    with pytest.raises(Unroutable):
        mem_app.emit("nobody.listens", 1)

    kinds = [(kind, m.task, m.queue) for kind, m in recording.calls]
    assert kinds == [
        ("before", "order.created", "mqtasks.events"),
        ("after", "order.created", "mqtasks.events"),
        ("before", "nobody.listens", "mqtasks.events"),
        ("error", "nobody.listens", "mqtasks.events"),
    ]
    assert recording.calls[1][1].id == handle.id
    assert got == ["yes"]  # the header a hook added reached the subscriber


# -- configuration mistakes, caught early ---------------------------------------------------


@pytest.mark.parametrize("pattern", ["", "order..created", ".order", "order*", "order.#x"])
def test_a_bad_pattern_is_refused_at_decoration(mem_app: App, pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="pattern"):

        @mem_app.on(pattern)
        def handler(payload: Any) -> None: ...

    assert list(mem_app.subscriptions) == []
    assert mem_app.tasks == {}


@pytest.mark.parametrize("name", ["", "order.*", "order.#", "a..b", "order.", "x" * 256])
def test_a_bad_event_name_is_refused_at_emit(mem_app: App, name: str) -> None:
    with pytest.raises(ValueError):
        mem_app.emit(name, 1)


def test_a_second_subscriber_on_one_queue_is_refused_naming_both(mem_app: App) -> None:
    @mem_app.on("order.*", queue="shared")
    def first(payload: Any) -> None: ...

    with pytest.raises(ConfigurationError) as info:

        @mem_app.on("invoice.*", queue="shared")
        def second(payload: Any) -> None: ...

    assert "first" in str(info.value) and "second" in str(info.value)
    assert [(s.pattern, s.queue) for s in mem_app.subscriptions] == [("order.*", "shared")]


def test_a_subscriber_must_take_one_argument(mem_app: App) -> None:
    with pytest.raises(ConfigurationError, match="one argument"):

        @mem_app.on("order.*")
        def two(payload: Any, extra: Any) -> None: ...


def test_subscribers_store_no_result_and_an_event_has_none_to_get(mem_app: App) -> None:
    with pytest.raises(ConfigurationError, match="ignore_result"):

        @mem_app.on("order.*", ignore_result=False)
        def keeps(payload: Any) -> None: ...

    @mem_app.on("order.*")
    def audit(payload: Any) -> None: ...

    assert audit.options["ignore_result"] is True
    handle = mem_app.emit("order.created", 1)
    with pytest.raises(ConfigurationError, match="no result"):
        handle.get(timeout=1)


@pytest.mark.parametrize("option", [{"idempotent": True}, {"unique_for": 60}])
def test_subscribers_refuse_options_keyed_by_the_shared_event_id(
    mem_app: App, option: dict[str, Any]
) -> None:
    """Every subscriber gets an event under one id: a key of that id would skip the others."""
    with pytest.raises(ConfigurationError, match="event's id"):

        @mem_app.on("order.*", **option)
        def audit(payload: Any) -> None: ...


def test_subscribers_refuse_broadcast(mem_app: App) -> None:
    with pytest.raises(ConfigurationError, match="cannot take broadcast"):

        @mem_app.on("order.*", broadcast=True)
        def audit(payload: Any) -> None: ...

    assert not list(mem_app.subscriptions)


def test_subscriber_defaults_and_registry(mem_app: App) -> None:
    @mem_app.on("order.*", max_retries=5)
    def audit(payload: Any) -> None: ...

    [sub] = mem_app.subscriptions
    pattern, queue, task = sub
    assert (pattern, queue, task) == ("order.*", "test.audit", audit)
    assert audit.queue == "test.audit"
    assert audit.retry_policy.max_retries == 5
    assert mem_app.task_queues() == ["test.audit"]  # consumed by default
    assert mem_app.tasks[audit.name] is audit


def test_a_worker_binds_its_subscriber_queues_at_start(mem_app: App) -> None:
    @mem_app.on("order.*")
    def audit(payload: Any) -> None: ...

    @mem_app.on("invoice.#")
    def billing(payload: Any) -> None: ...

    exchange = mem_app.settings.events_exchange
    assert mem_app.transport.bindings(exchange) == []
    with running_worker(mem_app, queues=[audit.queue]) as worker:
        assert mem_app.transport.bindings(exchange) == [("order.*", audit.queue)]
        assert [s.queue for s in worker.subscriptions] == [audit.queue]


def test_a_worker_refuses_subscribers_on_a_transport_without_exchanges() -> None:
    app = App("t", broker="redis+kombu://127.0.0.1:6379/9", backend=None)

    @app.on("order.*")
    def audit(payload: Any) -> None: ...

    with pytest.raises(ConfigurationError, match=r"cannot route events.*'order\.\*' on 't\.audit'"):
        Worker(app)


def test_events_exchange_setting() -> None:
    assert Settings().events_exchange == "mqtasks.events"
    env = {"MQTASKS_EVENTS_EXCHANGE": "shop.events"}
    assert Settings.from_env(env).events_exchange == "shop.events"
    with pytest.raises(ConfigurationError, match="events_exchange"):
        Settings(events_exchange="")


# -- mqtasks declare ---------------------------------------------------------------------------

_DECLARE_APP = """
from mqtasks import App

app = App("shop")


@app.task(queue="shop.mail")
def send(x): ...


@app.on("order.*")
def audit(payload): ...


@app.on("order.created", queue="shop.stock")
def stock(payload): ...
"""


def test_declare_prints_queues_exchange_and_bindings(tmp_path: Path) -> None:
    (tmp_path / "declare_app.py").write_text(_DECLARE_APP)
    env = clean_env(PYTHONPATH=str(tmp_path), MQTASKS_EVENTS_EXCHANGE="shop.events")
    done = run([MQTASKS, "declare", "-A", "declare_app"], env=env)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[0] == ["Declared", "on", "memory:///:"]
    assert ["queue", "shop.mail", "dead", "letters:", "shop.mail.dlq"] in lines
    assert ["queue", "shop.audit", "dead", "letters:", "shop.audit.dlq"] in lines
    assert ["exchange", "shop.events", "topic,", "durable"] in lines
    assert ["binding", "order.*", "->", "shop.audit", "subscriber", "declare_app.audit"] in lines
    assert ["binding", "order.created", "->", "shop.stock", "subscriber", "declare_app.stock"] in (
        lines
    )


def test_declare_fails_on_a_transport_without_exchanges(tmp_path: Path) -> None:
    (tmp_path / "declare_app.py").write_text(_DECLARE_APP)
    env = clean_env(
        PYTHONPATH=str(tmp_path), MQTASKS_BROKER_URL="redis+kombu://:secret@127.0.0.1:1/9"
    )
    done = run([MQTASKS, "declare", "-A", "declare_app"], env=env)
    assert done.returncode == 1
    assert "secret" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("amqp", marks=pytest.mark.integration),
        pytest.param("redis", marks=pytest.mark.integration),
    ],
)
def test_declare_binds_on_the_broker_before_any_worker_starts(
    kind: str, tmp_path: Path, make_app: Callable[..., App]
) -> None:
    url = require_broker(kind)
    exchange, queue = unique_name("x"), unique_name("declared")
    (tmp_path / "declare_app.py").write_text(
        "from mqtasks import App\n\napp = App('shop')\n\n\n"
        f"@app.on('order.*', queue={queue!r})\ndef audit(payload): ...\n"
    )
    env = clean_env(
        PYTHONPATH=str(tmp_path), MQTASKS_BROKER_URL=url, MQTASKS_EVENTS_EXCHANGE=exchange
    )
    publisher = make_app(url, events_exchange=exchange, backend=None)  # knows no subscriber
    specs = [QueueSpec(queue), QueueSpec(queue + DLQ_SUFFIX)]
    try:
        # Given an old binding of the queue, `mqtasks declare` ran, and no worker has started
        publisher.transport.bind(exchange, "order.old.#", specs[0])
        done = run([MQTASKS, "declare", "-A", "declare_app"], env=env)
        assert done.returncode == 0, done.stderr
        lines = [line.split() for line in done.stdout.splitlines()]
        assert ["binding", "order.*", "->", queue, "subscriber", "declare_app.audit"] in lines
        # (listed where the broker can list bindings: not RabbitMQ, over AMQP)
        stale = ["stale", "order.old.#", "->", queue, "bound,", "but", "no", "subscriber"]
        assert [line[:8] for line in lines if line[0] == "stale"] == (
            [stale] if kind == "redis" else []
        )
        # When another app emits a matching event, it is routed and waits in the queue
        publisher.emit("order.created", {"id": 1})
        assert publisher.transport.message_counts(specs[:1]) == {queue: 1}
        # An event no binding matches is still refused
        with pytest.raises(Unroutable):
            publisher.emit("invoice.created", {"id": 1})
    finally:
        delete_exchange(publisher.transport, exchange)
        publisher.transport.delete(specs)


_WORKER_APP = """
import os

from mqtasks import App, current_event

app = App("shop")


def record(line):
    with open(os.environ["EVENTS_OUT"], "a") as out:
        out.write(line + "\\n")


@app.on("order.*", queue=os.environ["EVENTS_Q1"])
def audit(payload):
    record(f"audit {current_event()} {payload}")


@app.on("order.created", queue=os.environ["EVENTS_Q2"])
def stock(payload):
    record(f"stock {current_event()} {payload}")
"""


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("amqp", marks=pytest.mark.integration),
        pytest.param("redis", marks=pytest.mark.integration),
    ],
)
def test_a_worker_process_binds_at_start_and_runs_each_subscriber(
    kind: str, tmp_path: Path, make_app: Callable[..., App]
) -> None:
    url = require_broker(kind)
    exchange, q1, q2 = unique_name("x"), unique_name("audit"), unique_name("stock")
    (tmp_path / "events_worker_app.py").write_text(_WORKER_APP)
    out = tmp_path / "out.txt"
    env = clean_env(
        PYTHONPATH=str(tmp_path),
        MQTASKS_BROKER_URL=url,
        MQTASKS_EVENTS_EXCHANGE=exchange,
        EVENTS_OUT=str(out),
        EVENTS_Q1=q1,
        EVENTS_Q2=q2,
    )
    publisher = make_app(url, events_exchange=exchange, backend=None)  # knows no subscriber
    specs = [QueueSpec(n) for q in (q1, q2) for n in (q, q + DLQ_SUFFIX)]
    with open(tmp_path / "err", "ab") as err:
        proc = subprocess.Popen(
            [PYTHON, "-m", "mqtasks", "worker", "-A", "events_worker_app", "--log-format", "json"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    worker = CliWorker(proc, tmp_path / "err", tmp_path / "err")
    try:
        # Given a worker process started on an exchange nobody declared before
        [started] = worker.wait_log("worker.started")
        assert sorted(map(tuple, started["subscriptions"])) == [
            ("order.*", q1),
            ("order.created", q2),
        ]
        # When another app emits two events
        publisher.emit("order.created", 1)
        publisher.emit("order.paid", 2)

        # Then each matching subscriber ran each once
        def lines() -> list[str] | None:
            found = out.read_text().splitlines() if out.exists() else []
            return sorted(found) if len(found) >= 3 else None

        assert wait_for(lines, "three subscriber runs", WAIT) == [
            "audit order.created 1",
            "audit order.paid 2",
            "stock order.created 1",
        ]
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        worker.kill()
        delete_exchange(publisher.transport, exchange)
        publisher.transport.delete(specs)


def test_the_events_example_runs_on_memory() -> None:
    done = run([PYTHON, "examples/events.py"], env=clean_env())
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if not line[:4].isdigit()]  # no logs
    assert sorted(printed) == [
        "audit: user.signed_up {'name': 'ada'}",
        "email: order 42 order.created",
        "email: order 42 order.paid",
        "invoice.paid: no subscriber is bound for it",
        "stock: reserve 3 for order 42",
    ]


@pytest.mark.parametrize(
    "kind", ["memory", pytest.param("redis", marks=pytest.mark.integration)]
)  # RabbitMQ cannot list bindings over AMQP: nothing to report there
def test_a_binding_no_subscriber_declares_is_reported(
    kind: str, tmp_path: Path, make_app: Callable[..., App]
) -> None:
    app = make_app(require_broker(kind), events_exchange=unique_name("x"), backend=None)
    exchange, queue = app.settings.events_exchange, unique_name("audit")
    ran: list[str | None] = []
    try:
        # Given an earlier version of the subscriber bound its queue with another pattern
        app.transport.bind(exchange, "order.old", app.queue(queue))

        @app.on("order.new", queue=queue)
        def audit(payload: Any) -> None:
            ran.append(current_event())

        # When a worker starts, it says so, and the old binding still routes its events
        with structlog.testing.capture_logs() as logs, running_worker(app) as worker:
            app.emit("order.old", 1)
            app.emit("order.new", 2)
            drain(worker)
        stale = [e for e in logs if e["event"] == "events.stale_binding"]
        assert [(e["pattern"], e["queue"], e["subscriber"]) for e in stale] == [
            ("order.old", queue, audit.name)
        ]
        assert sorted(ran, key=str) == ["order.new", "order.old"]
    finally:
        delete_exchange(app.transport, exchange)
