"""Retries: the decision what becomes of a message whose task failed.

The next attempt, held by the broker for the delay the task's
:class:`~mqtasks.retry.RetryPolicy` picks, or the dead-letter queue with the
reason. Only the decision is here; the worker does the publishing (the next
attempt or the dead letter, confirmed, then the ack of this one) through
:meth:`Worker.retry() <mqtasks.worker.Worker.retry>` and
:meth:`Worker.dead_letter() <mqtasks.worker.Worker.dead_letter>`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, Reject, Retry, SkipMessage
from .base import Middleware, ensure

if TYPE_CHECKING:
    from ..message import Message
    from ..retry import RetryPolicy
    from ..worker import Worker

__all__ = ["BROKER_DEATH_HEADERS", "Retries", "next_attempt", "with_retries"]

#: Prefixes of the headers RabbitMQ adds when it dead-letters a message.
BROKER_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


def next_attempt(message: Message, now: float | None = None) -> Message:
    """Return the next attempt of ``message``: attempt + 1, the first failure time kept.

    The broker's dead-letter history from the last trip through the delay
    queues is dropped: RabbitMQ silently drops a message that would be
    dead-lettered again through a queue its ``x-death`` already lists (cycle
    detection).

    Args:
        message: The attempt that failed.
        now: The failure time, seconds since the epoch; the current time by default.
    """
    first = message.first_failed_at
    if first is None:
        first = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    headers = {k: v for k, v in message.headers.items() if not k.startswith(BROKER_DEATH_HEADERS)}
    return message.copy(attempt=message.attempt + 1, first_failed_at=first, headers=headers)


class Retries(Middleware):
    """Retries a failed task as its :class:`~mqtasks.retry.RetryPolicy` says; dead-letters the rest.

    Every worker runs one: a stack without it gets ``Retries()`` at its end
    (:func:`with_retries`), so its :meth:`after_process` runs before the other
    middleware's, which then see the outcome (``after_retry`` or
    ``after_dead_letter`` has run). Install a subclass to decide differently.

    Dead-letter reasons: ``rejected`` (the task raised
    :exc:`~mqtasks.exceptions.Reject`), ``max_retries_exceeded``,
    ``not_retryable``, ``expired`` (the next attempt would start after the
    task expires) and ``retry_unsupported`` (the transport cannot hold a delay).
    """

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Retry or dead-letter ``message`` if its task raised (unless already settled)."""
        if exception is None or isinstance(exception, SkipMessage) or worker.decided:
            return
        attempt = message.attempt
        if isinstance(exception, Reject):
            worker.dead_letter(message, "rejected", exception.reason, exception)
            return
        policy = self.policy(worker, message)
        if isinstance(exception, Retry):
            if attempt > policy.max_retries:
                detail = f"Retry requested after {attempt} attempts"
                worker.dead_letter(message, "max_retries_exceeded", detail, exception)
                return
            delay = exception.countdown
            if delay is None:
                delay = policy.backoff_delay(attempt, exception)
            self.retry(worker, message, max(0.0, delay), exception)
            return
        delay = policy.next_delay(attempt, exception)
        if delay is not None:
            self.retry(worker, message, delay, exception)
        elif not policy.is_retryable(exception):
            detail = f"{type(exception).__name__} is not retried"
            worker.dead_letter(message, "not_retryable", detail, exception)
        else:
            worker.dead_letter(
                message, "max_retries_exceeded", f"failed {attempt} times", exception
            )

    def policy(self, worker: Worker, message: Message) -> RetryPolicy:
        """Return the retry policy of ``message``'s task (the app's if it is not registered)."""
        task = worker.app.tasks.get(message.task)
        return task.retry_policy if task is not None else worker.app.retry_policy

    def retry(
        self, worker: Worker, message: Message, delay: float, exception: BaseException
    ) -> None:
        """Have the next attempt run in ``delay`` seconds, unless the task has expired by then."""
        now = time.time()
        if message.expires_at is not None and now + delay >= message.expires_at.timestamp():
            detail = f"the next attempt, due in {delay:.1f} s, would start after the task expires"
            worker.dead_letter(message, "expired", detail, exception)
            return
        try:
            worker.retry(message, next_attempt(message, now), delay, exception)
        except ConfigurationError as error:
            # The transport cannot hold this delay (redis+kombu://): requeueing would
            # run the task again at once, in a loop; give it up with the reason instead.
            worker.dead_letter(message, "retry_unsupported", str(error), exception)


def with_retries(middleware: Sequence[Middleware]) -> list[Middleware]:
    """Return ``middleware`` with :class:`Retries` at the end, unless it has one already.

    A worker runs this stack: whatever middleware an app installs (``[]``
    included), failed tasks are retried or dead-lettered, never acked as done.
    """
    return ensure(middleware, Retries)
