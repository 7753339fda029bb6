"""Idempotency: the middleware that runs a task with ``idempotent=True`` once per task id.

Ticks of periodic schedules (messages with the ``periodic-schedule`` header)
are treated the same way, whatever their task's options.

Delivery is at least once: a message can come again (a worker crashed before
its ack, a publisher sent the same id twice). For tasks with
``idempotent=True``, a worker records the id of a task that succeeded in the
result backend (``done:<id>``, kept ``result_expires`` seconds), after its
result is stored and before the message is acknowledged; a delivery whose id
is recorded is acknowledged without running (``task.duplicate_skipped``).

A crash between the task's side effects and the record leaves the id
unrecorded: that delivery runs again. Side effects must still be idempotent
(see the unique tasks guide).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from ..exceptions import BackendError, SkipMessage
from ..message import PERIODIC_HEADER
from .base import DeferBackoff, Middleware, ensure

if TYPE_CHECKING:
    from ..message import Message
    from ..worker import Worker

__all__ = ["DONE_PREFIX", "Idempotency", "done_key", "with_idempotency"]

logger = structlog.get_logger("mqtasks.idempotency")

#: Put in front of a completed task's id in the backend (which adds its own prefix).
DONE_PREFIX = "done:"


def done_key(task_id: str) -> str:
    """Return the backend key that records task ``task_id`` as completed."""
    return DONE_PREFIX + task_id


class Idempotency(Middleware):
    """Skips a delivery of an ``idempotent=True`` task whose id completed before.

    Workers install it when the app has a result backend, before
    :class:`~mqtasks.middleware.workflow.Workflow` and
    :class:`~mqtasks.middleware.results.Results` (see :func:`with_idempotency`),
    so its ``after_process`` runs once the result is stored and the workflow
    continued: the id is recorded only for a message that is over. A success
    whose result could not be stored (deferred) is not recorded, so its next
    run stores it.

    If the backend cannot be read before the task runs, or the record cannot
    be written after it succeeded, the message is deferred (published again,
    held a short while) rather than run unchecked or acknowledged unrecorded.

    Args:
        defer_delay: Seconds a deferred message is held; doubled for each
            failure in a row (with jitter), up to ``max_defer_delay``.
        max_defer_delay: The longest such hold, in seconds.
    """

    task_options = frozenset({"idempotent"})

    def __init__(self, *, defer_delay: float = 1.0, max_defer_delay: float = 30.0) -> None:
        self._backoff = DeferBackoff(defer_delay, max_defer_delay)
        self.defer_delay = defer_delay
        self.max_defer_delay = max_defer_delay

    def __repr__(self) -> str:
        return (
            f"Idempotency(defer_delay={self.defer_delay}, max_defer_delay={self.max_defer_delay})"
        )

    def before_process(self, worker: Worker, message: Message) -> None:
        """Skip (acknowledge unrun) a message whose id is recorded as completed.

        Raises:
            SkipMessage: The id completed before, or the backend cannot be read
                (then the message is deferred first).
        """
        if not _idempotent(worker, message):
            return
        try:
            done = worker.app.backend.get(done_key(message.id))
        except BackendError as exc:
            self._defer(worker, message, "done_check_failed", exc)
            raise SkipMessage("deferred: the result backend cannot be read") from exc
        if done is not None:
            logger.info(
                "task.duplicate_skipped",
                task_id=message.id,
                task_name=message.task,
                attempt=message.attempt,
                queue=message.queue,
            )
            raise SkipMessage(f"task {message.id} completed before")

    def after_process(
        self,
        worker: Worker,
        message: Message,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Record a succeeded task's id, before its message is acknowledged."""
        # A retry, dead letter or deferral (of the result, of the workflow) is
        # not the end of this id: its next run must not be skipped.
        if exception is not None or worker.decided or not _idempotent(worker, message):
            return
        app = worker.app
        try:
            app.backend.set_if_absent(done_key(message.id), b"1", app.settings.result_expires)
        except BackendError as exc:
            self._defer(worker, message, "done_record_failed", exc)
            return
        self._backoff.reset()

    def _defer(self, worker: Worker, message: Message, reason: str, exc: BackendError) -> None:
        delay = self._backoff.next_delay()
        logger.error(
            "task.idempotency_failed",
            task_id=message.id,
            task_name=message.task,
            reason=reason,
            error=str(exc),
            delay=round(delay, 3),
            note="deferred: the task runs once the delay is over",
        )
        worker.defer(message, delay, reason)


def _idempotent(worker: Worker, message: Message) -> bool:
    # A periodic tick may be published twice (a new leader resends a tick whose
    # publish an earlier one may not have seen confirmed): its id runs once.
    if PERIODIC_HEADER in message.headers:
        return True
    task = worker.app.tasks.get(message.task)
    return task is not None and bool(task.options.get("idempotent", False))


def with_idempotency(middleware: list[Middleware]) -> list[Middleware]:
    """Return ``middleware`` with :class:`Idempotency` at the end, unless it has one already.

    A worker of an app with a result backend runs this stack, then
    :class:`~mqtasks.middleware.workflow.Workflow`,
    :class:`~mqtasks.middleware.results.Results` and
    :class:`~mqtasks.middleware.retries.Retries`.
    """
    return ensure(middleware, Idempotency)
