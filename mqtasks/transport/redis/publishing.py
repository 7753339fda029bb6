"""Publishing on ``redis://``: one command per message, retried after a lost
connection within the publish timeout, and with ``durability="replicated"``
followed by ``WAIT 1`` on the same connection (at the end of each pipelined
chunk for ``publish_many``).

Redis replicates asynchronously: a write the primary acknowledged can be
missing on the replica that a failover promotes. ``WAIT numreplicas timeout``
returns how many replicas have acknowledged every write the connection made
so far, so a publish followed by ``WAIT 1`` returns only once one replica
holds the message (the counterpart of RabbitMQ's publisher confirms on a
quorum queue). It does not make the write atomic across nodes: a ``WAIT`` that
times out leaves the message on the primary, where it may run or may be lost
on a failover, and the publish raises.

Functions of a :class:`~mqtasks.transport.redis.RedisTransport`, kept apart
from its topology and consuming.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import redis

from ..._url import mask_url, redact
from ...exceptions import ConfigurationError, PublishError
from ..envelope import Envelope
from .consumer import CONNECTION_ERRORS

if TYPE_CHECKING:
    from . import RedisTransport

__all__ = [
    "DURABILITIES",
    "Durability",
    "NotReplicated",
    "check_durability",
    "publish_many",
    "run_publish",
]

T = TypeVar("T")

#: What a publish waits for: ``local`` the primary's reply, ``replicated`` also one replica's.
Durability = Literal["local", "replicated"]
#: The values of :data:`Durability`.
DURABILITIES: tuple[Durability, ...] = ("local", "replicated")

_PIPELINE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, redis.RedisError)
#: Seconds of the publish timeout kept back from ``WAIT``, so that its reply
#: arrives before the socket times out.
_WAIT_MARGIN = 0.25


class NotReplicated(redis.RedisError):
    """``WAIT 1`` reported no replica holding the write within its timeout."""


def check_durability(value: object) -> Durability:
    """Return ``value`` as a :data:`Durability`.

    Raises:
        ConfigurationError: It is neither ``local`` nor ``replicated``.
    """
    if value not in DURABILITIES:
        raise ConfigurationError(f"durability must be 'local' or 'replicated', not {value!r}.")
    return value


def _wait_ms(seconds: float) -> int:
    """``WAIT``'s timeout for ``seconds`` left (never 0, which would block for ever)."""
    return max(1, int((seconds - _WAIT_MARGIN) * 1000))


def call(transport: RedisTransport, send: Callable[[Any], T], deadline: float) -> T:
    """Run ``send`` once on the publishing client; with ``replicated``
    durability then ``WAIT 1`` on the same connection, for the time left.

    The ``WAIT`` is sent after the write's reply, not pipelined with it: its
    timeout starts when the server reads it, so behind a write held by a
    stalled primary (frozen, then thawed) a pipelined ``WAIT`` would run its
    whole timeout after the stall and push ``delay()`` past the publish
    timeout. Sent second, it gets only the time left. It costs one round trip
    to the primary more (``benchmarks/replicated.py`` measures it).

    Raises:
        NotReplicated: No replica acknowledged the write before ``deadline``.
    """
    client = transport.publisher()
    if transport.durability != "replicated":
        return send(client)
    # WAIT counts the writes of its own connection: pin one for both commands.
    pinned = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        reply = send(pinned)
        acked = pinned.wait(1, _wait_ms(deadline - time.monotonic()))
    finally:
        pinned.close()
    if int(acked) < 1:
        raise NotReplicated("no replica acknowledged the write within the publish timeout")
    return reply


def run_publish(
    transport: RedisTransport,
    send: Callable[[Any], T],
    envelope: Envelope,
    where: str,
    timeout: float | None = None,
) -> T:
    """See :meth:`RedisTransport.run_publish`."""
    timeout = transport.publish_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    backoff = 0.05
    for attempt in range(transport.publish_retries + 1):
        try:
            return call(transport, send, deadline)
        except CONNECTION_ERRORS as exc:
            last: BaseException = exc
            if attempt == transport.publish_retries or time.monotonic() + backoff >= deadline:
                break
            time.sleep(backoff)
            backoff = min(backoff * 4, 2.0)
        except redis.RedisError as exc:  # OOM under noeviction, a wrong key type, ACLs, WAIT
            last = exc
            break
    if isinstance(last, NotReplicated):
        message = (
            f"Task {envelope.message_id} was written to {where} on the Redis primary, but no "
            f"replica acknowledged it within {timeout:g} s (durability='replicated'): a failover "
            "may lose it, or it may run. Check the replicas (INFO replication); publishing "
            f"again with the same task id makes a duplicate detectable (broker {mask_url(transport.url)})"
        )
    else:
        message = (
            f"Task {envelope.message_id} was NOT enqueued on {where}: "
            f"{type(last).__name__}: {last} (broker {mask_url(transport.url)})"
        )
    raise PublishError(redact(message), task_id=envelope.message_id) from last


def publish_many(
    transport: RedisTransport,
    items: Sequence[tuple[str, Envelope]],
    delays: Sequence[float | None] | None,
) -> list[BaseException | None]:
    """See :meth:`RedisTransport.publish_many`."""
    if delays is not None and len(delays) != len(items):
        raise ValueError(f"{len(delays)} delays for {len(items)} items")
    results: list[BaseException | None] = [None] * len(items)
    replicated = transport.durability == "replicated"
    for start in range(0, len(items), transport.chunk):
        batch = items[start : start + transport.chunk]
        pipe = transport.publisher().pipeline(transaction=False)
        for i, (queue, envelope) in enumerate(batch, start):
            try:
                element, level = transport._encode(queue, envelope)
                delay_ms = transport._delay_ms(queue, envelope, delays[i] if delays else None)
            except PublishError as exc:
                results[i] = exc
                continue
            transport._send(pipe, queue, element, level, delay_ms)
        if replicated:
            pipe.wait(1, _wait_ms(transport.publish_timeout))
        try:
            replies = pipe.execute(raise_on_error=False)
        except _PIPELINE_ERRORS as exc:
            for i, (queue, envelope) in enumerate(batch, start):
                if results[i] is None:
                    results[i] = PublishError(
                        f"Task {envelope.message_id} may NOT be enqueued on {queue!r}: "
                        f"{type(exc).__name__}: {exc}; publishing it again with the same "
                        "task id makes a duplicate detectable.",
                        task_id=envelope.message_id,
                    )
            continue
        unreplicated = replicated and (isinstance(replies[-1], Exception) or int(replies[-1]) < 1)
        sent = iter(replies)
        for i, (queue, envelope) in enumerate(batch, start):
            if results[i] is not None:
                continue
            reply = next(sent)
            if isinstance(reply, Exception):
                results[i] = PublishError(
                    f"Task {envelope.message_id} was NOT enqueued on {queue!r}: {reply}",
                    task_id=envelope.message_id,
                )
            elif unreplicated:
                results[i] = PublishError(
                    f"Task {envelope.message_id} was written to {queue!r} on the Redis primary, "
                    "but no replica acknowledged it within the publish timeout "
                    "(durability='replicated'): a failover may lose it, or it may run.",
                    task_id=envelope.message_id,
                )
    return results
