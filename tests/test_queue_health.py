"""Queue health: lag, unacked messages and rates, on memory, RabbitMQ (with its
management plugin) and Redis, and "unknown" when the broker cannot tell."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import amqp
import pytest
from click.testing import CliRunner

from mqtasks import App
from mqtasks.cli import cli
from mqtasks.message import Message
from mqtasks.status import QueueStatus, StatusMonitor, queue_status
from mqtasks.testing import drain, running_worker
from mqtasks.transport.amqp.management import management_url, read_queues, vhost_of
from mqtasks.transport.amqp.wire import message_timestamp, serialize_properties
from mqtasks.transport.base import DLQ_SUFFIX, Envelope

#: Seconds to wait for RabbitMQ's management API, which collects statistics every 5 s.
MANAGEMENT_WAIT = 30.0

#: The app ``-A tests.test_queue_health:current()`` returns.
_CURRENT: list[App] = []


def current() -> App:
    """Return the app the running test made (for ``mqtasks status -A``)."""
    return _CURRENT[-1]


def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def health_app(make_app: Callable[..., App], url: str, **overrides: object) -> App:
    """An app on ``url`` whose RabbitMQ queues are classic: only those report
    their head message's timestamp to the management API."""
    app = make_app(url, queue_type="classic", **overrides)

    @app.task(name="health.noop")
    def noop() -> None:
        pass

    _CURRENT.append(app)
    return app


def publish_old(app: App, age: float) -> None:
    """Publish a message to the app's default queue as if sent ``age`` seconds ago."""
    queue = app.settings.default_queue
    app.declare([queue])
    message = Message(
        id=str(uuid.uuid4()),
        task="health.noop",
        queue=queue,
        published_at=datetime.now(timezone.utc) - timedelta(seconds=age),
    )
    app.transport.publish(queue, message.encode(max_size=app.settings.max_message_size))


def wait_for(
    app: App, check: Callable[[QueueStatus], bool], timeout: float = MANAGEMENT_WAIT
) -> QueueStatus:
    """Sample the default queue until ``check`` holds (RabbitMQ's figures trail by
    up to a statistics interval); fail with the last sample otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        status = queue_status(app, [app.settings.default_queue])[0]
        if check(status):
            return status
        assert time.monotonic() < deadline, f"not seen in time: {status}"
        time.sleep(0.5)


def table_row(output: str, queue: str) -> tuple[list[str], dict[str, str]]:
    """The header of ``mqtasks status``'s table and ``queue``'s row, by column."""
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("QUEUE")).split()
    cells = next(line for line in lines if line.startswith(queue)).split()
    return header, dict(zip(header, cells, strict=True))


def test_lag_is_the_age_of_the_oldest_ready_message(
    broker_url: str, make_app: Callable[..., App]
) -> None:
    app = health_app(make_app, broker_url)
    # Given: an empty queue, then a message published two minutes ago, then a fresh one.
    app.declare([app.settings.default_queue])
    assert queue_status(app)[0].lag == 0.0
    publish_old(app, 120)
    app.tasks["health.noop"].delay()
    # Then: the lag is the old message's age, and it grows as the message waits on.
    first = wait_for(app, lambda s: s.ready == 2 and s.lag is not None)
    assert first.lag is not None and 119 <= first.lag < 3600
    later = wait_for(app, lambda s: s.lag is not None and s.lag > first.lag + 0.5)  # type: ignore[operator]
    assert later.lag is not None and later.lag < 3600


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_unacked_counts_the_running_task(
    kind: str, make_app: Callable[..., App], request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{kind}_url")
    app = health_app(make_app, url)
    started, release = threading.Event(), threading.Event()

    @app.task(name="health.block")
    def block() -> None:
        started.set()
        release.wait(60)

    with running_worker(app, concurrency=1, prefetch=1) as worker:
        try:
            block.delay()
            assert started.wait(20)
            # While it runs: one unacknowledged message (RabbitMQ: through the management API).
            status = wait_for(app, lambda s: s.unacked == 1 and s.consumers == 1)
            assert status.ready == 0
        finally:
            release.set()
        drain(worker)
    assert wait_for(app, lambda s: s.unacked == 0).ready == 0


def test_rabbitmq_figures_are_unknown_when_the_management_api_does_not_answer(
    amqp_url: str, make_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    app = health_app(
        make_app, amqp_url, rabbitmq_management_url=f"http://guest:mgmt-s3cret@127.0.0.1:{port}"
    )
    publish_old(app, 120)
    with caplog.at_level(logging.DEBUG, logger="mqtasks.transport.amqp.management"):
        status = queue_status(app)[0]
    # The passive declare still counts; nothing the management API would tell is guessed.
    assert (status.ready, status.consumers) == (1, 0)
    unknown = (status.unacked, status.lag, status.ack_rate, status.deliver_rate)
    assert unknown == (None, None, None, None)
    assert (status.publish_rate, status.redeliver_rate, status.error_rate) == (None, None, None)
    assert "status.management_unavailable" in caplog.text
    assert "mgmt-s3cret" not in caplog.text and str(port) in caplog.text


def test_rabbitmq_management_can_be_turned_off(amqp_url: str, make_app: Callable[..., App]) -> None:
    app = health_app(make_app, amqp_url, rabbitmq_management_url="off")
    publish_old(app, 60)
    status = queue_status(app)[0]
    assert status.ready == 1 and (status.unacked, status.lag) == (None, None)


def test_management_url_defaults_to_the_broker_host_with_its_credentials() -> None:
    broker = "amqp://user:p%40ss@rabbit.example:5672/prod"
    assert management_url(broker) == "http://user:p%40ss@rabbit.example:15672"
    assert management_url("amqps://u:p@h//") == "https://u:p@h:15672"
    assert management_url(broker, "http://mgmt:8080/") == "http://user:p%40ss@mgmt:8080"
    assert management_url(broker, "http://a:b@mgmt:8080") == "http://a:b@mgmt:8080"
    assert management_url(broker, "off") is None
    assert (vhost_of(broker), vhost_of("amqp://h//"), vhost_of("amqp://h/%2Fx")) == (
        "prod",
        "/",
        "/x",
    )


def test_management_api_reads_the_queue(amqp_url: str, make_app: Callable[..., App]) -> None:
    app = health_app(make_app, amqp_url)
    queue = app.settings.default_queue
    publish_old(app, 30)
    base = management_url(amqp_url)
    assert base is not None
    deadline = time.monotonic() + MANAGEMENT_WAIT
    while True:
        found = read_queues(base, vhost_of(amqp_url), [queue, "mqt-no-such-queue-" + queue])
        assert found is not None, "the management plugin answers (see .ci/run)"
        # The queue's counts and its head message's timestamp reach the API in
        # separate statistics events: wait for both.
        figures = found.get(queue, {})
        stamp = figures.get("head_message_timestamp")
        if figures.get("messages_ready") == 1 and isinstance(stamp, int):
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    # A queue the API does not know is left out, not an error.
    assert set(found) == {queue}
    assert isinstance(found[queue].get("head_message_timestamp"), int)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_error_rate_is_the_rise_of_dead_letters_between_samples(
    kind: str, make_app: Callable[..., App], request: pytest.FixtureRequest
) -> None:
    url = "memory://" if kind == "memory" else request.getfixturevalue("redis_url")
    app = health_app(make_app, url)
    queue = app.settings.default_queue
    app.declare([queue])
    monitor = StatusMonitor(app)
    assert monitor.sample()[0].error_rate is None  # one sample tells no rate
    message = Message(id=str(uuid.uuid4()), task="health.noop", queue=queue)
    envelope = message.encode(max_size=app.settings.max_message_size)
    app.transport.declare([app.queue(queue + DLQ_SUFFIX)])
    app.transport.publish(queue + DLQ_SUFFIX, envelope)
    second = monitor.sample()[0]
    assert second.dead_lettered == 1
    assert second.error_rate is not None and second.error_rate > 0
    assert second.ack_rate is None  # no broker here measures it


def test_status_command_shows_lag_and_rates(
    broker_url: str, make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = health_app(make_app, broker_url)
    queue = app.settings.default_queue
    publish_old(app, 3700)
    wait_for(app, lambda s: s.lag is not None)
    path = "tests.test_queue_health:current()"
    result = CliRunner().invoke(cli, ["status", "-A", path], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("QUEUE")).split()
    assert header[6:] == ["LAG", "ACK/S", "DEAD/S", "READY/S"]
    row = dict(
        zip(header, next(line for line in lines if line.startswith(queue)).split(), strict=True)
    )
    assert row["LAG"].startswith("1h01m"), row
    if broker_url.startswith("amqp"):
        assert row["ACK/S"] == "0.00" and row["UNACKED"] == "0"
    else:
        assert row["ACK/S"] == "-" and "ACK/S -: unknown: only RabbitMQ's management API" in (
            result.output
        )
    result = CliRunner().invoke(cli, ["status", "-A", path, "--json"], catch_exceptions=False)
    doc = json.loads(result.output)["queues"][0]
    assert doc["lag"] >= 3700 and "error_rate" in doc and "ack_rate" in doc


def test_status_command_marks_unknown_figures(amqp_url: str, make_app: Callable[..., App]) -> None:
    app = health_app(
        make_app, amqp_url, rabbitmq_management_url=f"http://127.0.0.1:{closed_port()}"
    )
    publish_old(app, 10)
    result = CliRunner().invoke(
        cli, ["status", "-A", "tests.test_queue_health:current()"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    _, row = table_row(result.output, app.settings.default_queue)
    assert (row["READY"], row["UNACKED"], row["LAG"], row["ACK/S"]) == ("1", "-", "-", "-")
    assert any(line.startswith("UNACKED -: unknown") for line in lines)
    assert any("rabbitmq-plugins enable rabbitmq_management" in line for line in lines)


@pytest.mark.parametrize("headers", [{"mqtasks-published-at": 1796659462.75}, {"x": [1, "y"]}])
def test_published_messages_carry_the_amqp_timestamp(headers: dict[str, object]) -> None:
    """The fast property writer adds the timestamp exactly as py-amqp writes it."""
    envelope = Envelope(b"{}", "id-1", headers=headers, priority=3)
    stamp = message_timestamp(envelope)
    if "mqtasks-published-at" in headers:
        assert stamp == 1796659462  # the message's own publishing time, whole seconds
    expected = amqp.Message(
        b"{}",
        priority=3,
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        application_headers=dict(headers),
        message_id="id-1",
        delivery_mode=2,
        timestamp=stamp,
    )._serialize_properties()
    assert serialize_properties(envelope, dict(headers), stamp) == expected
