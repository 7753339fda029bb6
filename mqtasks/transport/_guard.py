"""Guards that refuse hostile input before anything expensive or recursive touches it.

* **Compressed bodies.** kombu's ``Message.__init__`` decompresses any body whose
  headers carry ``compression``, before a consumer can look at it: a small
  hostile message can expand to hundreds of MiB in the worker. No kombu option
  turns that off, so the message subclasses here drop the header first and mark
  the message refused; the worker then rejects it with reason
  ``compression_refused`` without touching the body.
* **Deeply nested AMQP header tables.** py-amqp parses a table recursively, so
  a header nested a few thousand levels deep (a few KiB on the wire) raises
  ``RecursionError`` inside the frame reader and would take the consumer down,
  with the message still at the head of its queue. :func:`guarded_frame_handler`
  replaces such a header table by a marker, so the message is delivered and
  rejected with reason ``invalid_headers``.

JSON nesting is bounded by :func:`mqtasks.serialization.json_depth_exceeds`.

kombu and py-amqp are imported when a guard that needs them is first used (the
message classes are made on first access), not with this module: the
``redis://`` transport uses only :func:`strip_compression`, and talks to Redis
without kombu.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__all__ = [
    "REFUSED_HEADER",
    "GuardedAmqpMessage",
    "GuardedVirtualMessage",
    "guarded_frame_handler",
    "strip_compression",
]

#: Header put in place of an AMQP header table that could not be parsed safely;
#: its value is the refusal reason. A producer that sets it only gets its own
#: message refused.
REFUSED_HEADER = "x-mqtasks-refused"


def strip_compression(headers: Any) -> str | None:
    """Remove a ``compression`` header in place; return the refusal reason if present."""
    if isinstance(headers, dict) and "compression" in headers:
        headers.pop("compression", None)
        return "compression_refused"
    return None


def _refusal(headers: Any) -> str | None:
    """Strip the marker and ``compression`` headers; return the first refusal reason."""
    marked = headers.pop(REFUSED_HEADER, None) if isinstance(headers, dict) else None
    compressed = strip_compression(headers)
    if marked is not None:
        return "invalid_headers"
    return compressed


if TYPE_CHECKING:
    #: py-amqp message whose compressed bodies are refused, not inflated.
    GuardedAmqpMessage: type[Any]
    #: Virtual-transport (Redis, memory) message with the same guard.
    GuardedVirtualMessage: type[Any]


def _amqp_message() -> type[Any]:
    from kombu.transport import pyamqp

    class GuardedAmqpMessage(pyamqp.Message):  # type: ignore[misc]
        """py-amqp message whose compressed bodies are refused, not inflated."""

        def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
            self.mqtasks_refused = _refusal(msg.properties.get("application_headers"))
            super().__init__(msg, channel=channel, **kwargs)

    return GuardedAmqpMessage


def _virtual_message() -> type[Any]:
    from kombu.transport.virtual import base as virtual

    class GuardedVirtualMessage(virtual.Message):  # type: ignore[misc]
        """Virtual-transport (Redis, memory) message with the same guard."""

        def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
            self.mqtasks_refused = _refusal(payload.get("headers"))
            super().__init__(payload, channel=channel, **kwargs)

    return GuardedVirtualMessage


_MESSAGE_CLASSES: dict[str, Callable[[], type[Any]]] = {
    "GuardedAmqpMessage": _amqp_message,
    "GuardedVirtualMessage": _virtual_message,
}
_made = threading.Lock()


def __getattr__(name: str) -> Any:
    """Make a kombu message class on first access (importing kombu then), once."""
    make = _MESSAGE_CLASSES.get(name)
    if make is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _made:
        cls = globals().get(name)
        if cls is None:
            cls = make()
            cls.__qualname__ = name
            globals()[name] = cls
    return cls


# -- AMQP header tables ------------------------------------------------------------

_CONTENT_HEADER = 2
_FLAG_CONTENT_TYPE = 1 << 15
_FLAG_CONTENT_ENCODING = 1 << 14
_FLAG_HEADERS = 1 << 13


def _marker_table() -> bytes:
    key = REFUSED_HEADER.encode()
    value = b"invalid_headers"
    item = bytes([len(key)]) + key + b"S" + struct.pack(">I", len(value)) + value
    return struct.pack(">I", len(item)) + item


_MARKER_TABLE = _marker_table()


def _without_header_table(payload: bytes) -> bytes | None:
    """Return the content-header payload with its header table replaced by the
    marker table, or None if it has no header table.

    The payload is class id, weight, body size (12 bytes), property flags, then
    the properties in flag order: content type and encoding (short strings), then
    the header table, length-prefixed, so it can be skipped without parsing it.
    """
    (flags,) = struct.unpack_from(">H", payload, 12)
    if not flags & _FLAG_HEADERS:
        return None
    offset = 14
    for flag in (_FLAG_CONTENT_TYPE, _FLAG_CONTENT_ENCODING):
        if flags & flag:
            offset += 1 + payload[offset]
    (length,) = struct.unpack_from(">I", payload, offset)
    return payload[:offset] + _MARKER_TABLE + payload[offset + 4 + length :]


def guarded_frame_handler(
    connection: Any, callback: Callable[..., Any]
) -> Callable[[tuple[int, int, bytes]], Any]:
    """py-amqp's frame handler, except that a content header whose table is too
    deeply nested to parse is delivered with the marker table instead.

    Passed as ``frame_handler`` to py-amqp's ``Connection``.
    """
    from amqp.method_framing import frame_handler

    on_frame = frame_handler(connection, callback)

    def guarded(frame: tuple[int, int, bytes]) -> Any:
        try:
            return on_frame(frame)
        except RecursionError:
            frame_type, channel, payload = frame
            if frame_type != _CONTENT_HEADER:
                raise
            replaced = _without_header_table(bytes(payload))
            if replaced is None:
                raise
            # The partial message is still waiting for its header: parse the
            # replacement, which has no nesting, in its place.
            return on_frame((frame_type, channel, replaced))

    return guarded
