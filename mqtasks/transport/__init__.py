"""Broker URL scheme -> transport class; :func:`resolve` builds one from a URL.

The table names each class by its import path, as kombu's ``TRANSPORT_ALIASES``
does: importing :mod:`mqtasks.transport` (the interface and value types) loads
no broker client, and a transport's module is imported only when a URL asks
for it.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..exceptions import ConfigurationError, UnknownTransport
from .base import Capabilities, Consumer, Delivery, QueueSpec, QueueStats, Transport
from .envelope import Envelope

if TYPE_CHECKING:
    from .amqp import AmqpsTransport, AmqpTransport
    from .memory import MemoryTransport
    from .postgres import PostgresTransport
    from .redis import RedisTransport
    from .redis_kombu import RedisKombuTransport
    from .sqlite import SqliteTransport

__all__ = [
    "TRANSPORTS",
    "UNAVAILABLE",
    "AmqpTransport",
    "AmqpsTransport",
    "Capabilities",
    "Consumer",
    "Delivery",
    "Envelope",
    "MemoryTransport",
    "PostgresTransport",
    "QueueSpec",
    "QueueStats",
    "RedisKombuTransport",
    "RedisTransport",
    "SqliteTransport",
    "SqsTransport",
    "Transport",
    "resolve",
    "transport_class",
]

#: URL scheme -> ``module:Class`` of its transport. ``redis://`` is mqtasks' own
#: Redis transport; ``redis+kombu://`` selects kombu's stock Redis transport
#: (``RedisKombuTransport``).
TRANSPORTS: dict[str, str] = {
    "amqp": "mqtasks.transport.amqp:AmqpTransport",
    "pyamqp": "mqtasks.transport.amqp:AmqpTransport",
    "amqps": "mqtasks.transport.amqp:AmqpsTransport",
    "redis": "mqtasks.transport.redis:RedisTransport",
    "rediss": "mqtasks.transport.redis:RedisTransport",
    "redis+kombu": "mqtasks.transport.redis_kombu:RedisKombuTransport",
    "rediss+kombu": "mqtasks.transport.redis_kombu:RedisKombuTransport",
    "redis+sentinel": "mqtasks.transport.redis:RedisTransport",
    "rediss+sentinel": "mqtasks.transport.redis:RedisTransport",
    "sqs": "mqtasks.transport.sqs:SqsTransport",
    "postgresql": "mqtasks.transport.postgres:PostgresTransport",
    "postgres": "mqtasks.transport.postgres:PostgresTransport",
    "sqlite": "mqtasks.transport.sqlite:SqliteTransport",
    "memory": "mqtasks.transport.memory:MemoryTransport",
}

#: URL schemes users ask for that no transport serves yet -> what to do instead.
UNAVAILABLE: dict[str, str] = {
    "kafka": (
        "kafka:// is not supported: no Kafka broker could be run where mqtasks is built "
        "and tested, so there is no tested transport for it. For a replayable log, use "
        "streams on RabbitMQ (amqp://) or Redis (redis://): App(streams=[StreamSpec(...)])."
    ),
}

#: Names this package offers lazily -> the scheme whose class it is.
_LAZY = {
    "AmqpTransport": "amqp",
    "AmqpsTransport": "amqps",
    "MemoryTransport": "memory",
    "PostgresTransport": "postgresql",
    "RedisKombuTransport": "redis+kombu",
    "RedisTransport": "redis",
    "SqliteTransport": "sqlite",
    "SqsTransport": "sqs",
}


def transport_class(scheme: str) -> type[Transport]:
    """Return the transport class that serves URL scheme ``scheme``.

    Raises:
        ConfigurationError: A scheme mqtasks knows of but does not serve
            (``kafka``); the error says what to use instead.
        UnknownTransport: No transport serves it; the error names the supported
            schemes and the closest match.
    """
    if scheme in UNAVAILABLE:
        raise ConfigurationError(UNAVAILABLE[scheme])
    try:
        path = TRANSPORTS[scheme]
    except KeyError:
        close = difflib.get_close_matches(scheme, list(TRANSPORTS), n=1)
        raise UnknownTransport(
            scheme, tuple(sorted(TRANSPORTS)), close[0] if close else None
        ) from None
    module, _, name = path.partition(":")
    cls: type[Transport] = getattr(importlib.import_module(module), name)
    return cls


def resolve(url: str, **options: Any) -> Transport:
    """Build the transport that serves ``url``.

    Args:
        url: A broker URL such as ``amqp://guest:guest@localhost//``.
        options: Passed to the transport's constructor.

    Raises:
        UnknownTransport: No transport serves the URL's scheme; the error names
            the supported schemes and the closest match.
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else url
    return transport_class(scheme)(url, **options)


#: Names of earlier releases -> today's (a rename keeps the old name for a while).
_RENAMED = {"ReliableRedisTransport": "RedisTransport"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return transport_class(_LAZY[name])
    if name in _RENAMED:
        warnings.warn(
            f"mqtasks.transport.{name} is now mqtasks.transport.{_RENAMED[name]}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return transport_class(_LAZY[_RENAMED[name]])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
