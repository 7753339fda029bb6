"""The settlements the deciding middleware chooses: the next attempt (:func:`retry`)
or a deferral (:func:`defer`), published before the message is acked; for an
ordered task, a hold in place instead.

The bodies of :meth:`Worker.retry() <mqtasks.worker.Worker.retry>` and
:meth:`Worker.defer() <mqtasks.worker.Worker.defer>`, which document them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from .._url import redact
from ..events import wire_message
from ..exceptions import ConfigurationError, MQTasksError
from ..middleware.retries import BROKER_DEATH_HEADERS
from ..processing import ACK as _ACK
from ..processing import HOLD as _HOLD
from ..processing import REQUEUE as _REQUEUE
from ..processing import Job, current_job, log_fields

if TYPE_CHECKING:
    from ..message import Message
    from ..worker import Worker

__all__ = ["ROUTINE_DEFERRALS", "defer", "retry"]

logger = structlog.get_logger("mqtasks.worker")

#: Deferrals that come once per waiting task, at high volume under a rate limit,
#: a concurrency limit or an open circuit: logged at debug (their middleware
#: reports the limit or the circuit itself), the others at info.
ROUTINE_DEFERRALS = frozenset(
    {"rate_limited", "concurrency_limited", "circuit_open", "circuit_half_open"}
)


def retry(
    worker: Worker, message: Message, attempt: Message, delay: float, exception: BaseException
) -> None:
    """Publish ``attempt`` held ``delay`` s, then ack ``message`` (see ``Worker.retry``)."""
    job = current_job()
    try:
        if not _hold(worker, job, attempt, delay):
            envelope = wire_message(attempt).to_envelope(job.delivery.body)
            worker.app.transport.publish(message.queue, envelope, delay=delay)
    except ConfigurationError:
        raise
    except MQTasksError as error:
        logger.error(
            "task.retry_failed",
            **log_fields(job.delivery, message),
            error=str(error),
            note="requeued instead; nothing is lost",
        )
        job.action = _REQUEUE
        return
    logger.info(
        "task.retried",
        **log_fields(job.delivery, message),
        delay=round(delay, 3),
        **({"held_in_place": True} if job.action == _HOLD else {}),
        error=redact(f"{type(exception).__name__}: {exception}")[:500],
    )
    worker._hooks.after_retry(worker, message, delay, exception)
    job.action = _HOLD if job.action == _HOLD else _ACK


def _hold(worker: Worker, job: Job, attempt: Message, delay: float) -> bool:
    """Hold an ordered delivery in place (unacked) to run as ``attempt`` after ``delay`` s."""
    if not job.in_lane or worker._ordering is None:
        return False
    worker._ordering.hold_request(job.delivery, delay, attempt)
    job.action = _HOLD
    return True


def defer(worker: Worker, message: Message, delay: float, reason: str) -> None:
    """Publish ``message`` again held ``delay`` s, then ack it (see ``Worker.defer``)."""
    job = current_job()
    headers = {k: v for k, v in message.headers.items() if not k.startswith(BROKER_DEATH_HEADERS)}
    try:
        if not _hold(worker, job, message, delay):
            wire = wire_message(message.copy(headers=headers)).to_envelope(job.delivery.body)
            worker.app.transport.publish(message.queue, wire, delay=delay)
    except MQTasksError as error:  # ConfigurationError too: no delays on this transport
        logger.error(
            "task.defer_failed",
            **log_fields(job.delivery, message),
            reason=reason,
            error=str(error),
            note="requeued instead; nothing is lost",
        )
        job.action = _REQUEUE
        return
    log = logger.debug if reason in ROUTINE_DEFERRALS else logger.info
    log(
        "task.deferred",
        **log_fields(job.delivery, message),
        reason=reason,
        delay=round(delay, 3),
        **({"held_in_place": True} if job.action == _HOLD else {}),
    )
    job.action = _HOLD if job.action == _HOLD else _ACK
