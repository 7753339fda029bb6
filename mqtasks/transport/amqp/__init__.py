"""RabbitMQ through kombu's py-amqp transport: confirms, mandatory routing, quorum queues."""

from __future__ import annotations

import contextlib
import math
import os
import select
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import kombu
from amqp.exceptions import MessageNacked, RecoverableConnectionError, UnexpectedFrame
from amqp.serialization import dumps as amqp_dumps
from kombu.transport import pyamqp

from ..._url import mask_url, redact
from ...exceptions import ConfigurationError, PublishError, PublishNacked, Unroutable
from .._guard import GuardedAmqpMessage, guarded_frame_handler
from ..base import DLQ_SUFFIX, Capabilities, Consumer, Delivery, QueueSpec, QueueStats
from ..envelope import Envelope
from ..errors import is_not_found, translate_errors
from ..kombu import KombuTransport, deadline_errback
from ..kombu_consumer import KombuConsumer
from .delivery_count import RedeliveryCounter, counted_returns

__all__ = ["DEAD_LETTER_EXCHANGE", "DELAY_LEVELS", "AmqpTransport"]

#: Direct exchange routing each queue's dead letters to ``<queue>.dlq``.
DEAD_LETTER_EXCHANGE = "mqtasks.dlx"
#: Levels of the delay ladder: level k holds a message 2**k ms; 32 levels reach 49 days.
DELAY_LEVELS = 32
#: Topic exchange where delayed messages leave the ladder towards their queue.
DELAY_DELIVERY_EXCHANGE = "mqtasks.delayed"
#: Longest delay the ladder can hold, in seconds.
MAX_DELAY = (2**DELAY_LEVELS - 1) / 1000


def _level(k: int) -> str:
    return f"mqtasks.delay.{k}"


def delay_routing_key(delay: float, queue: str) -> str:
    """Routing key that walks a message through the ladder for ``delay`` seconds.

    One word per level, most significant first: ``1`` stops in that level's
    queue (TTL ``2**k`` ms), ``0`` passes on. The queue name follows.
    """
    ms = max(1, math.ceil(delay * 1000))
    return ".".join(f"{ms:0{DELAY_LEVELS}b}") + "." + queue


class _Channel(pyamqp.Channel):  # type: ignore[misc]
    Message = GuardedAmqpMessage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Keep bodies as bytes: py-amqp would otherwise decode them with
        # whatever content_encoding the publisher claimed.
        kwargs["auto_decode"] = False
        super().__init__(*args, **kwargs)


class _Connection(pyamqp.Connection):  # type: ignore[misc]
    Channel = _Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A header table too deeply nested to parse is replaced, not fatal (see _guard).
        kwargs.setdefault("frame_handler", guarded_frame_handler)
        super().__init__(*args, **kwargs)


class KombuAmqpTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport with the compression guard on received messages."""

    Connection = _Connection


class KombuAmqpsTransport(pyamqp.SSLTransport):  # type: ignore[misc]
    """TLS flavour of :class:`KombuAmqpTransport`."""

    Connection = _Connection


_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_FRAME_END = 0xCE


def split_frames(data: bytes, on_frame: Callable[[tuple[int, int, bytes]], object]) -> bytes:
    """Hand each complete AMQP frame in ``data`` to ``on_frame``, in order.

    A frame is a 7-byte header (type, channel, payload size), the payload and the
    frame-end octet ``0xCE``; ``on_frame`` receives ``(type, channel, payload)``,
    the tuple py-amqp's frame handler takes.

    Returns:
        The bytes after the last complete frame (an incomplete frame, or nothing).

    Raises:
        UnexpectedFrame: A frame does not end with the frame-end octet (the stream
            is out of step and the connection cannot be trusted any more).
    """
    unpack = _FRAME_HEADER.unpack_from
    end = len(data)
    offset = 0
    while end - offset > 7:
        frame_type, channel, size = unpack(data, offset)
        stop = offset + 7 + size
        if stop >= end:
            break
        if data[stop] != _FRAME_END:
            raise UnexpectedFrame(f"Received frame_end {data[stop]:#04x} while expecting 0xce")
        payload = data[offset + 7 : stop]
        offset = stop + 1
        on_frame((frame_type, channel, payload))
    return data[offset:] if offset else data


#: Bytes asked of a socket per read: every frame a full prefetch window of small
#: messages takes, and below malloc's mmap threshold.
READ_SIZE = 65536


def read_available(connection: Any, sock: Any, size: int = READ_SIZE) -> None:
    """Read what a readable plain-TCP socket holds and dispatch its complete frames.

    The incomplete rest goes back into py-amqp's own read buffer, where its next
    read, ours or its own (a synchronous call such as ``basic.cancel``), continues.

    Args:
        connection: The py-amqp connection the socket belongs to.
        sock: Its socket, which ``select()`` reported readable.
        size: Most bytes to read.
    """
    transport = connection.transport
    data = sock.recv(size)
    if not data:
        raise OSError("Server unexpectedly closed connection")
    buffered = transport._read_buffer
    transport._read_buffer = b""
    transport._read_buffer = split_frames(
        buffered + data if buffered else data, connection.on_inbound_frame
    )


_BASIC_PUBLISH = struct.pack(">HH", 60, 40)  # class basic, method publish
_CONTENT_HEADER = struct.Struct(">HHQ")  # class, weight, body size
_FRAME_END_BYTE = b"\xce"


#: ``delivery_mode`` 2: the broker writes the message to disk.
PERSISTENT = 2
_FLAGS = struct.Struct(">H")  # property flags of a content header


def serialize_properties(envelope: Envelope, headers: dict[str, Any]) -> bytes:
    """Return the content-header properties of ``envelope``, persistent, as py-amqp writes them.

    The bytes are those of ``amqp.Message(...)._serialize_properties()`` for the
    properties mqtasks sets (content type and encoding, headers, delivery mode,
    priority, message id): the property flags, then the values in flag order.
    py-amqp's version walks all fourteen basic properties and every header
    through generic loops; headers of plain values (strings, numbers, booleans,
    None: mqtasks' own) are written here directly, anything else by py-amqp.
    """
    table = _plain_table(headers) if headers is not None else None
    if (
        table is None
        or envelope.content_type is None
        or envelope.content_encoding is None
        or envelope.message_id is None
    ):
        return _serialize_properties(envelope, headers)
    content_type = envelope.content_type.encode("utf-8", "surrogatepass")
    content_encoding = envelope.content_encoding.encode("utf-8", "surrogatepass")
    message_id = envelope.message_id.encode("utf-8", "surrogatepass")
    if max(len(content_type), len(content_encoding), len(message_id)) > 255:
        return _serialize_properties(envelope, headers)
    priority = envelope.priority
    if priority is not None and not (type(priority) is int and 0 <= priority <= 255):
        return _serialize_properties(envelope, headers)
    parts = [
        _FLAGS.pack(0xF080 if priority is None else 0xF880),
        _BYTE.pack(len(content_type)),
        content_type,
        _BYTE.pack(len(content_encoding)),
        content_encoding,
        _LONG.pack(len(table)),
        table,
        _BYTE.pack(PERSISTENT),
    ]
    if priority is not None:
        parts.append(_BYTE.pack(priority))
    parts.append(_BYTE.pack(len(message_id)))
    parts.append(message_id)
    return b"".join(parts)


_BYTE = struct.Struct(">B")
_LONG = struct.Struct(">I")
_STRING = struct.Struct(">cI")
_INT = struct.Struct(">ci")
_LONGLONG = struct.Struct(">cq")
_DOUBLE = struct.Struct(">cd")


def _plain_table(headers: dict[str, Any]) -> bytes | None:
    """The field table of ``headers`` as py-amqp writes it, or None unless every
    key is a short string and every value a string, bytes, number, bool or None."""
    parts: list[bytes] = []
    append = parts.append
    for key, value in headers.items():
        if type(key) is not str:
            return None
        name = key.encode("utf-8", "surrogatepass")
        if len(name) > 255:
            return None
        append(_BYTE.pack(len(name)))
        append(name)
        kind = type(value)
        if kind is str:
            data = value.encode("utf-8", "surrogatepass")
            append(_STRING.pack(b"S", len(data)))
            append(data)
        elif kind is int:
            if value > 2147483647 or value < -2147483647:
                append(_LONGLONG.pack(b"L", value))
            else:
                append(_INT.pack(b"I", value))
        elif kind is float:
            append(_DOUBLE.pack(b"d", value))
        elif kind is bool:
            append(b"t\x01" if value else b"t\x00")
        elif kind is bytes:
            append(_STRING.pack(b"S", len(value)))
            append(value)
        elif value is None:
            append(b"V")
        else:
            return None
    return b"".join(parts)


def _serialize_properties(envelope: Envelope, headers: dict[str, Any] | None) -> bytes:
    """:func:`serialize_properties` through py-amqp's serializer (any header values)."""
    # (flag bit, py-amqp format, value) in the order of the content header.
    fields = [
        (0x8000, "s", envelope.content_type),
        (0x4000, "s", envelope.content_encoding),
        (0x2000, "F", headers),
        (0x1000, "o", PERSISTENT),
        (0x0800, "o", envelope.priority),
        (0x0080, "s", envelope.message_id),
    ]
    present = [field for field in fields if field[2] is not None]
    flags = sum(flag for flag, _, _ in present)
    values_bytes: bytes = amqp_dumps(
        "".join(kind for _, kind, _ in present), [value for _, _, value in present]
    )
    return _FLAGS.pack(flags) + values_bytes


class _PublishFrames:
    """The ``basic.publish`` frames of messages on one channel, written to the socket together.

    py-amqp's frame writer serializes the method arguments again for every
    message and copies the frames through a buffer; here the method frame of
    each destination is built once per channel, and a bulk publish makes one
    ``sendall()`` per :attr:`flush_size` bytes. The frames are the same: a method
    frame (mandatory), a content header and body frames of at most
    ``frame_max`` bytes. The connection must not be used by another thread
    meanwhile (a pooled one is not; the shared confirming one is written under
    its lock).
    """

    #: Bytes gathered before they are written.
    flush_size: ClassVar[int] = 65536

    def __init__(self, channel: Any, mandatory: bool = True) -> None:
        self.channel_id: int = channel.channel_id
        self.connection = channel.connection
        self.mandatory = mandatory
        self.buffer = bytearray()
        self._methods: dict[tuple[str, str], bytes] = {}

    def add(self, exchange: str, routing_key: str, properties: bytes, body: bytes) -> None:
        """Append the frames of a message (``properties``: see :func:`serialize_properties`)."""
        pack, channel, buffer = _FRAME_HEADER.pack, self.channel_id, self.buffer
        method = self._methods.get((exchange, routing_key))
        if method is None:
            args = _BASIC_PUBLISH + amqp_dumps(
                "Bssbb", (0, exchange, routing_key, self.mandatory, False)
            )
            method = pack(1, channel, len(args)) + args + _FRAME_END_BYTE
            self._methods[(exchange, routing_key)] = method
        header = _CONTENT_HEADER.pack(60, 0, len(body)) + properties
        buffer += method
        buffer += pack(2, channel, len(header))
        buffer += header
        buffer += _FRAME_END_BYTE
        chunk = self.connection.frame_max - 8
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            buffer += pack(3, channel, len(part))
            buffer += part
            buffer += _FRAME_END_BYTE

    def flush(self) -> None:
        """Write what was gathered."""
        if self.buffer:
            data, self.buffer = self.buffer, bytearray()
            transport = self.connection.transport
            if transport is None:  # as py-amqp's own writer says it: ensure() reconnects
                raise RecoverableConnectionError("connection already closed")
            transport.write(data)
            self.connection.bytes_sent += 1


class _BrokerNacked(Exception):
    """The broker nacked the message just published (a full queue with
    ``overflow=reject-publish``, for one): the publish is over, not retried.

    :meth:`Transport.publish` turns it into :class:`~mqtasks.exceptions.PublishNacked`
    (its cause is py-amqp's ``MessageNacked``).
    """


class _Confirms:
    """Publisher-confirm bookkeeping of one pooled channel, used by one thread at a time."""

    __slots__ = ("nacked", "published", "settled")

    def __init__(self) -> None:
        #: Delivery tag of the last message published on the channel.
        self.published = 0
        #: Highest delivery tag the broker has acked or nacked.
        self.settled = 0
        #: Highest delivery tag the broker has nacked.
        self.nacked = 0

    def on_ack(self, tag: int, multiple: bool) -> None:
        # One message is in flight at a time (the publisher waits for each), so
        # the highest tag settled says whether the one waited for is.
        if tag > self.settled:
            self.settled = tag

    def on_nack(self, tag: int, multiple: bool) -> None:
        self.on_ack(tag, multiple)
        if tag > self.nacked:
            self.nacked = tag


class _Waiter:
    """One message published on the shared confirming channel, until the broker settles it."""

    __slots__ = (
        "connection",
        "error",
        "message_id",
        "outcome",
        "returned",
        "signalled",
        "tag",
        "wake",
    )

    def __init__(self, tag: int, message_id: str, connection: Any) -> None:
        self.tag = tag
        self.message_id = message_id
        #: The py-amqp connection it was written on (its acks come only on that one).
        self.connection = connection
        #: "ack" or "nack" once the broker settled it.
        self.outcome: str | None = None
        #: ``(exception, routing_key)`` when the broker returned it (no queue bound).
        self.returned: tuple[Any, str] | None = None
        #: Why its connection was given up before it was settled.
        self.error: BaseException | None = None
        #: Held while nothing is to be told to its thread; released to wake it
        #: (``signalled`` says a release is pending; both under the pipeline's lock).
        self.wake = threading.Lock()
        self.wake.acquire()
        self.signalled = False

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.error is not None


class _Unsettled(Exception):
    """The shared connection was lost or broken before the broker settled a message."""


class _ConnectFailed(Exception):
    """No connection could be opened within the publish's retries and time (see ``__cause__``)."""


#: Every live pipeline, so that a forked child starts each without its parent's connection.
_PIPELINES: weakref.WeakSet[_ConfirmPipeline] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pipeline in list(_PIPELINES):
        pipeline._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ConfirmPipeline:
    """One connection and confirming channel that every thread's ``publish()`` shares.

    Written by hand because neither kombu nor py-amqp pipelines confirms across
    threads: py-amqp's confirmed publish waits on its channel for one confirm at a
    time, so each thread needs a pooled connection, and the broker then handles a
    channel, a confirm and a TCP round trip per message. Here threads write their
    frames to one channel, each taking the next delivery tag under a lock, and one
    of the waiting threads reads the socket for all while the others sleep: one
    read settles every ack that arrived (``multiple`` acks included) and wakes
    exactly the threads whose messages they settle; a reader whose own message is
    settled hands the reading to another waiting thread. A ``basic.return``
    (which the broker sends before the ack of the same message) marks the oldest
    unsettled message with that id.

    A write or read that fails, or a confirm that does not come in time, gives up
    the whole connection: every message on it that is not settled yet is published
    again by its own caller on a new one, as a pooled connection's publish is
    retried (at least once: the broker may have had it).
    """

    def __init__(self, transport: AmqpTransport) -> None:
        self.transport = transport
        self._reset()
        _PIPELINES.add(self)

    def _reset(self) -> None:
        """Start with no connection (also in a forked child: the parent's socket is not its own)."""
        #: Guards the connection, the tag counter and writes (re-entrant: a failed
        #: write gives up the connection while holding it).
        self._write = threading.RLock()
        #: Guards the waiters, their outcomes and wake-ups, and the reader's role.
        self._state = threading.Lock()
        self._kombu: kombu.Connection | None = None
        self._amqp: Any = None  # the py-amqp connection of the current channel
        self._sock: Any = None
        self._frames: _PublishFrames | None = None
        self._published = 0
        self._pending: dict[int, _Waiter] = {}
        self._reading = False

    # -- the connection ------------------------------------------------------

    def _open(self, deadline: float) -> None:
        """Connect (once per call) and open a confirming channel; the write lock is held."""
        transport = self.transport
        conn = self._kombu
        if conn is None:
            conn = self._kombu = transport.connection()
        # kombu's reconnect loop, as its ensure() runs it for a pooled publish: up to
        # publish_retries attempts, moving along a failover list, each within what is
        # left of the publish's time (a frozen broker accepts TCP, then says nothing).
        conn.ensure_connection(
            errback=deadline_errback(conn, deadline, transport.connect_timeout),
            max_retries=transport.publish_retries,
            interval_start=0.1,
            interval_step=0.5,
            interval_max=2.0,
        )
        try:
            channel = conn.channel()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            channel.confirm_select()
            sock = channel.connection.transport.sock
            sock.settimeout(transport.publish_timeout)  # bounds a write the broker does not read
        except BaseException:
            # A channel that is not in confirm mode must not stay open beside the
            # next attempt's: the connection is dropped with it (no polite close,
            # which would wait on a broker that may not answer), and the retry
            # connects anew.
            self._kombu = None
            with contextlib.suppress(Exception):
                conn.collect()
            raise
        self._amqp = channel.connection
        self._sock = sock
        self._frames = _PublishFrames(channel)
        self._published = 0

    def _give_up(self, connection: Any, exc: BaseException) -> None:
        """Drop ``connection`` (if still current) and fail its unsettled messages."""
        with self._write:
            if connection is not None and connection is self._amqp:
                self._amqp = self._sock = self._frames = None
                if self._kombu is not None:
                    with contextlib.suppress(Exception):
                        self._kombu.collect()  # no polite close: the broker may not answer
        with self._state:
            for tag, waiter in list(self._pending.items()):
                if waiter.connection is connection:
                    waiter.error = exc
                    del self._pending[tag]
                    self._signal(waiter)

    def close(self) -> None:
        """Close the connection; publishes still waiting fail and retry on a new one."""
        with self._write:
            connection, conn = self._amqp, self._kombu
            self._kombu = None
        self._give_up(connection, _Unsettled("the transport was closed"))
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    # -- broker answers (run by the reading thread) --------------------------

    @staticmethod
    def _signal(waiter: _Waiter) -> None:
        # The state lock is held.
        if not waiter.signalled:
            waiter.signalled = True
            waiter.wake.release()

    def _settle(self, tag: int, multiple: bool, outcome: str) -> None:
        with self._state:
            pending = self._pending
            tags = [t for t in pending if t <= tag] if multiple else [tag] * (tag in pending)
            for t in tags:
                waiter = pending.pop(t)
                waiter.outcome = outcome
                self._signal(waiter)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, "ack")

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, "nack")

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        message_id = message.properties.get("message_id")
        with self._state:
            for tag in sorted(self._pending):
                waiter = self._pending[tag]
                if waiter.message_id == message_id and waiter.returned is None:
                    waiter.returned = (exc, routing_key)
                    break

    # -- publishing ----------------------------------------------------------

    def send(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        properties: bytes,
        deadline: float,
    ) -> _Waiter:
        """Write one message with the next delivery tag; return its waiter.

        Raises:
            PublishError: The write lock was not free before ``deadline`` (a broker
                that stopped reading holds a writer for up to ``publish_timeout``).
        """
        if not self._write.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise PublishError(
                f"Task {envelope.message_id} was NOT enqueued: the publishing connection "
                f"stayed busy until the timeout (broker {mask_url(self.transport.url)}).",
                task_id=envelope.message_id,
            )
        try:
            if self._frames is None:
                try:
                    self._open(deadline)
                except Exception as exc:
                    raise _ConnectFailed(str(exc)) from exc
            frames = self._frames
            assert frames is not None
            self._published += 1
            waiter = _Waiter(self._published, envelope.message_id, self._amqp)
            with self._state:
                self._pending[waiter.tag] = waiter
            try:
                frames.add(exchange, routing_key, properties, envelope.body)
                frames.flush()
            except BaseException as exc:
                self._give_up(waiter.connection, exc)
                raise
            return waiter
        finally:
            self._write.release()

    def wait(self, waiter: _Waiter, envelope: Envelope, deadline: float) -> None:
        """Return once the broker settled ``waiter``'s message or its connection was given up.

        Raises:
            PublishError: No confirm came before ``deadline`` (the connection is given
                up: a broker that does not answer one message answers none).
        """
        state = self._state
        woken = False
        while True:
            with state:
                if woken:
                    waiter.signalled = False  # that release is consumed
                if waiter.done:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                reader = not self._reading
                self._reading = True
            if not reader:
                woken = waiter.wake.acquire(timeout=remaining)
                continue
            woken = False
            failed: BaseException | None = None
            try:
                self._read(waiter, remaining)
            except Exception as exc:
                failed = exc
            with state:
                self._reading = False
                if waiter.done or failed is not None:
                    # Someone else's message still waits for its confirm: its
                    # thread reads next.
                    for other in self._pending.values():
                        if other is not waiter:
                            self._signal(other)
                            break
            if failed is not None:
                self._give_up(waiter.connection, failed)
        self._give_up(waiter.connection, _Unsettled("no confirm within the publish timeout"))
        raise PublishError(
            f"Task {envelope.message_id} was NOT confirmed in time; it may or may not "
            f"be enqueued (broker {mask_url(self.transport.url)}). Publishing it again with the "
            "same task id makes a duplicate detectable.",
            task_id=envelope.message_id,
        )

    def _read(self, waiter: _Waiter, timeout: float) -> None:
        """Read what the socket of ``waiter``'s connection holds and dispatch it."""
        connection = waiter.connection
        sock = self._sock
        if connection is not self._amqp or sock is None:
            raise _Unsettled("the connection was given up")
        # A second at a time: a connection given up by another thread (a failed
        # write) closes the socket under this select(), which may not wake it.
        if select.select([sock], [], [], min(timeout, 1.0))[0]:
            read_available(connection, sock)


#: A ``basic.ack`` method frame: type, channel, size, class, method, delivery tag,
#: multiple, frame end.
_ACK_FRAME = struct.Struct(">BHIHHQBB")


def write_ack(channel: Any, delivery_tag: int, multiple: bool) -> None:
    """Send ``basic.ack`` on ``channel``: the frame py-amqp's ``basic_ack`` sends.

    py-amqp builds it through its generic method writer (a promise, the
    arguments serialized from a format string, a locked shared buffer); the
    consumer's I/O thread, the only one writing on its connection, sends the
    21 bytes directly.

    Raises:
        RecoverableConnectionError: The channel's connection is closed.
    """
    connection = channel.connection
    if connection is None:
        raise RecoverableConnectionError("connection already closed")
    connection.transport.write(
        _ACK_FRAME.pack(1, channel.channel_id, 13, 60, 80, delivery_tag, multiple, _FRAME_END)
    )
    connection.bytes_sent += 1


def _ack(raw: Any) -> None:
    """Acknowledge a received kombu message as ``Message.ack()`` does, with :func:`write_ack`."""
    if raw.acknowledged:
        raise raw.MessageStateError(f"Message already acknowledged with state: {raw._state}")
    write_ack(raw.channel, raw.delivery_tag, False)
    raw._state = "ACK"


class AmqpConsumer(KombuConsumer):
    """Consumer that sleeps in ``select()`` on its socket and a wake-up pipe.

    kombu's ``drain_events(timeout)`` sets and restores the socket timeout on
    every call, and cannot be interrupted when a worker thread has an ack to
    send. Selecting on the socket and the worker's pipe instead wakes the I/O
    thread the moment either has something, and reads with no timeout juggling.

    On plain TCP it also reads whatever the socket holds in one ``recv()`` and
    splits the frames itself (:func:`split_frames`): py-amqp reads each frame
    with three ``recv()`` calls (header, payload, end octet), nine per delivered
    message, where one call per wake-up serves every message that arrived.
    """

    wakeable: ClassVar[bool] = True
    #: Most messages read in one wake-up before settlements are flushed again (TLS).
    batch: ClassVar[int] = 64
    #: Bytes asked of the socket per read.
    read_size: ClassVar[int] = READ_SIZE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tags received on the current channel and not settled yet.
        self._unsettled: set[int] = set()
        self._next_heartbeat = 0.0
        # Classic queues only flag a redelivery; their deliveries are counted here.
        default = self.transport.queue_type
        classic = [s for s in self.specs if (s.queue_type or default) == "classic"]
        self._counter = RedeliveryCounter(self.transport, classic)
        self._hand_on: Callable[[Delivery], None] | None = None

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._hand_on = on_delivery
        super().start(self._count if self._counter.queues else on_delivery)

    def _count(self, delivery: Delivery) -> None:
        assert self._hand_on is not None
        if self._counter.receive(delivery):
            self._hand_on(delivery)

    def _recount(self) -> None:
        """Count the redeliveries held back by :meth:`_count`: republish each with its
        count raised, then ack it (see :mod:`~mqtasks.transport.delivery_count`).

        Runs after a read, not inside the frame callback that delivered them, so
        an ack that finds the connection gone reconnects between reads. After one
        failed publish the rest go on with the count they have at least, so a
        broker that does not answer holds the I/O thread for one publish
        timeout, not one per message.
        """
        assert self._hand_on is not None
        pending, self._counter.pending = self._counter.pending, []
        failed = False
        for delivery, copy in pending:
            if delivery.generation != self.generation:
                continue  # its connection is gone: the broker has it back
            if not failed and self._counter.republish(delivery, copy):
                self.ack(delivery)
                continue
            failed = True
            delivery.delivery_count = counted_returns(copy.headers) + 1
            self._hand_on(delivery)

    def _receive(self, raw: Any) -> None:
        self._unsettled.add(raw.delivery_tag)
        super()._receive(raw)

    def _connect(self, max_retries: int | None) -> None:
        self._unsettled = set()
        self._counter.pending.clear()
        super()._connect(max_retries)
        sock = self._socket()
        if sock is not None:
            # Reads start only when select() says data is there; this bounds a
            # read stuck on a half-received frame of a connection gone silent.
            sock.settimeout(max(2 * self.transport.heartbeat, 10.0))

    def _settle(self, delivery: Any, action: Any) -> bool:
        settled = super()._settle(delivery, action)
        if settled:
            self._unsettled.discard(delivery.raw.delivery_tag)
        return settled

    def ack(self, delivery: Any) -> bool:
        return self._settle(delivery, lambda: _ack(delivery.raw))

    def ack_many(self, deliveries: Sequence[Any]) -> None:
        """Ack with one ``multiple`` frame up to the highest tag below which
        nothing else is unsettled; ack the rest one by one.

        py-amqp has no ack coalescing of its own; under load this turns a frame
        (and a system call) per message into one per batch.
        """
        live = [d for d in deliveries if d.generation == self.generation]
        if len(live) < 2 or self._conn is None:
            super().ack_many(deliveries)
            return
        tags = sorted(d.raw.delivery_tag for d in live)
        batch = set(tags)
        lowest_other = min((t for t in self._unsettled if t not in batch), default=None)
        upto = max((t for t in tags if lowest_other is None or t < lowest_other), default=None)
        rest = [
            d
            for d in deliveries
            if d.generation != self.generation or upto is None or d.raw.delivery_tag > upto
        ]
        if upto is not None:
            covered = [d for d in live if d.raw.delivery_tag <= upto]
            channel = covered[0].raw.channel

            def ack_multiple() -> None:
                write_ack(channel, upto, True)

            if super()._settle(covered[0], ack_multiple):
                for d in covered:
                    d.raw._state = "ACK"  # kombu's bookkeeping, as Message.ack() does
                    self._unsettled.discard(d.raw.delivery_tag)
        for delivery in rest:
            self.ack(delivery)

    def _socket(self) -> Any:
        conn = self._conn
        try:
            return conn.connection.transport.sock if conn is not None else None
        except AttributeError:
            return None

    def wait(self, timeout: float, wake_fd: int) -> None:
        conn = self._conn
        sock = self._socket()
        if conn is None or sock is None:
            self._reconnect()
            return
        try:
            pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
            if not (pending and pending()):
                readable, _, _ = select.select([sock, wake_fd], [], [], timeout)
                if sock not in readable:
                    self.heartbeat_check()
                    return
            if pending is None:
                read_available(conn.connection, sock, self.read_size)
            else:
                # One frame per read, only while bytes are waiting: drain_events()
                # would go on blocking after a heartbeat frame until a method
                # arrives, which with a full prefetch window never happens until we ack.
                read_frame = conn.connection.blocking_read
                for _ in range(self.batch):
                    read_frame(None)
                    if not pending() and not select.select([sock], [], [], 0)[0]:
                        break
        except self.connection_errors as exc:
            self._lost(exc)
            return
        if self._counter.pending:
            self._recount()
        self.heartbeat_check()

    def drain(self, timeout: float) -> None:
        super().drain(timeout)
        if self._counter.pending:
            self._recount()

    def heartbeat_check(self) -> None:
        """Check heartbeats at most four times per heartbeat interval (at most once a second).

        py-amqp sends one when half the interval has passed without traffic; the
        I/O thread comes here after every wake-up, far more often than that needs.
        """
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + min(1.0, self.transport.heartbeat / 4)
        super().heartbeat_check()


class AmqpTransport(KombuTransport):
    """RabbitMQ: durable (quorum by default) queues, persistent messages,
    publisher confirms and mandatory routing, so ``publish`` returns only once the
    broker has the message and raises when it cannot be routed or is nacked."""

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "pyamqp")
    kombu_transport: Any = KombuAmqpTransport
    capabilities = Capabilities(
        delays=True,
        max_priority=True,
        delivery_count=True,
        max_length=True,
        message_ttl=True,
        confirms=True,
    )

    def connection_options(self) -> dict[str, Any]:
        options = {"confirm_publish": True}
        options.update(self.transport_options)
        return options

    #: Most unconfirmed messages a bulk publish keeps in flight on its channel.
    confirm_window: ClassVar[int] = 1000

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._pipeline = _ConfirmPipeline(self)

    def close(self) -> None:
        """Close the shared confirming connection and the pooled ones."""
        self._pipeline.close()
        super().close()

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Publish ``envelope`` to ``queue``; return once the broker has confirmed it.

        With confirms on (the default) over plain TCP, every thread publishes on
        one shared channel with its confirms pipelined (see ``_ConfirmPipeline``):
        many threads calling ``delay()`` at once keep many confirms in flight on
        one connection. Without confirms, and over TLS (whose decrypted bytes
        ``select()`` cannot see), publishing goes through the pool.
        """
        if self.uses_tls or not self.connection_options().get("confirm_publish"):
            super().publish(queue, envelope, timeout=timeout, delay=delay)
            return
        timeout = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        exchange, routing_key = self.route(queue, delay)
        properties = serialize_properties(envelope, dict(envelope.headers))
        pipeline = self._pipeline
        failures = 0
        while True:
            try:
                waiter = pipeline.send(exchange, routing_key, envelope, properties, deadline)
            except PublishError:
                raise
            except _ConnectFailed as exc:  # kombu's reconnect loop ran its course
                error: BaseException = exc.__cause__ or exc
            except Exception as exc:
                error = exc
            else:
                pipeline.wait(waiter, envelope, deadline)
                if waiter.error is None:
                    break
                error = waiter.error
            # Not connected, or lost before its confirm: published again on a new
            # connection, publish_retries times, within the publish's time.
            failures += 1
            if failures > self.publish_retries or time.monotonic() >= deadline:
                raise PublishError(
                    redact(
                        f"Task {envelope.message_id} was NOT enqueued on {queue!r}: "
                        f"{type(error).__name__}: {error} (broker {mask_url(self.url)})"
                    ),
                    task_id=envelope.message_id,
                ) from error
        if waiter.returned is not None:
            self._raise_returned(queue, envelope, waiter.returned)
        if waiter.outcome == "nack":
            raise PublishNacked(
                f"Task {envelope.message_id} was NOT enqueued: the broker refused it on "
                f"{queue!r} (a full queue with overflow=reject-publish, or a broker alarm).",
                task_id=envelope.message_id,
            )

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        return AmqpConsumer(self, specs, prefetch=prefetch)

    def publish_many(
        self, items: Sequence[tuple[str, Envelope]], *, timeout: float | None = None
    ) -> list[BaseException | None]:
        """Publish with pipelined confirms: up to :attr:`confirm_window` messages are
        in flight on a channel of their own, and each is settled by its broker ack,
        nack or return as they arrive, instead of one round trip per message."""
        if not items:
            return []
        if timeout is None:
            timeout = self.publish_timeout * max(1.0, len(items) / self.confirm_window)
        deadline = time.monotonic() + timeout
        published = 0  # items handed to the socket (or possibly, when a write failed)
        results: list[BaseException | None] = [None] * len(items)
        pending: set[int] = set()  # delivery tags (1-based item index + 1) not yet settled
        by_id = {env.message_id: i for i, (_, env) in enumerate(items)}

        def fail(index: int, exc: BaseException) -> None:
            if results[index] is None:
                results[index] = exc

        def on_ack(tag: int, multiple: bool) -> None:
            settled = [t for t in pending if t <= tag] if multiple else [tag]
            pending.difference_update(settled)

        def on_nack(tag: int, multiple: bool) -> None:
            settled = [t for t in pending if t <= tag] if multiple else [tag]
            for t in settled:
                fail(
                    t - 1,
                    PublishNacked(
                        f"Task {items[t - 1][1].message_id} was NOT enqueued: the broker refused it.",
                        task_id=items[t - 1][1].message_id,
                    ),
                )
            pending.difference_update(settled)

        def on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
            index = by_id.get(message.properties.get("message_id"))
            if index is not None:
                fail(
                    index,
                    Unroutable(
                        f"Task {items[index][1].message_id} was NOT enqueued: no queue named "
                        f"{routing_key!r} is bound ({exc}).",
                        task_id=items[index][1].message_id,
                    ),
                )

        try:
            with self._pool().acquire(block=True, timeout=timeout) as producer:
                conn = producer.connection
                conn.ensure_connection(max_retries=self.publish_retries)
                channel = conn.channel()
                try:
                    channel.events["basic_ack"].add(on_ack)
                    channel.events["basic_nack"].add(on_nack)
                    channel.events["basic_return"].add(on_return)
                    channel.confirm_select()
                    sock = channel.connection.transport.sock
                    if sock.gettimeout() != self.publish_timeout:
                        # Bounds a write the broker does not read (see _publish).
                        sock.settimeout(self.publish_timeout)
                    frames = _PublishFrames(channel)
                    for i, (queue, env) in enumerate(items):
                        while len(pending) >= self.confirm_window:
                            published = i
                            frames.flush()
                            self._wait_confirms(conn, deadline)
                        properties = serialize_properties(env, dict(env.headers))
                        pending.add(i + 1)
                        frames.add("", queue, properties, env.body)
                        if len(frames.buffer) >= frames.flush_size:
                            published = i + 1
                            frames.flush()
                    published = len(items)
                    frames.flush()
                    while pending:
                        self._wait_confirms(conn, deadline)
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        except Exception as exc:
            for t in pending:
                if t > published:
                    continue  # never handed to the broker: below
                env = items[t - 1][1]
                fail(
                    t - 1,
                    PublishError(
                        f"Task {env.message_id} was NOT confirmed ({type(exc).__name__}: {exc}); it "
                        f"may or may not be enqueued (broker {mask_url(self.url)}). Publishing it "
                        "again with the same task id makes a duplicate detectable.",
                        task_id=env.message_id,
                    ),
                )
            for i in range(published, len(items)):  # never handed to the broker
                env = items[i][1]
                fail(
                    i,
                    PublishError(
                        f"Task {env.message_id} was NOT enqueued: {type(exc).__name__}: {exc}",
                        task_id=env.message_id,
                    ),
                )
        if any(isinstance(r, Unroutable) for r in results):
            self.forget_declared()
        return results

    def _publish(
        self,
        producer: kombu.Producer,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        deadline: float,
    ) -> None:
        """Send one message on the pooled producer's channel and, with confirms
        on, wait for its own confirm.

        The frames are those kombu's ``Producer.publish`` sends; the way there is
        shorter. py-amqp's confirmed publish sets and restores the socket timeout
        around every read, polls for ``connection.blocked`` notices before each
        publish and reads each frame with three ``recv()`` calls: about 17 system
        calls per message, where this makes one ``sendto``, one ``select()`` and
        one ``recv()``, and the frames are built by :class:`_PublishFrames` (the
        method frame once per destination, the properties by
        :func:`serialize_properties`). A lost connection is retried as before, by kombu's
        ``Connection.ensure``; a confirm that does not come in time is not (the
        message may be enqueued).
        """
        conn = producer.connection
        confirm = bool(conn.transport_options.get("confirm_publish"))
        properties = serialize_properties(envelope, dict(envelope.headers))
        body = envelope.body

        def publish_once() -> None:
            channel = producer.channel
            confirms: _Confirms | None = getattr(channel, "mqtasks_confirms", None)
            if confirm and confirms is None and channel._confirm_selected:
                # Put in confirm mode by someone else: its tags are not ours to count.
                super(AmqpTransport, self)._publish(
                    producer, exchange, routing_key, envelope, deadline
                )
                return
            frames: _PublishFrames | None = getattr(channel, "mqtasks_frames", None)
            if frames is None:
                frames = channel.mqtasks_frames = _PublishFrames(
                    channel, self.capabilities.confirms
                )
            sock = channel.connection.transport.sock
            if sock.gettimeout() != self.publish_timeout:
                sock.settimeout(self.publish_timeout)  # bounds a write the broker does not read
            if not confirm:
                frames.add(exchange, routing_key, properties, body)
                frames.flush()
                return
            if confirms is None:
                confirms = channel.mqtasks_confirms = _Confirms()
                channel.events["basic_ack"].add(confirms.on_ack)
                channel.events["basic_nack"].add(confirms.on_nack)
                channel._confirm_selected = True  # py-amqp's flag: never selected twice
                channel.confirm_select()
            confirms.published += 1
            tag = confirms.published
            frames.add(exchange, routing_key, properties, body)
            frames.flush()
            self._await_confirm(channel.connection, sock, confirms, tag, envelope, deadline)
            if confirms.nacked >= tag:
                # Not MessageNacked itself: py-amqp counts it among the recoverable
                # connection errors, and ensure() would drop the connection, open a
                # new one and publish again, publish_retries times, without a pause.
                raise _BrokerNacked() from MessageNacked()

        conn.ensure(
            producer,
            publish_once,
            max_retries=self.publish_retries,
            interval_start=0.1,
            interval_step=0.5,
            interval_max=2.0,
            errback=deadline_errback(conn, deadline, self.connect_timeout),
        )()

    def _await_confirm(
        self,
        connection: Any,
        sock: Any,
        confirms: _Confirms,
        tag: int,
        envelope: Envelope,
        deadline: float,
    ) -> None:
        tls = hasattr(sock, "pending")  # decrypted bytes select() cannot see
        while confirms.settled < tag:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"Task {envelope.message_id} was NOT confirmed in time; it may or may not "
                    f"be enqueued (broker {mask_url(self.url)}). Publishing it again with the "
                    "same task id makes a duplicate detectable.",
                    task_id=envelope.message_id,
                )
            if tls:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=remaining)
            elif select.select([sock], [], [], remaining)[0]:
                read_available(connection, sock)

    @staticmethod
    def _wait_confirms(conn: Any, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("publisher confirms did not arrive in time")
        connection = conn.connection
        sock = connection.transport.sock
        if hasattr(sock, "pending"):  # TLS: decrypted bytes select() cannot see
            conn.drain_events(timeout=remaining)
        elif select.select([sock], [], [], remaining)[0]:
            read_available(connection, sock)

    def route(self, queue: str, delay: float | None) -> tuple[str, str]:
        """Delays go through the ladder of TTL queues (see :meth:`declare_topology`)."""
        if not delay or delay <= 0:
            return "", queue
        if delay > MAX_DELAY:
            raise ConfigurationError(
                f"A delay of {delay:.0f} s is longer than the {MAX_DELAY:.0f} s the broker can hold."
            )
        return _level(DELAY_LEVELS - 1), delay_routing_key(delay, queue)

    def declare_topology(self, channel: Any) -> None:
        """Declare the dead-letter exchange and the delay ladder (once per transport).

        kombu's native delayed delivery (``kombu.transport.native_delayed_delivery``)
        builds the same kind of ladder but counts whole seconds, and retry backoffs
        start at fractions of a second; this ladder counts milliseconds. Level k is
        a topic exchange and a queue whose messages expire after ``2**k`` ms into
        level k-1; a message's routing key has one bit per level and stops only in
        the levels whose bit is 1, so each queue holds messages of one TTL and a
        short delay never waits behind a long one. Level 0 expires into
        ``mqtasks.delayed``, where every queue is bound under its own name.
        """
        if getattr(self, "_topology_declared", False):
            return
        kombu.Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True).bind(channel).declare()
        delivery = kombu.Exchange(DELAY_DELIVERY_EXCHANGE, type="topic", durable=True)
        delivery.bind(channel).declare()
        # Always classic durable queues, whatever the app's queue type: the ladder is
        # shared by every app on the vhost (a queue cannot be redeclared as another
        # type), and RabbitMQ 3.10's quorum queues expire a message at the head only
        # lazily, which stalled the ladder in tests; classic queues expire on time.
        # Their dead-lettering is at-most-once: see the reliability guide.
        quorum = False
        for k in range(DELAY_LEVELS - 1, -1, -1):
            exchange = kombu.Exchange(_level(k), type="topic", durable=True).bind(channel)
            exchange.declare()
            arguments: dict[str, Any] = {
                "x-message-ttl": 2**k,
                "x-dead-letter-exchange": _level(k - 1) if k else DELAY_DELIVERY_EXCHANGE,
                "x-overflow": "reject-publish",
            }
            if quorum:
                arguments["x-queue-type"] = "quorum"
                arguments["x-dead-letter-strategy"] = "at-least-once"
            prefix = "*." * (DELAY_LEVELS - 1 - k)
            queue = kombu.Queue(
                _level(k),
                exchange=exchange,
                routing_key=prefix + "1.#",
                durable=True,
                queue_arguments=arguments,
            ).bind(channel)
            queue.declare()
            # A 0 bit passes the message on: to the next level, or out of the ladder.
            onward = _level(k - 1) if k else DELAY_DELIVERY_EXCHANGE
            kombu.Exchange(onward, type="topic", durable=True).bind(channel).declare()
            channel.exchange_bind(destination=onward, source=_level(k), routing_key=prefix + "0.#")
        self._topology_declared = True

    def bind_queues(self, channel: Any, specs: Sequence[QueueSpec]) -> None:
        for spec in specs:
            if spec.name.endswith(DLQ_SUFFIX):
                continue
            channel.queue_bind(
                queue=spec.name + DLQ_SUFFIX, exchange=DEAD_LETTER_EXCHANGE, routing_key=spec.name
            )
            channel.queue_bind(
                queue=spec.name,
                exchange=DELAY_DELIVERY_EXCHANGE,
                routing_key="*." * DELAY_LEVELS + spec.name,
            )

    def queue_stats(self, specs: Sequence[QueueSpec]) -> dict[str, QueueStats]:
        """Read ready messages and consumers with passive ``queue.declare``.

        Unacknowledged messages are left unknown (``None``): only the management
        plugin's HTTP API counts them. Delayed messages are the total held in the
        delay ladder for the whole vhost (``delayed_scope="vhost"``): the ladder is
        shared by every queue, and telling whose a message is would mean taking it.

        Raises:
            ConnectionFailed: The broker cannot be reached.
        """
        with translate_errors(self.url, "read queue stats"), self.connection() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.connect_timeout)
            channel = [conn.channel()]

            def passive(name: str) -> tuple[int, int] | None:
                # A 404 closes the channel: carry on with a fresh one.
                try:
                    ok = channel[0].queue_declare(queue=name, passive=True)
                except Exception as exc:
                    if not is_not_found(exc):
                        raise
                    channel[0] = conn.channel()
                    return None
                return int(ok.message_count or 0), int(ok.consumer_count or 0)

            # The ladder is declared top level first: without it, nothing is delayed.
            top = passive(_level(DELAY_LEVELS - 1))
            levels = [passive(_level(k)) for k in range(DELAY_LEVELS - 1)] if top else []
            delayed = sum(level[0] for level in [top, *levels] if level is not None)
            stats: dict[str, QueueStats] = {}
            for spec in specs:
                found = passive(spec.name)
                if found is None:
                    stats[spec.name] = QueueStats(spec.name, exists=False)
                    continue
                dead = None if spec.name.endswith(DLQ_SUFFIX) else passive(spec.name + DLQ_SUFFIX)
                stats[spec.name] = QueueStats(
                    spec.name,
                    ready=found[0],
                    consumers=found[1],
                    delayed=delayed,
                    delayed_scope="vhost",
                    dead_lettered=dead[0] if dead is not None else None,
                )
        return stats

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        queue_type = spec.queue_type or self.queue_type
        args: dict[str, Any] = {}
        if not spec.name.endswith(DLQ_SUFFIX):
            # What the broker drops itself (TTL, overflow, delivery limit) lands
            # in the queue's dead-letter queue, with the broker's x-death reason.
            args["x-dead-letter-exchange"] = DEAD_LETTER_EXCHANGE
            args["x-dead-letter-routing-key"] = spec.name
            if queue_type == "quorum" and (
                spec.max_length is None or spec.overflow == "reject-publish"
            ):
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
        if queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if spec.max_priority is not None:
                raise ConfigurationError(
                    f"Queue {spec.name!r}: RabbitMQ quorum queues do not support max_priority; "
                    "use QueueSpec(..., queue_type='classic') for a priority queue."
                )
        elif spec.max_priority is not None:
            args["x-max-priority"] = spec.max_priority
        if spec.delivery_limit is not None and queue_type == "quorum":
            # Classic queues take no x-delivery-limit: their consumers count
            # deliveries themselves (AmqpConsumer, transport.delivery_count).
            args["x-delivery-limit"] = spec.delivery_limit
        if spec.message_ttl is not None:
            args["x-message-ttl"] = int(spec.message_ttl * 1000)
        if spec.max_length is not None:
            args["x-max-length"] = spec.max_length
            args["x-overflow"] = spec.overflow
        return args


class AmqpsTransport(AmqpTransport):
    """RabbitMQ over TLS: the broker's certificate and host name are checked
    (see :class:`~mqtasks.transport.tls.TLSOptions`)."""

    schemes: ClassVar[tuple[str, ...]] = ("amqps",)
    kombu_transport: Any = KombuAmqpsTransport

    def kombu_ssl(self) -> dict[str, Any] | bool:
        # A URL listing several brokers (a;b) leaves the name to kombu, per connection.
        host = None if ";" in self.url else urlsplit(self.url).hostname
        return self.tls.amqp_ssl(host)
