"""Replayable event streams: ``App(streams=[StreamSpec("orders", retention="7d")])``,
``app.emit(key, payload, stream="orders")`` and ``@app.on(pattern, stream="orders", start=...)``.

An event emitted to a stream is appended to it and kept (up to its retention),
whoever has read it. Each stream subscriber is a *group* named after its queue:
a pump thread in each worker that consumes the queue reads the stream from the
group's committed position, keeps the entries whose key matches the
subscriber's pattern, publishes them (confirmed) to the subscriber's queue, and
only then commits the position. From the queue on, an entry is an event like
any other: retries, dead letters, middleware, metrics and logs apply unchanged.
At least once: a pump that dies between the publish and the commit has its
entries read again by the group's next pump.

This module is transport-independent: the brokers' streams live beside their
transports (:mod:`mqtasks.transport.stream` and its implementations).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from .events import EventHandle, build_message, publish_event
from .exceptions import ConfigurationError, MQTasksError
from .middleware.base import Middleware
from .transport import transport_class
from .transport.stream import StartAt, StreamSpec, StreamStore, check_start, parse_duration
from .transport.topic import topic_matches

if TYPE_CHECKING:
    from .app import App
    from .events import Subscription
    from .transport.envelope import Envelope
    from .worker import Worker

__all__ = [
    "StartAt",
    "StreamPump",
    "StreamPumps",
    "StreamSpec",
    "check_start",
    "emit_to_stream",
    "parse_duration",
    "stream_specs",
    "stream_subscriptions",
]

logger = structlog.get_logger("mqtasks.streams")

#: Most entries a pump reads, publishes and commits at once.
PUMP_BATCH = 200


def stream_specs(
    app_name: str, broker_url: str, streams: Iterable[StreamSpec]
) -> dict[str, StreamSpec]:
    """Return ``streams`` by name, refusing them on a broker without streams.

    Raises:
        ConfigurationError: A stream named twice, or a broker that keeps no streams.
    """
    specs: dict[str, StreamSpec] = {}
    for spec in streams:
        if not isinstance(spec, StreamSpec):
            raise ConfigurationError(f"streams=: {spec!r} is not a StreamSpec.")
        if spec.name in specs:
            raise ConfigurationError(f"App {app_name!r}: stream {spec.name!r} is declared twice.")
        specs[spec.name] = spec
    if specs:
        try:
            cls = transport_class(urlsplit(broker_url).scheme)
        except MQTasksError:
            return specs  # an unknown scheme is reported when the transport is resolved
        if not cls.capabilities.streams:
            raise ConfigurationError(
                f"App {app_name!r} has streams ({', '.join(specs)}), but {cls.schemes[0]}:// "
                "keeps no replayable streams. Use amqp:// (RabbitMQ 3.9+ stream queues), "
                "redis:// (Redis Streams) or memory://, or plain events (no streams=)."
            )
    return specs


def spec_of(app: App, stream: str) -> StreamSpec:
    """Return the app's stream ``stream``.

    Raises:
        ConfigurationError: The app declares no such stream.
    """
    spec = app.streams.get(stream)
    if spec is None:
        known = ", ".join(app.streams) or "none"
        raise ConfigurationError(
            f"App {app.name!r} has no stream {stream!r} (its streams: {known}); add "
            f"StreamSpec({stream!r}) to App(..., streams=[...])."
        )
    return spec


def store_of(app: App, stream: str) -> StreamStore:
    """Return the broker's streams with ``stream`` declared (once per app)."""
    spec = spec_of(app, stream)
    store = app.transport.streams()
    if stream not in app._streams_declared:
        store.declare(spec)
        app._streams_declared.add(stream)
    return store


def stream_subscriptions(app: App, queues: Iterable[str] | None = None) -> list[Subscription]:
    """Return the app's stream subscribers (of ``queues`` only, when given)."""
    wanted = None if queues is None else set(queues)
    return [
        s
        for s in app.subscriptions
        if s.stream is not None and (wanted is None or s.queue in wanted)
    ]


def emit_to_stream(
    app: App,
    stream: str,
    event: str,
    payload: Any,
    *,
    headers: Mapping[str, Any] | None = None,
    event_id: str | None = None,
) -> EventHandle:
    """Append event ``event`` with ``payload`` to ``stream``; return once the broker has it.

    The publish middleware runs as for :func:`mqtasks.events.emit`; the message's
    ``queue`` is the stream's name.

    Raises:
        ValueError: A bad event name or a reserved header.
        EncodeError: A payload JSON cannot carry, or over ``max_message_size``.
        ConfigurationError: The app has no such stream, or the broker keeps no streams.
        PublishError: The broker did not take the event.
    """
    spec_of(app, stream)
    message = build_message(stream, event, payload, headers=headers, event_id=event_id)

    def send(envelope: Envelope) -> str:
        return store_of(app, stream).append(stream, event, envelope)

    message, entry = publish_event(app, message, send, f"appended to stream {stream!r}")
    logger.debug("stream.appended", stream=stream, event_name=event, entry=entry)
    return EventHandle(message.id, event, stream, None)


class StreamPump(threading.Thread):
    """Moves one group's matching entries from its stream to its subscriber's queue.

    Reads, publishes (confirmed) and commits in batches of up to
    ``PUMP_BATCH``; on an error it starts over from the committed position
    after a capped backoff, so nothing is skipped.
    """

    def __init__(self, app: App, subscription: Subscription, *, batch: int = PUMP_BATCH) -> None:
        super().__init__(name=f"mqtasks-stream-{subscription.queue}", daemon=True)
        self.app = app
        self.subscription = subscription
        self.batch = batch
        self._stopping = threading.Event()
        #: Entries read and committed so far (matching or not).
        self.committed = 0
        #: Set once the group exists (created at its ``start`` if it did not).
        self.ready = threading.Event()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the pump to stop after its current batch, and wait for it."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        sub = self.subscription
        stream = sub.stream or ""
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                self.app.declare([sub.queue])
                store = store_of(self.app, stream)
                reader = store.reader(spec_of(self.app, stream), sub.queue, sub.start)
                self.ready.set()
                try:
                    self._pump(reader)
                    backoff = 0.2
                finally:
                    reader.close()
            except Exception as exc:  # the pump must outlive a broker outage
                logger.warning(
                    "stream.pump_failed",
                    stream=stream,
                    group=sub.queue,
                    error=type(exc).__name__,
                    detail=str(exc)[:300],
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _pump(self, reader: Any) -> None:
        sub = self.subscription
        transport = self.app.transport
        while not self._stopping.is_set():
            entries = reader.read(self.batch, 0.5)
            if not entries:
                continue
            items = [(sub.queue, e.envelope) for e in entries if topic_matches(sub.pattern, e.key)]
            if items:
                failed = [r for r in transport.publish_many(items) if r is not None]
                if failed:
                    raise failed[0]
            reader.commit(entries)
            self.committed += len(entries)


class StreamPumps(Middleware):
    """Runs a :class:`StreamPump` for each stream subscriber a worker consumes.

    :class:`~mqtasks.app.App` installs it when it has streams.
    """

    def __init__(self) -> None:
        self.pumps: dict[int, list[StreamPump]] = {}

    def worker_boot(self, worker: Worker) -> None:
        pumps = [StreamPump(worker.app, s) for s in stream_subscriptions(worker.app, worker.queues)]
        for pump in pumps:
            pump.start()
        self.pumps[id(worker)] = pumps
        if pumps:
            logger.info(
                "stream.pumps_started",
                groups=[
                    (p.subscription.stream, p.subscription.pattern, p.subscription.queue)
                    for p in pumps
                ],
            )

    def worker_shutdown(self, worker: Worker) -> None:
        for pump in self.pumps.pop(id(worker), []):
            pump.stop()
