"""The whole mqtasks error tree, in a leaf module so every layer can import it.

::

    MQTasksError
    ├── ConfigurationError          bad settings
    │   └── UnknownTransport        unknown broker URL scheme
    ├── TransportError              wraps kombu / py-amqp / redis errors
    │   ├── ConnectionFailed        the broker cannot be reached
    │   ├── QueueNotFound           a queue the worker needs does not exist
    │   └── PublishError            a message was not enqueued
    │       ├── Unroutable          no queue is bound for the routing key
    │       ├── PublishNacked       the broker refused the message
    │       └── BulkPublishError    some messages of a bulk send were not enqueued
    ├── SerializationError
    │   ├── EncodeError             arguments JSON cannot carry, or too large
    │   └── DecodeError             a body or headers the worker refuses
    ├── BackendError                wraps redis / psycopg errors of the state backend
    ├── TaskError
    │   ├── TaskNotRegistered
    │   ├── DuplicateTask
    │   ├── TaskFailed              a result: the task ended failed or dead-lettered
    │   ├── SoftTimeLimitExceeded   raised inside a task past its soft time limit
    │   └── TaskTerminated          the worker stopped a running task (revoked, ...)
    │       └── TimeLimitExceeded   ... because it ran past its hard time limit
    ├── ResultTimeout(TimeoutError) no result within the time given to get()
    ├── MiddlewareError
    │   └── SkipMessage             the only way a middleware vetoes
    └── TaskControl                 raised by task code to steer the worker
        ├── Retry                   run the task again (after ``countdown``)
        └── Reject                  give the message up: straight to the dead letters
    MQTasksWarning(UserWarning)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BackendError",
    "BatchFailures",
    "BulkPublishError",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "DuplicateTask",
    "EncodeError",
    "MQTasksError",
    "MQTasksWarning",
    "MiddlewareError",
    "PublishError",
    "PublishNacked",
    "QueueNotFound",
    "Reject",
    "ResultTimeout",
    "Retry",
    "SerializationError",
    "SkipMessage",
    "SoftTimeLimitExceeded",
    "TaskControl",
    "TaskError",
    "TaskFailed",
    "TaskNotRegistered",
    "TaskTerminated",
    "TimeLimitExceeded",
    "TransportError",
    "UnknownTransport",
    "Unroutable",
]


class MQTasksError(Exception):
    """Base class of every error mqtasks raises."""


class MQTasksWarning(UserWarning):
    """Base class of every warning mqtasks emits."""


class ConfigurationError(MQTasksError):
    """Settings, queue or task options that cannot work."""


class UnknownTransport(ConfigurationError):
    """A broker URL whose scheme no transport handles."""

    def __init__(
        self, scheme: str, supported: tuple[str, ...], suggestion: str | None = None
    ) -> None:
        self.scheme = scheme
        self.supported = supported
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(
            f"Unknown transport {scheme!r}.{hint} Supported URL schemes: {', '.join(supported)}."
        )


class TransportError(MQTasksError):
    """A broker operation failed; the original error is the ``__cause__``."""


class ConnectionFailed(TransportError):
    """The broker could not be reached (after the configured retries)."""


class QueueNotFound(TransportError):
    """A queue that must exist does not."""


class PublishError(TransportError):
    """A message was not enqueued: the task will not run unless published again.

    Attributes:
        task_id: The id of the message that was not enqueued.
    """

    def __init__(self, message: str, *, task_id: str | None = None) -> None:
        self.task_id = task_id
        super().__init__(message)


class Unroutable(PublishError):
    """The broker returned the message: no queue is bound for its routing key."""


class PublishNacked(PublishError):
    """The broker refused the message (for example a full queue with ``reject-publish``)."""


class BulkPublishError(PublishError):
    """Some messages of a bulk send were not enqueued; the others were.

    Attributes:
        sent: Handles of the messages the broker confirmed.
        failed: Task id -> the error for each message that was not confirmed.
    """

    def __init__(self, message: str, *, sent: list[Any], failed: dict[str, BaseException]) -> None:
        self.sent = sent
        self.failed = failed
        super().__init__(message)


class SerializationError(MQTasksError):
    """A message body or its headers could not be encoded or decoded."""


class EncodeError(SerializationError, TypeError):
    """Task arguments that cannot be sent: not JSON, or over the size limit.

    Attributes:
        argument: The offending argument's name (or position), when known.
    """

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        self.argument = argument
        super().__init__(message)


class DecodeError(SerializationError):
    """A received message the worker refuses to turn into a task call.

    Attributes:
        reason: A stable reason code: ``decode_error``, ``content_type``, ``too_large``,
            ``compression_refused`` or ``invalid_headers`` when decoding; the worker also
            reports ``unknown_task``, ``invalid_arguments`` and ``expired`` this way.
        body: The raw body, kept for the dead-letter entry; never logged.
    """

    def __init__(self, reason: str, detail: str, body: bytes = b"") -> None:
        self.reason = reason
        self.detail = detail
        self.body = body
        super().__init__(f"{reason}: {detail}")


class TaskError(MQTasksError):
    """Errors about tasks and the registry."""


class TaskNotRegistered(TaskError, KeyError):
    """No task of that name is registered on the app."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not registered"


class DuplicateTask(TaskError):
    """Two functions registered under one task name."""


class TaskFailed(TaskError):
    """A task's result is a failure: it ended dead-lettered (or revoked), not with a value.

    Raised by ``get()`` on a handle. The task ran in another process, so its
    exception is described, not re-raised.

    Attributes:
        task_id: The id of the task that failed (for a workflow, the failed member).
        state: ``FAILED``, ``DEAD_LETTERED`` or ``REVOKED``.
        reason: The dead-letter reason (``max_retries_exceeded``, ``rejected``...), if any.
        exc_type: The name of the exception the task raised, if any.
        exc_message: Its message.
        traceback: Its formatted traceback (credentials masked), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str,
        state: str,
        reason: str | None = None,
        exc_type: str | None = None,
        exc_message: str | None = None,
        traceback: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.state = state
        self.reason = reason
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        super().__init__(message)


class BatchFailures(TaskError):
    """Raised by a batch task for the items that failed; the others succeeded.

    Each failed item's message is retried or dead-lettered on its own, with its
    own attempt count and reason; the messages of the other items are acked.

    Args:
        failures: The exception of each failed item, by its index in the list the
            function was given.
    """

    def __init__(self, failures: Mapping[int, BaseException]) -> None:
        self.failures: dict[int, BaseException] = dict(failures)
        summary = ", ".join(
            f"{i}: {type(exc).__name__}" for i, exc in sorted(self.failures.items())[:5]
        )
        more = len(self.failures) - 5
        super().__init__(
            f"{len(self.failures)} item(s) of the batch failed ({summary}"
            + (f", and {more} more)" if more > 0 else ")")
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.failures,)


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task that runs past its ``soft_time_limit``, so it can clean up.

    In a thread it arrives as an asynchronous exception (at the next Python
    line the task runs, never inside a blocking C call such as ``time.sleep``);
    an ``async def`` task is cancelled instead (it sees ``CancelledError``) and
    the worker reports this exception. Uncaught, it is a failure like any other:
    retried as the task's retry policy says.
    """

    def __init__(self, message: str = "soft time limit exceeded") -> None:
        super().__init__(message)


class TaskTerminated(TaskError):
    """The worker stopped a running task; its message is dead-lettered with ``reason``.

    Attributes:
        reason: The dead-letter reason (``revoked`` for a terminated revoke).
    """

    reason: str = "terminated"

    def __init__(
        self, message: str = "terminated by the worker", *, reason: str | None = None
    ) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(message)


class TimeLimitExceeded(TaskTerminated):
    """A task ran past its hard ``time_limit``: the worker stopped it and
    dead-lettered its message with reason ``time_limit``."""

    reason: str = "time_limit"

    def __init__(
        self, message: str = "hard time limit exceeded", *, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)


class BackendError(MQTasksError):
    """A state backend operation failed; the original error is the ``__cause__``."""


class ResultTimeout(MQTasksError, TimeoutError):
    """No final result arrived within the time given to ``get()``.

    Attributes:
        task_id: The task waited for.
        timeout: The seconds waited.
    """

    def __init__(self, message: str, *, task_id: str, timeout: float) -> None:
        self.task_id = task_id
        self.timeout = timeout
        super().__init__(message)


class MiddlewareError(MQTasksError):
    """Base class for errors middleware raise on purpose."""


class SkipMessage(MiddlewareError):
    """Raised in ``before_process`` to acknowledge a message without running it."""


class TaskControl(MQTasksError):
    """Raised by task code to steer the worker; logged without a traceback."""


class Retry(TaskControl):
    """Ask for another attempt of this task, within its ``max_retries``.

    Args:
        countdown: Seconds until the next attempt; the task's backoff when None.
        reason: Why, for the log.
    """

    def __init__(self, countdown: float | None = None, reason: str = "retry requested") -> None:
        self.countdown = countdown
        self.reason = reason
        super().__init__(reason)


class Reject(TaskControl):
    """Give the message up: it goes to the dead-letter queue, unretried.

    Args:
        reason: Why, kept in the dead-letter entry.
    """

    def __init__(self, reason: str = "rejected") -> None:
        self.reason = reason
        super().__init__(reason)
