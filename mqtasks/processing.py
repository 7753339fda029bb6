"""Processing one delivery in a worker thread: decode it, refuse bad input, run the
task between the middleware hooks, and choose its settlement.

A :class:`~mqtasks.worker.Worker` calls :func:`process` for each delivery, in
a context of its own; the deciding middleware settles the message through
the worker (:meth:`~mqtasks.worker.Worker.retry`,
:meth:`~mqtasks.worker.Worker.dead_letter`, :meth:`~mqtasks.worker.Worker.defer`),
which record their decision in the :class:`Job` of that context.
"""

from __future__ import annotations

import contextvars
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from ._url import redact
from .deadletter import dead_letter_envelope, publish_dead_letter
from .events import HEADER_EVENT, event_of
from .exceptions import DecodeError, MQTasksError, Reject, Retry, SkipMessage, TaskTerminated
from .message import Message, _current
from .ordering.gate import after_dead_letter as after_ordered_dead_letter
from .ordering.gate import gate
from .ordering.queues import base_queue
from .task import refuse_awaitable
from .transport.base import Delivery

if TYPE_CHECKING:
    from .worker import Worker

__all__ = [
    "ABANDONED",
    "ACK",
    "BATCHED",
    "DROP",
    "HOLD",
    "REJECT",
    "REQUEUE",
    "Job",
    "batch_item_problem",
    "conclude",
    "current_job",
    "dead_letter",
    "job_or_none",
    "log_fields",
    "process",
    "reject",
]

logger = structlog.get_logger("mqtasks.worker")

#: Settlements of a delivery.
ACK, REJECT, REQUEUE, DROP = "ack", "reject", "requeue", "drop"
#: Not a settlement: an ordered delivery stays unacked and runs again after a delay.
HOLD = "hold"
#: Not a settlement: the worker gave up the thread running it and settled it already.
ABANDONED = "abandoned"
#: Not a settlement: held in a batch (``mqtasks.execution.batch``), settled once it has run.
BATCHED = "batched"


@dataclass(slots=True)
class Job:
    """The delivery a worker thread runs, and its settlement once decided."""

    delivery: Delivery
    action: str | None = None
    #: Whether the delivery is in a key lane of ordered tasks: a retry or
    #: deferral then waits in place (:data:`HOLD`) instead of being republished.
    in_lane: bool = False


#: The job of the message running in this context (one context per message).
_job: contextvars.ContextVar[Job | None] = contextvars.ContextVar("mqtasks_job", default=None)


def job_or_none() -> Job | None:
    """Return the job of the message processed in this context, if any."""
    return _job.get()


def current_job() -> Job:
    """Return the job of the message processed in this context.

    Raises:
        RuntimeError: No message is processed here.
    """
    job = _job.get()
    if job is None:
        raise RuntimeError(
            "Worker.retry(), dead_letter() and defer() are for after_process hooks "
            "(defer() also for before_process), while the worker processes a message."
        )
    return job


def log_fields(delivery: Delivery, message: Message | None) -> dict[str, Any]:
    """The task fields of a log event about ``delivery`` (``message``: None if undecodable)."""
    return {
        "task_id": delivery.message_id,
        "task_name": message.task if message else None,
        "attempt": message.attempt if message else None,
        "queue": delivery.queue,
    }


def process(worker: Worker, delivery: Delivery) -> str:
    """Run ``delivery`` (worker thread, in a context of its own); return its settlement.

    :data:`ABANDONED` when the worker gave the task up (past its hard time
    limit, or terminated) and settled the message itself.
    :data:`BATCHED` when a batch task's message joined its batch (settled
    once the batch has run, see ``mqtasks.execution.batch``).
    """
    job = Job(delivery)
    _job.set(job)
    app = worker.app
    over = _over_delivery_limit(worker, delivery)
    if over is not None:
        return over
    try:
        message = Message.from_delivery(delivery, max_size=app.settings.max_message_size)
    except DecodeError as exc:
        return reject(worker, delivery, None, exc.reason, exc.detail)
    if HEADER_EVENT in delivery.headers:
        # An event runs with the subscriber of the queue it came from, whatever its name.
        event = event_of(delivery.headers)
        if event is None:
            return reject(worker, delivery, message, "invalid_headers", f"invalid {HEADER_EVENT}")
        subscription = app.subscriptions.for_queue(delivery.queue)
        if subscription is None:
            detail = f"event {event!r}: no subscriber of queue {delivery.queue!r} in this app"
            return reject(worker, delivery, message, "unknown_subscriber", detail)
        task = subscription.task
        # The subscriber's priority (an event is emitted without one) goes with
        # its retries, as a task's own priority goes with its messages.
        priority = task.priority if task.priority is not None else message.priority
        message = message.copy(
            task=task.name, priority=priority, headers={**message.headers, HEADER_EVENT: event}
        )
    else:
        found = app.tasks.get(message.task)
        if found is None:
            detail = f"no task named {message.task!r}"
            return reject(worker, delivery, message, "unknown_task", detail)
        task = found
    ordered = worker._ordering
    if ordered is not None or task.ordering is not None:
        gated = gate(app, ordered, delivery, message, task)
        job.in_lane = gated.in_lane
        if gated.action == "dead_letter":
            return dead_letter(worker, delivery, gated.message, gated.reason, gated.detail)
        if gated.action != "run":
            return ACK if gated.action == "done" else REQUEUE
        message = gated.message
    if message.is_expired():
        return reject(worker, delivery, message, "expired", f"expired at {message.expires_at}")
    if task.flow.batched and (problem := batch_item_problem(message)) is not None:
        return reject(worker, delivery, message, "invalid_arguments", problem)
    try:
        task.check_arguments(message.args, message.kwargs)
    except TypeError as exc:
        return reject(worker, delivery, message, "invalid_arguments", str(exc))
    revocations = worker.revocations
    if revocations is not None and revocations.is_revoked(message.id):
        return dead_letter(worker, delivery, message, "revoked", "revoked before it ran")
    if task.flow.batched:  # this thread is free; settled once its batch has run
        return worker._batches.add(task, message, job)
    hooks = worker._hooks
    try:
        hooks.before_process(worker, message)
    except SkipMessage:
        return job.action or ACK  # a hook that deferred the message decided already
    _current.set(message)
    result, error, abandoned = worker._execution.execute(job, message, task)
    if abandoned:  # stopped past its hard limit: the worker settled it meanwhile
        return ABANDONED
    return conclude(worker, delivery, message, result, error)


def conclude(
    worker: Worker,
    delivery: Delivery,
    message: Message,
    result: Any,
    error: BaseException | None,
) -> str:
    """Report how the task ended, run the ``after_process`` hooks; return the settlement.

    Runs in the message's context: on its worker thread, or, for a thread the
    worker gave up, on the watchdog's, in a copy of the context the task started in.
    """
    job = current_job()
    refused = refuse_awaitable(result, message.task) if result is not None else None
    if refused is not None:
        error, result = refused, None
    if error is not None:
        _report(worker, delivery, message, error)
    if refused is not None:  # nothing can iterate over it: never retried
        job.action = dead_letter(
            worker, delivery, message, "async_unsupported", str(refused), refused
        )
    elif isinstance(error, TaskTerminated):  # its hard time limit, or Worker.terminate()
        job.action = dead_letter(worker, delivery, message, error.reason, str(error), error)
    # The deciding middleware (Retries) comes last in the stack, so it retries
    # or dead-letters before the others (Results) see the outcome; a decision
    # taken by then (a retry, a dead letter, a deferral) is the settlement.
    worker._hooks.after_process(worker, message, result, error)
    if job.action is not None:
        return job.action
    if error is None:
        return ACK
    # The deciding hook failed (logged as middleware.hook_failed).
    logger.error("task.undecided", **log_fields(delivery, message), note="requeued")
    return REQUEUE


def batch_item_problem(message: Message) -> str | None:
    """Why ``message`` is not one item of a batch task (None: it is): its message
    carries exactly one positional argument, the item."""
    if len(message.args) == 1 and not message.kwargs:
        return None
    return (
        f"task {message.task!r} consumes batches: each message carries one item as its "
        f"only positional argument ({message.task}.delay(item)), not "
        f"{len(message.args)} positional and {len(message.kwargs)} keyword argument(s)"
    )


def _over_delivery_limit(worker: Worker, delivery: Delivery) -> str | None:
    """Dead-letter a message delivered more often than its queue allows, unrun."""
    limit = worker.delivery_limits.get(delivery.queue)
    count = delivery.delivery_count
    if limit is None or count is None or count <= limit:
        return None
    try:
        message = Message.from_delivery(delivery, max_size=worker.app.settings.max_message_size)
    except DecodeError:
        message = None
    detail = (
        f"delivered {count} times, over the queue's limit of {limit}: its worker "
        "crashed, was killed or lost its connection each time (the task may be what "
        "kills it); not run again"
    )
    return reject(worker, delivery, message, "delivery_limit", detail)


def reject(
    worker: Worker, delivery: Delivery, message: Message | None, reason: str, detail: str
) -> str:
    """Bad input: log it, dead-letter it with its reason, never run or requeue it."""
    logger.error("message.rejected", reason=reason, detail=detail, **log_fields(delivery, message))
    if worker.collect_errors:
        worker.errors.append((message, DecodeError(reason, detail)))
    worker._hooks.after_reject(worker, message, reason)
    return dead_letter(worker, delivery, message, reason, detail)


def dead_letter(
    worker: Worker,
    delivery: Delivery,
    message: Message | None,
    reason: str,
    detail: str,
    exc: BaseException | None = None,
) -> str:
    """Publish the original message to ``<queue>.dlq`` with the reason, confirmed.

    Returns the settlement: ack once the dead-letter queue has it; requeue
    if it could not be stored (a broker problem: the message must not be lost).
    """
    app = worker.app
    envelope = dead_letter_envelope(
        delivery, message, reason=reason, detail=detail, exc=exc, worker=worker._origin
    )
    try:
        # A broadcast queue's dead letters go to its task queue's dead-letter queue.
        # And a partition's (ordered tasks) to its base queue's.
        home = worker.broadcast.home(delivery.queue)
        publish_dead_letter(app.transport, app.queue(base_queue(app, home) or home), envelope)
    except MQTasksError as error:
        logger.error(
            "message.dead_letter_failed",
            **log_fields(delivery, message),
            reason=reason,
            error=str(error),
            note="requeued instead; nothing is lost",
        )
        return REQUEUE
    logger.warning("task.dead_lettered", **log_fields(delivery, message), reason=reason)
    after_ordered_dead_letter(app, delivery, message, reason)
    worker._hooks.after_dead_letter(worker, message, reason)
    return ACK


def _report(worker: Worker, delivery: Delivery, message: Message, exc: BaseException) -> None:
    """Log how the task ended, before the deciding middleware acts on it."""
    if isinstance(exc, Reject):
        logger.info("task.rejected", **log_fields(delivery, message), reason=exc.reason)
        worker._hooks.after_reject(worker, message, "rejected")
    elif not isinstance(exc, Retry):
        logger.error(
            "task.failed",
            **log_fields(delivery, message),
            error=redact(f"{type(exc).__name__}: {exc}"),
            traceback=redact("".join(traceback.format_exception(exc)))[-8192:],
        )
        if worker.collect_errors:
            worker.errors.append((message, exc))
