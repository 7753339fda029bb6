"""``async def`` tasks: run on the worker's event loop, with the sync tasks' middleware,
retries, dead letters and results; ``adelay()`` from asyncio code; a blocked loop is named."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mqtasks import (
    App,
    ConnectionFailed,
    OpenTelemetryTracing,
    StructlogContext,
    TaskFailed,
    Worker,
    current_message,
)
from mqtasks.testing import drain, running_worker
from tests._helpers.wait import wait_for


@pytest.fixture
def results_app(broker_url: str, make_app: Callable[..., App]) -> App:
    """An app on each broker in turn, with a result backend."""
    return make_app(broker_url, backend="memory://")


def test_an_async_task_runs_on_the_loop_and_its_result_is_stored(results_app: App) -> None:
    app = results_app
    seen: dict[str, Any] = {}

    @app.task
    async def add(x: int, y: int) -> int:
        await asyncio.sleep(0)
        seen["thread"] = threading.current_thread().name
        seen["asyncio_task"] = asyncio.current_task().get_name()  # type: ignore[union-attr]
        message = current_message()
        seen["message_id"] = message.id if message is not None else None
        return x + y

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    with running_worker(app):
        handle = add.delay(2, 3)
        assert handle.get(timeout=10) == 5
        assert mul.delay(2, 3).get(timeout=10) == 6  # sync and async share the worker
    assert seen["thread"] == "mqtasks-event-loop"
    # The message's context (what middleware bound) is the coroutine's.
    assert seen["message_id"] == handle.id
    assert seen["asyncio_task"] == f"{add.name}[{handle.id}]"


def test_the_structlog_context_bound_by_middleware_is_the_coroutine_s(
    make_app: Callable[..., App],
) -> None:
    app = make_app(middleware=[StructlogContext()])
    bound: dict[str, Any] = {}

    @app.task
    async def look() -> None:
        bound.update(structlog.contextvars.get_contextvars())

    with running_worker(app) as worker:
        handle = look.delay()
        drain(worker)
    assert bound["task_id"] == handle.id and bound["task_name"] == look.name


def test_the_process_span_is_current_inside_a_coroutine_task(
    make_app: Callable[..., App],
) -> None:
    """A span the task starts is a child of the worker's process span, as for a sync task."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = make_app(middleware=[OpenTelemetryTracing(provider)])

    @app.task
    async def traced() -> None:
        with provider.get_tracer("test").start_as_current_span("inside"):
            await asyncio.sleep(0)

    with running_worker(app) as worker:
        traced.delay()
        drain(worker)
    provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    inside = spans.pop("inside")
    [process] = [s for s in spans.values() if s.kind is SpanKind.CONSUMER]
    assert inside.parent is not None and inside.parent.span_id == process.context.span_id


def test_a_failing_async_task_is_retried_then_dead_lettered_like_a_sync_one(
    results_app: App,
) -> None:
    app = results_app
    attempts: list[int] = []

    @app.task(max_retries=1, retry_backoff=0)
    async def flaky() -> None:
        message = current_message()
        attempts.append(message.attempt if message is not None else 0)
        raise ValueError("boom")

    with running_worker(app) as worker:
        handle = flaky.delay()
        with pytest.raises(TaskFailed) as failed:
            handle.get(timeout=15)
        drain(worker, raise_errors=False)
    assert attempts == [1, 2]
    assert (failed.value.reason, failed.value.exc_type) == ("max_retries_exceeded", "ValueError")
    [entry] = app.dead_letters()
    assert (entry.id, entry.reason) == (handle.id, "max_retries_exceeded")


def test_concurrency_bounds_the_coroutines_running_at_once(make_app: Callable[..., App]) -> None:
    app = make_app()
    running = 0
    most = 0
    release = asyncio.Event()
    lock = threading.Lock()

    @app.task
    async def wait() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            while not release.is_set():
                await asyncio.sleep(0.01)
        finally:
            with lock:
                running -= 1

    with running_worker(app, concurrency=2, prefetch=8) as worker:
        for _ in range(6):
            wait.delay()
        wait_for(lambda: worker.running == 2, "two coroutines running")
        assert most == 2
        release.set()
        drain(worker)
    assert most == 2


def test_adelay_publishes_from_asyncio_code(make_app: Callable[..., App]) -> None:
    app = make_app(backend="memory://")

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    async def caller() -> list[int]:
        handles = await asyncio.gather(double.adelay(1), double.adelay(2))
        return [await asyncio.to_thread(h.get, timeout=10) for h in handles]

    with running_worker(app):
        assert asyncio.run(caller()) == [2, 4]


def test_a_coroutine_that_blocks_the_loop_is_named_in_a_warning(
    make_app: Callable[..., App],
) -> None:
    app = make_app(loop_block_threshold=0.1)

    @app.task
    async def sleepy() -> None:
        time.sleep(0.6)  # blocks the loop: the mistake being detected

    with structlog.testing.capture_logs() as logs, running_worker(app) as worker:
        handle = sleepy.delay()
        drain(worker)
        wait_for(
            lambda: any(e["event"] == "task.loop_unblocked" for e in logs),
            "the end of the episode",
        )
    blocked = [e for e in logs if e["event"] == "task.loop_blocked"]
    assert len(blocked) == 1  # once per episode
    assert blocked[0]["asyncio_task"] == f"{sleepy.name}[{handle.id}]"
    assert blocked[0]["log_level"] == "warning" and blocked[0]["blocked_for"] >= 0.1


def test_a_worker_that_cannot_start_leaves_no_event_loop_running(
    make_app: Callable[..., App],
) -> None:
    app = make_app("redis://127.0.0.1:1/0", connect_timeout=0.5)  # nothing listens there

    @app.task
    async def never() -> None: ...

    before = set(threading.enumerate())
    worker = Worker(app)
    with pytest.raises(ConnectionFailed):
        worker.start(timeout=10)
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("mqtasks-")]
    assert left == []
