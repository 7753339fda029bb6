"""Amazon SQS through kombu's SQS transport (boto3): ``sqs://``.

Credentials and region come from boto3's usual sources (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, a profile or a role), or
from the URL (``sqs://KEY:SECRET@``, masked in every log and error). A local
or compatible server is named by the ``endpoint_url`` transport option or
``MQTASKS_SQS_ENDPOINT_URL``.

A publish returns once ``SendMessage`` has answered. Delays up to 900 s are
SQS's ``DelaySeconds``; longer ones go in steps (:mod:`.consumer`). Dead
letters go to ``<queue>.dlq`` (SQS spells the dot ``-``) with their reason in
the headers, as on every broker; delivery limits count SQS's
``ApproximateReceiveCount``. A FIFO queue (name ending ``.fifo``) groups
messages by their ordering key (``MessageGroupId``) and keeps each group in
order: ordered tasks on it need no partitions, a consumer hands on a group's
messages one at a time, and a retry waits in the queue, first of its group
(``groups.py``). SQS has no priorities and no exchanges: asking for them
raises ConfigurationError.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import kombu
from kombu.exceptions import OperationalError

from ..._url import mask_url, redact
from ...exceptions import ConfigurationError, ConnectionFailed, QueueNotFound, TransportError

try:
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "sqs:// needs boto3, which is not installed: pip install 'mqtasks[sqs]'."
    ) from exc
from ..base import (
    DLQ_SUFFIX,
    Capabilities,
    Consumer,
    Delivery,
    QueueSpec,
    QueueStats,
    Taken,
    dead_letter_spec,
)
from ..envelope import Envelope
from ..kombu import KombuTransport
from .channel import KombuSqsTransport, is_missing_queue
from .consumer import DUE_HEADER, SqsConsumer
from .groups import GROUP_HEADER, ORDERING_KEY_HEADER, message_group

__all__ = ["DUE_HEADER", "GROUP_HEADER", "MAX_DELAY", "ORDERING_KEY_HEADER", "SqsTransport"]

#: The longest delay SQS holds a message for (``DelaySeconds``).
MAX_DELAY = 900
#: The environment variable naming the endpoint of a local or compatible server.
ENDPOINT_ENV = "MQTASKS_SQS_ENDPOINT_URL"
#: Seconds a received message stays invisible to other consumers (renewed while held).
DEFAULT_VISIBILITY_TIMEOUT = 60
#: Queue attributes read for a queue's figures.
_COUNTS = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


class SqsTransport(KombuTransport):
    """Amazon SQS (``sqs://``) through kombu's SQS transport.

    Transport options (beside kombu's own, such as ``region``,
    ``queue_name_prefix`` or ``sqs-creation-attributes``):

    * ``endpoint_url``: a local or SQS-compatible server
      (default: ``MQTASKS_SQS_ENDPOINT_URL``, else AWS's endpoint of the region);
    * ``visibility_timeout``: seconds, for the queues mqtasks creates (60);
      a consumer renews the timeout of every message it holds, so tasks may
      run longer; a killed worker's messages come back after it;
    * ``wait_time_seconds``: long polling of each receive (1).
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqs",)
    kombu_transport: Any = KombuSqsTransport
    capabilities = Capabilities(delays=True, delivery_count=True, native_ordering=True)

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        #: Visibility timeout of each queue read at declaration, by queue name.
        self._visibility: dict[str, int] = {}
        #: The endpoint named by the environment when the transport was made.
        self._env_endpoint = os.environ.get(ENDPOINT_ENV)

    # -- connections -------------------------------------------------------

    def connection_options(self) -> dict[str, Any]:
        """kombu's options: short long-polls, no client-side sleep, plain JSON bodies."""
        options: dict[str, Any] = {
            "wait_time_seconds": 1,
            "polling_interval": 0,
            "visibility_timeout": DEFAULT_VISIBILITY_TIMEOUT,
            "sqs_base64_encoding": False,
            # The receive count is the delivery count; the group orders FIFO queues.
            "fetch_message_attributes": ["ApproximateReceiveCount", "MessageGroupId"],
            # botocore's defaults (60 s timeouts, retries) would outlast a publish timeout.
            "client-config": {
                "connect_timeout": self.connect_timeout,
                "read_timeout": max(10.0, self.publish_timeout),
                "retries": {"mode": "standard", "max_attempts": 3},
            },
        }
        if self._env_endpoint:
            options["endpoint_url"] = self._env_endpoint
        options.update(self.transport_options)
        return options

    @property
    def visibility_timeout(self) -> int:
        """Seconds of the ``visibility_timeout`` transport option (queues mqtasks creates)."""
        value = self.connection_options()["visibility_timeout"]
        try:
            seconds = int(float(value))
        except (TypeError, ValueError):
            seconds = 0
        if not 10 <= seconds <= 43200:
            raise ConfigurationError(
                f"transport_options visibility_timeout must be 10 to 43200 seconds on sqs://, "
                f"not {value!r}: the consumer renews it while a task runs, and a killed "
                "worker's messages come back after it."
            )
        wait = self.connection_options()["wait_time_seconds"]
        if isinstance(wait, (int, float)) and seconds / 3 < wait + 2:
            # A message is renewed when a third of its timeout is left, by the thread
            # that also long-polls: a poll must end well within that third.
            raise ConfigurationError(
                f"transport_options visibility_timeout ({seconds} s) must be at least three "
                f"times wait_time_seconds ({wait} s) plus 6 s on sqs://: the worker renews "
                "held messages between long polls. Raise visibility_timeout or lower "
                "wait_time_seconds."
            )
        return seconds

    def visibility_of(self, queue: str) -> int:
        """Return the visibility timeout of ``queue`` as read when it was declared."""
        return self._visibility.get(queue, self.visibility_timeout)

    @property
    def recovery_time(self) -> float:
        """Seconds until SQS hands back what a killed consumer held: the visibility timeout."""
        return float(max([self.visibility_timeout, *self._visibility.values()]))

    @contextlib.contextmanager
    def _client(self, what: str, queue: str | None = None) -> Iterator[Any]:
        """A channel of a new connection, with SQS's errors translated."""
        with _translate(self.url, what, queue), self.connection() as conn:
            yield conn.default_channel

    # -- topology ----------------------------------------------------------

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        """Refuse what SQS cannot honour (priorities, limits, expiring queues)."""
        if spec.max_priority is not None:
            raise ConfigurationError(
                f"Queue {spec.name!r}: sqs:// has no priorities, so it cannot honour "
                "max_priority. Remove it, or send urgent work to a queue of its own with "
                "workers of its own."
            )
        return super().queue_arguments(spec)

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Create the queues and their dead-letter queues that do not exist yet.

        A queue that exists keeps its attributes (its visibility timeout is read
        and renewed as it is).

        Raises:
            ConfigurationError: An option SQS cannot honour.
            ConnectionFailed: SQS cannot be reached.
            TransportError: SQS refused.
        """
        todo = [s for s in specs if s.name not in self._declared]
        if not todo:
            return
        for spec in todo:
            self.queue_arguments(spec)
        dead = [
            dead_letter_spec(s)
            for s in todo
            if not s.name.endswith(DLQ_SUFFIX) and s.dead_letter_queue is None
        ]
        visibility = self.visibility_timeout
        with self._client("declare queues") as channel:
            client = channel.sqs()
            for spec in [*todo, *dead]:
                name = channel.canonical_queue_name(spec.name)
                try:
                    url = client.get_queue_url(QueueName=name)["QueueUrl"]
                except ClientError as exc:
                    if not is_missing_queue(exc):
                        raise
                    attributes = {"VisibilityTimeout": str(visibility)}
                    if name.endswith(".fifo"):
                        attributes["FifoQueue"] = "true"
                    attributes.update(
                        channel.transport_options.get("sqs-creation-attributes") or {}
                    )
                    url = client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
                attrs = client.get_queue_attributes(
                    QueueUrl=url, AttributeNames=["VisibilityTimeout"]
                )["Attributes"]
                self._visibility[spec.name] = int(attrs.get("VisibilityTimeout", visibility))
        self._declared.update(s.name for s in [*todo, *dead])

    # -- publishing --------------------------------------------------------

    def delay_refused(self, queue: str) -> str | None:
        """A FIFO queue cannot hold one message for a delay (SQS delays FIFO queues
        as a whole); a standard queue can, for up to 15 minutes at a time."""
        if queue.endswith(".fifo"):
            return (
                f"the FIFO queue {queue!r} cannot hold one message for a delay (SQS delays "
                "FIFO queues as a whole)"
            )
        return super().delay_refused(queue)

    def native_ordering_refused(self, queue: str) -> str | None:
        """A FIFO queue keeps each message group in order; a standard queue keeps none."""
        if queue.endswith(".fifo"):
            return None
        return (
            f"the standard SQS queue {queue!r} keeps no order: give ordered tasks a FIFO "
            f"queue, whose name ends in .fifo (@app.task(queue={queue + '.fifo'!r}, "
            "ordering_key=...))"
        )

    def hold_in_place(self, consumer: Consumer, delivery: Delivery, delay: float) -> None:
        """Leave ``delivery`` in its FIFO queue, invisible for ``delay`` s (at most 12
        hours): SQS then delivers it again first of its group, whose later messages
        wait meanwhile.

        Raises:
            ConfigurationError: Not a FIFO queue, or not this transport's consumer.
        """
        if not isinstance(consumer, SqsConsumer):
            raise ConfigurationError(f"{consumer!r} is not a consumer of sqs://.")
        if self.native_ordering_refused(delivery.queue) is not None:
            super().hold_in_place(consumer, delivery, delay)
        consumer.hold(delivery, delay)

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Send ``envelope`` to ``queue``; return once ``SendMessage`` has answered.

        A delay over :data:`MAX_DELAY` is held in steps: the message carries
        when it is due, and a consumer that receives it earlier sends it on.

        Raises:
            ConfigurationError: A priority (SQS has none), or a delay on a FIFO queue
                (SQS delays whole FIFO queues only).
            PublishError: SQS did not take it.
        """
        if envelope.priority is not None:
            raise ConfigurationError(
                f"Task {envelope.message_id}: sqs:// has no priorities, so it cannot honour "
                f"priority={envelope.priority}. Send it without priority, or route urgent "
                "work to a queue of its own."
            )
        step: int | None = None
        if delay is not None and delay > 0:
            if queue.endswith(".fifo"):
                raise ConfigurationError(
                    f"Task {envelope.message_id}: the FIFO queue {queue!r} cannot hold one "
                    "message for a delay (SQS delays FIFO queues as a whole). Send it without "
                    "countdown/eta, and give its task retry_backoff=0, or use a standard queue."
                )
            if delay > MAX_DELAY:
                due = time.time() + delay
                envelope = Envelope(
                    body=envelope.body,
                    message_id=envelope.message_id,
                    headers={**envelope.headers, DUE_HEADER: due},
                    content_type=envelope.content_type,
                    content_encoding=envelope.content_encoding,
                )
                step = MAX_DELAY
            else:
                step = math.ceil(delay)
        self._local.delay_seconds = step
        try:
            self._publish_pooled("", queue, envelope, timeout, repr(queue))
        finally:
            self._local.delay_seconds = None

    def _publish(
        self,
        producer: kombu.Producer,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        deadline: float,
        *,
        mandatory: bool | None = None,
    ) -> None:
        properties: dict[str, Any] = {}
        step = getattr(self._local, "delay_seconds", None)
        if step:
            properties["delay_seconds"] = step
        if routing_key.endswith(".fifo"):
            properties["MessageGroupId"] = message_group(envelope.headers)
            # One id per publish call: kombu's retries of this call are deduplicated by
            # SQS, while a retry of the task (the same message id) is a new message.
            properties["MessageDeduplicationId"] = uuid.uuid4().hex
        if properties:
            producer = _WithProperties(producer, properties)
        super()._publish(producer, exchange, routing_key, envelope, deadline, mandatory=mandatory)

    # -- consuming ---------------------------------------------------------

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        """Return a consumer of ``specs`` that keeps held messages invisible to others."""
        return SqsConsumer(self, specs, prefetch=prefetch)

    def delivery_count(self, raw: Any) -> int | None:
        """Return SQS's ``ApproximateReceiveCount`` of ``raw``."""
        from .consumer import receive_count

        return receive_count(raw)

    # -- reading queues ----------------------------------------------------

    def _attributes(self, channel: Any, name: str) -> dict[str, str]:
        """Return the counts of queue ``name``.

        Raises:
            QueueNotFound: The queue does not exist.
        """
        client = channel.sqs()
        try:
            url = client.get_queue_url(QueueName=channel.canonical_queue_name(name))["QueueUrl"]
            attrs: dict[str, str] = client.get_queue_attributes(
                QueueUrl=url, AttributeNames=list(_COUNTS)
            )["Attributes"]
        except ClientError as exc:
            if is_missing_queue(exc):
                raise QueueNotFound(f"Queue {name!r} does not exist.") from exc
            raise
        return attrs

    def _count(self, conn: kombu.Connection, specs: Sequence[QueueSpec]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for spec in specs:
            with _translate(self.url, "count messages", spec.name):
                attrs = self._attributes(conn.default_channel, spec.name)
            counts[spec.name] = int(attrs.get("ApproximateNumberOfMessages", 0))
        return counts

    def delayed_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        """Return SQS's ``ApproximateNumberOfMessagesDelayed`` per queue (absent queues left out)."""
        found: dict[str, int] = {}
        with self._client("count delayed messages") as channel:
            for spec in specs:
                try:
                    attrs = self._attributes(channel, spec.name)
                except QueueNotFound:
                    continue
                found[spec.name] = int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
        return found

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Return SQS's approximate counts: ready, in flight (unacked), delayed, dead-lettered.

        SQS counts eventually: a figure may lag a change by a few seconds.
        """
        stats: dict[str, QueueStats] = {}
        with self._client("read queue attributes") as channel:
            for spec in specs:
                try:
                    attrs = self._attributes(channel, spec.name)
                except QueueNotFound:
                    stats[spec.name] = QueueStats(spec.name, exists=False)
                    continue
                dead: int | None = None
                if not spec.name.endswith(DLQ_SUFFIX):
                    try:
                        dlq = self._attributes(channel, spec.dead_letter_name)
                    except QueueNotFound:
                        dead = None
                    else:
                        dead = sum(int(dlq.get(k, 0)) for k in _COUNTS)
                stats[spec.name] = QueueStats(
                    spec.name,
                    ready=int(attrs.get("ApproximateNumberOfMessages", 0)),
                    unacked=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
                    delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
                    dead_lettered=dead,
                )
        return stats

    @contextlib.contextmanager
    def take(self, queue: str) -> Iterator[Iterator[Taken]]:
        """Take the messages of ``queue`` one by one (see :meth:`mqtasks.transport.kombu.KombuTransport.take`).

        Raises:
            QueueNotFound: The queue does not exist (kombu would create it).
        """
        with self._client(f"read {queue!r}", queue) as channel:
            if not channel._has_queue(queue):
                raise QueueNotFound(f"Queue {queue!r} does not exist.")
        with super().take(queue) as messages:
            yield messages

    def purge(self, specs: Sequence[QueueSpec]) -> int:
        """Remove all ready messages (SQS's ``PurgeQueue``; AWS allows one a minute per queue).

        Returns how many SQS counted ready just before (its count is approximate).
        """
        total = 0
        with self._client("purge") as channel:
            client = channel.sqs()
            for spec in specs:
                try:
                    attrs = self._attributes(channel, spec.name)
                except QueueNotFound:
                    continue
                total += int(attrs.get("ApproximateNumberOfMessages", 0))
                url = client.get_queue_url(QueueName=channel.canonical_queue_name(spec.name))
                client.purge_queue(QueueUrl=url["QueueUrl"])
        return total

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete queues (absent ones are skipped)."""
        with self._client("delete queues") as channel:
            client = channel.sqs()
            for spec in specs:
                self._declared.discard(spec.name)
                self._visibility.pop(spec.name, None)
                name = channel.canonical_queue_name(spec.name)
                try:
                    url = client.get_queue_url(QueueName=name)["QueueUrl"]
                    client.delete_queue(QueueUrl=url)
                except ClientError as exc:
                    if not is_missing_queue(exc):
                        raise
                channel._queue_cache.pop(name, None)


class _WithProperties:
    """A kombu producer whose publishes carry SQS properties (kombu's SQS channel reads
    ``delay_seconds``, ``MessageGroupId`` and ``MessageDeduplicationId`` there)."""

    def __init__(self, producer: kombu.Producer, properties: dict[str, Any]) -> None:
        self._producer = producer
        self._properties = properties

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        return self._producer.publish(*args, **kwargs, **self._properties)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


@contextlib.contextmanager
def _translate(url: str, what: str, queue: str | None = None) -> Iterator[None]:
    """Turn boto3's errors into mqtasks' transport errors, credentials masked."""
    try:
        yield
    except (TransportError, ConfigurationError):
        raise
    except ClientError as exc:
        if queue is not None and is_missing_queue(exc):
            raise QueueNotFound(f"Queue {queue!r} does not exist.") from exc
        error = exc.response.get("Error", {})
        raise TransportError(
            redact(
                f"{what}: SQS at {mask_url(url)} refused ({error.get('Code')}: "
                f"{error.get('Message')})"
            )
        ) from exc
    except (BotoCoreError, OSError, OperationalError) as exc:
        raise ConnectionFailed(
            redact(f"{what}: cannot reach SQS at {mask_url(url)} ({type(exc).__name__}: {exc})")
        ) from exc
