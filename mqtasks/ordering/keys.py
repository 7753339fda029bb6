"""Names of ordered processing by key: key digests, partition queues, headers, backend keys.

Every part of ordered processing (the publish step, the worker's partition
ownership and key lanes, the queue resolution of the app) agrees on these.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..exceptions import EncodeError

__all__ = [
    "DEFAULT_PARTITIONS",
    "HEADER_OKEY",
    "HEADER_OSEQ",
    "MAX_PARTITIONS",
    "halt_key",
    "key_digest",
    "lease_name",
    "member_key",
    "members_key",
    "owner_key",
    "parse_partition",
    "partition_index",
    "partition_name",
    "sequence_key",
]

#: Header: the digest of the ordering key's value (:func:`key_digest`).
HEADER_OKEY = "mqtasks-okey"
#: Header: the message's sequence number within its key, from 1.
HEADER_OSEQ = "mqtasks-oseq"

#: Partitions of a queue when its ordered tasks name none.
DEFAULT_PARTITIONS = 16
#: Most partitions a queue may have.
MAX_PARTITIONS = 1024

# sort_keys: {"a": 1, "b": 2} and {"b": 2, "a": 1} are one key.
_CANONICAL = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True
)
_PARTITION = re.compile(r"^(?P<base>.+)\.p(?P<index>[0-9]+)$")


def key_digest(value: Any) -> str:
    """Return the digest of an ordering key's value: 16 hex digits of BLAKE2b over its JSON.

    Raises:
        EncodeError: A value JSON cannot carry.
    """
    try:
        text = _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"The ordering key {value!r} cannot be encoded as JSON: {exc}") from exc
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def partition_index(okey: str, partitions: int) -> int:
    """Return the partition of key digest ``okey`` among ``partitions``."""
    return int(okey, 16) % partitions


def partition_name(queue: str, index: int, partitions: int) -> str:
    """Return the name of partition ``index`` of ``queue``: ``<queue>.p<index>``, zero-padded
    to the width of ``partitions - 1`` (``ledger.p03`` of 16)."""
    width = len(str(partitions - 1))
    return f"{queue}.p{index:0{width}d}"


def parse_partition(name: str, partitions: dict[str, int]) -> tuple[str, int] | None:
    """Return ``(base queue, index)`` if ``name`` is a partition of a queue of ``partitions``.

    Args:
        name: A queue name.
        partitions: Partition counts by base queue (the queues with ordered tasks).
    """
    match = _PARTITION.match(name)
    if match is None:
        return None
    base, digits = match["base"], match["index"]
    count = partitions.get(base)
    if count is None:
        return None
    index = int(digits)
    if index >= count or partition_name(base, index, count) != name:
        return None
    return base, index


def sequence_key(queue: str, okey: str) -> str:
    """The backend counter of a key's sequence numbers."""
    return f"ordering:seq:{queue}:{okey}"


def halt_key(queue: str, okey: str) -> str:
    """The backend key holding the id of the task that halted a key."""
    return f"ordering:halt:{queue}:{okey}"


def members_key(queue: str) -> str:
    """The backend set of the workers sharing a queue's partitions."""
    return f"ordering:members:{queue}"


def epoch_key(queue: str) -> str:
    """The backend counter bumped when a worker joins or leaves a queue's members, or gives
    a partition back: the others look at it often and rebalance at once when it moved."""
    return f"ordering:epoch:{queue}"


def member_key(queue: str, member: str) -> str:
    """The backend key whose presence says that ``member`` is alive."""
    return f"ordering:member:{queue}:{member}"


def owner_key(queue: str, index: int) -> str:
    """The backend key naming the member that consumes a partition (deleted when it gives
    the partition up in good order)."""
    return f"ordering:owner:{queue}:{index}"


def resume_key(message_id: str) -> str:
    """The backend key holding the attempt a retry held in place runs as next, so that a
    redelivery of the message (after a hand-back or a crash) keeps its attempt count."""
    return f"ordering:resume:{message_id}"


def lease_name(queue: str, index: int) -> str:
    """The backend lease of partition ``index`` of ``queue``."""
    return f"ordering:part:{queue}:{index}"
