"""Dead-letter entries: the original message plus why it was given up, and their publishing.

A dead-lettered message keeps its body, id and headers unchanged and gains
``mqtasks-death-*`` headers, so an operator can see the reason and a replay can
send the original again. Every text is cut to a bounded size, and so are the
original headers kept: a refused message may carry as many as the broker took,
and its entry, which adds the reason on top, must still be publishable (RabbitMQ
carries all headers of a message in one frame, 128 KiB by default).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._url import redact
from .exceptions import Unroutable
from .message import HEADER_ATTEMPT, HEADER_FIRST_FAILED_AT, Message
from .transport.envelope import Envelope
from .transport.queue import DLQ_SUFFIX

if TYPE_CHECKING:
    from .transport.base import Delivery, Transport
    from .transport.queue import QueueSpec

__all__ = [
    "HEADER_DEATH_DETAIL",
    "HEADER_DEATH_DROPPED_HEADERS",
    "HEADER_DEATH_EXCEPTION",
    "HEADER_DEATH_FAILED_AT",
    "HEADER_DEATH_QUEUE",
    "HEADER_DEATH_REASON",
    "HEADER_DEATH_TRACEBACK",
    "HEADER_DEATH_WORKER",
    "MAX_DETAIL",
    "MAX_KEPT_HEADERS",
    "MAX_TRACEBACK",
    "dead_letter_envelope",
    "publish_dead_letter",
]

#: Header: the reason code (``max_retries_exceeded``, ``rejected``, ``decode_error`` ...).
HEADER_DEATH_REASON = "mqtasks-death-reason"
#: Header: a human-readable explanation (bounded).
HEADER_DEATH_DETAIL = "mqtasks-death-detail"
#: Header: ``Type: message`` of the last exception, if any (bounded).
HEADER_DEATH_EXCEPTION = "mqtasks-death-exception"
#: Header: the last exception's traceback, cut to :data:`MAX_TRACEBACK` bytes.
HEADER_DEATH_TRACEBACK = "mqtasks-death-traceback"
#: Header: when it was dead-lettered, seconds since the epoch.
HEADER_DEATH_FAILED_AT = "mqtasks-death-failed-at"
#: Header: ``pid@host`` of the worker that gave it up.
HEADER_DEATH_WORKER = "mqtasks-death-worker"
#: Header: the queue it was taken from.
HEADER_DEATH_QUEUE = "mqtasks-death-queue"
#: Header: names of original headers left out of the entry (over :data:`MAX_KEPT_HEADERS`).
HEADER_DEATH_DROPPED_HEADERS = "mqtasks-death-dropped-headers"

#: Longest detail or exception text kept, in characters.
MAX_DETAIL = 1024
#: Longest traceback kept, in characters (its end, where the error is).
MAX_TRACEBACK = 8192
#: Most bytes of the original headers an entry keeps (names and values, about as
#: encoded); ``mqtasks-*`` headers are kept first, then the others in order.
MAX_KEPT_HEADERS = 64 * 1024


def dead_letter_envelope(
    delivery: Delivery,
    message: Message | None,
    *,
    reason: str,
    detail: str,
    exc: BaseException | None,
    worker: str,
) -> Envelope:
    """Build the dead-letter entry of ``delivery``: its body, id and headers, plus the reason.

    Args:
        delivery: The message as received (its body may be undecodable).
        message: The decoded message, if decoding succeeded.
        reason: Reason code.
        detail: Explanation.
        exc: The last exception, if the task raised.
        worker: ``pid@host`` of this worker.
    """
    headers = _kept_headers(delivery.headers)
    headers[HEADER_DEATH_REASON] = reason
    headers[HEADER_DEATH_DETAIL] = redact(detail)[:MAX_DETAIL]
    headers[HEADER_DEATH_FAILED_AT] = time.time()
    headers[HEADER_DEATH_WORKER] = worker
    headers[HEADER_DEATH_QUEUE] = delivery.queue
    if message is not None:
        headers[HEADER_ATTEMPT] = message.attempt
        if message.first_failed_at is not None:
            headers[HEADER_FIRST_FAILED_AT] = message.first_failed_at.timestamp()
    if exc is not None:
        # Exception texts may quote a broker URL: passwords are masked (redact).
        headers[HEADER_DEATH_EXCEPTION] = redact(f"{type(exc).__name__}: {exc}")[:MAX_DETAIL]
        headers[HEADER_DEATH_TRACEBACK] = redact("".join(traceback.format_exception(exc)))[
            -MAX_TRACEBACK:
        ]
    return Envelope(
        body=delivery.body,
        message_id=delivery.message_id or f"no-id-{time.time_ns()}",
        headers=headers,
        content_type=delivery.content_type or "application/data",
        content_encoding=delivery.content_encoding or "binary",
        priority=None,
    )


def publish_dead_letter(transport: Transport, spec: QueueSpec, envelope: Envelope) -> None:
    """Publish a dead-letter entry to the dead-letter queue of ``spec``, confirmed.

    A dead-letter queue deleted behind the worker's back is declared again,
    and the entry published once more.

    Raises:
        TransportError: The broker did not store the entry.
    """
    name = spec.name + DLQ_SUFFIX
    try:
        transport.publish(name, envelope)
    except Unroutable:
        transport.forget_declared()
        transport.declare([spec])
        transport.publish(name, envelope)


def _kept_headers(original: Mapping[str, Any]) -> dict[str, Any]:
    """The original headers as plain values, within :data:`MAX_KEPT_HEADERS`.

    A header that does not fit is left out whole (a cut value would be a wrong
    one) and named in :data:`HEADER_DEATH_DROPPED_HEADERS`.
    """
    items = [(str(k), v) for k, v in dict(original).items()]
    items.sort(key=lambda kv: not kv[0].startswith("mqtasks-"))  # stable: order kept otherwise
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    room = MAX_KEPT_HEADERS
    for key, value in items:
        plain = _plain(value)
        size = _encoded_size(key) + _encoded_size(plain)
        if size > room:
            dropped.append(key)
            continue
        kept[key] = plain
        room -= size
    if dropped:
        kept[HEADER_DEATH_DROPPED_HEADERS] = ", ".join(dropped)[:MAX_DETAIL]
    return kept


def _encoded_size(value: Any) -> int:
    """About how many bytes ``value`` (a plain header value) takes on the wire."""
    size = 0
    stack = [value]
    while stack:
        current = stack.pop()
        size += 8  # type tag, length prefix, separators
        if isinstance(current, str):
            size += len(current.encode("utf-8", "surrogatepass"))
        elif isinstance(current, Mapping):
            size += sum(len(str(k)) for k in current)
            stack.extend(current.values())
        elif isinstance(current, (list, tuple)):
            stack.extend(current)
    return size


def _plain(value: Any, depth: int = 0) -> Any:
    """Headers as plain JSON-able values (AMQP tables may carry datetimes, bytes)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value[:32]]
    if isinstance(value, (Mapping, list, tuple)):
        # str() of a hostile, deeply nested value would exhaust the stack.
        return f"<{type(value).__name__} of {len(value)} items, nested too deep to keep>"
    return str(value)[:MAX_DETAIL]
