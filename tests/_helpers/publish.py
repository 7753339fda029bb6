"""Publishing past mqtasks' producer, as a hostile or buggy producer would.

Raw kombu on RabbitMQ, SQS and ``memory://``; on mqtasks' own Redis transport the
list element written straight into the queue; on the SQL transports (PostgreSQL,
SQLite), which store an envelope as it is given, a hand-built envelope through
their ``publish``. The worker must dead-letter what it cannot take, with its
reason, and never block the queue on it.
"""

from __future__ import annotations

import gzip
import pickle
from typing import Any

from mqtasks import App
from mqtasks.transport.base import Envelope
from mqtasks.transport.kombu import KombuTransport
from mqtasks.transport.redis import RedisTransport, encode_element

__all__ = ["raw_publish"]


def raw_publish(app: App, queue: str, body: Any, **kwargs: Any) -> None:
    """Publish ``body`` to ``queue`` bypassing mqtasks.

    Args:
        app: The app whose broker is used.
        queue: The queue (routing key on the default exchange).
        body: The raw body.
        **kwargs: What kombu's ``Producer.publish`` takes (``headers``,
            ``content_type``, ``serializer="pickle"``, ``compression="gzip"``...),
            applied the same way on Redis.
    """
    kwargs["headers"] = dict(kwargs.get("headers") or {})  # kombu may add to it in place
    transport = app.transport
    if isinstance(transport, RedisTransport):
        # The transport's own client: it reaches fakeredis too.
        element = encode_element(_poison_envelope(body, **kwargs))
        transport.publisher().lpush(transport.queue_key(queue), element)
        return
    if not isinstance(transport, KombuTransport):
        transport.publish(queue, _poison_envelope(body, **kwargs))
        return
    with transport.connection() as conn:
        producer = conn.Producer()
        kwargs.setdefault("message_id", "raw-1")
        producer.publish(body, routing_key=queue, exchange="", **kwargs)


def _poison_envelope(body: Any, **kwargs: Any) -> Envelope:
    """``body`` with the headers and properties kombu would send, as an envelope."""
    headers = kwargs["headers"]
    content_type = kwargs.get("content_type")
    if kwargs.get("serializer") == "pickle":
        body, content_type = pickle.dumps(body), "application/x-python-serialize"
    if kwargs.get("compression") == "gzip":
        body, headers["compression"] = gzip.compress(body), "application/x-gzip"
    return Envelope(
        body=body,
        message_id=kwargs.get("message_id", "raw-1"),
        headers=headers,
        content_type=content_type or "application/data",
        content_encoding=kwargs.get("content_encoding") or "binary",
    )
