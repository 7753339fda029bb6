"""OpenTelemetryTracing: W3C trace context through the broker, a span per publish and per attempt.

``delay()`` opens a PRODUCER span ``"<queue> publish"`` and injects its
context into the message headers (``traceparent``, ``tracestate``, baggage).
A worker extracts it and opens a CONSUMER span ``"<queue> process"`` per
attempt, a child of the producer span, current while the task runs. A retry is
republished with the same headers, so every attempt of a task, and the tasks
it sends, belong to the caller's trace.

Only the OpenTelemetry API is used: spans are recorded once the application
sets a tracer provider (the SDK's, or a vendor's); until then the middleware
does nothing. Nor does it import the API until a provider can exist: one is set
through ``opentelemetry.trace`` (by the application, an instrumentation or a
distro), or named by ``OTEL_PYTHON_TRACER_PROVIDER``; in a process with
neither, the API would be imported (with ``importlib.metadata``, for its
propagators' entry points) into every worker process only to find no provider.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from ..exceptions import Reject, Retry, SkipMessage
from .base import Middleware

if TYPE_CHECKING:
    from contextvars import Token

    # Bound at run time by _import_opentelemetry(), before the first span.
    import opentelemetry.context as otel_context
    import opentelemetry.propagate as propagate
    import opentelemetry.trace
    import opentelemetry.trace as trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from ..app import App
    from ..config import Settings
    from ..message import Message
    from ..worker import Worker

__all__ = ["INSTRUMENTATION_NAME", "OpenTelemetryTracing", "messaging_system", "span_event"]

#: Name of the tracer (the instrumentation scope) spans are created with.
INSTRUMENTATION_NAME = "mqtasks"

#: Most (broker, queue, task, operation) whose span name and shared attributes are kept.
_SHARED_CACHE_SIZE = 1024

#: The environment variable that names a tracer provider to load (OpenTelemetry's).
_PROVIDER_ENV = "OTEL_PYTHON_TRACER_PROVIDER"

_SYSTEMS = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "memory": "memory",
}


def span_event(name: str, attributes: dict[str, Any]) -> None:
    """Add event ``name`` to the current span, if OpenTelemetry is in use and the span records.

    For middleware that marks moments of a task's run (a deferral, a circuit's
    change). The API is not imported here: it is in use only where a tracer
    provider can exist, once something else imported it.
    """
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


def messaging_system(broker_url: str) -> str:
    """Return the ``messaging.system`` attribute for a broker URL (``rabbitmq``, ``redis``, ``memory``)."""
    scheme = broker_url.split("://", 1)[0].split("+", 1)[0].lower()
    return _SYSTEMS.get(scheme, scheme)


def _import_opentelemetry() -> None:
    """Import the parts of the OpenTelemetry API this module uses into its namespace.

    Called before the first span, so the hooks use them as module globals, at
    no more cost than a top-level import; safe to call from several threads.
    """
    from opentelemetry import context, propagate, trace

    globals().update(
        otel_context=context,
        propagate=propagate,
        trace=trace,
        SpanKind=trace.SpanKind,
        Status=trace.Status,
        StatusCode=trace.StatusCode,
    )


class _Local(threading.local):
    """Per thread: the open PRODUCER spans by message id, and the CONSUMER span current here."""

    #: The CONSUMER span of the attempt running in this thread, and the token
    #: that restores the context it replaced.
    current: tuple[trace.Span, Token[Context]] | None = None

    def __init__(self) -> None:
        self.publishing: dict[str, trace.Span] = {}


class OpenTelemetryTracing(Middleware):
    """Propagates trace context through messages and records publish and process spans.

    Installed by the default stack unless the ``tracing`` setting is off
    (``MQTASKS_TRACING=false``).

    Args:
        tracer_provider: Where spans go; the global provider
            (:func:`opentelemetry.trace.set_tracer_provider`) by default,
            looked up until one is set.
    """

    def __init__(self, tracer_provider: opentelemetry.trace.TracerProvider | None = None) -> None:
        self._tracer: trace.Tracer | None = None
        if tracer_provider is not None:
            _import_opentelemetry()
            self._tracer = tracer_provider.get_tracer(INSTRUMENTATION_NAME)
        self._local = _Local()
        self._shared: dict[tuple[str, str, str, str], tuple[str, dict[str, Any]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenTelemetryTracing | None:
        """Return tracing on the global tracer provider, or None when ``tracing`` is off."""
        return cls() if settings.tracing else None

    def __repr__(self) -> str:
        return "<OpenTelemetryTracing>"

    @property
    def tracer(self) -> opentelemetry.trace.Tracer | None:
        """The tracer spans are made with; None while no tracer provider is set."""
        tracer = self._tracer
        if tracer is None:
            if "opentelemetry.trace" not in sys.modules and _PROVIDER_ENV not in os.environ:
                return None  # no provider can have been set: leave the API unimported
            _import_opentelemetry()
            provider = trace.get_tracer_provider()
            if isinstance(provider, trace.ProxyTracerProvider):
                return None  # nothing configured: stay out of the way, at no cost
            tracer = self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        return tracer

    def _shared_for(self, app: App, message: Message, operation: str) -> tuple[str, dict[str, Any]]:
        # The span name and the attributes a queue, task and operation share are
        # built once, not per span.
        key = (app.settings.broker_url, message.queue, message.task, operation)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= _SHARED_CACHE_SIZE:
                self._shared.clear()
            shared = self._shared[key] = (
                f"{message.queue} {operation}",
                {
                    "messaging.system": messaging_system(key[0]),
                    "messaging.destination.name": message.queue,
                    "messaging.operation": operation,
                    "mqtasks.task.name": message.task,
                },
            )
        return shared

    @staticmethod
    def _attributes(shared: dict[str, Any], message: Message) -> dict[str, Any]:
        # Built only for a span that records: an unsampled span (most of them,
        # under a ratio sampler) skips the copy, and the SDK's checks of each value.
        attributes = shared.copy()
        attributes["messaging.message.id"] = message.id
        attributes["mqtasks.task.attempt"] = message.attempt
        return attributes

    # -- publishing ------------------------------------------------------------------

    def before_publish(self, app: App, message: Message) -> Message:
        """Open the PRODUCER span and inject its context into the message headers."""
        tracer = self._tracer or self.tracer
        if tracer is None:
            return message
        headers = message.headers
        # Headers that carry a trace already (a replayed message, or the caller's
        # own) say where this publish belongs; otherwise the current span does.
        parent = propagate.extract(headers) if "traceparent" in headers else None
        name, shared = self._shared_for(app, message, "publish")
        span = tracer.start_span(name, context=parent, kind=SpanKind.PRODUCER)
        if span.is_recording():
            span.set_attributes(self._attributes(shared, message))
        carrier = dict(headers)
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        self._local.publishing[message.id] = span
        return message.copy(headers=carrier)

    def after_publish(self, app: App, message: Message) -> None:
        """End the PRODUCER span."""
        span = self._local.publishing.pop(message.id, None)
        if span is not None:
            span.end()

    def after_publish_error(self, app: App, message: Message, exception: BaseException) -> None:
        """Record the exception on the PRODUCER span, with error status, and end it."""
        span = self._local.publishing.pop(message.id, None)
        if span is None:
            return
        if span.is_recording():
            span.record_exception(exception)
            span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"))
        span.end()

    # -- processing ------------------------------------------------------------------

    def before_process(self, worker: Worker, message: Message) -> None:
        """Open the CONSUMER span of this attempt, child of the producer's, and make it current."""
        tracer = self._tracer or self.tracer
        if tracer is None:
            return
        parent = propagate.extract(message.headers)
        name, shared = self._shared_for(worker.app, message, "process")
        span = tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER)
        if span.is_recording():
            attributes = self._attributes(shared, message)
            if message.redelivered:  # only when true: one attribute fewer for the SDK to check
                attributes["mqtasks.message.redelivered"] = True
            span.set_attributes(attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._local.current = (span, token)

    def _span(self) -> trace.Span | None:
        """The recording CONSUMER span current in this thread, if any."""
        current = self._local.current
        return current[0] if current is not None and current[0].is_recording() else None

    def after_retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Add a ``mqtasks.retry`` event: the delay and the next attempt."""
        span = self._span()
        if span is not None:
            span.add_event(
                "mqtasks.retry",
                {
                    "mqtasks.retry.delay": delay,
                    "mqtasks.retry.next_attempt": message.attempt + 1,
                    "exception.type": type(exception).__qualname__,
                },
            )

    def after_reject(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Add a ``mqtasks.reject`` event with the reason."""
        span = self._span()
        if span is not None:
            span.add_event("mqtasks.reject", {"mqtasks.reject.reason": reason})

    def after_dead_letter(self, worker: Worker, message: Message | None, reason: str) -> None:
        """Add a ``mqtasks.dead_letter`` event with the reason."""
        span = self._span()
        if span is not None:
            span.add_event("mqtasks.dead_letter", {"mqtasks.dead_letter.reason": reason})

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Record a failure on the span (error status), end it and restore the context."""
        local = self._local
        current = local.current
        if current is None:
            return
        local.current = None
        span, token = current
        if exception is None or isinstance(exception, Retry) or not span.is_recording():
            pass  # a requested retry is control flow, not an error; its event says enough
        elif isinstance(exception, SkipMessage):
            span.add_event("mqtasks.skip")
        elif isinstance(exception, Reject):
            span.set_status(Status(StatusCode.ERROR, f"rejected: {exception.reason}"))
        else:
            span.record_exception(exception)
            span.set_attribute("error.type", type(exception).__qualname__)
            span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"))
        otel_context.detach(token)
        span.end()
