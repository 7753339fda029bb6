"""Redis through kombu's Redis transport (lists, an unacked hash, visibility timeout)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import kombu
from kombu.transport import redis as kombu_redis

from ._guard import GuardedVirtualMessage
from .base import Capabilities, QueueSpec
from .envelope import Envelope
from .errors import translate_errors
from .kombu import KombuTransport
from .redis.checks import redis_warnings

__all__ = ["RedisKombuTransport"]


class _Channel(kombu_redis.Channel):  # type: ignore[misc]
    Message = GuardedVirtualMessage


class KombuRedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with the compression guard on received messages."""

    Channel = _Channel


class RedisKombuTransport(KombuTransport):
    """Redis through kombu's stock transport (``redis+kombu://``): a list per queue (per priority step), unacknowledged messages kept
    in a hash and restored after ``visibility_timeout`` or at a worker's shutdown.

    Redis has no publisher confirms: a publish returns when Redis has executed the
    push. Durability depends on Redis persistence (``appendonly yes``).
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis+kombu", "rediss+kombu")
    kombu_transport: Any = KombuRedisTransport
    capabilities = Capabilities(priorities=True, visibility_timeout=True)

    def connection(self, *, heartbeat: float = 0) -> Any:
        # kombu reads "redis+kombu://" as transport "redis" plus a URL "kombu://...";
        # hand it the plain redis:// URL (the transport class is given explicitly).
        plain = self.url.replace("+kombu://", "://", 1)
        return kombu.Connection(
            plain,
            transport=self.kombu_transport,
            heartbeat=heartbeat,
            connect_timeout=self.connect_timeout,
            transport_options=self.connection_options(),
            ssl=self.kombu_ssl(),
        )

    def kombu_ssl(self) -> dict[str, Any] | bool:
        # Without options kombu would connect to rediss:// with CERT_NONE.
        return self.tls.redis_kwargs() if self.uses_tls else False

    def connection_options(self) -> dict[str, Any]:
        # Ten priority lists, so that priorities 0-9 keep their order (kombu's
        # default of four steps would file 1 and 3 together).
        options: dict[str, Any] = {"priority_steps": list(range(10))}
        options.update(self.transport_options)
        return options

    def _publish(
        self,
        producer: Any,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        deadline: float,
        *,
        mandatory: bool | None = None,
    ) -> None:
        # kombu's Redis transport serves priority 0 first and 9 last, the reverse
        # of RabbitMQ, and files a message without priority under 0 (first of
        # all). Map to RabbitMQ's meaning so that swapping brokers keeps the
        # order: higher runs first; no priority counts as the lowest.
        priority = envelope.priority or 0
        envelope = dataclasses.replace(envelope, priority=9 - min(priority, 9))
        super()._publish(producer, exchange, routing_key, envelope, deadline, mandatory=mandatory)

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        # A Redis queue is a list that vanishes when empty, so a passive declare
        # would report "not found"; count the lists (all priority steps) instead.
        counts: dict[str, int] = {}
        with translate_errors(self.url, "count messages"), self.connection() as conn:
            channel = conn.default_channel
            for spec in specs:
                counts[spec.name] = int(channel._size(spec.name))
        return counts

    def delete(self, specs: Sequence[QueueSpec]) -> None:
        """Delete queues: every priority list of each, and its binding."""
        # kombu's virtual channel deletes the lists only of queues bound to an
        # exchange in its own state, and a queue on the default exchange never is:
        # its delete would leave every list in Redis. A purge removes the lists.
        with translate_errors(self.url, "delete queues"), self.connection() as conn:
            channel = conn.default_channel
            for spec in specs:
                queue = self.kombu_queue(spec).bind(channel)
                queue.purge()
                queue.delete()
                self._declared.discard(spec.name)

    def check_broker(self) -> list[str]:
        """Warn when Redis would lose or evict acknowledged tasks."""
        return redis_warnings(self.connection)
