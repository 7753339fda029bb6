"""Broker URL scheme -> transport class; :func:`resolve` builds one from a URL."""

from __future__ import annotations

import difflib
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import UnknownTransport
from .amqp import AmqpsTransport, AmqpTransport
from .base import Consumer, Delivery, Envelope, QueueSpec, Transport
from .memory import MemoryTransport
from .redis import RedisTransport
from .redis_reliable import ReliableRedisTransport

__all__ = [
    "TRANSPORTS",
    "AmqpTransport",
    "AmqpsTransport",
    "Consumer",
    "Delivery",
    "Envelope",
    "MemoryTransport",
    "QueueSpec",
    "RedisTransport",
    "ReliableRedisTransport",
    "Transport",
    "resolve",
]

#: URL scheme -> transport class. ``redis://`` is mqtasks' own Redis transport;
#: ``redis+kombu://`` selects kombu's stock Redis transport.
TRANSPORTS: dict[str, type[Transport]] = {
    "amqp": AmqpTransport,
    "pyamqp": AmqpTransport,
    "amqps": AmqpsTransport,
    "redis": ReliableRedisTransport,
    "rediss": ReliableRedisTransport,
    "redis+kombu": RedisTransport,
    "rediss+kombu": RedisTransport,
    "memory": MemoryTransport,
}


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
    try:
        cls = TRANSPORTS[scheme]
    except KeyError:
        close = difflib.get_close_matches(scheme, list(TRANSPORTS), n=1)
        raise UnknownTransport(
            scheme, tuple(sorted(TRANSPORTS)), close[0] if close else None
        ) from None
    return cls(url, **options)
