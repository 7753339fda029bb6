"""RabbitMQ through kombu's py-amqp transport: confirms, mandatory routing, quorum queues."""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Any, ClassVar

from kombu.transport import pyamqp

from ..exceptions import ConfigurationError
from ._guard import GuardedAmqpMessage
from .base import Consumer, QueueSpec, Transport

__all__ = ["AmqpTransport"]


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

    def _connect(self, max_retries: int | None) -> None:
        super()._connect(max_retries)
        sock = self._socket()
        if sock is not None:
            # Reads start only when select() says data is there; this bounds a
            # read stuck on a half-received frame of a connection gone silent.
            sock.settimeout(max(2 * self.transport.heartbeat, 10.0))

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
            for _ in range(self.batch):
                conn.drain_events(timeout=None)
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

    def consumer(self, specs: Sequence[QueueSpec], *, prefetch: int) -> Consumer:
        return AmqpConsumer(self, specs, prefetch=prefetch)

    def queue_arguments(self, spec: QueueSpec) -> dict[str, Any]:
        queue_type = spec.queue_type or self.queue_type
        args: dict[str, Any] = {}
        if queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if spec.max_priority is not None:
                raise ConfigurationError(
                    f"Queue {spec.name!r}: RabbitMQ quorum queues do not support max_priority; "
                    "use QueueSpec(..., queue_type='classic') for a priority queue."
                )
        elif spec.max_priority is not None:
            args["x-max-priority"] = spec.max_priority
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
