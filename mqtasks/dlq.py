"""Dead-letter tooling: list, show, replay and purge the entries of ``<queue>.dlq``.

The same operations back the ``mqtasks dlq`` commands and serve tests::

    from mqtasks.dlq import list_dead_letters, purge_dead_letters, replay_dead_letters

    for entry in list_dead_letters(app, "emails"):
        print(entry.id, entry.task, entry.reason, entry.attempts)
    replay_dead_letters(app, "emails", task="shop.send_receipt")

``queue`` is always the work queue (``emails``), not its dead-letter queue
(``emails.dlq``; that name is accepted too). Entries are read in the order the
dead-letter queue holds them, oldest first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .deadletter import (
    HEADER_DEATH_DETAIL,
    HEADER_DEATH_EXCEPTION,
    HEADER_DEATH_FAILED_AT,
    HEADER_DEATH_QUEUE,
    HEADER_DEATH_REASON,
    HEADER_DEATH_TRACEBACK,
)
from .message import HEADER_ATTEMPT, HEADER_FIRST_FAILED_AT, HEADER_TASK
from .result import REVOKED_REASON
from .revoke import clear_revocation
from .transport.base import DLQ_SUFFIX, StoredMessage, dead_letter_spec
from .transport.envelope import Envelope
from .transport.errors import translate_errors

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "DeadLetter",
    "dead_letter_queue",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
    "replay_envelope",
]

#: Header prefixes a replay removes: mqtasks' reasons, RabbitMQ's dead-letter history
#: and its delivery count (a quorum queue counts every browse of the dead-letter queue).
_DEATH_PREFIXES = (
    "mqtasks-death-",
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-delivery-count",
)


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry: the original message and why it was given up.

    Attributes:
        id: The message (task) id.
        task: The task name, if the message carried one.
        reason: The reason code (``max_retries_exceeded``, ``rejected`` ...); for
            messages RabbitMQ dead-lettered by itself, its ``x-death`` reason.
        detail: A human-readable explanation.
        exception: ``Type: message`` of the last exception, if the task raised.
        traceback: That exception's traceback (cut to its last 8 KiB).
        attempts: Attempts made, if known.
        failed_at: When it was dead-lettered (aware UTC), if known.
        queue: The queue it was taken from.
        body: The original body, unchanged.
        headers: All headers of the entry.
        content_type: The original content type.
        content_encoding: The original content encoding.
    """

    id: str
    task: str | None
    reason: str | None
    detail: str | None
    exception: str | None
    traceback: str | None
    attempts: int | None
    failed_at: datetime | None
    queue: str
    body: bytes = field(repr=False)
    headers: dict[str, Any] = field(repr=False)
    content_type: str | None = None
    content_encoding: str | None = None

    @classmethod
    def from_entry(
        cls,
        *,
        body: bytes,
        message_id: str | None,
        headers: Mapping[str, Any] | None,
        queue: str,
        content_type: str | None = None,
        content_encoding: str | None = None,
    ) -> DeadLetter:
        """Parse an entry as read from a dead-letter queue of ``queue`` (an envelope's fields)."""
        h = {str(k): v for k, v in dict(headers or {}).items()}
        reason = _text(h.get(HEADER_DEATH_REASON))
        failed_at = _utc(h.get(HEADER_DEATH_FAILED_AT))
        if reason is None:  # dead-lettered by RabbitMQ itself (TTL, max-length, delivery limit)
            reason = _text(h.get("x-last-death-reason") or h.get("x-first-death-reason"))
            deaths = h.get("x-death")
            if failed_at is None and isinstance(deaths, list) and deaths:
                first = deaths[0]
                failed_at = _utc(first.get("time")) if isinstance(first, Mapping) else None
        attempts = h.get(HEADER_ATTEMPT)
        return cls(
            id=message_id or "",
            task=_text(h.get(HEADER_TASK)),
            reason=reason,
            detail=_text(h.get(HEADER_DEATH_DETAIL)),
            exception=_text(h.get(HEADER_DEATH_EXCEPTION)),
            traceback=_text(h.get(HEADER_DEATH_TRACEBACK)),
            attempts=attempts
            if isinstance(attempts, int) and not isinstance(attempts, bool)
            else None,
            failed_at=failed_at,
            queue=_text(h.get(HEADER_DEATH_QUEUE)) or queue,
            body=bytes(body),
            headers=h,
            content_type=content_type,
            content_encoding=content_encoding,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as JSON-able values (the body decoded as UTF-8 where it can be)."""
        try:
            body: str = self.body.decode()
        except UnicodeDecodeError:
            body = repr(self.body)
        return {
            "id": self.id,
            "task": self.task,
            "reason": self.reason,
            "detail": self.detail,
            "exception": self.exception,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "queue": self.queue,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "headers": _jsonable(self.headers),
            "body": body,
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        try:
            return datetime.fromtimestamp(value, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if depth < 6 and isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 6 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


def dead_letter_queue(queue: str) -> str:
    """Return the name of ``queue``'s dead-letter queue (``queue`` may already be one)."""
    return queue if queue.endswith(DLQ_SUFFIX) else queue + DLQ_SUFFIX


def _work_queue(queue: str) -> str:
    return queue[: -len(DLQ_SUFFIX)] if queue.endswith(DLQ_SUFFIX) else queue


def replay_envelope(entry: DeadLetter) -> Envelope:
    """Return the original message of ``entry`` as a first attempt.

    The ``mqtasks-death-*``, RabbitMQ ``x-death*`` and ``x-delivery-count``
    headers are removed,
    ``mqtasks-attempt`` is reset to 1 and ``mqtasks-first-failed-at`` dropped;
    the body, id and all other headers (``mqtasks-expires`` included) are kept.
    """
    headers = {k: v for k, v in entry.headers.items() if not k.startswith(_DEATH_PREFIXES)}
    headers.pop(HEADER_FIRST_FAILED_AT, None)
    headers[HEADER_ATTEMPT] = 1
    return Envelope(
        body=entry.body,
        message_id=entry.id,
        headers=headers,
        content_type=entry.content_type or "application/json",
        content_encoding=entry.content_encoding or "utf-8",
        priority=None,
    )


def _entry(message: StoredMessage, queue: str) -> DeadLetter:
    return DeadLetter.from_entry(
        body=message.body,
        message_id=message.message_id,
        headers=message.headers,
        queue=_work_queue(queue),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
    )


def list_dead_letters(app: App, queue: str, limit: int | None = 100) -> list[DeadLetter]:
    """Return up to ``limit`` entries of ``queue``'s dead-letter queue, oldest first.

    Non-destructive: every entry stays in the dead-letter queue. On Redis the
    list is read with ``LRANGE``. On RabbitMQ (and ``memory://``) entries are
    taken with ``basic_get`` and requeued afterwards: browsing marks them
    redelivered (on a quorum queue, ``x-delivery-count`` grows) and may
    re-order them, and while the listing runs they are invisible to other readers.

    Raises:
        QueueNotFound: The dead-letter queue does not exist (RabbitMQ).
        TransportError: The broker cannot be reached or refused.
    """
    stored = app.transport.browse(dead_letter_queue(queue), limit)
    return [_entry(message, queue) for message in stored]


def replay_dead_letters(
    app: App,
    queue: str,
    *,
    ids: Collection[str] | None = None,
    task: str | None = None,
    limit: int | None = None,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> int:
    """Send dead-lettered messages back to ``queue`` as first attempts; return how many.

    Each matching entry is republished (see :func:`replay_envelope`) and removed
    from the dead-letter queue only once the broker confirmed the publish: a
    failure in between can duplicate an entry, never lose it. Entries that do
    not match stay where they are. A revoked entry's revocation is cleared
    first, so it runs.

    Args:
        app: The app whose broker holds the queue.
        queue: The work queue (its dead letters are in ``<queue>.dlq``).
        ids: Replay only entries with these message ids.
        task: Replay only entries of this task name.
        limit: Replay at most this many.
        on_replayed: Called with each entry once it is replayed (for progress).

    Raises:
        PublishError: A message could not be republished (it stays a dead letter).
        QueueNotFound: The dead-letter queue does not exist (RabbitMQ).
    """
    wanted = set(ids) if ids is not None else None
    target = _work_queue(queue)

    def matches(entry: DeadLetter) -> bool:
        return (wanted is None or entry.id in wanted) and (task is None or entry.task == task)

    transport = app.transport
    transport.declare([app.queue(target)])
    replayed = 0
    with transport.take(dead_letter_queue(queue)) as messages:
        for message, remove in messages:
            if limit is not None and replayed >= limit:
                break
            entry = _entry(message, queue)
            if not matches(entry):
                continue
            if entry.reason == REVOKED_REASON:
                clear_revocation(app, entry.id)  # the replay runs: the revocation and REVOKED go
            transport.publish(target, replay_envelope(entry))
            remove()
            replayed += 1
            if on_replayed is not None:
                on_replayed(entry)
    return replayed


def purge_dead_letters(app: App, queue: str) -> int:
    """Delete every entry of ``queue``'s dead-letter queue; return how many.

    Raises:
        QueueNotFound: The dead-letter queue does not exist (RabbitMQ).
    """
    spec = dead_letter_spec(app.queue(_work_queue(queue)))
    transport = app.transport
    with translate_errors(transport.url, f"purge {spec.name!r}", queue=spec.name):
        return transport.purge([spec])
