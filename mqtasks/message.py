"""Message: one task call, and its encoding to and decoding from the wire (protocol 1).

The wire format is documented in ``docs/protocol.md``. A body is JSON
``{"args": [...], "kwargs": {...}}``, plus ``"workflow": {...}`` for a step of
a workflow (:mod:`mqtasks.canvas`); everything else travels in the message id
property and headers prefixed ``mqtasks-``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .exceptions import DecodeError
from .serialization import CONTENT_ENCODING, CONTENT_TYPE, decode_call, encode_body
from .transport.envelope import Envelope

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .transport.base import Delivery

__all__ = [
    "HEADER_ATTEMPT",
    "HEADER_EXPIRES",
    "HEADER_FIRST_FAILED_AT",
    "HEADER_ORIGIN",
    "HEADER_PROTOCOL",
    "HEADER_PUBLISHED_AT",
    "HEADER_TASK",
    "MAX_ATTEMPT",
    "MAX_HEADERS",
    "MAX_HEADER_DEPTH",
    "MAX_HEADER_ITEMS",
    "MAX_HEADER_VALUE",
    "MAX_NAME_LENGTH",
    "PERIODIC_HEADER",
    "PROTOCOL_VERSION",
    "Message",
    "current_message",
]

#: Version of the wire protocol this release speaks.
PROTOCOL_VERSION = 1
#: Header: the wire protocol version.
HEADER_PROTOCOL = "mqtasks-protocol"
#: Header: the registered task name.
HEADER_TASK = "mqtasks-task"
#: Header: attempt number, starting at 1.
HEADER_ATTEMPT = "mqtasks-attempt"
#: Header: ``pid@host`` of the publisher.
HEADER_ORIGIN = "mqtasks-origin"
#: Header: publish time, seconds since the epoch (UTC).
HEADER_PUBLISHED_AT = "mqtasks-published-at"
#: Header: expiry time, seconds since the epoch (UTC); absent when the task never expires.
HEADER_EXPIRES = "mqtasks-expires"
#: Header: when the first attempt failed, seconds since the epoch (on retries).
HEADER_FIRST_FAILED_AT = "mqtasks-first-failed-at"

#: Header (not ``mqtasks-``: it travels in :attr:`Message.headers`) naming the periodic
#: schedule a message is a tick of; workers run such a task id once (the idempotency record).
PERIODIC_HEADER = "periodic-schedule"

#: Longest id or task name accepted.
MAX_NAME_LENGTH = 255
#: Largest attempt number accepted in a header.
MAX_ATTEMPT = 10_000
#: Longest string value accepted in any header.
MAX_HEADER_VALUE = 8192
#: Most headers accepted on one message.
MAX_HEADERS = 64

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _reset_origin() -> None:
    global _ORIGIN
    _ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


# Set again in a forked child, rather than compared with os.getpid() (a system
# call) on every publish.
os.register_at_fork(after_in_child=_reset_origin)


def _origin() -> str:
    return _ORIGIN


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True)
class Message:
    """One call of a task, as it travels through the broker.

    Change it with :meth:`copy`, never in place.
    """

    #: Message (task) id; stable across retries and redeliveries.
    id: str
    #: Registered task name.
    task: str
    #: Queue the message is published to, or was received from.
    queue: str
    #: Positional arguments (JSON values).
    args: tuple[Any, ...] = ()
    #: Keyword arguments (JSON values).
    kwargs: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    #: Attempt number, starting at 1.
    attempt: int = 1
    #: When the message was first published (aware UTC).
    published_at: datetime | None = None
    #: When the task stops being worth running (aware UTC), if ever.
    expires_at: datetime | None = None
    #: ``pid@host`` of the publisher.
    origin: str | None = None
    #: Message priority (0-255), if any.
    priority: int | None = None
    #: Headers mqtasks does not own (``traceparent`` and the like), passed through.
    headers: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    #: Whether the broker delivered this message before (received messages only).
    redelivered: bool = False
    #: When the first attempt failed (aware UTC), once a retry is under way.
    first_failed_at: datetime | None = None
    #: Deliveries of this message so far, this one included, where the broker
    #: counts them (received messages only; a worker crash counts one more).
    delivery_count: int | None = None
    #: What continues the workflow this call is a step of (the body's
    #: ``workflow`` member, read by :class:`~mqtasks.middleware.workflow.Workflow`);
    #: None for a plain call.
    workflow: Mapping[str, Any] | None = None

    def copy(self, **changes: Any) -> Message:
        """Return a copy with ``changes`` applied.

        Raises:
            TypeError: A name in ``changes`` is not a field.
        """
        # dataclasses.replace() would call __init__, which sets every frozen field one
        # object.__setattr__ at a time, on every traced publish; no field has a
        # default to compute or a check to run, so copying the instance dict gives
        # the same object far more cheaply.
        if not changes.keys() <= _FIELD_NAMES:  # a comparison builds no set when all is well
            raise TypeError(f"Message has no field(s) {sorted(changes.keys() - _FIELD_NAMES)}")
        new = object.__new__(type(self))
        state = new.__dict__
        state.update(self.__dict__)
        state.update(changes)
        return new

    def is_expired(self, now: float | None = None) -> bool:
        """Return whether the message is past its expiry time."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at.timestamp()

    def encode(self, *, max_size: int, names: Sequence[str] | None = None) -> Envelope:
        """Encode the arguments as the JSON body and wrap it with this message's id and headers.

        Args:
            max_size: Largest body accepted, in bytes.
            names: Parameter names of the task's positional arguments, for errors.

        Raises:
            EncodeError: An argument JSON cannot carry, or a body over ``max_size``.
        """
        body = encode_body(
            self.args,
            dict(self.kwargs),
            max_size=max_size,
            names=names,
            task=self.task,
            workflow=self.workflow,
        )
        return self.to_envelope(body)

    def to_envelope(self, body: bytes) -> Envelope:
        """Wrap an already encoded body with this message's id and headers.

        A retry sends the body it received this way, unchanged.
        """
        headers: dict[str, Any] = dict(self.headers)
        headers[HEADER_PROTOCOL] = PROTOCOL_VERSION
        headers[HEADER_TASK] = self.task
        headers[HEADER_ATTEMPT] = self.attempt
        headers[HEADER_ORIGIN] = self.origin or _origin()
        headers[HEADER_PUBLISHED_AT] = (
            self.published_at.timestamp() if self.published_at else time.time()
        )
        if self.expires_at is not None:
            headers[HEADER_EXPIRES] = self.expires_at.timestamp()
        if self.first_failed_at is not None:
            headers[HEADER_FIRST_FAILED_AT] = self.first_failed_at.timestamp()
        return Envelope(
            body=body,
            message_id=self.id,
            headers=headers,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            priority=self.priority,
        )

    @classmethod
    def from_delivery(cls, delivery: Delivery, *, max_size: int) -> Message:
        """Validate and decode a received delivery.

        Checks run cheapest first and before any decoding: refusal by the
        transport, size, content type, headers, then the JSON body.

        Raises:
            DecodeError: With the reason code the worker logs (and dead-letters with).
        """
        if delivery.refused:
            detail = _REFUSALS.get(delivery.refused, "refused by the transport")
            raise DecodeError(delivery.refused, detail)
        if len(delivery.body) > max_size:
            raise DecodeError("too_large", f"body of {len(delivery.body)} bytes exceeds {max_size}")
        if delivery.content_type != CONTENT_TYPE:
            raise DecodeError(
                "content_type",
                f"content type {delivery.content_type!r} is not {CONTENT_TYPE!r}",
            )
        meta = _parse_headers(delivery)
        args, kwargs, workflow = decode_call(
            delivery.body,
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            max_size=max_size,
        )
        return cls(
            id=meta["id"],
            task=meta["task"],
            queue=delivery.queue,
            args=tuple(args),
            kwargs=kwargs,
            attempt=meta["attempt"],
            published_at=_utc(meta["published_at"]),
            expires_at=_utc(meta["expires"]),
            origin=meta["origin"],
            priority=delivery.priority,
            headers=meta["extra"],
            redelivered=delivery.redelivered,
            first_failed_at=_utc(meta["first_failed_at"]),
            delivery_count=delivery.delivery_count,
            workflow=workflow,
        )


#: What a transport's refusal (``Delivery.refused``) means, for the log and dead letter.
_REFUSALS = {
    "compression_refused": "compressed bodies are not accepted",
    "invalid_headers": "headers too large or too deeply nested to read",
    "decode_error": "the transport could not read the message",
}

#: The fields Message.copy() accepts.
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Message))

#: Headers RabbitMQ writes when it dead-letters a message; a producer may forge them.
_DEATH_LIST = "x-death"
_DEATH_TEXTS = ("x-first-death-", "x-last-death-")


def _check_broker_headers(headers: Mapping[str, Any]) -> None:
    """Refuse broker dead-letter headers of a shape RabbitMQ never writes."""
    deaths = headers.get(_DEATH_LIST)
    if deaths is not None and not (
        isinstance(deaths, (list, tuple))
        and len(deaths) <= MAX_HEADERS
        and all(isinstance(d, Mapping) for d in deaths)
    ):
        raise DecodeError("invalid_headers", f"malformed {_DEATH_LIST} header")
    for key, value in headers.items():
        if str(key).startswith(_DEATH_TEXTS) and not isinstance(value, str):
            raise DecodeError("invalid_headers", f"malformed {str(key)[:64]} header")


#: Header value types that need no size check (short strings are checked inline).
_SCALARS = frozenset({int, float, bool, type(None)})


def _parse_headers(delivery: Delivery) -> dict[str, Any]:
    headers = delivery.headers
    if not isinstance(headers, Mapping):
        raise DecodeError("invalid_headers", "headers are not a table")
    if len(headers) > MAX_HEADERS:
        raise DecodeError("invalid_headers", f"{len(headers)} headers, over {MAX_HEADERS}")
    extra: dict[str, Any] = {}
    for key, value in headers.items():
        kind = type(value)
        if kind in _SCALARS:
            pass  # the common case, without the ABC checks below
        elif isinstance(value, (str, bytes)):
            if len(value) > MAX_HEADER_VALUE:
                raise DecodeError("invalid_headers", f"header {str(key)[:64]!r} is too long")
        elif isinstance(value, (Mapping, list, tuple)) and not _small_value(value):
            raise DecodeError("invalid_headers", f"header {str(key)[:64]!r} is too large or deep")
        if not str(key).startswith("mqtasks-"):
            extra[key] = value
    _check_broker_headers(headers)
    message_id = delivery.message_id
    if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_NAME_LENGTH:
        raise DecodeError("invalid_headers", "missing or invalid message id")
    protocol = headers.get(HEADER_PROTOCOL, PROTOCOL_VERSION)
    if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
        raise DecodeError("invalid_headers", f"unsupported protocol version {protocol!r}")
    task = headers.get(HEADER_TASK)
    if not isinstance(task, str) or not 0 < len(task) <= MAX_NAME_LENGTH:
        raise DecodeError("invalid_headers", f"missing or invalid {HEADER_TASK} header")
    attempt = headers.get(HEADER_ATTEMPT, 1)
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= MAX_ATTEMPT:
        raise DecodeError("invalid_headers", f"invalid {HEADER_ATTEMPT} {str(attempt)[:32]!r}")
    origin = headers.get(HEADER_ORIGIN)
    if origin is not None and not isinstance(origin, str):
        raise DecodeError("invalid_headers", f"invalid {HEADER_ORIGIN} header")
    return {
        "id": message_id,
        "task": task,
        "attempt": attempt,
        "origin": origin,
        "published_at": _timestamp(headers, HEADER_PUBLISHED_AT),
        "expires": _timestamp(headers, HEADER_EXPIRES),
        "first_failed_at": _timestamp(headers, HEADER_FIRST_FAILED_AT),
        "extra": extra,
    }


#: Deepest nesting of tables and arrays in a header value (RabbitMQ's x-death has 3).
MAX_HEADER_DEPTH = 16
#: Most items in all the tables and arrays of one header value.
MAX_HEADER_ITEMS = 4096


def _small_value(value: Any) -> bool:
    """Whether a table or array header is within the depth and item limits.

    Iterative, so that a hostile value cannot exhaust the stack here, or later
    when it is printed or copied into a dead letter.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        current, depth = stack.pop()
        if depth > MAX_HEADER_DEPTH:
            return False
        children = current.values() if isinstance(current, Mapping) else current
        for child in children:
            items += 1
            if items > MAX_HEADER_ITEMS:
                return False
            if isinstance(child, (str, bytes)) and len(child) > MAX_HEADER_VALUE:
                return False
            if isinstance(child, (Mapping, list, tuple)):
                stack.append((child, depth + 1))
    return True


#: Latest timestamp accepted (year 3000): later ones are forged or broken.
_MAX_TIMESTAMP = 32503680000.0


def _timestamp(headers: Mapping[str, Any], key: str) -> float | None:
    value = headers.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError("invalid_headers", f"invalid {key} header")
    value = float(value)
    if not math.isfinite(value) or not 0 <= value <= _MAX_TIMESTAMP:
        raise DecodeError("invalid_headers", f"{key} out of range")
    return value


_current: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "mqtasks_current_message", default=None
)


def current_message() -> Message | None:
    """Return the message of the task running in this thread, or None outside a task.

    Inside a task it tells the task its own id (stable across retries and
    redeliveries: the idempotency key), attempt, queue, whether the broker
    delivered it before, and how often::

        from mqtasks import current_message

        @app.task
        def charge(order_id: int) -> None:
            msg = current_message()
            payments.charge(order_id, idempotency_key=msg.id if msg else None)
    """
    return _current.get()
