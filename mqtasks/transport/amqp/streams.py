"""Streams of ``amqp://``: RabbitMQ stream queues (3.9+), read over AMQP 0-9-1.

A stream is a queue declared with ``x-queue-type=stream`` (``x-max-age`` for a
retention, ``x-max-length-bytes`` and ``x-stream-max-segment-size-bytes`` for
its size); entries are published to it like messages (confirmed), with their
routing key in a header. A reader consumes it with ``x-stream-offset``, under
``basic.qos`` and manual acks.

RabbitMQ tracks consumers' offsets on the server only for its stream protocol,
so a group's position lives in a queue of its own,
``mqtasks.stream.<stream>.group.<group>``: a classic queue bounded to one
message (``x-max-length=1``, the older is dropped) whose body is the next
offset to read. Keeping it in the broker, not in the result backend, means a
stream needs nothing but RabbitMQ, and the position lives and is deleted with
the stream. The message is also the group's lease: a reader holds it
unacknowledged while it reads, so one reader of a group reads at a time, and
the broker hands it to the next reader when the holder's connection dies. A
commit publishes the new position (confirmed), then acknowledges the held one
and takes the new one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import amqp
from amqp.exceptions import NotFound

from ...exceptions import ConfigurationError
from ..envelope import Envelope
from ..errors import translate_errors
from ..stream import (
    HEADER_STREAM_KEY,
    StartAt,
    StreamEntry,
    StreamInfo,
    StreamReader,
    StreamSpec,
    StreamStore,
)

if TYPE_CHECKING:
    from . import AmqpTransport

__all__ = ["AmqpStreams", "stream_arguments"]

#: Most stream deliveries a reader holds unacknowledged (``basic.qos``, required on streams).
READ_PREFETCH = 500
#: Seconds a probe of the stream's end waits for its first delivery.
PROBE_WAIT = 1.0


def stream_arguments(spec: StreamSpec) -> dict[str, Any]:
    """Return the queue arguments of ``spec``'s stream queue.

    Raises:
        ConfigurationError: ``max_length`` (RabbitMQ bounds streams by bytes and age).
    """
    if spec.max_length is not None:
        raise ConfigurationError(
            f"Stream {spec.name!r}: RabbitMQ bounds streams by age and bytes, not by "
            "entries; replace max_length by retention or max_bytes."
        )
    args: dict[str, Any] = {"x-queue-type": "stream"}
    if spec.retention_seconds is not None:
        args["x-max-age"] = f"{max(1, round(spec.retention_seconds))}s"
    if spec.max_bytes is not None:
        args["x-max-length-bytes"] = spec.max_bytes
    if spec.segment_bytes is not None:
        args["x-stream-max-segment-size-bytes"] = spec.segment_bytes
    return args


def _encode_position(position: StartAt) -> bytes:
    if isinstance(position, datetime):
        return f"t:{position.timestamp()}".encode()
    return str(position).encode()


def _decode_position(body: bytes) -> StartAt:
    text = body.decode()
    if text.startswith("t:"):
        return datetime.fromtimestamp(float(text[2:]), tz=timezone.utc)
    return text if text in ("first", "last") else int(text)


def _entry(message: Any) -> StreamEntry:
    headers = dict(message.headers or {})
    offset = int(headers.pop("x-stream-offset", -1))
    key = headers.pop(HEADER_STREAM_KEY, "")
    props = message.properties
    stamp = props.get("timestamp")
    at = stamp.timestamp() if isinstance(stamp, datetime) else None
    envelope = Envelope(
        body=bytes(message.body),
        message_id=str(props.get("message_id") or ""),
        headers=headers,
        content_type=props.get("content_type") or "application/json",
        content_encoding=props.get("content_encoding") or "utf-8",
    )
    return StreamEntry(
        str(offset), offset, key if isinstance(key, str) else key.decode(), envelope, at
    )


def _position_arg(position: StartAt) -> Any:
    # x-stream-offset takes "first", "last", "next", an offset or a timestamp.
    return position


class AmqpStreams(StreamStore):
    """The stream queues of one :class:`~mqtasks.transport.amqp.AmqpTransport`."""

    def __init__(self, transport: AmqpTransport) -> None:
        self.transport = transport
        self._lock = threading.Lock()

    @staticmethod
    def queue(stream: str) -> str:
        """The stream queue of ``stream``."""
        return f"mqtasks.stream.{stream}"

    @staticmethod
    def group_queue(stream: str, group: str) -> str:
        """The queue holding ``group``'s position in ``stream``."""
        return f"mqtasks.stream.{stream}.group.{group}"

    @contextmanager
    def connection(self, what: str) -> Iterator[Any]:
        """A new connection for one operation (its errors translated)."""
        with translate_errors(self.transport.url, what):
            conn = self.transport.connection()
            conn.connect()
            try:
                yield conn.connection
            finally:
                conn.release()

    def declare(self, spec: StreamSpec) -> None:
        args = stream_arguments(spec)
        with self.connection(f"declare stream {spec.name!r}") as raw:
            raw.channel().queue_declare(
                self.queue(spec.name), durable=True, auto_delete=False, arguments=args
            )

    def append(self, stream: str, key: str, envelope: Envelope) -> str:
        headers = {**envelope.headers, HEADER_STREAM_KEY: key}
        self.transport.publish(
            self.queue(stream),
            Envelope(
                envelope.body,
                envelope.message_id,
                headers,
                envelope.content_type,
                envelope.content_encoding,
            ),
        )
        return ""  # RabbitMQ does not tell the offset to the publisher

    def read_range(
        self, raw: Any, stream: str, start: StartAt, limit: int, idle: float = 0.3
    ) -> list[StreamEntry]:
        """Read up to ``limit`` entries from ``start`` on a temporary channel."""
        channel = raw.channel()
        found: list[StreamEntry] = []
        channel.basic_qos(0, min(max(limit, 1), READ_PREFETCH), False)

        def on_message(message: Any) -> None:
            found.append(_entry(message))
            channel.basic_ack(message.delivery_tag)

        tag = channel.basic_consume(
            self.queue(stream),
            callback=on_message,
            arguments={"x-stream-offset": _position_arg(start)},
        )
        wait = PROBE_WAIT
        while len(found) < limit:
            before = len(found)
            try:
                raw.drain_events(timeout=wait)
            except TimeoutError:
                break
            if len(found) > before:
                wait = idle
        channel.basic_cancel(tag)
        channel.close()
        if isinstance(start, int):
            found = [e for e in found if (e.offset or 0) >= start]
        elif isinstance(start, datetime):
            stamp = start.timestamp()
            found = [e for e in found if e.at is None or e.at >= stamp]
        return found[:limit]

    def resolve(self, raw: Any, stream: str, start: StartAt) -> StartAt:
        """Turn ``"last"`` into the offset after the stream's last entry, now."""
        if start != "last":
            return start
        tail = self.read_range(raw, stream, "last", 10**9)
        return (tail[-1].offset or 0) + 1 if tail else "first"

    def reader(self, spec: StreamSpec, group: str, start: StartAt) -> StreamReader:
        name = self.group_queue(spec.name, group)
        with self.connection(f"create group {group!r} of {spec.name!r}") as raw:
            try:
                raw.channel().queue_declare(name, passive=True)
            except NotFound:
                position = self.resolve(raw, spec.name, start)
                self._set_position(raw, name, position, purge=False)
        return _AmqpReader(self, spec, group)

    def _set_position(self, raw: Any, name: str, position: StartAt, *, purge: bool) -> None:
        channel = raw.channel()
        channel.queue_declare(
            name,
            durable=True,
            auto_delete=False,
            arguments={"x-queue-type": "classic", "x-max-length": 1},
        )
        if purge:
            channel.queue_purge(name)
        channel.confirm_select()
        channel.basic_publish(amqp.Message(_encode_position(position), delivery_mode=2), "", name)
        channel.close()

    def info(self, spec: StreamSpec, groups: Sequence[str] = ()) -> StreamInfo:
        with self.connection(f"read stream {spec.name!r}") as raw:
            try:
                raw.channel().queue_declare(self.queue(spec.name), passive=True)
            except NotFound:
                return StreamInfo(spec.name, exists=False)
            first = self.read_range(raw, spec.name, "first", 1)
            last = self.read_range(raw, spec.name, "last", 10**9)
        # declare-ok counts no messages of a stream; its offsets have no gaps.
        count = (last[-1].offset or 0) - (first[0].offset or 0) + 1 if first and last else 0
        return StreamInfo(
            spec.name,
            True,
            count,
            first[0].id if first else None,
            last[-1].id if last else None,
            tuple(groups),
        )

    def entries(self, spec: StreamSpec, start: StartAt, limit: int) -> list[StreamEntry]:
        with self.connection(f"read stream {spec.name!r}") as raw:
            return self.read_range(raw, spec.name, self.resolve(raw, spec.name, start), limit)

    def rewind(self, spec: StreamSpec, group: str, start: StartAt) -> None:
        """Set ``group``'s position in ``spec``'s stream.

        Raises:
            ConfigurationError: A running reader of the group holds its position
                (its next commit would write over the new one).
        """
        name = self.group_queue(spec.name, group)
        with self.connection(f"rewind group {group!r} of {spec.name!r}") as raw:
            try:
                held = raw.channel().queue_declare(name, passive=True).message_count == 0
            except NotFound:
                held = False
            if held:
                raise ConfigurationError(
                    f"Group {group!r} of stream {spec.name!r} is being read by a running "
                    "worker, whose next commit would undo the rewind: stop the workers "
                    "that consume its subscriber's queue, then rewind."
                )
            position = self.resolve(raw, spec.name, start)
            self._set_position(raw, self.group_queue(spec.name, group), position, purge=True)

    def delete(self, spec: StreamSpec, groups: Sequence[str] = ()) -> None:
        with self.connection(f"delete stream {spec.name!r}") as raw:
            channel = raw.channel()
            for name in [self.queue(spec.name), *(self.group_queue(spec.name, g) for g in groups)]:
                channel.queue_delete(name)


class _AmqpReader(StreamReader):
    """Holds its group's lease (the position message) while it consumes the stream."""

    def __init__(self, store: AmqpStreams, spec: StreamSpec, group: str) -> None:
        self.store, self.spec, self.group = store, spec, group
        self.position_queue = store.group_queue(spec.name, group)
        with translate_errors(store.transport.url, f"read stream {spec.name!r}"):
            # Heartbeats, checked at every read: a network that drops silently
            # ends the read in an error (the pump starts over from the group's
            # committed position) instead of stalling it until TCP gives up.
            self.conn = store.transport.connection(heartbeat=store.transport.heartbeat)
            self.conn.connect()
            self.raw = self.conn.connection
            self.lease_channel = self.raw.channel()
            self.lease_channel.confirm_select()
            self.channel = self.raw.channel()
            self.channel.basic_qos(0, READ_PREFETCH, False)
        self.lease: int | None = None
        self.consumer_tag: str | None = None
        self.skip_below: int | None = None
        self.not_before: float | None = None
        self.buffer: list[tuple[int, StreamEntry]] = []
        self.handed: list[tuple[int, StreamEntry]] = []

    def _take_lease(self) -> bool:
        message = self.lease_channel.basic_get(self.position_queue, no_ack=False)
        if message is None:
            return False
        self.lease = message.delivery_tag
        self._consume(_decode_position(bytes(message.body)))
        return True

    def _consume(self, position: StartAt) -> None:
        if self.consumer_tag is not None:
            self.channel.basic_cancel(self.consumer_tag)
            self.consumer_tag = None
        self.buffer.clear()
        self.skip_below = position if isinstance(position, int) else None
        self.not_before = position.timestamp() if isinstance(position, datetime) else None
        self.consumer_tag = self.channel.basic_consume(
            self.store.queue(self.spec.name),
            callback=self._on_message,
            arguments={"x-stream-offset": _position_arg(position)},
        )

    def _on_message(self, message: Any) -> None:
        tag = message.delivery_tag
        if message.delivery_info.get("consumer_tag") != self.consumer_tag:
            self.channel.basic_ack(tag)  # in flight when its consumer was cancelled
            return
        entry = _entry(message)
        # A stream is delivered from the start of the chunk holding the offset asked.
        if (self.skip_below is not None and (entry.offset or 0) < self.skip_below) or (
            self.not_before is not None and entry.at is not None and entry.at < self.not_before
        ):
            self.channel.basic_ack(tag)
            return
        self.buffer.append((tag, entry))

    def read(self, count: int, timeout: float) -> list[StreamEntry]:
        with translate_errors(self.store.transport.url, f"read stream {self.spec.name!r}"):
            self.conn.heartbeat_check()
            if self.lease is None and not self._take_lease():
                time.sleep(min(timeout, 1.0))  # another reader of the group holds it
                return []
            deadline = time.monotonic() + timeout
            while len(self.buffer) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    self.raw.drain_events(timeout=remaining if not self.buffer else 0.01)
                except TimeoutError:
                    if self.buffer:
                        break
        self.handed, self.buffer = self.buffer[:count], self.buffer[count:]
        return [e for _, e in self.handed]

    def commit(self, entries: Sequence[StreamEntry]) -> None:
        if not entries or self.lease is None:
            return
        with translate_errors(self.store.transport.url, f"commit stream {self.spec.name!r}"):
            self.channel.basic_ack(self.handed[-1][0], multiple=True)
            following = (entries[-1].offset or 0) + 1
            self.lease_channel.basic_publish(
                amqp.Message(_encode_position(following), delivery_mode=2), "", self.position_queue
            )
            self.lease_channel.basic_ack(self.lease)
            self.lease = None
            message = self.lease_channel.basic_get(self.position_queue, no_ack=False)
            if message is None:  # another reader took the group over: stop reading
                if self.consumer_tag is not None:
                    self.channel.basic_cancel(self.consumer_tag)
                    self.consumer_tag = None
                self.buffer.clear()
                return
            self.lease = message.delivery_tag
            position = _decode_position(bytes(message.body))
            if position != following:  # rewound meanwhile: read from there
                self._consume(position)

    def close(self) -> None:
        try:
            self.conn.release()  # the held position goes back to the queue
        except Exception:
            pass
