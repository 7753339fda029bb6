"""The AMQP 0-9-1 frames mqtasks writes and reads itself, beside py-amqp.

py-amqp builds every frame through generic writers and reads each one with
several ``recv()`` calls; on the hot paths (publishing, acknowledging, reading
what a consumer's socket holds) mqtasks writes and splits the same bytes
directly. Everything else on the connection stays py-amqp's: these helpers
share its socket, read buffer and byte counters.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any, ClassVar

from amqp.exceptions import RecoverableConnectionError, UnexpectedFrame
from amqp.serialization import dumps as amqp_dumps

from ..envelope import Envelope
from ..queue import published_at

__all__ = [
    "PERSISTENT",
    "READ_SIZE",
    "message_timestamp",
    "read_available",
    "serialize_properties",
    "split_frames",
    "write_ack",
]

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
        amqp.exceptions.UnexpectedFrame: A frame does not end with the frame-end
            octet (the stream is out of step and the connection cannot be
            trusted any more).
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


def message_timestamp(envelope: Envelope) -> int:
    """Return the AMQP ``timestamp`` property for ``envelope``: when it was published.

    That is its ``mqtasks-published-at`` header, else now, in whole seconds;
    RabbitMQ's management API reports it for a classic queue's head message
    (``head_message_timestamp``), which is how ``mqtasks status`` tells the lag.
    """
    when = published_at(envelope.headers)
    return int(when if when is not None else time.time())


def serialize_properties(
    envelope: Envelope, headers: dict[str, Any], timestamp: int | None = None
) -> bytes:
    """Return the content-header properties of ``envelope``, persistent, as py-amqp writes them.

    The bytes are those of ``amqp.Message(...)._serialize_properties()`` for the
    properties mqtasks sets (content type and encoding, headers, delivery mode,
    priority, message id, timestamp): the property flags, then the values in
    flag order. py-amqp's version walks all fourteen basic properties and every
    header through generic loops; headers of plain values (strings, numbers,
    booleans, None: mqtasks' own) are written here directly, anything else by
    py-amqp.

    Args:
        envelope: The message.
        headers: Its headers, as they are to be sent.
        timestamp: The ``timestamp`` property (seconds since the epoch; see
            :func:`message_timestamp`), or None to send none.
    """
    table = _plain_table(headers) if headers is not None else None
    if (
        table is None
        or envelope.content_type is None
        or envelope.content_encoding is None
        or envelope.message_id is None
        or (timestamp is not None and not 0 <= timestamp < 2**63)
    ):
        return _serialize_properties(envelope, headers, timestamp)
    content_type = envelope.content_type.encode("utf-8", "surrogatepass")
    content_encoding = envelope.content_encoding.encode("utf-8", "surrogatepass")
    message_id = envelope.message_id.encode("utf-8", "surrogatepass")
    if max(len(content_type), len(content_encoding), len(message_id)) > 255:
        return _serialize_properties(envelope, headers, timestamp)
    priority = envelope.priority
    if priority is not None and not (type(priority) is int and 0 <= priority <= 255):
        return _serialize_properties(envelope, headers, timestamp)
    flags = 0xF080 if priority is None else 0xF880
    parts = [
        _FLAGS.pack(flags if timestamp is None else flags | _TIMESTAMP_FLAG),
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
    if timestamp is not None:
        parts.append(_TIMESTAMP.pack(timestamp))
    return b"".join(parts)


_BYTE = struct.Struct(">B")
_TIMESTAMP = struct.Struct(">Q")
#: Property flag of the AMQP ``timestamp`` basic property.
_TIMESTAMP_FLAG = 0x0040
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


def _serialize_properties(
    envelope: Envelope, headers: dict[str, Any] | None, timestamp: int | None = None
) -> bytes:
    """:func:`serialize_properties` through py-amqp's serializer (any header values)."""
    # (flag bit, py-amqp format, value) in the order of the content header.
    fields = [
        (0x8000, "s", envelope.content_type),
        (0x4000, "s", envelope.content_encoding),
        (0x2000, "F", headers),
        (0x1000, "o", PERSISTENT),
        (0x0800, "o", envelope.priority),
        (0x0080, "s", envelope.message_id),
        (_TIMESTAMP_FLAG, "L", timestamp),
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
        self._methods: dict[tuple[str, str, bool], bytes] = {}

    def add(
        self,
        exchange: str,
        routing_key: str,
        properties: bytes,
        body: bytes,
        mandatory: bool | None = None,
    ) -> None:
        """Append the frames of a message (``properties``: see :func:`serialize_properties`).

        Args:
            mandatory: The method's ``mandatory`` flag; the channel's by default.
        """
        pack, channel, buffer = _FRAME_HEADER.pack, self.channel_id, self.buffer
        if mandatory is None:
            mandatory = self.mandatory
        method = self._methods.get((exchange, routing_key, mandatory))
        if method is None:
            args = _BASIC_PUBLISH + amqp_dumps(
                "Bssbb", (0, exchange, routing_key, mandatory, False)
            )
            method = pack(1, channel, len(args)) + args + _FRAME_END_BYTE
            self._methods[(exchange, routing_key, mandatory)] = method
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
        amqp.exceptions.RecoverableConnectionError: The channel's connection is closed.
    """
    connection = channel.connection
    if connection is None:
        raise RecoverableConnectionError("connection already closed")
    connection.transport.write(
        _ACK_FRAME.pack(1, channel.channel_id, 13, 60, 80, delivery_tag, multiple, _FRAME_END)
    )
    connection.bytes_sent += 1
