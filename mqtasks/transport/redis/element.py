"""The list element of the ``redis://`` transport: one flag byte, the count of
earlier deliveries, a JSON metadata line and the body; and the delivery read
from it. The format is described in :mod:`mqtasks.transport.redis`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from ..._json import json_depth_exceeds
from .._guard import strip_compression
from ..base import Delivery
from ..envelope import Envelope

__all__ = ["MAX_LEVEL", "RedisDelivery", "encode_element", "priority_level"]

#: Largest metadata (id, headers, content type) of a list element read, in bytes.
MAX_METADATA = 1024 * 1024


#: Highest priority level: priorities 0 to 9 are kept apart, higher ones count as 9.
MAX_LEVEL = 9


def priority_level(priority: int | None, max_priority: int | None = None) -> int:
    """Return the level a message of ``priority`` is queued at, 0 (none) to 9.

    Args:
        priority: The message's priority; None counts as 0, as on RabbitMQ.
        max_priority: The queue's ``QueueSpec.max_priority``: higher priorities
            count as this one, as on RabbitMQ.
    """
    if not priority or priority < 0:
        return 0
    return min(priority, MAX_LEVEL if max_priority is None else max_priority, MAX_LEVEL)


def encode_element(envelope: Envelope, level: int | None = None) -> bytes:
    """Return the list element for ``envelope`` (flag, JSON metadata, newline, body).

    Args:
        envelope: The message.
        level: Its priority level, if not the one its priority gives
            (:func:`priority_level` without a ``max_priority``). Written last,
            where the Lua scripts read it.

    Raises:
        TypeError: A header value is not JSON-serialisable.
    """
    meta = {
        "i": envelope.message_id,
        "h": dict(envelope.headers),
        "t": envelope.content_type,
        "e": envelope.content_encoding,
        "p": envelope.priority,
    }
    if level is not None and level != priority_level(envelope.priority):
        meta["l"] = level
    head = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
    return b"n" + head + b"\n" + envelope.body


#: The message id at the start of an element's metadata (``encode_element`` writes it first).
_LEADING_ID = re.compile(rb'\{"i":"([^"\\]{1,255})"')


class RedisDelivery(Delivery):
    """A delivery that remembers its list element and the lists it moves between."""

    __slots__ = ("element", "proc_key", "source_key")

    def __init__(
        self, element: bytes, queue: str, generation: int, proc_key: str, source_key: str
    ) -> None:
        # Fields are read from the element below, not passed to Delivery.__init__:
        # a malformed element still becomes a delivery, refused with its reason.
        self.element = element
        self.proc_key = proc_key
        self.source_key = source_key
        self.queue = queue
        self.generation = generation
        self.received_at = time.time()
        self.redelivered = element[:1] == b"r"
        self.delivery_count: int | None = 1
        self.refused: str | None = None
        self.body = b""
        self.headers: Mapping[str, Any] = {}
        self.message_id: str | None = None
        self.content_type: str | None = None
        self.content_encoding: str | None = None
        self.priority: int | None = None
        newline = element.find(b"\n")
        start = 1  # the metadata starts after the flag and the count's digits
        while start < newline and 0x30 <= element[start] <= 0x39:
            start += 1
        try:
            if element[:1] not in (b"n", b"r") or newline < 0 or start > 10:
                raise ValueError("not an mqtasks element")
            if start > 1:
                self.delivery_count = int(element[1:start]) + 1
            if newline > MAX_METADATA or json_depth_exceeds(element[start:newline], 64):
                # Parsing could take the memory or the stack of the worker.
                self.refused = "invalid_headers"
                self.body = element[newline + 1 :]
                # The id is written first: keep it, so the dead letter names its task.
                found = _LEADING_ID.match(element, start, min(newline, start + 512))
                self.message_id = found.group(1).decode() if found else None
                return
            meta = json.loads(element[start:newline])
            if not isinstance(meta, dict):
                raise ValueError("metadata is not an object")
            headers = meta.get("h") or {}
            if not isinstance(headers, dict):
                raise ValueError("headers are not an object")
        except ValueError:
            self.refused = "decode_error"  # the worker rejects it with this reason
            self.body = element
            return
        self.body = element[newline + 1 :]
        self.refused = strip_compression(headers)
        self.headers = headers
        message_id, priority = meta.get("i"), meta.get("p")
        self.message_id = message_id if isinstance(message_id, str) else None
        self.content_type = _str_or_none(meta.get("t"))
        self.content_encoding = _str_or_none(meta.get("e"))
        self.priority = priority if isinstance(priority, int) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
