"""Replayable event streams: StreamSpec, emit(stream=), @app.on(stream=, start=) on memory://,
RabbitMQ stream queues and Redis Streams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from mqtasks import App, ConfigurationError, StreamSpec, Unroutable, Worker
from mqtasks.retry import RetryPolicy
from mqtasks.streams import StreamPump, StreamPumps
from mqtasks.testing import running_worker
from mqtasks.transport.amqp.streams import stream_arguments
from mqtasks.transport.stream import parse_duration
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.cli import PYTHON, ROOT, CliWorker, clean_env
from tests._helpers.wait import wait_for

BROKERS = [
    "memory",
    pytest.param("amqp", marks=pytest.mark.integration),
    pytest.param("redis", marks=pytest.mark.integration),
]

MakeApp = Callable[..., App]


@pytest.fixture(params=BROKERS)
def stream_app(request: pytest.FixtureRequest) -> Iterator[MakeApp]:
    """A factory of apps on each broker with one stream of their own, deleted after the test."""
    url = require_broker(request.param)
    made: list[tuple[App, list[str]]] = []

    def make(**spec: Any) -> App:
        name = unique_name("stream")
        app = App(
            "t",
            broker=url,
            default_queue=unique_name("default"),
            publish_timeout=5.0,
            retry_policy=RetryPolicy(max_retries=1, backoff=0.2),
            streams=[StreamSpec(name, **spec)],
        )
        made.append((app, []))
        return app

    yield make
    for app, _ in made:
        for spec in app.streams.values():
            groups = [s.queue for s in app.subscriptions if s.stream == spec.name]
            app.transport.streams().delete(spec, groups)
        cleanup(app)


def stream_of(app: App) -> str:
    return next(iter(app.streams))


def pumps(app: App) -> list[StreamPump]:
    middleware = next(m for m in app.middleware if isinstance(m, StreamPumps))
    return [p for group in middleware.pumps.values() for p in group]


def wait_ready(app: App) -> None:
    wait_for(lambda: pumps(app) and all(p.ready.is_set() for p in pumps(app)), "groups created")


def seen_all(seen: list[int], count: int) -> Callable[[], bool]:
    return lambda: len(set(seen)) >= count


# -- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis+kombu://127.0.0.1:6379/0",
        "sqs://127.0.0.1:1",
        "postgresql://127.0.0.1/postgres",
        "sqlite:///streams-refused.db",
    ],
)
def test_brokers_without_streams_refuse_them_at_start(url: str) -> None:
    with pytest.raises(ConfigurationError, match="keeps no replayable streams"):
        App("t", broker=url, streams=[StreamSpec("orders")])


def test_unknown_stream_and_bad_start_are_refused() -> None:
    app = App("t", broker="memory://", streams=[StreamSpec("orders")])
    with pytest.raises(ConfigurationError, match="no stream 'payments'"):
        app.on("order.*", stream="payments")
    with pytest.raises(ConfigurationError, match="start="):
        app.on("order.*", stream="orders", start="oldest")
    with pytest.raises(ConfigurationError, match="naive"):
        app.on("order.*", stream="orders", start=datetime(2024, 1, 1))
    with pytest.raises(ConfigurationError, match="no stream"):
        app.emit("order.created", {}, stream="payments")


def test_plain_events_do_not_reach_stream_subscribers() -> None:
    app = App("t", broker="memory://", streams=[StreamSpec("orders")])

    @app.on("order.*", stream="orders", queue=unique_name("g"))
    def from_stream(event: Any) -> None: ...

    try:
        assert app.declare_events() == []  # a stream subscriber's queue is not bound
        with pytest.raises(Unroutable):
            app.emit("order.created", {"id": 1})
        assert app.emit("order.created", {"id": 1}, mandatory=False).routed == 0
    finally:
        app.transport.reset()


def test_retention_strings_are_seconds() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90s") == 90
    assert StreamSpec("s", retention="2h").retention_seconds == 7200
    with pytest.raises(ConfigurationError, match="duration"):
        StreamSpec("s", retention="a week")


def test_rabbitmq_stream_arguments() -> None:
    spec = StreamSpec("s", retention="7d", max_bytes=10**9, segment_bytes=10**6)
    assert stream_arguments(spec) == {
        "x-queue-type": "stream",
        "x-max-age": "604800s",
        "x-max-length-bytes": 10**9,
        "x-stream-max-segment-size-bytes": 10**6,
    }
    with pytest.raises(ConfigurationError, match="not by entries"):
        stream_arguments(StreamSpec("s", max_length=10))


# -- reading -------------------------------------------------------------------------


def test_late_subscriber_replays_every_event_from_first(stream_app: MakeApp) -> None:
    # Given 1,000 events in the stream, and no subscriber yet
    app = stream_app()
    stream = stream_of(app)
    for i in range(1000):
        app.emit("order.created", {"id": i}, stream=stream)
    seen: list[int] = []

    # When a subscriber starting at "first" is added
    @app.on("order.*", stream=stream, start="first", queue=unique_name("g"))
    def rebuild(event: dict[str, int]) -> None:
        seen.append(event["id"])

    with running_worker(app, concurrency=4, prefetch=50):
        wait_for(seen_all(seen, 1000), lambda: f"1000 events replayed ({len(set(seen))})", 60)

    # Then it ran each of them
    assert set(seen) == set(range(1000))


def test_subscriber_sees_only_keys_matching_its_pattern(stream_app: MakeApp) -> None:
    app = stream_app()
    stream = stream_of(app)
    keys = ["order.created", "user.created", "order.paid", "order.paid.late", "order"]
    for i, key in enumerate(keys):
        app.emit(key, {"id": i}, stream=stream)
    seen: list[int] = []

    @app.on("order.*", stream=stream, start="first", queue=unique_name("g"))
    def orders(event: dict[str, int]) -> None:
        seen.append(event["id"])

    @app.on("#", stream=stream, start="first", queue=unique_name("g"))
    def everything(event: dict[str, int]) -> None:
        seen.append(100 + event["id"])

    with running_worker(app):
        wait_for(lambda: len(seen) >= 7, lambda: f"7 runs ({seen})")
        time.sleep(0.3)  # nothing more comes
    assert sorted(seen) == [0, 2, 100, 101, 102, 103, 104]


def test_start_last_sees_only_new_events(stream_app: MakeApp) -> None:
    app = stream_app()
    stream = stream_of(app)
    for i in range(5):
        app.emit("order.created", {"id": i}, stream=stream)
    seen: list[int] = []

    @app.on("order.*", stream=stream, start="last", queue=unique_name("g"))
    def fresh(event: dict[str, int]) -> None:
        seen.append(event["id"])

    with running_worker(app):
        wait_ready(app)  # the group now exists, at the end of the stream
        for i in range(5, 8):
            app.emit("order.created", {"id": i}, stream=stream)
        wait_for(lambda: len(seen) >= 3, lambda: f"3 new events ({seen})")
        time.sleep(0.3)
    assert sorted(seen) == [5, 6, 7]


def test_group_resumes_where_it_stopped_not_at_start(stream_app: MakeApp) -> None:
    app = stream_app()
    stream = stream_of(app)
    seen: list[int] = []

    @app.on("order.*", stream=stream, start="first", queue=unique_name("g"))
    def audit(event: dict[str, int]) -> None:
        seen.append(event["id"])

    app.emit("order.created", {"id": 0}, stream=stream)
    with running_worker(app):
        wait_for(lambda: seen == [0], lambda: f"first event ({seen})")
    app.emit("order.created", {"id": 1}, stream=stream)
    with running_worker(app):
        wait_for(lambda: 1 in seen, lambda: f"second event ({seen})")
        time.sleep(0.3)
    assert seen == [0, 1]


def test_two_workers_of_one_group_run_each_event_once(stream_app: MakeApp) -> None:
    """RabbitMQ and memory://: one pump of the group reads at a time (the lease); Redis:
    both read the consumer group side by side. Either way no event runs twice."""
    app = stream_app()
    stream = stream_of(app)
    seen: list[int] = []
    lock = threading.Lock()

    @app.on("order.*", stream=stream, start="first", queue=unique_name("g"))
    def once(event: dict[str, int]) -> None:
        with lock:
            seen.append(event["id"])

    with running_worker(app), running_worker(app):
        for i in range(300):
            app.emit("order.created", {"id": i}, stream=stream)
        wait_for(seen_all(seen, 300), lambda: f"300 events ({len(set(seen))})", 60)
        time.sleep(0.5)
    assert sorted(seen) == list(range(300))


def test_datetime_start_skips_older_entries(stream_app: MakeApp) -> None:
    app = stream_app()
    stream = stream_of(app)
    app.emit("order.created", {"id": 0}, stream=stream)
    time.sleep(1.1)  # RabbitMQ timestamps have a resolution of one second
    mark = datetime.now(timezone.utc)
    time.sleep(0.05)
    app.emit("order.created", {"id": 1}, stream=stream)
    seen: list[int] = []

    @app.on("order.*", stream=stream, start=mark, queue=unique_name("g"))
    def since(event: dict[str, int]) -> None:
        seen.append(event["id"])

    with running_worker(app):
        wait_for(lambda: seen, "an event")
        time.sleep(0.3)
    assert seen == [1]


def test_failing_subscriber_retries_then_dead_letters(stream_app: MakeApp) -> None:
    app = stream_app()
    stream = stream_of(app)
    queue = unique_name("g")
    attempts: list[int] = []

    @app.on("order.*", stream=stream, start="first", queue=queue)
    def broken(event: dict[str, int]) -> None:
        attempts.append(event["id"])
        raise RuntimeError("boom")

    app.emit("order.created", {"id": 7}, stream=stream)
    with running_worker(app, collect_errors=False):
        wait_for(lambda: app.dead_letters(queue), "a dead letter")
    assert attempts == [7, 7]  # max_retries=1: two attempts
    (dead,) = app.dead_letters(queue)
    assert "boom" in str(dead)


# -- admin -----------------------------------------------------------------------------


def test_rewind_replays_a_group_again(stream_app: MakeApp) -> None:
    app = stream_app()
    stream = stream_of(app)
    queue = unique_name("g")
    seen: list[int] = []

    @app.on("order.*", stream=stream, start="first", queue=queue)
    def audit(event: dict[str, int]) -> None:
        seen.append(event["id"])

    for i in range(3):
        app.emit("order.created", {"id": i}, stream=stream)
    with running_worker(app):
        wait_for(seen_all(seen, 3), "3 events")
    store = app.transport.streams()
    store.rewind(app.streams[stream], queue, 1)
    with running_worker(app):
        wait_for(lambda: len(seen) >= 5, lambda: f"2 replayed ({seen})")
        time.sleep(0.3)
    assert seen == [0, 1, 2, 1, 2]
    info = store.info(app.streams[stream])
    assert info.length == 3
    assert [e.key for e in store.entries(app.streams[stream], "first", 10)] == ["order.created"] * 3


def test_aemit_appends_to_a_stream() -> None:
    app = App("t", broker="memory://", streams=[StreamSpec("audit")])
    try:
        asyncio.run(app.aemit("order.created", {"id": 1}, stream="audit"))
        entries = app.transport.streams().entries(app.streams["audit"], "first", 10)
        assert [e.key for e in entries] == ["order.created"]
    finally:
        app.transport.reset()


@pytest.mark.integration
def test_rabbitmq_refuses_a_rewind_while_a_worker_reads_the_group() -> None:
    url = require_broker("amqp")
    name = unique_name("st")
    app = App("t", broker=url, streams=[StreamSpec(name)])
    queue = unique_name("g")
    seen: list[int] = []

    @app.on("order.*", stream=name, start="first", queue=queue)
    def audit(event: dict[str, int]) -> None:
        seen.append(event["id"])

    store = app.transport.streams()
    try:
        app.emit("order.created", {"id": 0}, stream=name)
        with running_worker(app):
            wait_for(seen_all(seen, 1), "1 event")
            with pytest.raises(ConfigurationError, match="stop the workers"):
                store.rewind(app.streams[name], queue, "first")
        store.rewind(app.streams[name], queue, "first")  # stopped: its position is free
    finally:
        store.delete(app.streams[name], [queue])
        cleanup(app)


# -- retention -------------------------------------------------------------------------


def test_max_length_drops_the_oldest_entries() -> None:
    app = App("t", broker="memory://", streams=[StreamSpec("short", max_length=10)])
    try:
        for i in range(50):
            app.emit("e.x", {"id": i}, stream="short")
        entries = app.transport.streams().entries(app.streams["short"], "first", 100)
        assert [e.offset for e in entries] == list(range(40, 50))
    finally:
        app.transport.reset()


@pytest.mark.integration
def test_redis_trims_by_maxlen_and_by_minid() -> None:
    url = require_broker("redis")
    by_length, by_age = unique_name("len"), unique_name("age")
    app = App(
        "t",
        broker=url,
        streams=[StreamSpec(by_length, max_length=10), StreamSpec(by_age, retention=1.0)],
    )
    store = app.transport.streams()
    try:
        for i in range(350):
            app.emit("e.x", {"id": i}, stream=by_length)
            app.emit("e.x", {"id": i}, stream=by_age)
        # MAXLEN ~ trims whole nodes (100 entries): what is left is the newest few hundred at most.
        left = store.info(app.streams[by_length]).length or 0
        assert 10 <= left <= 110
        assert store.info(app.streams[by_age]).length == 350  # none is a second old yet
        time.sleep(1.2)
        app.emit("e.x", {"id": 999}, stream=by_age)
        assert (store.info(app.streams[by_age]).length or 0) <= 101
    finally:
        for spec in app.streams.values():
            store.delete(spec)
        app.close()


@pytest.mark.integration
def test_rabbitmq_drops_segments_past_max_age() -> None:
    """x-max-age drops whole segments, checked when a segment fills: with 1 s and small
    segments the oldest entries go within seconds."""
    url = require_broker("amqp")
    name = unique_name("age")
    spec = StreamSpec(name, retention=1.0, segment_bytes=4000)
    app = App("t", broker=url, streams=[spec])
    store = app.transport.streams()
    try:
        for i in range(100):
            app.emit("e.x", {"id": i, "pad": "x" * 200}, stream=name)
        assert store.info(spec).first == "0"
        time.sleep(2.0)
        for i in range(100, 200):
            app.emit("e.x", {"id": i, "pad": "x" * 200}, stream=name)

        def first() -> int | None:
            found = store.info(spec).first
            return int(found) if found and int(found) > 0 else None

        assert wait_for(first, "the oldest segment dropped", 15) > 0
    finally:
        store.delete(spec)
        app.close()


# -- a worker killed mid-stream ----------------------------------------------------------


#: The SIGKILL test's worker command line.
WORKER = [PYTHON, "-m", "mqtasks", "worker", "-A", "tests.test_streams:kill_app()"]


def kill_app() -> App:
    """The app of the SIGKILL test's worker subprocess (configured from the environment)."""
    stream = os.environ["STREAM_TEST_NAME"]
    app = App(
        "t",
        streams=[StreamSpec(stream, claim_after=1.0)],
        transport_options=json.loads(os.environ.get("STREAM_TEST_OPTIONS", "{}")),
    )
    record = Path(os.environ["STREAM_TEST_RECORD"])

    @app.on("order.*", stream=stream, start="first", queue=os.environ["STREAM_TEST_GROUP"])
    def slow(event: dict[str, int]) -> None:
        time.sleep(0.005)
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event['id']}\n".encode())
        finally:
            os.close(fd)

    return app


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_worker_killed_mid_stream_resumes_without_a_gap(kind: str, tmp_path: Path) -> None:
    url = require_broker(kind)
    stream, group = unique_name("stream"), unique_name("g")
    options = {"liveness_ttl": 1.0, "sweep_interval": 0.25} if kind == "redis" else {}
    env = {
        "MQTASKS_BROKER_URL": url,
        "STREAM_TEST_NAME": stream,
        "STREAM_TEST_GROUP": group,
        "STREAM_TEST_RECORD": str(tmp_path / "record"),
        "STREAM_TEST_OPTIONS": json.dumps(options),
    }
    os.environ.update(env)
    try:
        app = kill_app()
    finally:
        for key in env:
            os.environ.pop(key)
    total = 600
    for i in range(total):
        app.emit("order.created", {"id": i}, stream=stream)
    workers: list[CliWorker] = []

    def start() -> CliWorker:
        n = len(workers)
        err, out = tmp_path / f"w{n}.err", tmp_path / f"w{n}.out"
        with open(err, "ab") as e, open(out, "ab") as o:
            proc = subprocess.Popen(
                [*WORKER, "--log-format", "json", "--concurrency", "4"],
                cwd=ROOT,
                env=clean_env(**env),
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        workers.append(CliWorker(proc, err, out))
        return workers[-1]

    def done() -> set[int]:
        path = tmp_path / "record"
        return {int(x) for x in path.read_text().split()} if path.exists() else set()

    try:
        # Given a worker halfway through the stream
        first = start()
        wait_for(lambda: len(done()) >= 100, "100 events run", 60)
        # When it is SIGKILLed
        os.killpg(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        assert len(done()) < total
        # Then a new worker of the group runs the rest: none is missing
        start()
        wait_for(lambda: len(done()) >= total, lambda: f"{total} events run ({len(done())})", 90)
        assert done() == set(range(total))
    finally:
        for worker in workers:
            worker.kill()
        app.transport.streams().delete(app.streams[stream], [group])
        cleanup(app)


def test_pump_threads_stop_with_the_worker() -> None:
    app = App("t", broker="memory://", streams=[StreamSpec("s")])

    @app.on("e.*", stream="s", queue=unique_name("g"))
    def handler(event: Any) -> None: ...

    worker = Worker(app, concurrency=1)
    worker.start()
    wait_ready(app)
    threads = [p for p in pumps(app)]
    worker.stop()
    assert not any(t.is_alive() for t in threads)
    assert threading.active_count() >= 1
    app.transport.reset()


# -- mqtasks stream ----------------------------------------------------------------------

#: The app of the CLI test (memory://, so the command runs in this process).
CLI_APP = App("cli", broker="memory://", streams=[StreamSpec("cli-orders")])


@CLI_APP.on("order.*", stream="cli-orders", start="first", queue="cli.rebuild")
def cli_rebuild(event: Any) -> None: ...


def test_stream_command_lists_shows_and_rewinds() -> None:
    from click.testing import CliRunner

    from mqtasks.cli import cli

    runner = CliRunner()
    target = "tests.test_streams:CLI_APP"
    try:
        for i in range(3):
            CLI_APP.emit("order.created", {"id": i}, stream="cli-orders")
        listed = runner.invoke(cli, ["stream", "ls", "-A", target])
        assert listed.exit_code == 0, listed.output
        assert "cli-orders  3       0      2     cli.rebuild" in listed.output
        shown = runner.invoke(cli, ["stream", "show", "cli-orders", "-A", target, "--from", "1"])
        assert shown.exit_code == 0, shown.output
        assert [line.split()[-1] for line in shown.output.splitlines()] == ['{"id":1}', '{"id":2}']
        bad = [
            "stream",
            "replay",
            "cli-orders",
            "-A",
            target,
            "--subscriber",
            "nope",
            "--from",
            "0",
        ]
        assert runner.invoke(cli, bad).exit_code == 2
        replay = ["stream", "replay", "cli-orders", "-A", target, "--subscriber", "cli.rebuild"]
        assert runner.invoke(cli, [*replay, "--from", "2"]).exit_code == 0
        store = CLI_APP.transport.streams()
        reader = store.reader(CLI_APP.streams["cli-orders"], "cli.rebuild", "first")
        assert [e.offset for e in reader.read(10, 0.1)] == [2]
        reader.close()
        assert runner.invoke(cli, [*replay, "--from", "yesterday"]).exit_code == 2
    finally:
        CLI_APP.transport.reset()
