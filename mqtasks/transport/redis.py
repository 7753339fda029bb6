"""Redis through kombu's Redis transport (lists, an unacked hash, visibility timeout)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from kombu.transport import redis as kombu_redis

from ._guard import GuardedVirtualMessage
from .base import QueueSpec, Transport, translate_errors

__all__ = ["RedisTransport"]


class _Channel(kombu_redis.Channel):  # type: ignore[misc]
    Message = GuardedVirtualMessage


class KombuRedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with the compression guard on received messages."""

    Channel = _Channel


class RedisTransport(Transport):
    """Redis: a list per queue (per priority step), unacknowledged messages kept
    in a hash and restored after ``visibility_timeout`` or at a worker's shutdown.

    Redis has no publisher confirms: a publish returns when Redis has executed the
    push. Durability depends on Redis persistence (``appendonly yes``).
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss")
    kombu_transport: Any = KombuRedisTransport

    def message_counts(self, specs: Sequence[QueueSpec]) -> dict[str, int]:
        # A Redis queue is a list that vanishes when empty, so a passive declare
        # would report "not found"; count the lists (all priority steps) instead.
        counts: dict[str, int] = {}
        with translate_errors(self.url, "count messages"), self.connection() as conn:
            channel = conn.default_channel
            for spec in specs:
                counts[spec.name] = int(channel._size(spec.name))
        return counts
