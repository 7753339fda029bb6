"""Queue status: the Python API and ``mqtasks status``, on memory, RabbitMQ and Redis."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner

from mqtasks import App
from mqtasks.cli import cli
from mqtasks.deadletter import dead_letter_envelope
from mqtasks.exceptions import ConfigurationError, ConnectionFailed
from mqtasks.status import QueueStatus, StatusMonitor, queue_status
from mqtasks.transport.base import DLQ_SUFFIX, Consumer, Delivery
from tests import status_app
from tests._helpers.brokers import cleanup, require_broker, unique_name
from tests._helpers.cli import ROOT


@pytest.fixture(autouse=True)
def no_management_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave RabbitMQ's management API out: its figures trail the broker by a
    statistics interval (tests/test_queue_health.py covers them)."""
    monkeypatch.setenv("MQTASKS_RABBITMQ_MANAGEMENT_URL", "off")


@pytest.fixture
def make_status_app() -> Iterator[Callable[[str], App]]:
    """A factory of ``tests/status_app.py`` apps on a run-unique queue; queues deleted at teardown."""
    apps: list[App] = []

    def make(url: str) -> App:
        app = status_app.create(url, unique_name("status"))
        apps.append(app)
        return app

    yield make
    for app in apps:
        cleanup(app)
    status_app.BUILT.clear()


def _take(consumer: Consumer, held: list[Delivery], n: int) -> None:
    deadline = time.monotonic() + 20
    while len(held) < n:
        assert time.monotonic() < deadline, f"{len(held)} of {n} deliveries in time"
        consumer.drain(0.1)


@contextlib.contextmanager
def loaded(app: App) -> Iterator[Consumer]:
    """Load the app's queue: 3 ready, 2 delayed, 1 dead letter, 1 held unacked by a consumer.

    Yields the consumer holding the unacknowledged message; it is closed on exit.
    """
    queue = app.settings.default_queue
    noop = app.tasks[status_app.NOOP]
    noop.delay(0)
    noop.delay(1)
    held: list[Delivery] = []
    consumer = app.transport.consumer([app.queue(queue)], prefetch=1)
    consumer.start(held.append)
    try:
        # The first delivery is dead-lettered as a worker does it; the second stays unacked.
        _take(consumer, held, 1)
        envelope = dead_letter_envelope(
            held[0], None, reason="rejected", detail="test", exc=None, worker="test"
        )
        app.transport.publish(queue + DLQ_SUFFIX, envelope)
        assert consumer.ack(held[0])
        _take(consumer, held, 2)
        for n in (2, 3, 4):
            noop.delay(n)
        for n in (5, 6):
            noop.apply_async(args=(n,), countdown=3600)
        yield consumer
    finally:
        consumer.close()


def check_loaded(status: QueueStatus, url: str) -> None:
    """The numbers :func:`loaded` leaves, as far as the broker behind ``url`` tells them."""
    assert status.exists
    assert (status.ready, status.dead_lettered, status.consumers) == (3, 1, 1)
    if url.startswith("amqp"):
        # Only the management API (off here) counts unacked messages; the delay
        # queues are shared by the vhost (other runs may hold messages there too).
        assert status.unacked is None
        assert status.delayed is not None and status.delayed >= 2
        assert status.delayed_scope == "vhost"
    else:
        assert (status.unacked, status.delayed, status.delayed_scope) == (1, 2, "queue")


def check_missing(doc: dict[str, object], name: str, url: str) -> None:
    """A queue nobody declared: missing, or on Redis (no queue objects) empty."""
    assert doc["queue"] == name
    counts = [doc[k] for k in ("ready", "unacked", "delayed", "dead_lettered", "consumers")]
    if url.startswith("redis"):
        assert doc["exists"] is True and counts == [0] * 5
    else:
        assert doc["exists"] is False and counts == [None] * 5


def check_loaded_json(doc: dict[str, object], url: str) -> None:
    expected = {"exists": True, "ready": 3, "dead_lettered": 1, "consumers": 1}
    assert {k: doc[k] for k in expected} == expected
    if url.startswith("amqp"):
        assert doc["unacked"] is None and doc["delayed_scope"] == "vhost"
        assert isinstance(doc["delayed"], int) and doc["delayed"] >= 2
    else:
        assert (doc["unacked"], doc["delayed"], doc["delayed_scope"]) == (1, 2, "queue")


def test_counts_ready_unacked_delayed_dead_and_consumers(
    broker_url: str, make_status_app: Callable[[str], App]
) -> None:
    app = make_status_app(broker_url)
    queue = app.settings.default_queue
    missing = unique_name("missing")
    with loaded(app):
        # A missing queue first: on RabbitMQ its 404 closes the channel, and the
        # queues after it must still be read.
        gone, status = queue_status(app, [missing, queue])
        check_missing(gone.to_dict(), missing, broker_url)
        assert status.queue == queue
        check_loaded(status, broker_url)
        assert status.ready_rate is None and status.rate_window is None
        assert status.sampled_at.tzinfo is not None
        # The app's task queues by default, through App.status() too.
        assert [s.queue for s in app.status()] == [queue]
        check_loaded(app.status()[0], broker_url)
    # Closing the consumer hands its message back and detaches it.
    after = queue_status(app)[0]
    assert (after.ready, after.consumers) == (4, 0)
    assert after.unacked in (0, None)


def test_monitor_rates_follow_the_ready_count(
    broker_url: str, make_status_app: Callable[[str], App]
) -> None:
    app = make_status_app(broker_url)
    queue = app.settings.default_queue
    app.declare()
    monitor = StatusMonitor(app)
    assert monitor.sample()[0].ready_rate is None
    for n in range(4):
        app.tasks[status_app.NOOP].delay(n)
    grown = monitor.sample()[0]
    assert grown.ready == 4
    assert grown.ready_rate is not None and grown.ready_rate > 0
    assert grown.rate_window is not None and grown.rate_window > 0
    app.transport.purge([app.queue(queue)])
    drained = monitor.sample()[0]
    # Compared with the first sample (the oldest in the window): back to 0.
    assert drained.ready == 0 and drained.ready_rate == 0
    assert drained.rate_window is not None and drained.rate_window > grown.rate_window


def test_rate_window_keeps_at_least_the_previous_sample() -> None:
    app = status_app.create("memory://", unique_name("window"))
    try:
        app.declare()
        monitor = StatusMonitor(app, window=1e-9)
        monitor.sample()
        app.tasks[status_app.NOOP].delay(1)
        second = monitor.sample()[0]
        app.tasks[status_app.NOOP].delay(2)
        third = monitor.sample()[0]
        # Older than the window, the previous sample is used all the same.
        assert second.ready_rate is not None and second.ready_rate > 0
        assert third.ready_rate is not None and third.ready_rate > 0
        assert third.rate_window is not None and second.rate_window is not None
    finally:
        cleanup(app)


def test_bad_queue_names_and_windows_are_refused() -> None:
    app = status_app.create("memory://", unique_name("bad"))
    with pytest.raises(ConfigurationError, match="may not contain"):
        queue_status(app, ["no spaces please"])
    with pytest.raises(ConfigurationError, match="positive"):
        StatusMonitor(app, window=0)


@pytest.mark.parametrize(
    "url",
    ["amqp://admin:s3cret@127.0.0.1:1//", "redis://:s3cret@127.0.0.1:1/0"],
    ids=["amqp", "redis"],
)
def test_unreachable_broker_raises_with_the_url_masked(url: str) -> None:
    app = status_app.create(url, "q")
    try:
        with pytest.raises(ConnectionFailed) as info:
            queue_status(app)
    finally:
        app.close()
    assert "127.0.0.1:1" in str(info.value)
    assert "s3cret" not in str(info.value)


# -- the command line ---------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def app_path(url: str, app: App, monkeypatch: pytest.MonkeyPatch) -> str:
    """``-A`` for ``app``: rebuilt from the environment, or (memory://) the same object."""
    if url.startswith("memory"):
        return "tests.status_app:current()"
    monkeypatch.setenv("MQTASKS_BROKER_URL", url)
    monkeypatch.setenv("STATUS_TEST_QUEUE", app.settings.default_queue)
    return "tests.status_app:create()"


def test_cli_table_json_and_watch(
    broker_url: str, make_status_app: Callable[[str], App], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_status_app(broker_url)
    queue = app.settings.default_queue
    path = app_path(broker_url, app, monkeypatch)
    missing = unique_name("missing")
    with loaded(app) as consumer:
        code, out = invoke("status", "-A", path)
        assert code == 0, out
        lines = out.splitlines()
        header = next(line for line in lines if line.startswith("QUEUE"))
        assert header.split() == [
            "QUEUE",
            "READY",
            "UNACKED",
            "DELAYED",
            "DEAD",
            "CONSUMERS",
            "LAG",
            "ACK/S",
            "DEAD/S",
            "READY/S",
        ]
        row = next(line for line in lines if line.startswith(queue)).split()
        delayed = row[3]
        if broker_url.startswith("amqp"):
            assert row[2] == "-" and delayed.endswith("*") and int(delayed[:-1]) >= 2
            assert any(line.startswith("UNACKED -:") for line in lines)
            assert any(line.startswith("DELAYED *:") for line in lines)
        else:
            assert (row[2], delayed) == ("1", "2")
        assert [row[1], row[4], row[5], row[-1]] == ["3", "1", "1", "-"]
        # Unknown without the management API (RabbitMQ) or a second sample.
        assert (row[7], row[8]) == ("-", "-")
        assert any(line.startswith("ACK/S -: unknown") for line in lines)
        assert "READY/S -: needs two samples; use --watch." in lines

        consumer.heartbeat_check()
        code, out = invoke("status", "-A", path, missing, queue, "--json")
        assert code == 0, out
        (line,) = out.splitlines()
        doc = json.loads(line)
        assert doc["sampled_at"] and "s3cret" not in doc["broker"]
        gone, status = doc["queues"]
        check_missing(gone, missing, broker_url)
        check_loaded_json(status, broker_url)

        consumer.heartbeat_check()
        code, out = invoke("status", "-A", path, queue, "--watch", "0.05", "-n", "2", "--json")
        assert code == 0, out
        first, second = (json.loads(line)["queues"][0] for line in out.splitlines())
        assert first["ready_rate"] is None
        assert second["ready_rate"] == 0 and second["rate_window"] > 0

        code, out = invoke("status", "-A", path, queue, missing, "--watch", "0.05", "-n", "2")
        assert code == 0, out
        assert out.count("QUEUE") == 2
        absent = [missing, "missing"]
        if broker_url.startswith("redis"):
            absent = [missing, "0", "0", "0", "0", "0", "0s", "-", "0.00", "+0.00"]
        assert any(line.split() == absent for line in out.splitlines())
        last_row = [line for line in out.splitlines() if line.startswith(queue)][-1].split()
        assert last_row[-1] == "+0.00"


@pytest.fixture(params=["amqp", "redis"])
def remote_url(request: pytest.FixtureRequest) -> str:
    """The local RabbitMQ, then the local Redis: brokers another process can see."""
    request.applymarker(pytest.mark.integration)
    return require_broker(request.param)


def test_subprocess_json(remote_url: str, make_status_app: Callable[[str], App]) -> None:
    url = remote_url
    app = make_status_app(url)
    env = {
        **os.environ,
        "MQTASKS_BROKER_URL": url,
        "STATUS_TEST_QUEUE": app.settings.default_queue,
    }
    with loaded(app) as consumer:
        consumer.heartbeat_check()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mqtasks",
                "status",
                "-A",
                "tests.status_app:create()",
                "--json",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    (status,) = json.loads(line)["queues"]
    assert status["queue"] == app.settings.default_queue
    check_loaded_json(status, url)


@pytest.mark.parametrize(
    "url",
    ["amqp://admin:s3cret@127.0.0.1:1//", "redis://:s3cret@127.0.0.1:1/0"],
    ids=["amqp", "redis"],
)
def test_cli_unreachable_broker_exits_1_with_the_url_masked(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTASKS_BROKER_URL", url)
    monkeypatch.setenv("STATUS_TEST_QUEUE", "q")
    code, out = invoke("status", "-A", "tests.status_app:create()", "--json")
    assert code == 1
    assert "cannot reach the broker" in out and ":**@127.0.0.1:1" in out
    assert "s3cret" not in out


def test_cli_bad_input_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTASKS_BROKER_URL", "memory://")
    path = "tests.status_app:create()"
    code, out = invoke("status", "-A", path, "no spaces")
    assert code == 2 and "may not contain" in out
    code, out = invoke("status", "-A", path, "--count", "2")
    assert code == 2 and "--count needs --watch" in out
    code, out = invoke("status", "-A", path, "--watch", "0")
    assert code == 2 and "--watch" in out
    code, out = invoke("status", "-A", "tests.no_such_module")
    assert code == 2
