"""Ordered processing by key: tasks with the same key value run one at a time, in publish order.

``@app.task(ordering_key="account_id", partitions=16)`` makes the calls of a
task that share the value of one parameter a group, like the message groups
of a FIFO queue: a worker runs them one at a time, in the order they were
published, while other keys run in parallel. Publishing routes each call to
one of its queue's partition queues (:mod:`.publish`); workers share the
partitions through backend leases (:mod:`.assignment`) and keep one lane per
key (:mod:`.lanes`). See ``docs/guide/ordering.rst``.
"""

from __future__ import annotations

from .keys import HEADER_OKEY, HEADER_OSEQ, key_digest, partition_name
from .options import Ordering

__all__ = ["HEADER_OKEY", "HEADER_OSEQ", "Ordering", "key_digest", "partition_name"]
