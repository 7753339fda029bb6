"""RabbitMQ through kombu's py-amqp transport: confirms, mandatory routing, quorum queues.

:class:`AmqpTransport` (``amqp://``) and :class:`AmqpsTransport` (``amqps://``)
publish and declare; the rest of the package holds their parts: the frames
written by hand (:mod:`~mqtasks.transport.amqp.wire`), publisher confirms
(:mod:`~mqtasks.transport.amqp.confirms`), topic exchanges for events
(:mod:`~mqtasks.transport.amqp.exchanges`), the consumer
(:mod:`~mqtasks.transport.amqp.consumer`, with
:mod:`~mqtasks.transport.amqp.delivery_count`) and what is declared beside the
queues (:mod:`~mqtasks.transport.amqp.topology`).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import kombu
import structlog
from amqp.exceptions import MessageNacked
from kombu.transport import pyamqp

from ..._url import mask_url, redact
from ...exceptions import PublishError, PublishNacked
from .._guard import GuardedAmqpMessage, guarded_frame_handler
from ..base import Capabilities, Consumer, QueueSpec, QueueStats
from ..envelope import Envelope
from ..kombu import KombuTransport, _FailoverConnection, deadline_errback
from ..stream import StreamStore
from . import bulk, exchanges, topology
from .confirms import (
    Confirm,
    Confirms,
    _BrokerNacked,
    _ConfirmPipeline,
    _ConnectFailed,
    read_confirms,
)
from .consumer import AmqpConsumer
from .topology import DEAD_LETTER_EXCHANGE, DELAY_LEVELS
from .wire import _PublishFrames, message_timestamp, serialize_properties

__all__ = ["DEAD_LETTER_EXCHANGE", "DELAY_LEVELS", "AmqpTransport", "AmqpsTransport"]

logger = structlog.get_logger("mqtasks.transport")


class _Channel(pyamqp.Channel):  # type: ignore[misc]
    Message = GuardedAmqpMessage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Keep bodies as bytes: py-amqp would otherwise decode them with
        # whatever content_encoding the publisher claimed.
        kwargs["auto_decode"] = False
        super().__init__(*args, **kwargs)


class _Connection(pyamqp.Connection):  # type: ignore[misc]
    Channel = _Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A header table too deeply nested to parse is replaced, not fatal (see _guard).
        kwargs.setdefault("frame_handler", guarded_frame_handler)
        super().__init__(*args, **kwargs)


class KombuAmqpTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport with the compression guard on received messages."""

    Connection = _Connection


class KombuAmqpsTransport(pyamqp.SSLTransport):  # type: ignore[misc]
    """TLS flavour of :class:`KombuAmqpTransport`."""

    Connection = _Connection


class AmqpTransport(KombuTransport):
    """RabbitMQ: durable (quorum by default) queues, persistent messages,
    publisher confirms and mandatory routing, so ``publish`` returns only once the
    broker has the message and raises when it cannot be routed or is nacked."""

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "pyamqp")
    kombu_transport: Any = KombuAmqpTransport
    capabilities = Capabilities(
        delays=True,
        max_priority=True,
        delivery_count=True,
        max_length=True,
        message_ttl=True,
        confirms=True,
        exchanges=True,
        single_active_consumer=True,
        expiring_queues=True,
        streams=True,
    )

    def connection_options(self) -> dict[str, Any]:
        options = {"confirm_publish": True}
        options.update(self.transport_options)
        return options

    #: Most unconfirmed messages a bulk publish keeps in flight on its channel.
    confirm_window: ClassVar[int] = 1000

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._pipeline = _ConfirmPipeline(self)
        #: Topic exchanges declared through this transport (declared again after close).
        self.exchanges_declared: set[str] = set()
        #: Exchange -> ``(pattern, queue)`` bindings made (and not unbound) through this transport.
        self.bound: dict[str, set[tuple[str, str]]] = {}
        self.bound_lock = threading.Lock()
        #: Queues declared through this transport with a max_length: a nack there
        #: may mean full, and is never published again.
        self._bounded: set[str] = set()
        #: The URL lists several nodes of a cluster (``a;b;c``).
        self.failover = ";" in url
        # Each process starts at a node of its own, so that the processes of
        # one deployment spread over the cluster.
        self._rotation = itertools.count(random.randrange(url.count(";") + 1))

    def connection(self, *, heartbeat: float = 0) -> kombu.Connection:
        """Return a new (unconnected) kombu connection to this broker.

        With a failover list, each new connection starts one node further
        along it (and moves on along it when a node does not answer, as kombu
        does), the first at a random node: a consumer reconnecting with one
        attempt at a time reaches every node in turn rather than the first
        one again and again, and connections spread over the cluster.
        """
        if not self.failover:
            return super().connection(heartbeat=heartbeat)
        urls = self.url.split(";")
        start = next(self._rotation) % len(urls)
        return _FailoverConnection(
            ";".join(urls[start:] + urls[:start]),
            transport=self.kombu_transport,
            heartbeat=heartbeat,
            connect_timeout=self.connect_timeout,
            transport_options=self.connection_options(),
            ssl=self.kombu_ssl(),
        )

    def close(self) -> None:
        """Close the shared confirming connection and the pooled ones."""
        self._pipeline.close()
        self.exchanges_declared.clear()
        super().close()

    # -- topic exchanges (events) ----------------------------------------------

    def bind(self, exchange: str, pattern: str, spec: QueueSpec) -> None:
        """Declare the durable topic exchange and ``spec`` (with its dead-letter queue,
        as :meth:`~mqtasks.transport.kombu.KombuTransport.declare` does), then
        ``queue.bind`` it under ``pattern``."""
        exchanges.bind(self, exchange, pattern, spec)

    def unbind(self, exchange: str, pattern: str, queue: str) -> None:
        """``queue.unbind``; a queue or exchange that does not exist has no binding."""
        exchanges.unbind(self, exchange, pattern, queue)

    def bindings(self, exchange: str) -> list[tuple[str, str]]:
        """Return the bindings of ``exchange`` made through this transport, sorted.

        AMQP 0-9-1 has no method that lists bindings (only the management
        plugin's HTTP API or ``rabbitmqctl list_bindings`` do), so these are the
        ones this transport object bound and did not unbind, not every binding
        the broker holds.
        """
        with self.bound_lock:
            return sorted(self.bound.get(exchange, ()))

    def emit(
        self, exchange: str, routing_key: str, envelope: Envelope, *, mandatory: bool = True
    ) -> int:
        """``basic.publish`` to the topic exchange on the confirming channel; return -1
        (RabbitMQ does not tell how many queues got it).

        Raises:
            Unroutable: ``mandatory`` and the broker returned it (no binding matches).
            PublishError: Not confirmed (``PublishNacked`` for a nack).
        """
        return exchanges.emit(self, exchange, routing_key, envelope, mandatory)

    def publish(
        self,
        queue: str,
        envelope: Envelope,
        *,
        timeout: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Publish ``envelope`` to ``queue``; return once the broker has confirmed it.

        With confirms on (the default) over plain TCP, every thread publishes on
        one shared channel with its confirms pipelined (see ``_ConfirmPipeline``):
        many threads calling ``delay()`` at once keep many confirms in flight on
        one connection. Without confirms, and over TLS (whose decrypted bytes
        ``select()`` cannot see), publishing goes through the pool.
        """
        exchange, routing_key = self.route(queue, delay)
        timeout = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        transient = self.nack_is_transient(queue)
        pause = 0.1
        while True:
            try:
                returned = self._send(
                    exchange,
                    routing_key,
                    envelope,
                    max(0.05, deadline - time.monotonic()),
                    repr(queue),
                    renew_on_nack=transient,
                )
                break
            except PublishNacked:
                if not transient or time.monotonic() + pause >= deadline:
                    raise
            # A cluster nacks what it cannot take now: a quorum queue whose leader
            # is gone nacks until its members elect another (seconds). Published
            # again, with the same id, until the publish's time is up.
            logger.info("amqp.publish_nacked_retry", task_id=envelope.message_id, retry_in=pause)
            time.sleep(pause)
            pause = min(1.0, pause * 2)
        if returned is not None:
            self._raise_returned(queue, envelope, returned)

    def nack_is_transient(self, queue: str) -> bool:
        """Whether a nack of a message for ``queue`` is worth publishing again.

        On a cluster (a failover list of URLs), RabbitMQ nacks a message for a
        quorum queue that has no leader for the moment; it also nacks one for
        a full queue with ``overflow=reject-publish``, and the nack does not
        say which. So only queues without a ``max_length`` (as declared
        through this transport) are published again; a bounded one raises
        :class:`~mqtasks.exceptions.PublishNacked` at once, as on one node.
        """
        return self.failover and queue not in self._bounded

    def declare(self, specs: Sequence[QueueSpec]) -> None:
        """Declare queues (see :meth:`KombuTransport.declare
        <mqtasks.transport.kombu.KombuTransport.declare>`), remembering the bounded ones."""
        self._bounded.update(s.name for s in specs if s.max_length is not None)
        super().declare(specs)

    def _send(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        timeout: float | None,
        where: str,
        mandatory: bool = True,
        *,
        renew_on_nack: bool = False,
    ) -> tuple[Any, str] | None:
        """Publish and wait for the confirm; return the broker's return, if it sent one.

        Args:
            where: The destination as error messages name it.
            mandatory: Ask the broker to return the message when nothing is bound.
            renew_on_nack: After a nack, drop the channel it came on (the next
                publish opens another). On RabbitMQ 3.10, a channel opened while
                a quorum queue had no leader nacks every message for that queue
                even after a new leader is elected; a new channel does not.

        Raises:
            PublishError: Not confirmed (``PublishNacked`` for a nack).
        """
        if self.uses_tls or not self.connection_options().get("confirm_publish"):
            self._local.renew_on_nack = renew_on_nack
            return self._publish_pooled(
                exchange, routing_key, envelope, timeout, where, mandatory=mandatory
            )
        timeout = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        properties = serialize_properties(
            envelope, dict(envelope.headers), message_timestamp(envelope)
        )
        pipeline = self._pipeline
        failures = 0
        while True:
            try:
                waiter = pipeline.send(
                    exchange, routing_key, envelope, properties, deadline, mandatory
                )
            except PublishError:
                raise
            except _ConnectFailed as exc:  # kombu's reconnect loop ran its course
                error: BaseException = exc.__cause__ or exc
            except Exception as exc:
                error = exc
            else:
                pipeline.wait(waiter, envelope, deadline)
                if waiter.error is None:
                    break
                error = waiter.error
            # Not connected, or lost before its confirm: published again on a new
            # connection, publish_retries times, within the publish's time.
            failures += 1
            if failures > self.publish_retries or time.monotonic() >= deadline:
                raise PublishError(
                    redact(
                        f"Task {envelope.message_id} was NOT enqueued on {where}: "
                        f"{type(error).__name__}: {error} (broker {mask_url(self.url)})"
                    ),
                    task_id=envelope.message_id,
                ) from error
        if waiter.returned is not None:
            return waiter.returned
        if waiter.outcome == "nack":
            if renew_on_nack:
                pipeline.renew(waiter)
            raise PublishNacked(
                f"Task {envelope.message_id} was NOT enqueued: the broker refused it on "
                f"{where} (a full queue with overflow=reject-publish, or a broker alarm).",
                task_id=envelope.message_id,
            )
        return None

    def streams(self) -> StreamStore:
        """Return this broker's stream queues (``mqtasks.transport.amqp.streams``)."""
        from .streams import AmqpStreams

        return AmqpStreams(self)

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        return AmqpConsumer(self, specs, prefetch=prefetch)

    def publish_many(
        self, items: Sequence[tuple[str, Envelope]], *, timeout: float | None = None
    ) -> list[BaseException | None]:
        """Publish with pipelined confirms (see :func:`~mqtasks.transport.amqp.bulk.publish_many`):
        each message is settled by its broker ack, nack or return as they arrive, instead
        of one round trip per message; on a cluster, nacked ones are published again."""
        return bulk.publish_many(self, items, timeout)

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
        """Send one message on the pooled producer's channel and, with confirms
        on, wait for its own confirm.

        The frames are those kombu's ``Producer.publish`` sends; the way there is
        shorter. py-amqp's confirmed publish sets and restores the socket timeout
        around every read, polls for ``connection.blocked`` notices before each
        publish and reads each frame with three ``recv()`` calls; this writes the
        frames built by :class:`~mqtasks.transport.amqp.wire._PublishFrames` (the
        method frame once per destination, the properties by
        :func:`~mqtasks.transport.amqp.wire.serialize_properties`) with one write
        and reads what the socket holds when ``select()`` says it is there. A lost
        connection is retried as before, by kombu's ``Connection.ensure``; a
        confirm that does not come in time is not (the message may be enqueued).
        """
        conn = producer.connection
        confirm = bool(conn.transport_options.get("confirm_publish"))
        properties = serialize_properties(
            envelope, dict(envelope.headers), message_timestamp(envelope)
        )
        body = envelope.body

        def publish_once() -> None:
            channel = producer.channel
            confirms: Confirms[Confirm] | None = getattr(channel, "mqtasks_confirms", None)
            if confirm and confirms is None and channel._confirm_selected:
                # Put in confirm mode by someone else: its tags are not ours to count.
                super(AmqpTransport, self)._publish(
                    producer, exchange, routing_key, envelope, deadline, mandatory=mandatory
                )
                return
            frames: _PublishFrames | None = getattr(channel, "mqtasks_frames", None)
            if frames is None:
                frames = channel.mqtasks_frames = _PublishFrames(
                    channel, self.capabilities.confirms
                )
            sock = channel.connection.transport.sock
            if sock.gettimeout() != self.publish_timeout:
                sock.settimeout(self.publish_timeout)  # bounds a write the broker does not read
            if not confirm:
                frames.add(exchange, routing_key, properties, body, mandatory)
                frames.flush()
                return
            if confirms is None:
                confirms = channel.mqtasks_confirms = Confirms()
                confirms.select(channel)
            sent = Confirm()
            confirms.add(sent)
            frames.add(exchange, routing_key, properties, body, mandatory)
            frames.flush()
            self._await_confirm(channel.connection, sent, envelope, deadline)
            if sent.outcome == "nack":
                # Not MessageNacked itself: py-amqp counts it among the recoverable
                # connection errors, and ensure() would drop the connection, open a
                # new one and publish again, publish_retries times, without a pause.
                if getattr(self._local, "renew_on_nack", False):
                    # The pool makes a new connection (see _send's renew_on_nack).
                    with contextlib.suppress(Exception):
                        conn.collect()
                raise _BrokerNacked() from MessageNacked()

        conn.ensure(
            producer,
            publish_once,
            max_retries=self.publish_retries,
            interval_start=0.1,
            interval_step=0.5,
            interval_max=2.0,
            errback=deadline_errback(conn, deadline, self.connect_timeout),
        )()

    def _await_confirm(
        self, connection: Any, sent: Confirm, envelope: Envelope, deadline: float
    ) -> None:
        while sent.outcome is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"Task {envelope.message_id} was NOT confirmed in time; it may or may not "
                    f"be enqueued (broker {mask_url(self.url)}). Publishing it again with the "
                    "same task id makes a duplicate detectable.",
                    task_id=envelope.message_id,
                )
            read_confirms(connection, remaining)

    @staticmethod
    def _wait_confirms(connection: Any, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("publisher confirms did not arrive in time")
        read_confirms(connection, remaining)

    def route(self, queue: str, delay: float | None) -> tuple[str, str]:
        """Delays go through the ladder of TTL queues (see :meth:`declare_topology`)."""
        return topology.route(queue, delay)

    def declare_topology(self, channel: Any) -> None:
        """Declare the dead-letter exchange and the delay ladder, once per transport
        (see :func:`~mqtasks.transport.amqp.topology.declare_topology`)."""
        if getattr(self, "_topology_declared", False):
            return
        # On a channel of its own: a level of the classic ladder on a node that is
        # down closes the channel it is declared on (and is skipped, on a new one).
        opened = [channel.connection.channel()]

        def reopen() -> Any:
            opened.append(channel.connection.channel())
            return opened[-1]

        try:
            topology.declare_topology(opened[0], reopen if self.failover else None)
        finally:
            for ch in opened:
                with contextlib.suppress(Exception):
                    ch.close()
        self._topology_declared = True

    def bind_queues(self, channel: Any, specs: Sequence[QueueSpec]) -> None:
        topology.bind_queues(channel, specs)

    def queue_stats(
        self, specs: Sequence[QueueSpec], *, management_url: str | None = None
    ) -> dict[str, QueueStats]:
        """Read ready messages and consumers with passive ``queue.declare``, the
        rest from the management API when it answers
        (see :func:`~mqtasks.transport.amqp.topology.queue_stats`).

        Raises:
            ConnectionFailed: The broker cannot be reached.
        """
        return topology.queue_stats(self, specs, management_url)

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        return topology.queue_arguments(spec, self.queue_type)


class AmqpsTransport(AmqpTransport):
    """RabbitMQ over TLS: the broker's certificate and host name are checked
    (see :class:`~mqtasks.transport.tls.TLSOptions`)."""

    schemes: ClassVar[tuple[str, ...]] = ("amqps",)
    kombu_transport: Any = KombuAmqpsTransport

    def kombu_ssl(self) -> dict[str, Any] | bool:
        # A URL listing several brokers (a;b) leaves the name to kombu, per connection.
        host = None if ";" in self.url else urlsplit(self.url).hostname
        return self.tls.amqp_ssl(host)
