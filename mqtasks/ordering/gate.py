"""What a worker thread checks before it runs a message of an ordered task.

:func:`gate` tells the worker thread's ``process()`` whether to run the
message (as which attempt), dead-letter it (a late sequence number, a halted
key) or take it as done because it was sent on through its partition (it
arrived on its base queue). :func:`after_dead_letter` halts the key of a
dead-lettered task whose ``ordering_on_dead_letter`` is ``"halt"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from ..exceptions import MQTasksError
from .keys import HEADER_OKEY, halt_key, resume_key
from .lanes import SEQUENCE_GAP
from .publish import reroute
from .queues import base_queue

if TYPE_CHECKING:
    from ..app import App
    from ..message import Message
    from ..task import Task
    from ..transport.base import Delivery
    from .runtime import OrderedDeliveries

__all__ = ["HALTED", "Gate", "after_dead_letter", "gate"]

logger = structlog.get_logger("mqtasks.ordering")

#: Dead-letter reason of a task whose key is halted by an earlier dead letter.
HALTED = "ordering_halted"

_DETAILS = {
    SEQUENCE_GAP: (
        "a later task of its ordering key ran before it arrived (its number was skipped "
        "after the gap timeout, or arrived after a takeover); not run out of order"
    ),
}


@dataclass(frozen=True)
class Gate:
    """What to do with a message of an ordered task."""

    #: ``run``, ``dead_letter``, ``done`` (sent on through its partition: ack it)
    #: or ``requeue`` (the backend or the broker failed).
    action: Literal["run", "dead_letter", "done", "requeue"]
    #: The message to run (a held retry's next attempt) or dead-letter.
    message: Message
    #: Whether the delivery is in a key lane (a retry or deferral then waits in place).
    in_lane: bool = False
    #: The dead-letter reason and detail.
    reason: str = ""
    detail: str = ""


def gate(
    app: App,
    ordered: OrderedDeliveries | None,
    delivery: Delivery,
    message: Message,
    task: Task[Any, Any],
) -> Gate:
    """Decide what becomes of ``message`` (worker thread); see the module's docstring."""
    in_lane = ordered is not None and ordered.tracks(delivery)
    reason = ordered.verdict(delivery) if ordered is not None else None
    if reason is not None:
        return Gate("dead_letter", message, in_lane, reason, _DETAILS.get(reason, reason))
    ordering = task.ordering
    if ordering is None:
        return Gate("run", message, in_lane)
    # The worker knows its partitions; parsing the name is for a queue it does not order.
    base = ordered.bases.get(delivery.queue) if ordered is not None else None
    if delivery.queue == task.queue and app.transport.native_ordering_refused(task.queue) is None:
        base = task.queue  # ordered by the broker itself (an SQS FIFO queue): no partitions
    if (base or base_queue(app, delivery.queue)) != task.queue:
        try:
            reroute(app, task, message, delivery)
        except MQTasksError as exc:
            logger.error(
                "ordering.reroute_failed",
                task_id=message.id,
                queue=delivery.queue,
                error=str(exc),
                note="requeued; nothing is lost",
            )
            return Gate("requeue", message, in_lane)
        return Gate("done", message, in_lane)
    if ordered is not None:
        resumed = ordered.resumed(delivery)
        if resumed is not None:
            message = resumed
        elif delivery.redelivered:
            message = _kept_attempt(app, delivery, message)
    okey = delivery.headers.get(HEADER_OKEY)
    if ordering.halts and isinstance(okey, str):
        key = halt_key(task.queue, okey)
        try:
            mark = app.backend.get(key)
            if mark is not None and mark.decode() == message.id:
                app.backend.delete(key)
                logger.info("ordering.resumed", task_id=message.id, queue=delivery.queue, okey=okey)
                mark = None
        except MQTasksError as exc:
            logger.error("ordering.halt_unchecked", task_id=message.id, error=str(exc))
            return Gate("requeue", message, in_lane)
        if mark is not None:
            detail = (
                f"task {mark.decode()} of the same ordering key was dead-lettered and the "
                "task says ordering_on_dead_letter='halt': replay that one to resume the key"
            )
            return Gate("dead_letter", message, in_lane, HALTED, detail)
    return Gate("run", message, in_lane)


def _kept_attempt(app: App, delivery: Delivery, message: Message) -> Message:
    """``message`` as the attempt kept for it when it was held as a retry (see
    :meth:`.runtime.OrderedDeliveries.hold_request`), if that is later than its own."""
    try:
        raw = app.backend.get(resume_key(message.id))
    except MQTasksError as exc:
        logger.warning(
            "ordering.attempt_unknown",
            task_id=message.id,
            error=str(exc),
            note=f"runs as attempt {message.attempt}, as redelivered",
        )
        return message
    attempt = int(raw) if raw is not None and raw.isdigit() else 0
    if attempt <= message.attempt:
        return message
    logger.info(
        "ordering.attempt_kept",
        task_id=message.id,
        queue=delivery.queue,
        attempt=attempt,
        note="a retry held in place came back from the broker: it keeps its attempt count",
    )
    return message.copy(attempt=attempt)


def after_dead_letter(app: App, delivery: Delivery, message: Message | None, reason: str) -> None:
    """Halt the key of a dead-lettered task with ``ordering_on_dead_letter="halt"``.

    The first halting task's id is kept (``ordering:halt:<queue>:<okey>``);
    later tasks of the key are dead-lettered with ``ordering_halted`` until it
    is replayed. Late arrivals and halted tasks do not halt the key again.
    """
    if message is None or reason in (SEQUENCE_GAP, HALTED):
        return
    task = app.tasks.get(message.task)
    ordering = getattr(task, "ordering", None)
    okey = delivery.headers.get(HEADER_OKEY)
    if task is None or ordering is None or not ordering.halts or not isinstance(okey, str):
        return
    try:
        app.backend.set_if_absent(
            halt_key(task.queue, okey), message.id.encode(), app.settings.ordering_state_ttl
        )
    except MQTasksError as exc:
        logger.error("ordering.halt_failed", task_id=message.id, okey=okey, error=str(exc))
        return
    logger.warning(
        "ordering.halted",
        task_id=message.id,
        queue=delivery.queue,
        okey=okey,
        reason=reason,
        note="later tasks of the key are dead-lettered (ordering_halted) until it is replayed",
    )
