"""Partition queues as the broker sees them: declared from their base queue's spec.

A partition queue (``ledger.p03``) is configured by its base queue
(``ledger``): same type, limits and TTL, plus ``single_active_consumer``
where the broker honours it, so that the broker itself keeps a second
consumer on standby. Its dead letters go to the base queue's dead-letter queue.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from .keys import parse_partition, partition_name
from .options import ordered_queues

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..app import App
    from ..transport.base import QueueSpec

__all__ = ["base_queue", "partition_spec", "partitions_of"]

_MAYBE = re.compile(r"\.p[0-9]+$")


def _partition_of(app: App, name: str) -> tuple[str, int] | None:
    if _MAYBE.search(name) is None:  # most queue names: no need to look at the tasks
        return None
    return parse_partition(name, ordered_queues(app.tasks.values()))


def partition_spec(app: App, name: str) -> QueueSpec | None:
    """Return the spec of partition queue ``name``, or None if it is not one: its base
    queue's spec, renamed, with ``single_active_consumer`` where the transport honours it
    and the base queue's dead-letter queue (what the broker dead-letters goes there too)."""
    found = _partition_of(app, name)
    if found is None:
        return None
    base = app.queue(found[0])
    return dataclasses.replace(
        base,
        name=name,
        single_active_consumer=app.transport.capabilities.single_active_consumer,
        dead_letter_queue=base.dead_letter_name,
    )


def base_queue(app: App, name: str) -> str | None:
    """Return the base queue of partition queue ``name``, or None if it is not a partition."""
    found = _partition_of(app, name)
    return found[0] if found is not None else None


def partitions_of(app: App, queues: Sequence[str]) -> list[str]:
    """Return the partition queues of those of ``queues`` that carry ordered tasks (none
    of a queue the broker orders natively: ``Capabilities.native_ordering``)."""
    return [
        partition_name(q, i, n)
        for q, n in ordered_queues(app.tasks.values()).items()
        if q in queues and app.transport.native_ordering_refused(q) is not None
        for i in range(n)
    ]
