"""RabbitMQ through kombu's py-amqp transport: confirms, mandatory routing, quorum queues."""

from __future__ import annotations

import contextlib
import math
import select
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import kombu
from kombu.transport import pyamqp

from .._url import mask_url
from ..exceptions import ConfigurationError, PublishError, PublishNacked, Unroutable
from ._guard import GuardedAmqpMessage
from .base import DLQ_SUFFIX, Consumer, Envelope, QueueSpec, Transport

__all__ = ["DEAD_LETTER_EXCHANGE", "DELAY_LEVELS", "AmqpTransport"]

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


class _Channel(pyamqp.Channel):  # type: ignore[misc]
    Message = GuardedAmqpMessage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Keep bodies as bytes: py-amqp would otherwise decode them with
        # whatever content_encoding the publisher claimed.
        kwargs["auto_decode"] = False
        super().__init__(*args, **kwargs)


class _Connection(pyamqp.Connection):  # type: ignore[misc]
    Channel = _Channel


class KombuAmqpTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport with the compression guard on received messages."""

    Connection = _Connection


class KombuAmqpsTransport(pyamqp.SSLTransport):  # type: ignore[misc]
    """TLS flavour of :class:`KombuAmqpTransport`."""

    Connection = _Connection


class AmqpConsumer(Consumer):
    """Consumer that sleeps in ``select()`` on its socket and a wake-up pipe.

    kombu's ``drain_events(timeout)`` sets and restores the socket timeout on
    every call, and cannot be interrupted when a worker thread has an ack to
    send. Selecting on the socket and the worker's pipe instead wakes the I/O
    thread the moment either has something, and reads with no timeout juggling.
    """

    wakeable: ClassVar[bool] = True
    #: Most messages read in one wake-up before settlements are flushed again.
    batch: ClassVar[int] = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tags received on the current channel and not settled yet.
        self._unsettled: set[int] = set()

    def _receive(self, raw: Any) -> None:
        self._unsettled.add(raw.delivery_tag)
        super()._receive(raw)

    def _connect(self, max_retries: int | None) -> None:
        self._unsettled = set()
        super()._connect(max_retries)
        sock = self._socket()
        if sock is not None:
            # Reads start only when select() says data is there; this bounds a
            # read stuck on a half-received frame of a connection gone silent.
            sock.settimeout(max(2 * self.transport.heartbeat, 10.0))

    def _settle(self, delivery: Any, action: Any) -> bool:
        settled = super()._settle(delivery, action)
        if settled:
            self._unsettled.discard(delivery.raw.delivery_tag)
        return settled

    def ack_many(self, deliveries: Sequence[Any]) -> None:
        """Ack with one ``multiple`` frame up to the highest tag below which
        nothing else is unsettled; ack the rest one by one.

        py-amqp has no ack coalescing of its own; under load this turns a frame
        (and a system call) per message into one per batch.
        """
        live = [d for d in deliveries if d.generation == self.generation]
        if len(live) < 2 or self._conn is None:
            super().ack_many(deliveries)
            return
        tags = sorted(d.raw.delivery_tag for d in live)
        batch = set(tags)
        lowest_other = min((t for t in self._unsettled if t not in batch), default=None)
        upto = max((t for t in tags if lowest_other is None or t < lowest_other), default=None)
        rest = [
            d
            for d in deliveries
            if d.generation != self.generation or upto is None or d.raw.delivery_tag > upto
        ]
        if upto is not None:
            covered = [d for d in live if d.raw.delivery_tag <= upto]
            channel = covered[0].raw.channel

            def ack_multiple() -> None:
                channel.basic_ack(upto, multiple=True)

            if super()._settle(covered[0], ack_multiple):
                for d in covered:
                    d.raw._state = "ACK"  # kombu's bookkeeping, as Message.ack() does
                    self._unsettled.discard(d.raw.delivery_tag)
        for delivery in rest:
            self.ack(delivery)

    def _socket(self) -> Any:
        conn = self._conn
        try:
            return conn.connection.transport.sock if conn is not None else None
        except AttributeError:
            return None

    def wait(self, timeout: float, wake_fd: int) -> None:
        conn = self._conn
        sock = self._socket()
        if conn is None or sock is None:
            self._reconnect()
            return
        try:
            pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
            if not (pending and pending()):
                readable, _, _ = select.select([sock, wake_fd], [], [], timeout)
                if sock not in readable:
                    self.heartbeat_check()
                    return
            # One frame per read, only while bytes are waiting: drain_events()
            # would go on blocking after a heartbeat frame until a method arrives,
            # which with a full prefetch window never happens until we ack.
            read_frame = conn.connection.blocking_read
            for _ in range(self.batch):
                read_frame(None)
                if not (pending and pending()) and not select.select([sock], [], [], 0)[0]:
                    break
        except self.connection_errors as exc:
            self._lost(exc)
            return
        self.heartbeat_check()


class AmqpTransport(Transport):
    """RabbitMQ: durable (quorum by default) queues, persistent messages,
    publisher confirms and mandatory routing, so ``publish`` returns only once the
    broker has the message and raises when it cannot be routed or is nacked."""

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "pyamqp")
    kombu_transport: Any = KombuAmqpTransport
    confirms: ClassVar[bool] = True

    def connection_options(self) -> dict[str, Any]:
        options = {"confirm_publish": True}
        options.update(self.transport_options)
        return options

    #: Most unconfirmed messages a bulk publish keeps in flight on its channel.
    confirm_window: ClassVar[int] = 1000

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        return AmqpConsumer(self, specs, prefetch=prefetch)

    def publish_many(
        self, items: Sequence[tuple[str, Envelope]], *, timeout: float | None = None
    ) -> list[BaseException | None]:
        """Publish with pipelined confirms: up to :attr:`confirm_window` messages are
        in flight on a channel of their own, and each is settled by its broker ack,
        nack or return as they arrive, instead of one round trip per message."""
        if not items:
            return []
        if timeout is None:
            timeout = self.publish_timeout * max(1.0, len(items) / self.confirm_window)
        deadline = time.monotonic() + timeout
        published = 0
        results: list[BaseException | None] = [None] * len(items)
        pending: set[int] = set()  # delivery tags (1-based item index + 1) not yet settled
        by_id = {env.message_id: i for i, (_, env) in enumerate(items)}

        def fail(index: int, exc: BaseException) -> None:
            if results[index] is None:
                results[index] = exc

        def on_ack(tag: int, multiple: bool) -> None:
            settled = [t for t in pending if t <= tag] if multiple else [tag]
            pending.difference_update(settled)

        def on_nack(tag: int, multiple: bool) -> None:
            settled = [t for t in pending if t <= tag] if multiple else [tag]
            for t in settled:
                fail(
                    t - 1,
                    PublishNacked(
                        f"Task {items[t - 1][1].message_id} was NOT enqueued: the broker refused it.",
                        task_id=items[t - 1][1].message_id,
                    ),
                )
            pending.difference_update(settled)

        def on_return(exc: Any, exchange: str, routing_key: str, message: Any) -> None:
            index = by_id.get(message.properties.get("message_id"))
            if index is not None:
                fail(
                    index,
                    Unroutable(
                        f"Task {items[index][1].message_id} was NOT enqueued: no queue named "
                        f"{routing_key!r} is bound ({exc}).",
                        task_id=items[index][1].message_id,
                    ),
                )

        try:
            with self._pool().acquire(block=True, timeout=timeout) as producer:
                conn = producer.connection
                conn.ensure_connection(max_retries=self.publish_retries)
                channel = conn.channel()
                try:
                    channel.events["basic_ack"].add(on_ack)
                    channel.events["basic_nack"].add(on_nack)
                    channel.events["basic_return"].add(on_return)
                    channel.confirm_select()
                    for i, (queue, env) in enumerate(items):
                        while len(pending) >= self.confirm_window:
                            self._wait_confirms(conn, deadline)
                        message = channel.prepare_message(
                            env.body,
                            env.priority,
                            env.content_type,
                            env.content_encoding,
                            dict(env.headers),
                            {"message_id": env.message_id, "delivery_mode": 2},
                        )
                        pending.add(i + 1)
                        channel._basic_publish(
                            message, exchange="", routing_key=queue, mandatory=True
                        )
                        published = i + 1
                    while pending:
                        self._wait_confirms(conn, deadline)
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        except Exception as exc:
            for t in pending:
                env = items[t - 1][1]
                fail(
                    t - 1,
                    PublishError(
                        f"Task {env.message_id} was NOT confirmed ({type(exc).__name__}: {exc}); it "
                        f"may or may not be enqueued (broker {mask_url(self.url)}). Publishing it "
                        "again with the same task id makes a duplicate detectable.",
                        task_id=env.message_id,
                    ),
                )
            for i in range(published, len(items)):  # never handed to the broker
                env = items[i][1]
                fail(
                    i,
                    PublishError(
                        f"Task {env.message_id} was NOT enqueued: {type(exc).__name__}: {exc}",
                        task_id=env.message_id,
                    ),
                )
        if any(isinstance(r, Unroutable) for r in results):
            self.forget_declared()
        return results

    @staticmethod
    def _wait_confirms(conn: Any, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("publisher confirms did not arrive in time")
        conn.drain_events(timeout=remaining)

    def route(self, queue: str, delay: float | None) -> tuple[str, str]:
        """Delays go through the ladder of TTL queues (see :meth:`declare_topology`)."""
        if not delay or delay <= 0:
            return "", queue
        if delay > MAX_DELAY:
            raise ConfigurationError(
                f"A delay of {delay:.0f} s is longer than the {MAX_DELAY:.0f} s the broker can hold."
            )
        return _level(DELAY_LEVELS - 1), delay_routing_key(delay, queue)

    def declare_topology(self, channel: Any) -> None:
        """Declare the dead-letter exchange and the delay ladder (once per transport).

        kombu's native delayed delivery (``kombu.transport.native_delayed_delivery``)
        builds the same kind of ladder but counts whole seconds, and retry backoffs
        start at fractions of a second; this ladder counts milliseconds. Level k is
        a topic exchange and a queue whose messages expire after ``2**k`` ms into
        level k-1; a message's routing key has one bit per level and stops only in
        the levels whose bit is 1, so each queue holds messages of one TTL and a
        short delay never waits behind a long one. Level 0 expires into
        ``mqtasks.delayed``, where every queue is bound under its own name.
        """
        if getattr(self, "_topology_declared", False):
            return
        kombu.Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True).bind(channel).declare()
        delivery = kombu.Exchange(DELAY_DELIVERY_EXCHANGE, type="topic", durable=True)
        delivery.bind(channel).declare()
        # Always classic durable queues, whatever the app's queue type: the ladder is
        # shared by every app on the vhost (a queue cannot be redeclared as another
        # type), and RabbitMQ 3.10's quorum queues expire a message at the head only
        # lazily, which stalled the ladder in tests; classic queues expire on time.
        # Their dead-lettering is at-most-once: see the reliability guide.
        quorum = False
        for k in range(DELAY_LEVELS - 1, -1, -1):
            exchange = kombu.Exchange(_level(k), type="topic", durable=True).bind(channel)
            exchange.declare()
            arguments: dict[str, Any] = {
                "x-message-ttl": 2**k,
                "x-dead-letter-exchange": _level(k - 1) if k else DELAY_DELIVERY_EXCHANGE,
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
            queue.declare()
            # A 0 bit passes the message on: to the next level, or out of the ladder.
            onward = _level(k - 1) if k else DELAY_DELIVERY_EXCHANGE
            kombu.Exchange(onward, type="topic", durable=True).bind(channel).declare()
            channel.exchange_bind(destination=onward, source=_level(k), routing_key=prefix + "0.#")
        self._topology_declared = True

    def bind_queues(self, channel: Any, specs: Sequence[QueueSpec]) -> None:
        for spec in specs:
            if spec.name.endswith(DLQ_SUFFIX):
                continue
            channel.queue_bind(
                queue=spec.name + DLQ_SUFFIX, exchange=DEAD_LETTER_EXCHANGE, routing_key=spec.name
            )
            channel.queue_bind(
                queue=spec.name,
                exchange=DELAY_DELIVERY_EXCHANGE,
                routing_key="*." * DELAY_LEVELS + spec.name,
            )

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        queue_type = spec.queue_type or self.queue_type
        args: dict[str, Any] = {}
        if not spec.name.endswith(DLQ_SUFFIX):
            # What the broker drops itself (TTL, overflow, delivery limit) lands
            # in the queue's dead-letter queue, with the broker's x-death reason.
            args["x-dead-letter-exchange"] = DEAD_LETTER_EXCHANGE
            args["x-dead-letter-routing-key"] = spec.name
            if queue_type == "quorum" and (
                spec.max_length is None or spec.overflow == "reject-publish"
            ):
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
        if queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if spec.max_priority is not None:
                raise ConfigurationError(
                    f"Queue {spec.name!r}: RabbitMQ quorum queues do not support max_priority; "
                    "use QueueSpec(..., queue_type='classic') for a priority queue."
                )
        elif spec.max_priority is not None:
            args["x-max-priority"] = spec.max_priority
        if spec.delivery_limit is not None:
            if queue_type != "quorum":
                raise ConfigurationError(
                    f"Queue {spec.name!r}: delivery_limit needs queue_type='quorum' "
                    "(RabbitMQ counts deliveries only on quorum queues)."
                )
            args["x-delivery-limit"] = spec.delivery_limit
        if spec.message_ttl is not None:
            args["x-message-ttl"] = int(spec.message_ttl * 1000)
        if spec.max_length is not None:
            args["x-max-length"] = spec.max_length
            args["x-overflow"] = spec.overflow
        return args


class AmqpsTransport(AmqpTransport):
    """RabbitMQ over TLS."""

    schemes: ClassVar[tuple[str, ...]] = ("amqps",)
    kombu_transport: Any = KombuAmqpsTransport
