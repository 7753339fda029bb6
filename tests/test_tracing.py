"""OpenTelemetry tracing: spans as the SDK's InMemorySpanExporter records them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tenacity
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from mqtasks import App, EncodeError, Message, Middleware, Reject, Settings, Worker
from mqtasks.middleware import OpenTelemetryTracing, default_middleware
from mqtasks.middleware.otel import messaging_system
from mqtasks.testing import drain, memory_app, reset, running_worker
from tests._helpers.brokers import require_broker


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A tracer provider of the test's own: the global one is left unset."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture(params=["memory", "amqp", "redis"])
def traced_app(
    request: pytest.FixtureRequest, make_app: Callable[..., App], provider: TracerProvider
) -> App:
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    app = make_app(require_broker(request.param))
    app.middleware[:] = [OpenTelemetryTracing(provider)]
    return app


class Headers(Middleware):
    """Keeps the headers of every message a worker processes."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def before_process(self, worker: Worker, message: Message) -> None:
        self.seen.append(dict(message.headers))


def attr(item: Any, key: str) -> Any:
    """An attribute of a span or span event (both may have none)."""
    return (item.attributes or {})[key]


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_failed_publish_ends_its_span_with_the_error(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = memory_app(middleware=[OpenTelemetryTracing(provider)])

    @app.task
    def store(value: Any) -> None: ...

    try:
        with pytest.raises(EncodeError):
            store.delay(object())
    finally:
        reset(app)
    (span,) = exporter.get_finished_spans()
    assert span.kind is SpanKind.PRODUCER
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert attr(span.events[0], "exception.type") == "mqtasks.exceptions.EncodeError"


def test_without_a_tracer_provider_nothing_is_added() -> None:
    # The global tracer provider is never set in the test process.
    headers = Headers()
    app = memory_app(middleware=[OpenTelemetryTracing(), headers])

    @app.task
    def noop() -> None: ...

    try:
        noop.delay()
        with running_worker(app) as worker:
            drain(worker)
    finally:
        reset(app)
    assert OpenTelemetryTracing().tracer is None
    assert headers.seen and "traceparent" not in headers.seen[0]


def test_tracing_is_in_the_default_stack_unless_turned_off() -> None:
    assert any(isinstance(m, OpenTelemetryTracing) for m in default_middleware(Settings()))
    off = Settings.from_env({"MQTASKS_TRACING": "false"})
    assert not any(isinstance(m, OpenTelemetryTracing) for m in default_middleware(off))
    assert messaging_system("amqps://h//") == "rabbitmq"
    assert messaging_system("redis+kombu://h") == "redis"


def test_a_task_retried_twice_is_one_trace_under_the_callers_span(
    traced_app: App, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = traced_app
    queue = app.settings.default_queue
    tracer = provider.get_tracer("test")
    runs: list[int] = []

    @app.task(name="shop.child")
    def child() -> None: ...

    @app.task(name="shop.flaky", max_retries=2, retry_backoff=tenacity.wait_none())
    def flaky(order: int) -> None:
        runs.append(order)
        with tracer.start_as_current_span("inside the task"):
            if len(runs) < 3:
                raise RuntimeError(f"attempt {len(runs)} failed")
            child.delay()

    # Given a request span that sends the task
    with tracer.start_as_current_span("request") as request:
        handle = flaky.delay(42)

    # When a worker runs it: two failures, then success
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    assert len(runs) == 3

    # Then the publish is a PRODUCER span, child of the request
    trace_id = request.get_span_context().trace_id
    publishes = spans_named(exporter, f"{queue} publish")
    producer = next(s for s in publishes if attr(s, "mqtasks.task.name") == "shop.flaky")
    assert producer.kind is SpanKind.PRODUCER
    assert producer.parent is not None
    assert producer.parent.span_id == request.get_span_context().span_id
    assert producer.context.trace_id == trace_id

    # And each attempt is a CONSUMER span, child of the producer, in the same trace
    attempts = sorted(
        (
            s
            for s in spans_named(exporter, f"{queue} process")
            if attr(s, "mqtasks.task.name") == "shop.flaky"
        ),
        key=lambda s: attr(s, "mqtasks.task.attempt"),
    )
    assert [attr(s, "mqtasks.task.attempt") for s in attempts] == [1, 2, 3]
    system = messaging_system(app.settings.broker_url)
    for span in attempts:
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.span_id == producer.context.span_id
        assert attr(span, "messaging.system") == system
        assert attr(span, "messaging.destination.name") == queue
        assert attr(span, "messaging.message.id") == handle.id
        assert attr(span, "messaging.operation") == "process"

    # And the failed attempts carry the exception, error status and a retry event
    for span, n in zip(attempts[:2], (1, 2), strict=True):
        assert span.status.status_code is StatusCode.ERROR
        events = {e.name: e for e in span.events}
        assert attr(events["exception"], "exception.message") == f"attempt {n} failed"
        assert attr(events["mqtasks.retry"], "mqtasks.retry.next_attempt") == n + 1
    assert attempts[2].status.status_code is StatusCode.UNSET

    # And what the task does is inside its attempt's span, the child task included
    inner = spans_named(exporter, "inside the task")
    assert len(inner) == 3
    assert {s.parent.span_id for s in inner if s.parent} == {s.context.span_id for s in attempts}
    child_publish = next(s for s in publishes if attr(s, "mqtasks.task.name") == "shop.child")
    assert child_publish.context.trace_id == trace_id
    child_runs = [
        s
        for s in spans_named(exporter, f"{queue} process")
        if attr(s, "mqtasks.task.name") == "shop.child"
    ]
    assert len(child_runs) == 1 and child_runs[0].context.trace_id == trace_id


def test_dead_lettering_and_rejection_are_span_events(
    traced_app: App, exporter: InMemorySpanExporter
) -> None:
    app = traced_app

    @app.task(name="shop.broken", max_retries=0)
    def broken() -> None:
        raise KeyError("gone")

    @app.task(name="shop.refuse")
    def refuse() -> None:
        raise Reject("bad order")

    broken.delay()
    refuse.delay()
    with running_worker(app) as worker:
        drain(worker, raise_errors=False)
    spans = {
        attr(s, "mqtasks.task.name"): s
        for s in spans_named(exporter, f"{app.settings.default_queue} process")
    }
    failed = spans["shop.broken"]
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["mqtasks.dead_letter", "exception"]
    assert attr(failed.events[0], "mqtasks.dead_letter.reason") == "max_retries_exceeded"
    assert attr(failed, "error.type") == "KeyError"
    rejected = spans["shop.refuse"]
    assert rejected.status.status_code is StatusCode.ERROR
    assert rejected.status.description == "rejected: bad order"
    assert [e.name for e in rejected.events] == ["mqtasks.reject", "mqtasks.dead_letter"]
    assert attr(rejected.events[1], "mqtasks.dead_letter.reason") == "rejected"


def test_an_incoming_trace_context_reaches_what_the_task_publishes(
    traced_app: App, exporter: InMemorySpanExporter
) -> None:
    app = traced_app
    queue = app.settings.default_queue
    trace_id, upstream = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    @app.task(name="shop.notify")
    def notify() -> None: ...

    @app.task(name="shop.order")
    def order() -> None:
        notify.delay()

    # Given a task sent with the trace context of a traced service upstream, no span current here
    order.apply_async(headers={"traceparent": f"00-{trace_id}-{upstream}-01"})
    # When a worker runs it, and the task publishes another task
    with running_worker(app) as worker:
        drain(worker)

    publishes = {attr(s, "mqtasks.task.name"): s for s in spans_named(exporter, f"{queue} publish")}
    runs = {attr(s, "mqtasks.task.name"): s for s in spans_named(exporter, f"{queue} process")}
    # Then the publish is a child of the upstream span, and the run a child of the publish
    assert publishes["shop.order"].parent is not None
    assert f"{publishes['shop.order'].parent.span_id:016x}" == upstream
    assert runs["shop.order"].parent is not None
    assert runs["shop.order"].parent.span_id == publishes["shop.order"].context.span_id
    # And what the task published is in the same trace, under the task's run
    assert publishes["shop.notify"].parent is not None
    assert publishes["shop.notify"].parent.span_id == runs["shop.order"].context.span_id
    assert runs["shop.notify"].parent is not None
    assert runs["shop.notify"].parent.span_id == publishes["shop.notify"].context.span_id
    for span in [*publishes.values(), *runs.values()]:
        assert f"{span.context.trace_id:032x}" == trace_id


def test_an_unrecorded_trace_still_travels_and_a_recorded_one_keeps_its_attributes(
    exporter: InMemorySpanExporter,
) -> None:
    """Under a parent-based sampler that starts no trace, the caller's sampled flag decides."""
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    headers = Headers()
    app = memory_app(middleware=[OpenTelemetryTracing(provider), headers])
    unrecorded, recorded = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"
    seen: list[tuple[str, bool]] = []

    @app.task(name="shop.notify")
    def notify() -> None: ...

    @app.task(name="shop.order", max_retries=0)
    def order(fail: bool) -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((f"{context.trace_id:032x}", context.trace_flags.sampled))
        notify.delay()
        if fail:
            raise RuntimeError("declined")

    # Given one task sent in a trace the caller does not record, and one in a trace it does
    order.apply_async((True,), headers={"traceparent": f"00-{unrecorded}-00f067aa0ba902b7-00"})
    order.apply_async((False,), headers={"traceparent": f"00-{recorded}-00f067aa0ba902b7-01"})
    # When a worker runs both (the first fails)
    try:
        with running_worker(app) as worker:
            drain(worker, raise_errors=False)
    finally:
        reset(app)

    # Then each runs in its caller's trace, and what it sends carries that trace on
    assert sorted(seen) == sorted([(unrecorded, False), (recorded, True)])
    sent = {h["traceparent"].split("-")[1]: h["traceparent"] for h in headers.seen}
    assert sent[unrecorded].endswith("-00") and sent[recorded].endswith("-01")
    # And only the recorded trace has spans, each with its attributes
    spans = exporter.get_finished_spans()
    assert spans and {f"{s.context.trace_id:032x}" for s in spans} == {recorded}
    for span in spans:
        assert attr(span, "mqtasks.task.name") in ("shop.order", "shop.notify")
        assert attr(span, "messaging.system") == "memory"
        assert attr(span, "mqtasks.task.attempt") == 1
