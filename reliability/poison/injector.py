"""Publishing poison past mqtasks' producer, the way a hostile or buggy producer would.

Raw kombu on RabbitMQ and ``memory://`` (the body and properties exactly as
given, confirmed by the broker), on mqtasks' own Redis transport an
``LPUSH`` of the list element format (flag, JSON metadata, newline, body), and
on ``postgresql://``, which stores an envelope as given, a hand-built envelope
through the transport's ``publish`` (a committed ``INSERT``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

import kombu

from mqtasks import App
from mqtasks.transport import RedisTransport
from mqtasks.transport.amqp import AmqpTransport
from mqtasks.transport.envelope import Envelope
from mqtasks.transport.kombu import KombuTransport

from .kinds import Poison, build_poison

__all__ = ["PoisonInjector", "inject_poison"]


class PoisonInjector:
    """Publishes poison to one app's broker past mqtasks' producer.

    RabbitMQ and ``memory://``: a raw kombu ``publish`` on one connection
    (persistent, and on RabbitMQ mandatory with publisher confirms, so a return
    means the broker has it). Redis (``redis://``): ``LPUSH`` of the element
    format. A header too long for RabbitMQ's frame (kind h's 1 MiB value) is cut
    to the longest the broker takes, found once by probing.

    Args:
        app: The app whose broker and queues are used (the queue must be declared).
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport = app.transport
        self._conn: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        self._room: dict[tuple[str, str, int], int] = {}
        #: ``(kind/variant, header, length sent)`` of headers cut to fit the broker.
        self.cut: dict[str, tuple[str, int]] = {}

    def __enter__(self) -> PoisonInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the publishing connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._producer = None

    @property
    def is_redis(self) -> bool:
        """Whether the broker is mqtasks' own Redis transport."""
        return isinstance(self.transport, RedisTransport)

    def _connection(self) -> kombu.Connection:
        """A new connection to the broker (RabbitMQ and ``memory://``: kombu-backed)."""
        assert isinstance(self.transport, KombuTransport), self.transport
        return self.transport.connection()

    def _kombu(self) -> kombu.Producer:
        if self._producer is None:
            self._conn = self._connection()
            self._conn.ensure_connection(max_retries=3)
            self._producer = self._conn.Producer()
        return self._producer

    def _kombu_publish(
        self, producer: kombu.Producer, queue: str, poison: Poison, *, mandatory: bool = True
    ) -> None:
        options: dict[str, Any] = {
            "routing_key": queue,
            "exchange": "",
            "headers": dict(poison.headers),
            "delivery_mode": 2,
            "retry": False,
        }
        if poison.send_id:
            options["message_id"] = poison.id
        if mandatory and isinstance(self.transport, AmqpTransport):
            options["mandatory"] = True  # a return raises: the queue must be there
        if poison.content_type is None:
            options["serializer"] = "raw"  # kombu's own default: application/data, binary
        else:
            options["content_type"] = poison.content_type
            options["content_encoding"] = poison.content_encoding or "binary"
        producer.publish(poison.body, **options)

    def inject(self, queue: str, poison: Poison) -> None:
        """Publish ``poison`` to ``queue``; return once the broker has it.

        Raises:
            Exception: Whatever kombu or redis-py raised (the broker did not take it).
        """
        if isinstance(self.transport, RedisTransport):
            meta = {
                "i": poison.id if poison.send_id else None,
                "h": dict(poison.headers),
                "t": poison.content_type,
                "e": poison.content_encoding,
                "p": None,
            }
            head = json.dumps(meta, separators=(",", ":")).encode()
            element = b"n" + head + b"\n" + poison.body
            self.transport.publisher().lpush(self.transport.queue_key(queue), element)
            return
        if not isinstance(self.transport, KombuTransport):  # postgresql://: the row as given
            self.transport.publish(
                queue,
                Envelope(
                    body=poison.body,
                    message_id=poison.id if poison.send_id else None,  # type: ignore[arg-type]
                    headers=dict(poison.headers),
                    content_type=poison.content_type or "application/data",
                    content_encoding=poison.content_encoding or "binary",
                ),
            )
            return
        if isinstance(self.transport, AmqpTransport):
            poison = self._fit_headers(poison)
        try:
            self._kombu_publish(self._kombu(), queue, poison)
        except Exception:
            self.close()  # the broker may have closed the connection: the next call opens one
            raise

    def _fit_headers(self, poison: Poison) -> Poison:
        """Cut the longest string header to what one AMQP frame takes, if needed."""
        texts = [(len(v), k) for k, v in poison.headers.items() if isinstance(v, str)]
        if not texts or max(texts)[0] < 64 * 1024:
            return poison
        length, key = max(texts)
        shape = (poison.kind, poison.variant, len(poison.id))
        room = self._room.get(shape)
        if room is None:
            room = self._room[shape] = self._header_room(poison, key, length)
        if room >= length:
            return poison
        self.cut[f"{poison.kind}/{poison.variant}"] = (key, room)
        headers = {**poison.headers, key: str(poison.headers[key])[:room]}
        return replace(poison, headers=headers)

    def _header_room(self, poison: Poison, key: str, length: int) -> int:
        """The longest value of header ``key`` the broker takes with the rest of
        ``poison`` (bisection, published where no queue is bound; a frame too
        large closes the connection, so each probe has its own)."""
        value = str(poison.headers[key])
        low, high = 0, length + 1
        while high - low > 1:
            size = (low + high) // 2
            probe = replace(poison, headers={**poison.headers, key: value[:size]})
            try:
                with self._connection() as conn:
                    conn.ensure_connection(max_retries=1)
                    producer = conn.Producer()
                    self._kombu_publish(producer, "mqtasks-poison-probe", probe, mandatory=False)
            except Exception:
                high = size
            else:
                low = size
        return low


def inject_poison(
    app: App,
    queue: str,
    kind: str,
    variant: str,
    message_id: str,
    **options: Any,
) -> Poison:
    """Build one poison message (see :func:`build_poison` for ``options``) and
    publish it to ``queue`` past mqtasks' producer; return it as built.

    ``max_size`` defaults to the app's ``max_message_size`` and ``task`` to ``rel.work``.
    """
    options.setdefault("max_size", app.settings.max_message_size)
    poison = build_poison(kind, variant, message_id, **options)
    with PoisonInjector(app) as injector:
        injector.inject(queue, poison)
    return poison
