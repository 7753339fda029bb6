"""``sqs://`` on moto's SQS server (started by the tests on a loopback port, never AWS).

What SQS does its own way: delays held by SQS (in steps beyond its 900 s),
visibility kept up while a task runs, delivery counts from
``ApproximateReceiveCount``, FIFO message groups, SQS's counts in
``mqtasks status``, the ``dlq`` commands; and what it cannot do refused.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from click.testing import CliRunner

import tests.test_dlq as dlq_tests
from mqtasks import App, QueueSpec, Task
from mqtasks.cli import cli
from mqtasks.exceptions import ConfigurationError, MQTasksError
from mqtasks.testing import drain, running_worker
from mqtasks.transport import sqs as sqs_transport
from mqtasks.transport.base import DLQ_SUFFIX, Delivery, Envelope
from mqtasks.transport.sqs import DUE_HEADER, GROUP_HEADER, SqsTransport
from mqtasks.validation import check_app
from tests import crash_app, status_app
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.crash import Crash
from tests._helpers.wait import wait_for
from tests.test_status import loaded

#: The fixture the dlq commands' test takes.
make_dlq_app = dlq_tests.make_dlq_app
#: The dlq commands' own test (ls, show, replay, purge), run on sqs:// (``cli_url`` below).
test_dlq_commands_on_sqs = dlq_tests.test_cli_ls_show_replay_purge


@pytest.fixture
def cli_url() -> str:
    """The dlq CLI test's broker: SQS."""
    return require_broker("sqs")


@pytest.fixture
def url() -> str:
    return require_broker("sqs")


@pytest.fixture
def sqs_app(url: str, make_app: Callable[..., App]) -> App:
    return make_app(url)


def endpoint(url: str) -> str:
    return "http://" + url.split("://", 1)[1]


def client(url: str) -> object:
    return boto3.client("sqs", endpoint_url=endpoint(url), region_name="us-east-1")


def envelope(n: int = 0, **headers: object) -> Envelope:
    return Envelope(body=json.dumps({"n": n}).encode(), message_id=f"m-{n}", headers=headers)


def loaded_queue(sqs_app: App, prefix: str, n: int) -> tuple[str, QueueSpec]:
    """Declare a run-unique queue holding ``n`` messages; return its name and spec."""
    queue = unique_name(prefix)
    spec = sqs_app.queue(queue)
    sqs_app.transport.declare([spec])
    for i in range(n):
        sqs_app.transport.publish(queue, envelope(i))
    return queue, spec


def received_groups(url: str, queue: str, receives: int = 2) -> list[str]:
    """Receive from ``queue`` straight from SQS; return the ``MessageGroupId`` of each message."""
    c = client(url)
    q_url = c.get_queue_url(QueueName=queue)["QueueUrl"]  # type: ignore[attr-defined]
    groups = []
    for _ in range(receives):
        resp = c.receive_message(  # type: ignore[attr-defined]
            QueueUrl=q_url, MessageSystemAttributeNames=["MessageGroupId"], WaitTimeSeconds=2
        )
        groups += [m["Attributes"]["MessageGroupId"] for m in resp.get("Messages", [])]
    return groups


def drain_until(consumer: object, got: list[Delivery], n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} deliveries in time"
        consumer.drain(0.2)  # type: ignore[attr-defined]


# -- publishing and delays ---------------------------------------------------------


def test_a_short_delay_is_held_by_sqs(sqs_app: App) -> None:
    t = sqs_app.transport
    queue = unique_name("delay")
    spec = sqs_app.queue(queue)
    t.declare([spec])
    t.publish(queue, envelope(1), delay=2)
    # Held by SQS, not ready: delayed 1, ready 0
    assert t.delayed_counts([spec]) == {queue: 1}
    assert t.message_counts([spec]) == {queue: 0}
    wait_for(lambda: t.message_counts([spec]) == {queue: 1}, "the delay to end", 10, 0.2)


def test_a_countdown_runs_the_task_after_it(sqs_app: App) -> None:
    ran: list[float] = []

    @sqs_app.task
    def later() -> None:
        ran.append(time.time())

    sent = time.time()
    later.apply_async(countdown=2)
    with running_worker(sqs_app, concurrency=1) as worker:
        wait_for(lambda: ran, "the task to run", 15, 0.1)
        drain(worker)
    assert ran[0] - sent >= 1.9


def test_a_delay_past_what_sqs_holds_is_held_in_steps(
    sqs_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQS's 900 s made 2 s, so that a delay of 5 s takes three steps held by SQS.
    monkeypatch.setattr(sqs_transport, "MAX_DELAY", 2)
    ran: list[float] = []

    @sqs_app.task
    def much_later() -> None:
        ran.append(time.time())

    sent = time.time()
    much_later.apply_async(countdown=5)
    spec = sqs_app.queue(much_later.queue)
    assert sqs_app.transport.delayed_counts([spec]) == {much_later.queue: 1}
    with running_worker(sqs_app, concurrency=1) as worker:
        wait_for(lambda: ran, "the task to run", 20, 0.1)
        drain(worker)
        # Between the steps the message was back in SQS, delayed again; the worker
        # never held it (it received it at most once per step).
        assert worker.received <= 4
    assert len(ran) == 1
    assert ran[0] - sent >= 5 - 1.0  # due within the second the consumer allows


def test_a_long_delay_goes_in_a_first_step_of_900_s_and_says_when_it_is_due(
    sqs_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = sqs_app.transport
    assert isinstance(t, SqsTransport)
    queue = unique_name("long")
    t.declare([sqs_app.queue(queue)])
    sent: list[tuple[Envelope, int | None]] = []
    publish_pooled = t._publish_pooled

    def spy(exchange: str, key: str, env: Envelope, *args: object, **kwargs: object) -> object:
        sent.append((env, t._local.delay_seconds))
        return publish_pooled(exchange, key, env, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(t, "_publish_pooled", spy)
    before = time.time()
    t.publish(queue, envelope(1), delay=3600)
    t.publish(queue, envelope(2), delay=0.2)
    [(long, step), (short, short_step)] = sent
    assert step == 900 and before + 3600 <= long.headers[DUE_HEADER] <= time.time() + 3600
    assert short_step == 1 and DUE_HEADER not in short.headers
    assert t.delayed_counts([sqs_app.queue(queue)]) == {queue: 2}


def test_a_message_received_before_it_is_due_goes_back_for_the_rest(sqs_app: App) -> None:
    t = sqs_app.transport
    queue = unique_name("due")
    spec = sqs_app.queue(queue)
    t.declare([spec])
    # A message that arrives seconds before it is due (a step's end)
    due = time.time() + 6
    t.publish(queue, envelope(1, **{DUE_HEADER: due}))
    got: list[Delivery] = []
    consumer = sqs_app.transport.consumer([spec], prefetch=10)
    consumer.start(got.append)
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            consumer.drain(0.2)
        # is not handed to the worker, but held by SQS again for the rest
        assert got == []
        assert t.delayed_counts([spec]) == {queue: 1}
        drain_until(consumer, got, 1, timeout=15)
    finally:
        consumer.close()
    assert got[0].received_at >= due - 1.0
    assert got[0].message_id == "m-1"
    assert DUE_HEADER not in got[0].headers


def test_a_fifo_queue_refuses_a_delay_and_an_unknown_priority_is_refused(sqs_app: App) -> None:
    t = sqs_app.transport
    fifo = unique_name("order") + ".fifo"
    t.declare([sqs_app.queue(fifo)])
    with pytest.raises(ConfigurationError, match="FIFO"):
        t.publish(fifo, envelope(1), delay=5)
    plain = unique_name("prio")
    with pytest.raises(ConfigurationError, match="no priorities"):
        t.publish(plain, Envelope(body=b"{}", message_id="p", priority=5))


# -- what SQS cannot do -------------------------------------------------------------


def test_priorities_and_exchanges_are_refused_with_what_to_do(sqs_app: App) -> None:
    @sqs_app.task
    def urgent() -> None: ...

    with pytest.raises(ConfigurationError, match="no priorities"):
        urgent.apply_async(priority=9)
    with pytest.raises(ConfigurationError, match="max_priority"):
        sqs_app.transport.declare([QueueSpec(unique_name("p"), max_priority=9)])
    with pytest.raises(ConfigurationError, match="cannot route events"):
        sqs_app.transport.bind("events", "order.*", sqs_app.queue(unique_name("sub")))
    with pytest.raises(ConfigurationError, match="cannot route events"):
        sqs_app.transport.emit("events", "order.created", envelope(1))
    with pytest.raises(ConfigurationError, match="max_length"):
        sqs_app.transport.declare([QueueSpec(unique_name("l"), max_length=5)])
    for options in ({"visibility_timeout": 1}, {"visibility_timeout": 30, "wait_time_seconds": 20}):
        with pytest.raises(ConfigurationError, match="visibility_timeout"):
            SqsTransport(sqs_app.settings.broker_url, transport_options=options).declare(
                [QueueSpec(unique_name("v"))]
            )


# -- visibility, delivery counts, dead letters ------------------------------------------


def test_a_task_longer_than_the_visibility_timeout_runs_once(
    url: str, make_app: Callable[..., App]
) -> None:
    # The shortest timeout the transport takes; the task runs 1.5 times as long.
    app = make_app(url, transport_options={"visibility_timeout": 10})
    runs: list[int] = []
    lock = threading.Lock()

    @app.task
    def slow() -> None:
        with lock:
            runs.append(1)
        time.sleep(15)

    slow.delay()
    with running_worker(app, concurrency=2, prefetch=2) as worker:
        drain(worker, timeout=40)
        assert worker.received == 1
    assert runs == [1]
    assert app.transport.queue_stats([app.queue(slow.queue)])[slow.queue].unacked == 0


def test_delivery_count_is_sqs_receive_count_and_the_limit_dead_letters(
    url: str, make_app: Callable[..., App]
) -> None:
    queue = unique_name("limited")
    app = make_app(url, queues=[QueueSpec(queue, delivery_limit=2)])
    ran: list[int] = []

    @app.task(queue=queue)
    def crashy() -> None:
        ran.append(1)

    handle = crashy.delay()
    spec = app.queue(queue)
    got: list[Delivery] = []
    consumer = app.transport.consumer([spec], prefetch=1)
    consumer.start(got.append)
    try:
        # Two deliveries that never end (a worker that died), handed back each time
        for n in (1, 2):
            drain_until(consumer, got, n)
            assert got[-1].delivery_count == n
            assert got[-1].redelivered is (n > 1)
            assert consumer.requeue(got[-1])
    finally:
        consumer.close()
    # The third is over the limit: dead-lettered with its reason, not run
    with running_worker(app, concurrency=1) as worker:
        drain(worker, raise_errors=False)
    assert ran == []
    [entry] = app.dead_letters(queue)
    assert (entry.id, entry.reason) == (handle.id, "delivery_limit")


def test_a_killed_workers_task_comes_back_after_the_visibility_timeout(
    crash: Callable[[str], Crash],
) -> None:
    c = crash("sqs")
    # Messages of a dead worker come back after 10 s (the shortest timeout taken).
    c.options = {"visibility_timeout": 10}
    c.app = crash_app.make_app(c.url, c.queue, c.options, None)
    # Given supervised workers (a dead child is replaced) and a limit of 2 deliveries
    parent = c.start("--processes", "2", "-c", "1", "--prefetch", "1", MQTASKS_DELIVERY_LIMIT="2")
    parent.wait_started(2)
    # When a task SIGKILLs its worker process every time it runs
    c.app.tasks[crash_app.KILL].delay("doom")
    parent.wait_log("task.dead_lettered", timeout=90)
    # Then SQS handed it to a live process after each death (at least once), and the
    # third receive, over the limit, was dead-lettered instead of run
    starts = c.events("start", "doom")
    assert len(starts) == 2 and len(set(starts)) == 2
    [entry] = c.app.dead_letters(c.queue)
    assert entry.reason == "delivery_limit" and entry.task == crash_app.KILL
    c.app.tasks[crash_app.PING].delay("after")
    wait_for(lambda: c.events("ping", "after"), "the ping to run", 30)
    parent.signal(signal.SIGTERM)
    assert parent.wait(30) == 0, parent.stderr()[-3000:]


def test_a_stopped_consumer_hands_its_messages_back_at_once(sqs_app: App) -> None:
    t = sqs_app.transport
    queue, spec = loaded_queue(sqs_app, "back", 3)
    got: list[Delivery] = []
    consumer = t.consumer([spec], prefetch=5)
    consumer.start(got.append)
    drain_until(consumer, got, 3)
    assert t.message_counts([spec]) == {queue: 0}
    consumer.close()
    # Visible again at once, not after the visibility timeout
    assert t.message_counts([spec]) == {queue: 3}


def test_acks_of_many_messages_delete_them_in_batches(
    sqs_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = sqs_app.transport
    queue, spec = loaded_queue(sqs_app, "batch", 13)
    got: list[Delivery] = []
    consumer = t.consumer([spec], prefetch=13)
    consumer.start(got.append)
    try:
        drain_until(consumer, got, 13)
        sqs = got[0].raw.channel.sqs()  # type: ignore[attr-defined]
        calls: list[int] = []
        batch = sqs.delete_message_batch

        def counted(**kwargs: object) -> object:
            calls.append(len(kwargs["Entries"]))  # type: ignore[arg-type]
            return batch(**kwargs)

        monkeypatch.setattr(sqs, "delete_message_batch", counted)
        consumer.ack_many(got)
        assert calls == [10, 3]
        assert all(d.raw.acknowledged for d in got)  # type: ignore[attr-defined]
        # Their prefetch slots are free: more comes
        t.publish(queue, envelope(99))
        drain_until(consumer, got, 14)
        consumer.ack(got[-1])
    finally:
        consumer.close()
    stats = t.queue_stats([spec])[queue]
    assert (stats.ready, stats.unacked) == (0, 0)


def test_dead_letters_go_to_the_dlq_queue_with_their_reason(sqs_app: App) -> None:
    @sqs_app.task(max_retries=1, retry_backoff=1)
    def broken() -> None:
        raise RuntimeError("broken")

    handle = broken.delay()
    with running_worker(sqs_app, concurrency=1) as worker:
        wait_for(lambda: sqs_app.dead_letters(broken.queue), "a dead letter", 30, 0.5)
        drain(worker, raise_errors=False)
    [entry] = sqs_app.dead_letters(broken.queue)
    assert (entry.id, entry.reason, entry.attempts) == (handle.id, "max_retries_exceeded", 2)
    # SQS spells the dot of "<queue>.dlq" as "-"
    names = client(sqs_app.settings.broker_url).list_queues(  # type: ignore[attr-defined]
        QueueNamePrefix=broken.queue
    )["QueueUrls"]
    assert any(u.endswith(broken.queue + "-dlq") for u in names)


# -- status ------------------------------------------------------------------------------


def test_status_reads_sqs_counts(url: str, make_app: Callable[..., App]) -> None:
    app = status_app.create(url, unique_name("status"))
    make_app(url, default_queue=app.settings.default_queue)  # cleanup of its queues
    queue = app.settings.default_queue
    with loaded(app):
        stats = app.transport.queue_stats([app.queue(queue)])[queue]
        # 3 ready, 1 held by the consumer, 2 delayed, 1 dead letter; SQS counts no consumers
        assert (stats.ready, stats.unacked, stats.delayed, stats.dead_lettered) == (3, 1, 2, 1)
        assert stats.consumers is None
        result = CliRunner().invoke(
            cli, ["status", "-A", "tests.status_app:current()", queue, "--json"]
        )
    assert result.exit_code == 0, result.output
    [doc] = json.loads(result.output.splitlines()[-1])["queues"]
    assert {k: doc[k] for k in ("exists", "ready", "unacked", "delayed", "dead_lettered")} == {
        "exists": True,
        "ready": 3,
        "unacked": 1,
        "delayed": 2,
        "dead_lettered": 1,
    }
    app.transport.delete([app.queue(queue), app.queue(queue + DLQ_SUFFIX)])
    missing = app.transport.queue_stats([app.queue(queue)])[queue]
    assert not missing.exists


# -- FIFO ------------------------------------------------------------------------------


def test_a_fifo_queue_keeps_order_and_groups_by_ordering_key(
    url: str, make_app: Callable[..., App]
) -> None:
    queue = unique_name("fifo") + ".fifo"
    app = make_app(url)
    seen: list[int] = []

    @app.task(queue=queue, max_retries=0)  # SQS cannot delay one FIFO message: no backoff
    def step(n: int) -> None:
        seen.append(n)

    for n in range(6):
        step.delay(n)
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    assert seen == list(range(6))
    # A group named by the caller, else the ordering key's digest, becomes the message group
    step.apply_async(args=(7,), headers={GROUP_HEADER: "account-42"})
    app.transport.publish(queue, envelope(9, **{"mqtasks-okey": "abc123"}))
    groups = received_groups(url, queue)
    assert sorted(groups) == ["abc123", "account-42"]


# -- endpoint and credentials -----------------------------------------------------------------


def test_the_endpoint_comes_from_the_environment_or_the_transport_options(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = unique_name("env")
    monkeypatch.setenv("MQTASKS_SQS_ENDPOINT_URL", endpoint(url))
    by_env = SqsTransport("sqs://")
    by_option = SqsTransport("sqs://", transport_options={"endpoint_url": endpoint(url)})
    monkeypatch.delenv("MQTASKS_SQS_ENDPOINT_URL")
    try:
        by_env.declare([QueueSpec(queue)])
        by_env.publish(queue, envelope(1))
        assert by_option.message_counts([QueueSpec(queue)]) == {queue: 1}
    finally:
        by_env.delete([QueueSpec(queue), QueueSpec(queue + DLQ_SUFFIX)])
        by_env.close()
        by_option.close()


def test_credentials_in_the_url_never_reach_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "wJalrXUtnFEMI-K7MDENG"
    # Nothing listens there: every call fails.
    t = SqsTransport(
        f"sqs://AKIAEXAMPLE:{secret}@127.0.0.1:9", connect_timeout=0.5, publish_timeout=2
    )
    with pytest.raises(MQTasksError) as raised:
        t.declare([QueueSpec(unique_name("x"))])
    with pytest.raises(MQTasksError) as raised_publish:
        t.publish(unique_name("y"), envelope(1), timeout=2)
    for text in (str(raised.value), str(raised_publish.value), repr(t), caplog.text):
        assert secret not in text
    t.close()


def test_a_hard_limit_past_sqs_s_12_hour_cap_is_refused_at_start(sqs_app: App) -> None:
    sqs_app.task(name="fits", time_limit=6 * 3600, max_retries=0)(lambda: None)
    check_app(sqs_app)
    sqs_app.task(name="endless", time_limit=13 * 3600, max_retries=0)(lambda: None)
    with pytest.raises(ConfigurationError) as refused:
        check_app(sqs_app)
    assert "task 'endless': time_limit is 46800 s, above the broker's 12-hour cap" in str(
        refused.value
    )


def test_retries_that_wait_on_a_fifo_queue_are_refused_at_start(sqs_app: App) -> None:
    fifo = unique_name("jobs") + ".fifo"
    sqs_app.task(name="plain", queue=fifo, max_retries=0)(lambda: None)
    sqs_app.task(name="at-once", queue=fifo, max_retries=3, retry_backoff=0)(lambda: None)
    check_app(sqs_app)
    sqs_app.task(name="backs-off", queue=fifo, max_retries=3)(lambda: None)
    with pytest.raises(ConfigurationError) as refused:
        check_app(sqs_app)
    text = str(refused.value)
    assert f"Queue {fifo!r}, task 'backs-off': its retries wait up to" in text
    assert "cannot hold one message for a delay" in text and "retry_backoff=0" in text
    assert "'at-once'" not in text and "'plain'" not in text
    # A standard queue holds the same retries.
    sqs_app.tasks.pop("backs-off")
    sqs_app.task(name="standard", queue=unique_name("jobs"), max_retries=3)(lambda: None)
    check_app(sqs_app)


# -- ordered tasks on FIFO queues -------------------------------------------------------


class KeyLog:
    """What ordered tasks ran, per key, from every worker thread; and how many keys at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: dict[int, list[object]] = {}
        self.running: set[int] = set()
        self.overlaps: list[int] = []  # keys seen running twice at once
        self.most_at_once = 0

    def start(self, key: int) -> None:
        with self._lock:
            if key in self.running:
                self.overlaps.append(key)
            self.running.add(key)
            self.most_at_once = max(self.most_at_once, len(self.running))

    def end(self, key: int, entry: object) -> None:
        with self._lock:
            self.running.discard(key)
            self.runs.setdefault(key, []).append(entry)

    def of(self, key: int) -> list[object]:
        with self._lock:
            return list(self.runs.get(key, []))

    def total(self) -> int:
        with self._lock:
            return sum(len(r) for r in self.runs.values())


def ordered_task(
    app: App, log: KeyLog, fails: Callable[[int, int, int], bool], **options: Any
) -> tuple[Task[..., None], str]:
    """An ordered task ``post(account, n)`` on a new FIFO queue that logs ``(n, attempt)``
    per account and raises when ``fails(account, n, attempt)``; and the queue's name."""
    from mqtasks.message import current_message

    queue = unique_name("ledger") + ".fifo"

    @app.task(queue=queue, ordering_key="account", **options)
    def post(account: int, n: int) -> None:
        message = current_message()
        assert message is not None
        log.start(account)
        log.end(account, (n, message.attempt))
        if fails(account, n, message.attempt):
            raise RuntimeError(f"call {n} of {account} fails at attempt {message.attempt}")

    return post, queue


def test_an_ordered_task_on_a_standard_queue_is_refused_at_start(
    url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(url, backend="memory://")
    standard = unique_name("ledger")
    app.task(name="post", queue=standard, ordering_key="account", max_retries=0)(
        lambda account: None
    )
    with pytest.raises(ConfigurationError) as refused, running_worker(app):
        pass
    text = str(refused.value)
    assert f"Queue {standard!r} carries ordered tasks" in text
    assert "standard SQS queue" in text and f"queue={standard + '.fifo'!r}" in text


def test_an_ordered_task_s_backoff_on_a_fifo_queue_is_allowed_up_to_12_hours(
    url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(url, backend="memory://")
    fifo = unique_name("ledger") + ".fifo"
    app.task(name="post", queue=fifo, ordering_key="account", max_retries=3)(lambda account: None)
    check_app(app)  # the retries wait in the queue, not delayed by SQS
    app.task(name="slow", queue=fifo, ordering_key="account", max_retries=1, retry_backoff=50000)(
        lambda account: None
    )
    with pytest.raises(ConfigurationError) as refused:
        check_app(app)
    text = str(refused.value)
    assert f"Queue {fifo!r}, task 'slow': its retries wait up to 50000 s" in text
    assert "43200 s" in text and "'post'" not in text


def test_ordered_calls_go_straight_to_the_fifo_queue_grouped_by_their_key(
    url: str, make_app: Callable[..., App]
) -> None:
    from mqtasks.ordering.keys import key_digest
    from mqtasks.ordering.queues import partitions_of

    app = make_app(url, backend="memory://")
    queue = unique_name("ledger") + ".fifo"

    @app.task(queue=queue, ordering_key="account", max_retries=0)
    def post(account: int, n: int) -> None: ...

    post.delay(5, 0)
    post.delay(6, 0)
    # No partition queues: the FIFO queue keeps each key's order itself
    assert partitions_of(app, [queue]) == []
    assert app.transport.message_counts([app.queue(queue)]) == {queue: 2}
    groups = received_groups(url, queue)
    assert sorted(groups) == sorted([key_digest(5), key_digest(6)])


def test_the_autoscaler_counts_the_fifo_queue_of_ordered_tasks_not_partitions(
    url: str, make_app: Callable[..., App]
) -> None:
    from mqtasks import Worker
    from mqtasks.execution.autoscale import WorkerLoad

    app = make_app(url, backend="memory://")
    queue = unique_name("ledger") + ".fifo"

    @app.task(queue=queue, ordering_key="account", max_retries=0)
    def post(account: int, n: int) -> None: ...

    post.delay(5, 0)
    post.delay(6, 0)
    worker = Worker(app, queues=[queue], concurrency=1)
    load = WorkerLoad(worker)
    assert [spec.name for spec in load._specs] == [queue]  # no x.fifo.p00...: none exist
    assert load.ready() == 2


def test_ordered_tasks_on_a_fifo_queue_run_in_order_per_key_and_keys_in_parallel(
    url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(url, backend="memory://")
    queue = unique_name("ledger") + ".fifo"
    log = KeyLog()

    @app.task(queue=queue, ordering_key="account", max_retries=0)
    def post(account: int, n: int) -> None:
        log.start(account)
        time.sleep(0.01)  # long enough for another thread to take the key's next, if it could
        log.end(account, n)

    # Given 5 keys x 20 calls, interleaved
    for n in range(20):
        for account in range(5):
            post.delay(account, n)
    # When 4 threads run them (one receive brings several messages of a key at once)
    with running_worker(app, concurrency=4, prefetch=10) as worker:
        wait_for(lambda: log.total() == 100, lambda: f"100 runs, not {log.total()}", 60, 0.1)
        assert worker.errors == []
    # Then each key ran in order, one call at a time, and keys ran side by side
    for account in range(5):
        assert log.of(account) == list(range(20)), account
    assert log.overlaps == []
    assert log.most_at_once >= 2


def test_a_failing_ordered_call_waits_in_the_fifo_queue_and_its_key_waits_behind_it(
    url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(url, backend="memory://")
    log = KeyLog()
    post, queue = ordered_task(
        app,
        log,
        lambda account, n, attempt: (
            ((account, n) == (1, 1) and attempt < 3) or (account, n) == (2, 0)
        ),
        max_retries=2,
        retry_backoff=1,
    )

    # A backoff is allowed for an ordered task on a FIFO queue: it waits in the queue
    check_app(app)
    for n in range(4):
        for account in (1, 2, 3):
            post.delay(account, n)
    with running_worker(app, concurrency=4) as worker:
        # Then key 1's second call runs three times, a second apart, its later calls after it
        wait_for(lambda: len(log.of(1)) == 6, lambda: f"key 1: {log.of(1)}", 60, 0.1)
        assert log.of(1) == [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]
        # And key 2's first call, failing each time, is dead-lettered after its retries,
        # with its reason; its key goes on after it
        wait_for(lambda: len(log.of(2)) == 6, lambda: f"key 2: {log.of(2)}", 60, 0.1)
        assert log.of(2) == [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1), (3, 1)]
        # And key 3 never waited for them
        assert log.of(3) == [(n, 1) for n in range(4)]
        dead = wait_for(lambda: app.dead_letters(queue), "the dead letter", 20, 0.2)
        assert [(d.reason, d.attempts) for d in dead] == [("max_retries_exceeded", 3)]
        assert worker.errors != []


def test_drain_waits_for_an_ordered_retry_held_in_the_fifo_queue(
    url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(url, backend="memory://")
    log = KeyLog()
    post, _ = ordered_task(
        app, log, lambda account, n, attempt: attempt < 2, max_retries=2, retry_backoff=1
    )

    post.delay(1, 0)
    with running_worker(app, concurrency=2) as worker:
        # The first attempt fails; its retry waits in the queue, invisible, for 1 s
        drain(worker, timeout=30, raise_errors=False)
        assert log.of(1) == [(0, 1), (0, 2)]


def test_waits_in_a_fifo_queue_do_not_count_against_the_delivery_limit(
    url: str, make_app: Callable[..., App]
) -> None:
    # Given a delivery limit below the retries of a key's first call
    app = make_app(url, backend="memory://", delivery_limit=2)
    log = KeyLog()
    post, queue = ordered_task(
        app,
        log,
        lambda account, n, attempt: n == 0 and attempt < 5,
        max_retries=4,
        retry_backoff=0.5,
    )

    for n in range(3):
        post.delay(1, n)
    with running_worker(app, concurrency=2) as worker:
        # When it waits four times in the queue, and its key's later calls with it
        wait_for(lambda: len(log.of(1)) == 7, lambda: f"key 1: {log.of(1)}", 60, 0.1)
        # Then neither it nor the calls behind it are dead-lettered as delivered too often
        assert log.of(1) == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 1), (2, 1)]
        assert app.dead_letters(queue) == []
        assert len(worker.errors) == 4


def test_a_retry_waiting_in_the_fifo_queue_keeps_its_attempt_with_the_next_worker(
    url: str, make_app: Callable[..., App]
) -> None:
    app = make_app(url, backend="memory://")
    log = KeyLog()
    post, _ = ordered_task(
        app,
        log,
        lambda account, n, attempt: n == 0 and attempt == 1,
        max_retries=3,
        retry_backoff=2,
    )

    post.delay(7, 0)
    post.delay(7, 1)
    # Given a first attempt that failed and waits in the queue for its retry
    with running_worker(app, concurrency=2) as first:
        wait_for(lambda: first.settled >= 1, "the retry to wait in the queue", 20, 0.05)
    assert log.of(7) == [(0, 1)]
    # When another worker takes the queue (the first one stopped)
    with running_worker(app, concurrency=2):
        # Then it runs the retry as attempt 2 once its wait is over, then the key's next call
        wait_for(lambda: len(log.of(7)) == 3, lambda: f"key 7: {log.of(7)}", 30, 0.1)
    assert log.of(7) == [(0, 1), (0, 2), (1, 1)]
