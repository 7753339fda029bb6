"""Dead-letter entries: the original message plus why it was given up.

A dead-lettered message keeps its body, id and headers unchanged and gains
``mqtasks-death-*`` headers, so an operator can see the reason and a replay can
send the original again. Every text is cut to a bounded size.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._url import redact
from .message import HEADER_ATTEMPT, HEADER_FIRST_FAILED_AT, Message

if TYPE_CHECKING:
    from .transport.base import Delivery, Envelope

__all__ = [
    "HEADER_DEATH_DETAIL",
    "HEADER_DEATH_EXCEPTION",
    "HEADER_DEATH_FAILED_AT",
    "HEADER_DEATH_QUEUE",
    "HEADER_DEATH_REASON",
    "HEADER_DEATH_TRACEBACK",
    "HEADER_DEATH_WORKER",
    "MAX_DETAIL",
    "MAX_TRACEBACK",
    "dead_letter_envelope",
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

#: Longest detail or exception text kept, in characters.
MAX_DETAIL = 1024
#: Longest traceback kept, in characters (its end, where the error is).
MAX_TRACEBACK = 8192


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
    from .transport.base import Envelope

    headers: dict[str, Any] = {str(k): _plain(v) for k, v in dict(delivery.headers).items()}
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
