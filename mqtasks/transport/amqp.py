"""RabbitMQ through kombu's py-amqp transport: confirms, mandatory routing, quorum queues."""

from __future__ import annotations

from typing import Any, ClassVar

from kombu.transport import pyamqp

from ..exceptions import ConfigurationError
from ._guard import GuardedAmqpMessage
from .base import QueueSpec, Transport

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
