"""How queues are declared and what a broker tells about them: value types
shared by every transport and by the layers above."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..exceptions import ConfigurationError

__all__ = [
    "DLQ_SUFFIX",
    "PUBLISHED_AT_HEADER",
    "Overflow",
    "QueueSpec",
    "QueueStats",
    "broker_spec",
    "dead_letter_spec",
    "published_at",
]

#: A queue's dead letters go to the queue of the same name with this suffix.
DLQ_SUFFIX = ".dlq"

#: Overflow behaviours of a bounded queue (RabbitMQ's ``x-overflow``).
Overflow = Literal["drop-head", "reject-publish"]


@dataclass(frozen=True)
class QueueSpec:
    """How a queue is declared.

    Args:
        name: Queue name (also the routing key).
        queue_type: ``quorum`` or ``classic`` (RabbitMQ); ``None`` takes the app's setting.
        max_priority: Highest message priority the queue ranks apart; higher
            ones rank with it, as on RabbitMQ. RabbitMQ honours it on classic
            queues (``x-max-priority``, up to 255) and orders no priorities on a
            queue declared without it. ``redis://`` and ``memory://`` order
            priorities 0 to 9 on every queue (higher first; above 9 counts as
            9) and cap them at ``max_priority`` when it is lower;
            ``redis+kombu://`` orders 0 to 9 whatever it says.
        message_ttl: Seconds a message may wait in the queue before the broker drops it.
        max_length: Most ready messages the queue holds (unacknowledged ones do
            not count). A RabbitMQ classic queue holds exactly this many; a
            quorum queue with ``reject-publish`` takes at least one more (as
            many more as are in flight when it fills) before it refuses
            publishes, as RabbitMQ documents.
        overflow: What happens past ``max_length``.
        delivery_limit: Most deliveries of a message that keeps coming back (its
            worker crashed, was killed, lost its connection): when it arrives once
            more, the worker dead-letters it with reason ``delivery_limit``
            instead of running it. ``None`` takes the app's
            :attr:`~mqtasks.config.Settings.delivery_limit`; ``0`` turns the
            limit off for this queue. Counted by ``redis://``, ``memory://``,
            RabbitMQ quorum queues (which also get ``x-delivery-limit``, so the
            broker dead-letters it itself if no worker does) and, by the worker,
            RabbitMQ classic queues; ``redis+kombu://`` refuses an explicit
            limit with a ConfigurationError.
        single_active_consumer: Deliver to one consumer at a time, the others
            waiting to take over (RabbitMQ's ``x-single-active-consumer``):
            ordered tasks' partition queues. Brokers without it
            (``Capabilities.single_active_consumer`` False) refuse it with a
            ConfigurationError; on them, the worker's partition leases keep one
            consumer per partition.
        durable: Whether the queue survives a broker restart (RabbitMQ). A
            non-durable queue is a classic one (``queue_type='classic'``):
            RabbitMQ quorum queues are always durable.
        expires: Seconds the broker keeps the queue once nobody uses it, then
            deletes it with its messages: a queue of one worker (broadcast tasks)
            that goes away with its worker. RabbitMQ: ``x-expires`` (unused: no
            consumer). ``redis://`` and ``memory://``, which keep no consumer
            registry: seconds its bindings to an exchange stay live after the last
            ``bind()`` of them; an emit skips a binding no longer live and removes
            it with the queue. Brokers without it (``Capabilities.expiring_queues``
            False) refuse it with a ConfigurationError.
        dead_letter_queue: The dead-letter queue that takes this queue's dead
            letters (``<other queue>.dlq``), instead of a ``<name>.dlq`` of its
            own, which is then not declared. None: its own.
        replicas: How many nodes of a RabbitMQ cluster hold a copy of a quorum
            queue (``x-quorum-initial-group-size``; capped by the number of
            nodes). ``None`` leaves it to the broker (RabbitMQ 3.10: every node,
            at most 3). An odd number, 3 or 5, survives the loss of 1 or 2
            nodes; a classic queue has no replicas and refuses it with a
            ConfigurationError.
    """

    name: str
    queue_type: Literal["quorum", "classic"] | None = None
    max_priority: int | None = None
    message_ttl: float | None = None
    max_length: int | None = None
    overflow: Overflow = "reject-publish"
    delivery_limit: int | None = None
    single_active_consumer: bool = False
    durable: bool = True
    expires: float | None = None
    dead_letter_queue: str | None = None
    replicas: int | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise ConfigurationError(f"Queue name {self.name!r} must be 1 to 200 characters.")
        if any(c in self.name for c in "#* "):
            raise ConfigurationError(
                f"Queue name {self.name!r} may not contain '#', '*' or spaces "
                "(they are routing-pattern characters)."
            )
        if self.max_priority is not None and not 1 <= self.max_priority <= 255:
            raise ConfigurationError(f"Queue {self.name!r}: max_priority must be 1 to 255.")
        if self.message_ttl is not None and self.message_ttl <= 0:
            raise ConfigurationError(f"Queue {self.name!r}: message_ttl must be positive seconds.")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigurationError(f"Queue {self.name!r}: max_length must be at least 1.")
        if self.delivery_limit is not None and (
            isinstance(self.delivery_limit, bool)
            or not isinstance(self.delivery_limit, int)
            or self.delivery_limit < 0
        ):
            raise ConfigurationError(
                f"Queue {self.name!r}: delivery_limit must be a number of deliveries "
                f"(at least 1), 0 for no limit, or None for the app's default; "
                f"not {self.delivery_limit!r}."
            )
        if self.overflow not in ("drop-head", "reject-publish"):
            raise ConfigurationError(
                f"Queue {self.name!r}: overflow must be 'drop-head' or 'reject-publish'."
            )
        if not isinstance(self.durable, bool):
            raise ConfigurationError(f"Queue {self.name!r}: durable must be True or False.")
        if not self.durable and self.queue_type == "quorum":
            raise ConfigurationError(
                f"Queue {self.name!r}: quorum queues are always durable; a non-durable "
                "queue needs queue_type='classic'."
            )
        if self.expires is not None and (
            isinstance(self.expires, bool)
            or not isinstance(self.expires, (int, float))
            or not self.expires > 0
        ):
            raise ConfigurationError(
                f"Queue {self.name!r}: expires must be positive seconds, not {self.expires!r}."
            )
        if self.replicas is not None and (
            isinstance(self.replicas, bool)
            or not isinstance(self.replicas, int)
            or self.replicas < 1
        ):
            raise ConfigurationError(
                f"Queue {self.name!r}: replicas must be a number of nodes (at least 1; "
                f"3 or 5 in a cluster), or None for the broker's default; not {self.replicas!r}."
            )
        if self.replicas is not None and self.queue_type == "classic":
            raise ConfigurationError(
                f"Queue {self.name!r}: a classic queue lives on one node and has no replicas; "
                "replicate it with queue_type='quorum'."
            )
        dead = self.dead_letter_queue
        if dead is not None and (
            not isinstance(dead, str)
            or not dead.endswith(DLQ_SUFFIX)
            or len(dead) == len(DLQ_SUFFIX)
            or self.name.endswith(DLQ_SUFFIX)
        ):
            raise ConfigurationError(
                f"Queue {self.name!r}: dead_letter_queue must name another queue's "
                f"dead-letter queue ('<queue>{DLQ_SUFFIX}'), not {dead!r}; a dead-letter "
                "queue has none."
            )

    @property
    def dead_letter_name(self) -> str:
        """The dead-letter queue this queue's dead letters go to."""
        return self.dead_letter_queue or self.name + DLQ_SUFFIX


def broker_spec(spec: QueueSpec) -> QueueSpec:
    """Return ``spec`` as a broker declares it: ``delivery_limit=0`` (off) becomes None.

    An inherited limit (None) is enforced by the worker from the delivery count
    alone and never becomes a queue argument: a queue declared before the
    default changed keeps its arguments, so redeclaring it does not fail.
    """
    if spec.delivery_limit == 0:
        return dataclasses.replace(spec, delivery_limit=None)
    return spec


def dead_letter_spec(spec: QueueSpec) -> QueueSpec:
    """Return the spec of ``spec``'s dead-letter queue: same type and replicas, no limits."""
    return QueueSpec(spec.name + DLQ_SUFFIX, queue_type=spec.queue_type, replicas=spec.replicas)


#: The header in which mqtasks writes when a message was published (seconds since
#: the epoch); transports read it to tell how long a queue's head has waited.
PUBLISHED_AT_HEADER = "mqtasks-published-at"


def published_at(headers: Mapping[str, Any]) -> float | None:
    """Return the publishing time ``headers`` carry (seconds since the epoch), or None."""
    value = headers.get(PUBLISHED_AT_HEADER)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class QueueStats:
    """What a broker tells about one queue; ``None`` where it cannot tell.

    Attributes:
        name: The queue.
        exists: False if the broker has no such queue (every count is then ``None``).
        ready: Messages waiting for a consumer.
        unacked: Messages delivered to consumers and not yet acknowledged.
        delayed: Messages the broker holds for a delay (countdowns, retry backoffs).
        delayed_scope: ``queue`` if :attr:`delayed` counts this queue's messages,
            ``vhost`` if the broker cannot attribute them and it is the total held
            for every queue of the virtual host (RabbitMQ's shared delay queues).
        dead_lettered: Entries of the queue's dead-letter queue (``None`` if that
            queue does not exist).
        consumers: Consumers attached to the queue.
        head_published_at: When the oldest ready message was published (seconds
            since the epoch), from its ``mqtasks-published-at`` header or AMQP
            timestamp; ``None`` if the queue is empty or the broker cannot tell.
        publish_rate: Messages published to the queue per second, as the broker
            measures it (RabbitMQ's management API).
        deliver_rate: Messages delivered to consumers per second (same source).
        ack_rate: Messages acknowledged per second (same source).
        redeliver_rate: Messages delivered again per second (same source).
        dead_letter_rate: Messages entering the dead-letter queue per second
            (same source: the publish rate of ``<queue>.dlq``).
    """

    name: str
    exists: bool = True
    ready: int | None = None
    unacked: int | None = None
    delayed: int | None = None
    delayed_scope: Literal["queue", "vhost"] = "queue"
    dead_lettered: int | None = None
    consumers: int | None = None
    head_published_at: float | None = None
    publish_rate: float | None = None
    deliver_rate: float | None = None
    ack_rate: float | None = None
    redeliver_rate: float | None = None
    dead_letter_rate: float | None = None
