"""Start-up checks of a Redis server's settings: what would lose or evict tasks.

Shared by ``redis://`` and ``redis+kombu://`` (replication: ``redis://`` only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["redis_warnings", "replication_warnings"]


def redis_warnings(connection: Callable[[], Any]) -> list[str]:
    """Read Redis' persistence and eviction settings; return what weakens delivery.

    Args:
        connection: Returns a kombu connection to the Redis server.
    """
    warnings: list[str] = []
    try:
        with connection() as conn:
            client = conn.default_channel.client
            config = {}
            for key in ("appendonly", "appendfsync", "maxmemory-policy"):
                config.update(client.config_get(key))
    except Exception as exc:  # CONFIG may be renamed or forbidden by ACLs
        return [
            f"could not read the Redis configuration ({type(exc).__name__}); "
            "make sure it persists tasks (appendonly yes) and does not evict them"
        ]
    if config.get("appendonly") != "yes":
        warnings.append(
            "Redis has no append-only file (appendonly no): queued tasks are lost if Redis "
            "restarts. Set appendonly yes and appendfsync always (or everysec, losing up "
            "to 1 s of tasks) for at-least-once delivery."
        )
    elif config.get("appendfsync") == "no":
        warnings.append(
            "Redis appendfsync is 'no': tasks acknowledged by Redis can be lost on a crash."
        )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict "
            "queued tasks. Use noeviction, so that delay() fails loudly instead."
        )
    return warnings


def replication_warnings(client: Any, durability: str, sentinel: bool) -> list[str]:
    """Say what a failover could lose: writes not yet replicated (``local``
    durability behind Sentinel), or every publish failing (``replicated`` with
    no replica connected).

    Args:
        client: A redis-py client of the primary.
        durability: The transport's ``durability``.
        sentinel: Whether the URL is a Sentinel URL.
    """
    if durability != "replicated":
        if not sentinel:
            return []
        return [
            "Redis replicates asynchronously: a Sentinel failover can drop tasks the primary "
            "had acknowledged but not yet sent to a replica. Set durability='replicated' "
            "(MQTASKS_DURABILITY) to have delay() wait for a replica (WAIT 1)."
        ]
    try:
        replicas = int(client.info("replication").get("connected_slaves", 0))
    except Exception as exc:  # INFO may be renamed or forbidden by ACLs
        return [f"could not read INFO replication ({type(exc).__name__})"]
    if replicas == 0:
        return [
            "durability='replicated' but the Redis primary has no connected replica: every "
            "delay() raises PublishError after its timeout until a replica is attached."
        ]
    return []
