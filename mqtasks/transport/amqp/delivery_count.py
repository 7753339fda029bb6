"""Delivery counts where the broker only flags a redelivery (RabbitMQ classic queues).

A quorum queue counts the returns of a message in ``x-delivery-count``; a
classic queue only sets ``redelivered``, so a task that kills its worker would
loop there with no end. :class:`RedeliveryCounter` keeps the count in the
message itself: a consumer that receives a redelivered message publishes a copy
whose :data:`HEADER_DELIVERY_COUNT` is one higher, waits for the broker's
confirm, acknowledges the original and lets the copy run when it arrives. Only
redeliveries pay for it (one confirmed publish each); first deliveries cost
nothing.

Publishing the copy before acknowledging the original means a consumer that
dies in between leaves both in the queue: the task may run once more, as after
any crash, and both copies stay counted (the original comes back redelivered
and is counted again), so the limit still holds. The copy goes to the back of
the queue, as redelivered messages may come back in another order anyway. The
header is read only on the queues this module counts, only as a whole number
from 0 to :data:`MAX_DELIVERY_COUNT`, and taken off before the message goes any
further, so retries, dead letters and replays start without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from ..._url import redact
from ...exceptions import MQTasksError
from ..envelope import Envelope
from ..queue import DLQ_SUFFIX, QueueSpec

if TYPE_CHECKING:
    from ..base import Delivery, Transport

__all__ = ["HEADER_DELIVERY_COUNT", "MAX_DELIVERY_COUNT", "RedeliveryCounter", "counted_returns"]

#: Header: deliveries of the message that ended without a settlement (its worker
#: died, lost its connection or handed it back), as mqtasks counted them on a
#: queue whose broker does not (RabbitMQ's ``x-delivery-count`` has the same meaning).
HEADER_DELIVERY_COUNT = "mqtasks-delivery-count"
#: Highest count read from :data:`HEADER_DELIVERY_COUNT`, and written: a message
#: is counted up to this many returns.
MAX_DELIVERY_COUNT = 10_000

logger = structlog.get_logger("mqtasks.transport")


def counted_returns(headers: Mapping[str, Any]) -> int:
    """Return the returns recorded in ``headers``: 0 unless the header is a whole
    number from 0 to :data:`MAX_DELIVERY_COUNT`."""
    value = headers.get(HEADER_DELIVERY_COUNT)
    if type(value) is int and 0 <= value <= MAX_DELIVERY_COUNT:
        return value
    return 0


class RedeliveryCounter:
    """Counts the deliveries of one consumer's queues whose broker does not.

    The consumer passes every delivery through :meth:`receive`; redeliveries
    it holds back in :attr:`pending`, to be counted with :meth:`republish`
    outside the broker's frame callbacks.

    Args:
        transport: Where copies are published (confirmed).
        queues: The queues to count: the consumer's classic queues whose
            ``delivery_limit`` is not 0.
    """

    def __init__(self, transport: Transport, queues: Sequence[QueueSpec]) -> None:
        self.transport = transport
        #: Names of the counted queues (never a dead-letter queue: no limit there).
        self.queues = frozenset(
            s.name for s in queues if s.delivery_limit != 0 and not s.name.endswith(DLQ_SUFFIX)
        )
        #: Redeliveries held back, each with the copy that records one more return.
        self.pending: list[tuple[Delivery, Envelope]] = []

    def receive(self, delivery: Delivery) -> bool:
        """Count ``delivery``; return whether to hand it on now.

        A first delivery gets ``delivery_count`` = recorded returns + 1 and goes
        on. A redelivery is held in :attr:`pending` (False), unless it is one the
        worker refuses unrun anyway (no id, refused by the transport): that one
        goes on uncounted.
        """
        if delivery.queue not in self.queues:
            return True
        headers = delivery.headers
        returns = counted_returns(headers)
        if HEADER_DELIVERY_COUNT in headers:
            delivery.headers = {k: v for k, v in headers.items() if k != HEADER_DELIVERY_COUNT}
        if not delivery.redelivered:
            delivery.delivery_count = returns + 1
            return True
        if delivery.delivery_count is not None:
            return True  # the broker counts this queue after all (x-delivery-count)
        copy = _copy(delivery, min(returns + 1, MAX_DELIVERY_COUNT))
        if copy is None:
            return True
        self.pending.append((delivery, copy))
        return False

    def republish(self, delivery: Delivery, copy: Envelope) -> bool:
        """Publish ``copy`` of held ``delivery`` to its queue and wait for the confirm.

        Returns:
            True once the broker has the copy: acknowledge the original. False if
            it could not be published (logged): the caller hands ``delivery`` on
            with the count it has at least, and its next return is counted
            from the old header again.
        """
        try:
            self.transport.publish(delivery.queue, copy)
        except MQTasksError as exc:
            logger.warning(
                "delivery.count_failed",
                queue=delivery.queue,
                task_id=delivery.message_id,
                delivery_count=copy.headers[HEADER_DELIVERY_COUNT] + 1,
                error=redact(f"{type(exc).__name__}: {exc}")[:500],
                note="runs with this count; its next return is not counted",
            )
            return False
        return True


def _copy(delivery: Delivery, returns: int) -> Envelope | None:
    """``delivery`` as an envelope recording ``returns``; None if the worker refuses it unrun."""
    if delivery.refused or delivery.message_id is None or delivery.content_type is None:
        return None
    headers = dict(delivery.headers)
    headers[HEADER_DELIVERY_COUNT] = returns
    return Envelope(
        body=delivery.body,
        message_id=delivery.message_id,
        headers=headers,
        content_type=delivery.content_type,
        # A worker reads a missing encoding as utf-8; the envelope needs one.
        content_encoding=delivery.content_encoding or "utf-8",
        priority=delivery.priority,
    )
