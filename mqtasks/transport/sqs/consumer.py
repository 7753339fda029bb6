"""The consuming side of ``sqs://``: visibility kept up while a task runs, delays
longer than SQS holds sent on in steps, SQS's receive count as the delivery count,
and the messages of a FIFO queue's group handed on one at a time.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
from botocore.exceptions import ClientError

from ...exceptions import MQTasksError
from ..envelope import Envelope
from ..kombu_consumer import KombuConsumer, KombuDelivery
from .groups import GivenBack, Groups, message_group

if TYPE_CHECKING:
    from kombu.message import Message as KombuMessage

    from ..queue import QueueSpec
    from . import SqsTransport

__all__ = ["DUE_HEADER", "SqsConsumer", "receive_count"]

logger = structlog.get_logger("mqtasks.transport")

#: Header of a message delayed longer than SQS holds one: when it is due
#: (seconds since the epoch). A consumer that receives it earlier sends it on.
DUE_HEADER = "mqtasks-sqs-due-at"

#: A message due within this many seconds runs now rather than going round again.
_DUE_SLACK = 1.0
#: The longest SQS keeps a received message invisible (``ChangeMessageVisibility``).
MAX_VISIBILITY = 43200


def receive_count(raw: KombuMessage) -> int | None:
    """Return SQS's ``ApproximateReceiveCount`` of ``raw`` (this receive included), or None."""
    sqs_message = raw.delivery_info.get("sqs_message") or {}
    value = (sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount")
    if not isinstance(value, (str, int)):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        return None
    return count if count >= 1 else None


def _sqs_id(raw: KombuMessage) -> str | None:
    """SQS's ``MessageId`` of ``raw`` (the same at every receive)."""
    found = (raw.delivery_info.get("sqs_message") or {}).get("MessageId")
    return found if isinstance(found, str) else None


class _Held:
    """A received message whose visibility the consumer keeps up until it is settled."""

    __slots__ = ("extended_at", "raw", "url", "visibility")

    def __init__(self, raw: KombuMessage, url: str, visibility: int) -> None:
        self.raw = raw
        self.url = url
        self.visibility = visibility
        self.extended_at = time.monotonic()


class SqsConsumer(KombuConsumer):
    """A :class:`~mqtasks.transport.kombu_consumer.KombuConsumer` for SQS.

    * Every message held (prefetched or running) has its visibility timeout
      renewed when a third of it is left, from the thread that drains the
      consumer: a task may run longer than the queue's visibility timeout, and
      no other worker receives its message meanwhile. A worker that dies
      stops renewing; SQS hands the message on once the timeout ends.
    * A message received before its :data:`DUE_HEADER` time is published
      again with the delay left (at most SQS's 900 s) and deleted, so SQS
      holds long delays in steps and no worker waits on one.
    * Delivery counts are SQS's ``ApproximateReceiveCount``.
    * On a FIFO queue, a message is handed on only once the one before it of
      its group (``MessageGroupId``) is settled (``Groups``), so
      the worker's threads run a group in order; other groups run in parallel.
      A message held in place for its next attempt (:meth:`hold`) goes back
      to SQS first of its group.
    """

    transport: SqsTransport

    def __init__(
        self, transport: SqsTransport, specs: Sequence[QueueSpec], *, prefetch: int
    ) -> None:
        super().__init__(transport, specs, prefetch=prefetch)
        self._held: dict[str, _Held] = {}
        self._groups = Groups()
        self._given_back = GivenBack()

    def _receive(self, raw: KombuMessage) -> None:
        info = raw.delivery_info
        queue = self._tags.get(info.get("consumer_tag")) or info.get("routing_key") or ""
        due = (raw.headers or {}).get(DUE_HEADER)
        if (
            isinstance(due, (int, float))
            and not isinstance(due, bool)
            and due - time.time() > _DUE_SLACK
        ):
            self._send_on(raw, queue, float(due))
            return
        count = receive_count(raw)
        # Received before (redelivered) by SQS's count; delivered before without the
        # receives that were no delivery (see GivenBack).
        delivered = self._given_back.discount(_sqs_id(raw), count)
        delivery = KombuDelivery(raw, queue, self.generation, delivered)
        delivery.redelivered = delivery.redelivered or (count is not None and count > 1)
        # kombu's producer stamps priority 0 on every message; SQS orders by none.
        delivery.priority = None
        url = info.get("sqs_queue")
        if url:
            self._held[raw.delivery_tag] = _Held(raw, url, self.transport.visibility_of(queue))
            if queue.endswith(".fifo"):
                attributes = (info.get("sqs_message") or {}).get("Attributes")
                key = (queue, message_group(raw.headers or {}, attributes))
                if not self._groups.arrive(key, raw.delivery_tag, delivery):
                    return  # behind the message of its group that is out (kept visible)
        assert self._on_delivery is not None
        self._on_delivery(delivery)

    def _next_of_group(self, delivery: Any) -> None:
        """``delivery`` is settled: hand on the next received message of its group."""
        found = self._groups.settled(delivery.raw.delivery_tag)
        if found is not None and found.generation == self.generation:
            assert self._on_delivery is not None
            self._on_delivery(found)

    def _release_group(self, delivery: Any) -> None:
        """``delivery`` went back to SQS: so do the messages of its group waiting behind
        it, after it (SQS then delivers the group again in its order)."""
        for waiting in self._groups.release(delivery.raw.delivery_tag):
            self._forget(waiting)
            if self._settle(waiting, functools.partial(waiting.raw.reject, requeue=True)):
                self._given_back.add(_sqs_id(waiting.raw))

    def _send_on(self, raw: KombuMessage, queue: str, due: float) -> None:
        """Publish ``raw`` again for the rest of its delay, then delete the received copy."""
        headers = dict(raw.headers or {})
        headers.pop(DUE_HEADER, None)
        envelope = Envelope(
            body=raw.body if isinstance(raw.body, bytes) else bytes(raw.body or b""),
            message_id=raw.properties.get("message_id") or "",
            headers=headers,
            content_type=raw.content_type or "application/json",
            content_encoding=raw.content_encoding or "utf-8",
        )
        left = due - time.time()
        try:
            self.transport.publish(queue, envelope, delay=left)
        except MQTasksError as exc:
            logger.warning("sqs.delay_step_failed", queue=queue, error=str(exc))
            self._settle_raw(lambda: raw.reject(requeue=True))
            return
        logger.debug("sqs.delay_step", queue=queue, message_id=envelope.message_id, left=left)
        self._settle_raw(raw.ack)

    def _settle_raw(self, action: Any) -> None:
        try:
            action()
        except self.connection_errors as exc:
            logger.warning("broker.settle_failed", error=type(exc).__name__)

    def drain(self, timeout: float) -> None:
        """Receive as :class:`KombuConsumer` does, then renew the visibility of held messages."""
        super().drain(timeout)
        self.keep_visible()

    def keep_visible(self) -> None:
        """Renew the visibility timeout of each held message that has a third of it left."""
        if not self._held:
            return
        now = time.monotonic()
        for tag, held in list(self._held.items()):
            if held.raw.acknowledged:
                self._held.pop(tag, None)
                continue
            if now - held.extended_at < held.visibility * 2 / 3:
                continue
            channel = held.raw.channel
            try:
                channel.sqs().change_message_visibility(
                    QueueUrl=held.url, ReceiptHandle=tag, VisibilityTimeout=held.visibility
                )
            except self.connection_errors as exc:
                # A receipt handle SQS no longer takes: the message went back to the
                # queue already (its timeout ended first); keeping it up again is moot.
                logger.warning("sqs.visibility_not_renewed", error=type(exc).__name__)
                self._held.pop(tag, None)
                continue
            held.extended_at = now

    def _forget(self, delivery: Any) -> None:
        self._held.pop(delivery.raw.delivery_tag, None)

    def _done(self, delivery: Any) -> None:
        """``delivery`` is deleted from its queue: hand on the next of its group."""
        self._given_back.forget(_sqs_id(delivery.raw))
        self._next_of_group(delivery)

    def ack(self, delivery: Any) -> bool:
        """Delete the message: it is done. Returns False if it was stale."""
        self._forget(delivery)
        done = super().ack(delivery)
        self._done(delivery)
        return done

    def ack_many(self, deliveries: Sequence[Any]) -> None:
        """Delete finished messages ten at a time (``DeleteMessageBatch``), one request
        per queue and batch instead of one per message; what a batch fails falls back
        to one by one."""
        by_url: dict[str, list[Any]] = {}
        for delivery in deliveries:
            raw = delivery.raw
            url = raw.delivery_info.get("sqs_queue")
            if (
                delivery.generation != self.generation
                or self._conn is None
                or raw.acknowledged
                or not url
            ):
                self.ack(delivery)
                continue
            by_url.setdefault(url, []).append(delivery)
        for url, batch in by_url.items():
            for start in range(0, len(batch), 10):
                self._delete_batch(url, batch[start : start + 10])

    def _delete_batch(self, url: str, batch: Sequence[Any]) -> None:
        if len(batch) == 1:
            self.ack(batch[0])
            return
        channel = batch[0].raw.channel
        entries = [{"Id": str(i), "ReceiptHandle": d.raw.delivery_tag} for i, d in enumerate(batch)]
        try:
            answer = channel.sqs().delete_message_batch(QueueUrl=url, Entries=entries)
        except self.connection_errors as exc:
            logger.warning("sqs.batch_delete_failed", error=type(exc).__name__)
            answer = {"Successful": []}
        done = {int(e["Id"]) for e in answer.get("Successful", [])}
        for i, delivery in enumerate(batch):
            if i not in done:
                self.ack(delivery)
                continue
            self._forget(delivery)
            raw = delivery.raw
            raw.channel.qos.ack(raw.delivery_tag)  # deleted: release its prefetch slot
            raw._state = "ACK"
            self._done(delivery)

    def reject(self, delivery: Any) -> bool:
        """Delete the message without running it (the worker dead-lettered it first)."""
        self._forget(delivery)
        done = super().reject(delivery)
        self._done(delivery)
        return done

    def requeue(self, delivery: Any) -> bool:
        """Make the message visible again at once, for any consumer (on a FIFO queue,
        with the messages of its group received behind it)."""
        self._forget(delivery)
        done = super().requeue(delivery)
        self._release_group(delivery)
        return done

    def hold(self, delivery: Any, delay: float) -> bool:
        """Leave the message in its queue, invisible for ``delay`` s (at most SQS's
        12 hours), then delivered again first of its group; settled as far as this
        consumer goes. Returns False if it was stale.

        The messages of its group received behind it go back at once: SQS
        delivers none of them while it is in flight.
        """
        raw = delivery.raw
        url = raw.delivery_info.get("sqs_queue")
        seconds = min(MAX_VISIBILITY, max(0, math.ceil(delay)))

        def change() -> None:
            try:
                raw.channel.sqs().change_message_visibility(
                    QueueUrl=url, ReceiptHandle=raw.delivery_tag, VisibilityTimeout=seconds
                )
            except ClientError as exc:
                # Its visibility ended already: SQS has it back, to deliver it sooner.
                logger.warning(
                    "sqs.hold_failed",
                    queue=delivery.queue,
                    error=exc.response.get("Error", {}).get("Code"),
                )
            raw.channel.qos.ack(raw.delivery_tag)  # SQS has it again: release its prefetch slot
            raw._state = "REQUEUED"

        self._forget(delivery)
        done = self._settle(delivery, change)
        if done:
            self._given_back.add(_sqs_id(raw))
        self._release_group(delivery)
        return done

    def _drop(self) -> None:
        self._held.clear()
        self._groups.clear()
        super()._drop()

    def close(self) -> None:
        """Close the connection; held messages are made visible again."""
        self._held.clear()
        self._groups.clear()
        super().close()
