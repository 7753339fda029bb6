"""kombu's SQS transport as mqtasks uses it: the endpoint from the transport options,
requeues by visibility, a queue deleted behind a publisher's back made again,
and the compression guard on received messages.
"""

from __future__ import annotations

from typing import Any

import structlog
from botocore.exceptions import ClientError
from kombu.transport import SQS
from kombu.transport.SQS.exceptions import DoesNotExistQueueException

from .._guard import GuardedVirtualMessage

__all__ = ["KombuSqsTransport", "SqsChannel", "is_missing_queue"]

logger = structlog.get_logger("mqtasks.transport")

#: The error codes SQS answers for a queue that does not exist.
_MISSING_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


def is_missing_queue(exc: BaseException) -> bool:
    """Whether ``exc`` is SQS's answer about a queue that does not exist."""
    if isinstance(exc, DoesNotExistQueueException):
        return True
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in _MISSING_CODES
    return False


class SqsChannel(SQS.Channel):  # type: ignore[misc]
    """kombu's SQS channel with the changes mqtasks needs.

    * The endpoint may come from the ``endpoint_url`` transport option (a local
      or compatible server), not only from the URL's host.
    * A requeued message is made visible again at once (visibility 0) instead
      of after ``wait_time_seconds``; kombu never sends it again, so no copy
      is made.
    * A publish to a queue deleted since this connection looked its URL up
      forgets the URL and makes the queue again, once.
    """

    Message = GuardedVirtualMessage

    @property
    def endpoint_url(self) -> str | None:
        explicit = self.transport_options.get("endpoint_url")
        if explicit:
            return str(explicit)
        info = self.conninfo
        if info.hostname is None:
            return None  # boto3 picks the region's endpoint
        scheme = "https" if self.is_secure else "http"
        port = f":{info.port}" if info.port is not None else ""
        return f"{scheme}://{info.hostname}{port}"

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        # kombu's virtual channel assumes every queue exists, and its queue_declare
        # (passive or not) would then create one: a count or a stats reading must
        # not make the queues it reads.
        try:
            self._resolve_queue_url(queue)
        except DoesNotExistQueueException:
            return False
        return True

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        try:
            super()._put(queue, message, **kwargs)
        except ClientError as exc:
            if not is_missing_queue(exc):
                raise
            # Deleted since this connection cached its URL: look it up again
            # (kombu creates it when it is not there).
            self._queue_cache.pop(self.canonical_queue_name(queue), None)
            super()._put(queue, message, **kwargs)

    def _restore(self, message: Any, unwanted_delivery_info: Any = None) -> None:
        info = message.delivery_info
        url = info.get("sqs_queue")
        if not url:
            return
        routing_key = info.get("routing_key")
        name = self.canonical_queue_name(routing_key) if routing_key else None
        try:
            self.sqs(queue=name).change_message_visibility(
                QueueUrl=url, ReceiptHandle=message.delivery_tag, VisibilityTimeout=0
            )
        except ClientError as exc:
            # Not made visible now, it comes back once its visibility timeout ends.
            logger.warning(
                "sqs.requeue_failed",
                queue=routing_key,
                error=exc.response.get("Error", {}).get("Code"),
            )


class KombuSqsTransport(SQS.Transport):  # type: ignore[misc]
    """kombu's SQS transport with ``SqsChannel`` (its channel, above).

    SQS's refusals (``ClientError``) count as channel errors: a consumer that
    meets one reconnects and declares its queues again, instead of its I/O
    thread dying on it. They are not recoverable for a publish, which
    reports them at once.
    """

    Channel = SqsChannel
    channel_errors = (*SQS.Transport.channel_errors, ClientError)
