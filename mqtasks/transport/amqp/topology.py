"""What mqtasks declares on RabbitMQ besides the queues themselves, and how it reads them.

Each queue gets a dead-letter queue behind one shared dead-letter exchange,
and its arguments (queue type, limits, priorities). Delays are held by a
ladder of TTL queues shared by the whole vhost. :class:`~mqtasks.transport.amqp.AmqpTransport`
calls these functions from its topology hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import kombu
import structlog

from ...exceptions import ConfigurationError
from ..base import DLQ_SUFFIX, QueueSpec, QueueStats
from ..errors import is_not_found, translate_errors
from . import management

if TYPE_CHECKING:
    from ..kombu import KombuTransport

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "DELAY_DELIVERY_EXCHANGE",
    "DELAY_LEVELS",
    "MAX_DELAY",
    "bind_queues",
    "declare_topology",
    "delay_routing_key",
    "queue_arguments",
    "queue_stats",
    "route",
]

logger = structlog.get_logger("mqtasks.transport")

#: Direct exchange routing each queue's dead letters to ``<queue>.dlq``.
DEAD_LETTER_EXCHANGE = "mqtasks.dlx"
#: Levels of the delay ladder: level k holds a message 2**k ms; 32 levels reach 49 days.
DELAY_LEVELS = 32
#: Topic exchange where delayed messages leave the ladder towards their queue.
DELAY_DELIVERY_EXCHANGE = "mqtasks.delayed"
#: Longest delay the ladder can hold, in seconds.
MAX_DELAY = (2**DELAY_LEVELS - 1) / 1000


def _level(k: int) -> str:
    return f"mqtasks.delay.{k}"


def delay_routing_key(delay: float, queue: str) -> str:
    """Routing key that walks a message through the ladder for ``delay`` seconds.

    One word per level, most significant first: ``1`` stops in that level's
    queue (TTL ``2**k`` ms), ``0`` passes on. The queue name follows.
    """
    ms = max(1, math.ceil(delay * 1000))
    return ".".join(f"{ms:0{DELAY_LEVELS}b}") + "." + queue


def route(queue: str, delay: float | None) -> tuple[str, str]:
    """Return ``(exchange, routing_key)`` that reaches ``queue`` after ``delay`` seconds.

    Raises:
        ConfigurationError: The delay is longer than the ladder holds.
    """
    if not delay or delay <= 0:
        return "", queue
    if delay > MAX_DELAY:
        raise ConfigurationError(
            f"A delay of {delay:.0f} s is longer than the {MAX_DELAY:.0f} s the broker can hold."
        )
    return _level(DELAY_LEVELS - 1), delay_routing_key(delay, queue)


def declare_topology(channel: Any, reopen: Callable[[], Any] | None = None) -> None:
    """Declare the dead-letter exchange and the delay ladder.

    Args:
        channel: A py-amqp channel.
        reopen: Returns a new channel after RabbitMQ closed the one in use; with
            it, a level of the classic ladder whose node is down (a durable
            classic queue cannot be declared then) is skipped with a warning,
            so that a cluster that lost that node can still be connected to.

    kombu's native delayed delivery (``kombu.transport.native_delayed_delivery``)
    builds the same kind of ladder but counts whole seconds, and retry backoffs
    start at fractions of a second; this ladder counts milliseconds. Level k is
    a topic exchange and a queue whose messages expire after ``2**k`` ms into
    level k-1; a message's routing key has one bit per level and stops only in
    the levels whose bit is 1, so each queue holds messages of one TTL and a
    short delay never waits behind a long one. Level 0 expires into
    ``mqtasks.delayed``, where every queue is bound under its own name.
    """
    kombu.Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True).bind(channel).declare()
    delivery = kombu.Exchange(DELAY_DELIVERY_EXCHANGE, type="topic", durable=True)
    delivery.bind(channel).declare()
    # Always classic durable queues, whatever the app's queue type: the ladder is
    # shared by every app on the vhost (a queue cannot be redeclared as another
    # type), and RabbitMQ 3.10's quorum queues expire a message at the head only
    # lazily, which stalled the ladder in tests; classic queues expire on time.
    # On a cluster too: there, a quorum level whose leader moved to another node
    # kept its messages past their TTL until the next one arrived (RabbitMQ
    # 3.10.8). Their dead-lettering is at-most-once, and each level lives on one
    # node: see the reliability guide and the cluster guide.
    quorum = False
    for k in range(DELAY_LEVELS - 1, -1, -1):
        exchange = kombu.Exchange(_level(k), type="topic", durable=True).bind(channel)
        exchange.declare()
        onward = _level(k - 1) if k else DELAY_DELIVERY_EXCHANGE
        arguments: dict[str, Any] = {
            "x-message-ttl": 2**k,
            "x-dead-letter-exchange": onward,
            "x-overflow": "reject-publish",
        }
        if quorum:
            arguments["x-queue-type"] = "quorum"
            arguments["x-dead-letter-strategy"] = "at-least-once"
        prefix = "*." * (DELAY_LEVELS - 1 - k)
        queue = kombu.Queue(
            _level(k),
            exchange=exchange,
            routing_key=prefix + "1.#",
            durable=True,
            queue_arguments=arguments,
        ).bind(channel)
        try:
            queue.declare()
        except Exception as exc:
            if reopen is None or quorum or not is_not_found(exc):
                raise
            # RabbitMQ: "home node ... of durable queue ... is down or inaccessible".
            logger.warning(
                "amqp.delay_level_unavailable",
                queue=_level(k),
                note="its node is down: the level is unavailable until the node is back",
            )
            channel = reopen()
            exchange = exchange.bind(channel)
        # A 0 bit passes the message on: to the next level, or out of the ladder.
        kombu.Exchange(onward, type="topic", durable=True).bind(channel).declare()
        channel.exchange_bind(destination=onward, source=_level(k), routing_key=prefix + "0.#")


def bind_queues(channel: Any, specs: Sequence[QueueSpec]) -> None:
    """Bind each queue's dead-letter queue to the dead-letter exchange and the
    queue itself to the end of the delay ladder."""
    for spec in specs:
        if spec.name.endswith(DLQ_SUFFIX):
            continue
        if spec.dead_letter_queue is None:  # else that queue's own binding routes them
            channel.queue_bind(
                queue=spec.name + DLQ_SUFFIX, exchange=DEAD_LETTER_EXCHANGE, routing_key=spec.name
            )
        channel.queue_bind(
            queue=spec.name,
            exchange=DELAY_DELIVERY_EXCHANGE,
            routing_key="*." * DELAY_LEVELS + spec.name,
        )


def queue_arguments(spec: QueueSpec, default_type: str) -> dict[str, Any]:
    """Return the ``x-`` arguments that declare ``spec`` on RabbitMQ.

    Args:
        spec: The queue.
        default_type: Its queue type unless ``spec`` names one.

    Raises:
        ConfigurationError: ``spec`` asks for what its queue type cannot do.
    """
    queue_type = spec.queue_type or default_type
    args: dict[str, Any] = {}
    if not spec.name.endswith(DLQ_SUFFIX):
        # What the broker drops itself (TTL, overflow, delivery limit) lands
        # in the queue's dead-letter queue, with the broker's x-death reason.
        args["x-dead-letter-exchange"] = DEAD_LETTER_EXCHANGE
        # The dead-letter exchange routes by the name of the queue whose .dlq takes them.
        args["x-dead-letter-routing-key"] = spec.dead_letter_name[: -len(DLQ_SUFFIX)]
        if queue_type == "quorum" and (
            spec.max_length is None or spec.overflow == "reject-publish"
        ):
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    if queue_type == "quorum" and not spec.durable:
        raise ConfigurationError(
            f"Queue {spec.name!r}: RabbitMQ quorum queues are always durable; declare a "
            "non-durable queue with QueueSpec(..., queue_type='classic')."
        )
    if spec.expires is not None:
        # Deleted by RabbitMQ once it has had no consumer (and no declare) this long.
        args["x-expires"] = max(1, int(spec.expires * 1000))
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if spec.replicas is not None:
            # Capped by RabbitMQ at the number of nodes; without it, the broker's
            # default (quorum_cluster_size: 3 on RabbitMQ 3.10).
            args["x-quorum-initial-group-size"] = spec.replicas
        if spec.max_priority is not None:
            raise ConfigurationError(
                f"Queue {spec.name!r}: RabbitMQ quorum queues do not support max_priority; "
                "use QueueSpec(..., queue_type='classic') for a priority queue."
            )
    else:
        if spec.replicas is not None:
            raise ConfigurationError(
                f"Queue {spec.name!r}: a classic queue lives on one node and has no "
                "replicas; replicate it with QueueSpec(..., queue_type='quorum')."
            )
        if spec.max_priority is not None:
            args["x-max-priority"] = spec.max_priority
    if spec.delivery_limit is not None and queue_type == "quorum":
        # Classic queues take no x-delivery-limit: their consumers count
        # deliveries themselves (AmqpConsumer, amqp.delivery_count).
        args["x-delivery-limit"] = spec.delivery_limit
    if spec.message_ttl is not None:
        args["x-message-ttl"] = int(spec.message_ttl * 1000)
    if spec.max_length is not None:
        args["x-max-length"] = spec.max_length
        args["x-overflow"] = spec.overflow
    if spec.single_active_consumer:
        args["x-single-active-consumer"] = True
    return args


def queue_stats(
    transport: KombuTransport,
    specs: Sequence[QueueSpec],
    management_url: str | None = None,
) -> dict[str, QueueStats]:
    """Read ready messages and consumers with passive ``queue.declare``, and the
    rest from the management plugin's HTTP API when it answers.

    Unacknowledged messages, the head message's publishing time (classic
    queues) and message rates come from the management API
    (``mqtasks.transport.amqp.management``); they are ``None`` when it does not
    answer. Delayed messages are the total held in the delay ladder for the
    whole vhost (``delayed_scope="vhost"``): the ladder is shared by every
    queue, and telling whose a message is would mean taking it.

    Args:
        transport: The RabbitMQ transport.
        specs: The queues.
        management_url: The ``rabbitmq_management_url`` setting (see
            ``mqtasks.transport.amqp.management.management_url``).

    Raises:
        ConnectionFailed: The broker cannot be reached.
    """
    with translate_errors(transport.url, "read queue stats"), transport.connection() as conn:
        conn.ensure_connection(max_retries=1, timeout=transport.connect_timeout)
        channel = [conn.channel()]

        def passive(name: str) -> tuple[int, int] | None:
            # A 404 closes the channel: carry on with a fresh one.
            try:
                ok = channel[0].queue_declare(queue=name, passive=True)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                channel[0] = conn.channel()
                return None
            return int(ok.message_count or 0), int(ok.consumer_count or 0)

        # The ladder is declared top level first: without it, nothing is delayed.
        top = passive(_level(DELAY_LEVELS - 1))
        levels = [passive(_level(k)) for k in range(DELAY_LEVELS - 1)] if top else []
        delayed = sum(level[0] for level in [top, *levels] if level is not None)
        found = {spec.name: passive(spec.name) for spec in specs}
        dead = {
            spec.name: passive(spec.name + DLQ_SUFFIX)
            for spec in specs
            if found[spec.name] is not None and not spec.name.endswith(DLQ_SUFFIX)
        }
    figures = _management_figures(transport.url, management_url, found, dead)
    stats: dict[str, QueueStats] = {}
    for spec in specs:
        counts = found[spec.name]
        if counts is None:
            stats[spec.name] = QueueStats(spec.name, exists=False)
            continue
        dlq = dead.get(spec.name)
        mine = None if figures is None else figures.get(spec.name)
        dlq_figures = None if figures is None else figures.get(spec.name + DLQ_SUFFIX)
        stats[spec.name] = QueueStats(
            spec.name,
            ready=counts[0],
            consumers=counts[1],
            unacked=management.count(mine, "messages_unacknowledged"),
            delayed=delayed,
            delayed_scope="vhost",
            dead_lettered=dlq[0] if dlq is not None else None,
            # An empty queue has no head: its age is nothing, not unknown.
            head_published_at=management.head_timestamp(mine) if counts[0] else None,
            publish_rate=management.rate(mine, "publish"),
            deliver_rate=management.rate(mine, "deliver_get"),
            ack_rate=management.rate(mine, "ack"),
            redeliver_rate=management.rate(mine, "redeliver"),
            dead_letter_rate=management.rate(dlq_figures, "publish"),
        )
    return stats


def _management_figures(
    broker_url: str,
    configured: str | None,
    found: dict[str, tuple[int, int] | None],
    dead: dict[str, tuple[int, int] | None],
) -> dict[str, management.QueueFigures] | None:
    """The management API's objects of the queues that exist, or None if it does not answer."""
    base = management.management_url(broker_url, configured)
    names = [name for name, counts in found.items() if counts is not None]
    names += [name + DLQ_SUFFIX for name, counts in dead.items() if counts is not None]
    if base is None or not names:
        return None
    return management.read_queues(base, management.vhost_of(broker_url), names)
