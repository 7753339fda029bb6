"""Structured logs: the task context on every event, lifecycle events, the worker's JSON output."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

import mqtasks.logging
from mqtasks import App, ConfigurationError
from mqtasks.logging import configure_logging, mask_urls
from mqtasks.middleware import OpenTelemetryTracing, StructlogContext
from mqtasks.middleware.log_context import trace_id_of
from mqtasks.testing import drain, memory_app, reset, running_worker
from tests import observability_app
from tests._helpers.brokers import require_broker, unique_name
from tests._helpers.cli import ROOT
from tests._helpers.wait import wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
CONTEXT = ("task_id", "task_name", "attempt", "queue")


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    """Every event, with the contextvars merged in as the worker's configuration does."""
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as captured:
        yield captured


@pytest.fixture
def app() -> Iterator[App]:
    app = memory_app()
    yield app
    reset(app)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_bad_level_or_format_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="Unknown log level 'loud'"):
        configure_logging("loud", "json", stream=io.StringIO())
    with pytest.raises(ConfigurationError, match="Unknown log format 'xml'"):
        configure_logging("info", "xml", stream=io.StringIO())
    with pytest.raises(ConfigurationError, match="log_format must be"):
        memory_app(log_format="xml")


def test_urls_with_passwords_are_masked_in_any_field() -> None:
    event = {"event": "x", "broker": "amqp://app:s3cret@rabbit:5672//", "n": 1}
    assert mask_urls(None, "info", event) == {
        "event": "x",
        "broker": "amqp://app:**@rabbit:5672//",
        "n": 1,
    }


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """configure_logging() to a string, for one test; structlog and stdlib restored after."""
    out = io.StringIO()
    yield out
    mqtasks.logging.flush()
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "mqtasks"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    if mqtasks.logging._writer is not None:
        mqtasks.logging._writer.close()
        mqtasks.logging._writer = None


def test_json_output_is_one_object_per_line_stdlib_records_included(
    configured: io.StringIO,
) -> None:
    assert configure_logging("info", "json", stream=configured) == "json"
    structlog.get_logger("x").debug("not.shown")
    structlog.get_logger("x").info("shown", url="redis://:hunter2@cache:6379/0")
    logging.getLogger("kombu.test").warning("a library says %s", "hello")
    mqtasks.logging.flush()
    lines = [json.loads(line) for line in configured.getvalue().splitlines()]
    assert [e["event"] for e in lines] == ["shown", "a library says hello"]
    assert lines[0]["url"] == "redis://:**@cache:6379/0"
    assert lines[0]["level"] == "info" and "timestamp" in lines[0]
    assert lines[1]["logger"] == "kombu.test" and lines[1]["level"] == "warning"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_in_logs_are_masked_too(configured: io.StringIO, fmt: str) -> None:
    configure_logging("info", fmt, stream=configured)
    broker = "amqp://app:Tb-s3cret-pw@rabbit:5672//"
    try:
        raise ConnectionError(f"cannot reach {broker}")
    except ConnectionError:
        structlog.get_logger("x").exception("failed", broker_url=broker)
        logging.getLogger("kombu.test").exception("stdlib failed too")
    mqtasks.logging.flush()
    text = configured.getvalue()
    assert "ConnectionError" in text and "amqp://app:**@rabbit:5672//" in text
    assert "Tb-s3cret-pw" not in text


def test_trace_id_comes_from_the_traceparent_header() -> None:
    assert trace_id_of({"traceparent": TRACEPARENT}) == TRACE_ID
    assert trace_id_of({"traceparent": "garbage"}) is None
    assert trace_id_of({}) is None


def test_every_event_of_a_task_run_carries_the_task_context(
    app: App, logs: list[dict[str, Any]]
) -> None:
    @app.task(name="shop.greet")
    def greet(name: str) -> None:
        structlog.contextvars.bind_contextvars(customer=name)
        structlog.get_logger("user").info("user.greeting")

    @app.task(name="shop.other")
    def other() -> None:
        structlog.get_logger("user").info("user.other")

    # Given a task sent with a trace, and one more after it
    handle = greet.apply_async(("ada",), headers={"traceparent": TRACEPARENT})
    other.delay()
    with running_worker(app, concurrency=1) as worker:
        drain(worker)

    # Then the task's own event has the task context and the trace id
    (greeting,) = events(logs, "user.greeting")
    expected = {
        "task_id": handle.id,
        "task_name": "shop.greet",
        "attempt": 1,
        "queue": app.settings.default_queue,
        "trace_id": TRACE_ID,
        "customer": "ada",
    }
    assert {k: greeting[k] for k in expected} == expected
    # And so do the lifecycle events, published to succeeded
    for name in ("task.published", "task.received", "task.succeeded"):
        event = next(e for e in events(logs, name) if e["task_name"] == "shop.greet")
        assert {k: event[k] for k in (*CONTEXT, "trace_id")} == {
            k: expected[k] for k in (*CONTEXT, "trace_id")
        }, name
    succeeded = next(e for e in events(logs, "task.succeeded") if e["task_name"] == "shop.greet")
    assert succeeded["log_level"] == "debug" and succeeded["duration"] >= 0
    # And nothing of it leaks into the next task or out of the worker
    (second,) = events(logs, "user.other")
    assert second["task_name"] == "shop.other"
    assert "customer" not in second and "trace_id" not in second
    structlog.get_logger("test").info("after")
    assert "task_id" not in events(logs, "after")[0]


def test_arguments_are_logged_only_when_the_app_opts_in(logs: list[dict[str, Any]]) -> None:
    for opt_in in (False, True):
        app = memory_app(log_task_args=opt_in)
        assert any(isinstance(m, StructlogContext) and m.log_args is opt_in for m in app.middleware)

        @app.task(name="shop.pay")
        def pay(card: str, *, amount: int) -> None: ...

        try:
            pay.delay("4111-1111", amount=5)
            with running_worker(app) as worker:
                drain(worker)
        finally:
            reset(app)
    received = events(logs, "task.received")
    assert "args" not in received[0] and "4111-1111" not in repr(logs[: len(logs) // 2])
    assert received[1]["args"] == ["4111-1111"] and received[1]["kwargs"] == {"amount": 5}


def test_worker_events_carry_the_context_without_the_middleware(
    logs: list[dict[str, Any]],
) -> None:
    app = memory_app(middleware=[])

    @app.task(name="shop.boom", max_retries=0)
    def boom() -> None:
        raise KeyError("x")

    try:
        boom.delay()
        with running_worker(app) as worker:
            drain(worker, raise_errors=False)
    finally:
        reset(app)
    for name in ("task.failed", "task.dead_lettered"):
        (event,) = events(logs, name)
        assert all(event[k] is not None for k in CONTEXT), name


def test_the_trace_of_a_traced_publish_is_logged(logs: list[dict[str, Any]]) -> None:
    provider = TracerProvider()
    app = memory_app(middleware=[OpenTelemetryTracing(provider), StructlogContext()])

    @app.task
    def noop() -> None: ...

    try:
        with provider.get_tracer("test").start_as_current_span("request") as span:
            noop.delay()
        with running_worker(app) as worker:
            drain(worker)
    finally:
        reset(app)
        provider.shutdown()
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert events(logs, "task.published")[0]["trace_id"] == trace_id
    assert events(logs, "task.succeeded")[0]["trace_id"] == trace_id


# -- the worker command ----------------------------------------------------------------


def test_an_unknown_log_format_in_the_environment_is_a_usage_error() -> None:
    env = {**os.environ, "MQTASKS_LOG_FORMAT": "xml"}
    result = subprocess.run(
        [sys.executable, "-m", "mqtasks", "worker", "-A", "tests.observability_app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Unknown log format 'xml'" in result.stderr


def test_worker_writes_json_with_the_task_context_and_masked_urls(
    amqp_url: str, make_app: Callable[..., App], tmp_path: Path
) -> None:
    queue = unique_name("obs")
    sender = make_app(amqp_url, default_queue=queue)

    @sender.task(name=observability_app.HELLO)
    def hello(name: str) -> None: ...

    @sender.task(name=observability_app.FAIL)
    def fail() -> None: ...

    sender.declare()
    stderr = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTASKS_")}
    env.update(MQTASKS_BROKER_URL=require_broker("amqp"), OBS_TEST_QUEUE=queue)
    env.update(OBS_TEST_TRACING="1", PYTHONUNBUFFERED="1")
    args = ["-A", "tests.observability_app", "--log-format", "json", "--log-level", "debug"]
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqtasks", "worker", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:

        def lines() -> list[dict[str, Any]]:
            text = stderr.read_text()
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        def wait_logged(event: str) -> dict[str, Any]:
            def found() -> dict[str, Any] | None:
                assert proc.poll() is None, stderr.read_text()
                return next((e for e in lines() if e["event"] == event), None)

            return wait_for(found, lambda: f"{event} in {stderr.read_text()}", 30)

        # Given a started worker
        started = wait_logged("worker.started")
        # When a traced call and a failing one arrive
        handle = hello.apply_async(("ada",), headers={"traceparent": TRACEPARENT})
        fail.apply_async(headers={"traceparent": TRACEPARENT})
        wait_logged("task.succeeded")
        wait_logged("task.dead_lettered")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # Then every line is a JSON event (json.loads above) and the broker URL is masked
    text = stderr.read_text()
    password = amqp_url.split("@")[0].rsplit(":", 1)[1]
    assert f":{password}@" not in text
    assert "**@" in started["broker"]
    # And each task event carries the task context and the trace id
    logged = lines()
    for name in ("task.received", "user.greeting", "task.succeeded"):
        (event,) = [e for e in logged if e["event"] == name and e["task_id"] == handle.id]
        assert event["task_name"] == observability_app.HELLO, name
        assert event["attempt"] == 1 and event["queue"] == queue, name
        assert event["trace_id"] == TRACE_ID, name
        assert "args" not in event, name
    for name in ("task.failed", "task.dead_lettered"):
        (event,) = [e for e in logged if e["event"] == name]
        assert event["task_name"] == observability_app.FAIL and event["trace_id"] == TRACE_ID
    assert all("timestamp" in e and "level" in e for e in logged)


def test_an_app_that_never_configured_structlog_gets_no_line_per_task(
    capsys: pytest.CaptureFixture[str],
) -> None:
    structlog.reset_defaults()  # structlog's default prints every level to stdout
    app = memory_app()

    @app.task
    def quiet() -> None: ...

    quiet.delay()
    with running_worker(app, concurrency=1) as worker:
        drain(worker)
    out = capsys.readouterr().out
    assert "task.published" not in out and "task.received" not in out
