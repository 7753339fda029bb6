"""What a transport hands out: deliveries to a consumer, stored messages to tooling.

A :class:`Delivery` is a message received by a
:class:`~mqtasks.transport.base.Consumer`, settled once through it; a
:class:`StoredMessage` is one read from a queue without a consumer
(:meth:`~mqtasks.transport.base.Transport.take`,
:meth:`~mqtasks.transport.base.Transport.browse`). Both are also importable
from :mod:`mqtasks.transport.base`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Delivery", "StoredMessage", "Taken"]


@dataclass(frozen=True)
class StoredMessage:
    """A message read from a queue without a consumer (dead-letter tooling).

    Attributes:
        body: The body bytes as stored.
        message_id: The message id, if it had one.
        headers: Its headers.
        content_type: Its content type.
        content_encoding: Its content encoding.
    """

    body: bytes
    message_id: str | None
    headers: Mapping[str, Any]
    content_type: str | None = None
    content_encoding: str | None = None


#: A taken message and the function that removes it from its queue for good.
Taken = tuple[StoredMessage, Callable[[], None]]


class Delivery:
    """A received message, owned by the consumer that delivered it.

    Settle it exactly once through :meth:`~mqtasks.transport.base.Consumer.ack`,
    :meth:`~mqtasks.transport.base.Consumer.reject` or
    :meth:`~mqtasks.transport.base.Consumer.requeue`. Transports subclass it to keep what they need
    for settling (a kombu message, a Redis list element).
    """

    __slots__ = (
        "body",
        "content_encoding",
        "content_type",
        "delivery_count",
        "generation",
        "headers",
        "message_id",
        "priority",
        "queue",
        "received_at",
        "redelivered",
        "refused",
    )

    def __init__(
        self,
        body: bytes,
        queue: str,
        generation: int,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        priority: int | None = None,
        redelivered: bool = False,
        delivery_count: int | None = None,
        refused: str | None = None,
    ) -> None:
        self.body = body
        self.headers: Mapping[str, Any] = headers if headers is not None else {}
        self.message_id = message_id
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.priority = priority
        self.redelivered = redelivered
        self.queue = queue
        self.generation = generation
        self.received_at = time.time()
        #: Set by the transport when it refused to read the body (the reason).
        self.refused = refused
        #: Deliveries of this message so far, this one included, as the broker
        #: counted them; None when the broker does not count.
        self.delivery_count = delivery_count

    def __repr__(self) -> str:
        return f"<Delivery {self.message_id} from {self.queue!r}>"
