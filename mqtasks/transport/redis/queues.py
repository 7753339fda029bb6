"""Working on ``redis://`` queues without a consumer: counting, statistics,
purging and deleting, and the browsing and taking that dead-letter tooling
uses. Functions of a :class:`~mqtasks.transport.redis.RedisTransport`, kept
apart from its publishing and topology."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..base import DLQ_SUFFIX, QueueSpec, QueueStats, StoredMessage, Taken
from ..errors import translate_errors
from ..queue import published_at
from .element import MAX_LEVEL, RedisDelivery

if TYPE_CHECKING:
    from . import RedisTransport

__all__ = [
    "browse",
    "count_ready",
    "delayed_counts",
    "delete",
    "message_counts",
    "purge",
    "queue_stats",
    "stored",
    "take",
]


def count_ready(t: RedisTransport, pipe: Any, queue: str) -> None:
    """Add an LLEN of each of ``queue``'s ready lists to ``pipe``."""
    for key in t.ready_keys(queue):
        pipe.llen(key)


def _sum_levels(replies: Iterator[Any]) -> int:
    """Sum the next LLEN replies of a queue's ready lists (see :func:`count_ready`)."""
    return sum(int(next(replies)) for _ in range(MAX_LEVEL + 1))


def message_counts(t: RedisTransport, specs: Sequence[QueueSpec]) -> dict[str, int]:
    """Return the number of ready messages per queue, all priority levels
    together (an absent queue is empty)."""
    with translate_errors(t.url, "count messages"):
        pipe = t.publisher().pipeline(transaction=False)
        for spec in specs:
            count_ready(t, pipe, spec.name)
        replies = iter(pipe.execute())
    return {s.name: _sum_levels(replies) for s in specs}


def delayed_counts(t: RedisTransport, specs: Sequence[QueueSpec]) -> dict[str, int]:
    """Return, per queue, how many messages Redis holds for a delay (due or not)."""
    with translate_errors(t.url, "count delayed messages"):
        pipe = t.publisher().pipeline(transaction=False)
        for spec in specs:
            pipe.zcard(t.delayed_key(spec.name))
        return {s.name: int(n) for s, n in zip(specs, pipe.execute(), strict=True)}


def purge(t: RedisTransport, specs: Sequence[QueueSpec]) -> int:
    """Remove all ready (of every priority) and delayed messages from the
    queues in one transaction; return how many."""
    with translate_errors(t.url, "purge"):
        pipe = t.publisher().pipeline(transaction=True)
        for spec in specs:
            count_ready(t, pipe, spec.name)
            pipe.zcard(t.delayed_key(spec.name))
            pipe.delete(*t.ready_keys(spec.name), t.delayed_key(spec.name))
        replies = iter(pipe.execute())
        removed = 0
        for _ in specs:
            removed += _sum_levels(replies) + int(next(replies))
            next(replies)  # the DEL's count of keys
        return removed


def delete(t: RedisTransport, specs: Sequence[QueueSpec]) -> None:
    """Delete queues: their ready lists of every priority and delayed sets
    (in-flight messages return to a new list); forget their declaration."""
    if not specs:
        return
    keys = [k for s in specs for k in (*t.ready_keys(s.name), t.delayed_key(s.name))]
    with translate_errors(t.url, "delete queues"):
        t.publisher().delete(*keys)
    t._declared.difference_update(s.name for s in specs)


def queue_stats(t: RedisTransport, specs: Sequence[QueueSpec]) -> dict[str, QueueStats]:
    """Read each queue's ready list (its length and oldest element's publishing
    time), delayed set, dead-letter list and, through the consumer registry,
    its in-flight lists and live consumers.

    Redis has no queue objects: an absent queue is an empty one, never
    missing. In-flight messages of a consumer that died count as
    unacknowledged until a sweep puts them back. Read with one pipeline,
    not atomically.

    Raises:
        ConnectionFailed: Redis cannot be reached.
    """
    with translate_errors(t.url, "read queue stats"):
        client = t.publisher()
        registry: dict[str, list[str]] = {}
        for raw_id, sources in client.hgetall(t.registry_key).items():
            try:
                keys = json.loads(sources)
            except ValueError:
                continue  # not ours to judge; the sweep owns the registry
            if isinstance(keys, list):
                registry[raw_id.decode(errors="replace")] = [str(k) for k in keys]
        pipe = client.pipeline(transaction=False)
        for cid in registry:
            pipe.exists(t.alive_key(cid))
        wanted = {t.queue_key(s.name) for s in specs}
        in_flight = [
            (cid, key, i)
            for cid, keys in registry.items()
            for i, key in enumerate(keys)
            if key in wanted
        ]
        for cid, _, i in in_flight:
            pipe.llen(t.processing_key(cid, i))
        for spec in specs:
            count_ready(t, pipe, spec.name)
            for key in t.ready_keys(spec.name):
                pipe.lindex(key, -1)  # the oldest of each level: consumers pop the right end
            pipe.zcard(t.delayed_key(spec.name))
            pipe.llen(t.queue_key(spec.name + DLQ_SUFFIX))  # dead letters: level 0
        replies = iter(pipe.execute())
    alive = {cid for cid in registry if next(replies)}
    unacked: Counter[str] = Counter()
    consumers: Counter[str] = Counter()
    for cid, key, _ in in_flight:
        unacked[key] += int(next(replies))
        if cid in alive:
            consumers[key] += 1
    stats: dict[str, QueueStats] = {}
    for spec in specs:
        key = t.queue_key(spec.name)
        ready = sum(int(next(replies)) for _ in range(MAX_LEVEL + 1))
        heads = [next(replies) for _ in range(MAX_LEVEL + 1)]
        delayed, dead = (int(next(replies)) for _ in range(2))
        times = [when for e in heads if e and (when := _published_at(e, spec.name))]
        stats[spec.name] = QueueStats(
            spec.name,
            ready=ready,
            unacked=unacked[key],
            delayed=delayed,
            dead_lettered=None if spec.name.endswith(DLQ_SUFFIX) else dead,
            consumers=consumers[key],
            head_published_at=min(times) if times else None,
        )
    return stats


def _published_at(element: bytes, queue: str) -> float | None:
    """When the message of a list element was published, from its header (None if unreadable)."""
    return published_at(RedisDelivery(element, queue, 1, "", "").headers)


def stored(t: RedisTransport, element: bytes, queue: str) -> StoredMessage:
    d = RedisDelivery(element, queue, 1, "", "")
    return StoredMessage(
        body=d.body,
        message_id=d.message_id,
        headers=d.headers,
        content_type=d.content_type,
        content_encoding=d.content_encoding,
    )


def browse(t: RedisTransport, queue: str, limit: int | None = None) -> list[StoredMessage]:
    """Read up to ``limit`` messages of ``queue`` with ``LRANGE``, oldest first, untouched."""
    if limit == 0:
        return []
    start = 0 if limit is None else -max(limit, 0)
    with translate_errors(t.url, f"read {queue!r}"):
        elements = t.publisher().lrange(t.queue_key(queue), start, -1)
    # Producers push on the left and consumers take from the right: oldest last.
    return [stored(t, e, queue) for e in reversed(elements)]


@contextlib.contextmanager
def take(t: RedisTransport, queue: str) -> Iterator[Iterator[Taken]]:
    """Read ``queue``'s messages oldest first; removing one is an ``LREM`` of its element."""
    key = t.queue_key(queue)
    with translate_errors(t.url, f"read {queue!r}"):
        elements = t.publisher().lrange(key, 0, -1)

    def remover(element: bytes) -> Callable[[], None]:
        def remove() -> None:
            with translate_errors(t.url, f"remove a message from {queue!r}"):
                t.publisher().lrem(key, -1, element)

        return remove

    yield ((stored(t, e, queue), remover(e)) for e in reversed(elements))
