"""Message groups of SQS FIFO queues as the consumer hands them on: one message of a
group out at a time, in the order received.

SQS returns no more messages of a group while some are in flight, but one
``ReceiveMessage`` may return several messages of one group at once, and a
worker's threads would run them side by side. :class:`Groups` keeps the later
ones of a group back until the one handed on is settled; the messages of
other groups flow meanwhile. :class:`GivenBack` keeps the receives that were
no delivery (a message given back unrun, a retry waiting in the queue) out of
the delivery count.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

__all__ = ["GROUP_HEADER", "ORDERING_KEY_HEADER", "GivenBack", "Groups", "message_group"]

#: The header ordered tasks carry their key's digest in (``MessageGroupId`` on FIFO queues).
ORDERING_KEY_HEADER = "mqtasks-okey"
#: The header that names a message's group on a FIFO queue
#: (``apply_async(headers={GROUP_HEADER: "account-42"})``); before the ordering key.
GROUP_HEADER = "sqs-message-group-id"
#: The group of a message on a FIFO queue that names none.
DEFAULT_GROUP = "default"


def message_group(headers: Mapping[str, Any], attributes: Mapping[str, Any] | None = None) -> str:
    """Return the ``MessageGroupId`` of a message on a FIFO queue.

    Args:
        headers: The message's headers (:data:`GROUP_HEADER`, else the ordering key).
        attributes: SQS's attributes of a received message; its ``MessageGroupId``
            comes first when SQS returned it.
    """
    if attributes:
        found = attributes.get("MessageGroupId")
        if isinstance(found, str) and found:
            return found
    group = headers.get(GROUP_HEADER) or headers.get(ORDERING_KEY_HEADER)
    return str(group) if group else DEFAULT_GROUP


class Groups:
    """Which message of each group is out, and the received ones waiting behind it.

    Keys are ``(queue, group)``; messages are told apart by their receipt handle.
    """

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], deque[Any]] = {}
        self._out: dict[str, tuple[str, str]] = {}

    def __len__(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def arrive(self, key: tuple[str, str], tag: str, delivery: Any) -> bool:
        """Take a received message; return whether it goes on now (no other of its group
        is out) rather than waiting behind the one that is."""
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append((tag, delivery))
            return False
        self._waiting[key] = deque()
        self._out[tag] = key
        return True

    def settled(self, tag: str) -> Any | None:
        """The message out under ``tag`` is settled: return the next of its group to hand
        on (now out), or None."""
        key = self._out.pop(tag, None)
        if key is None:
            return None
        waiting = self._waiting[key]
        if not waiting:
            del self._waiting[key]
            return None
        next_tag, delivery = waiting.popleft()
        self._out[next_tag] = key
        return delivery

    def release(self, tag: str) -> list[Any]:
        """The message out under ``tag`` goes back to SQS: free its group and return the
        messages waiting behind it, in order (they must go back too, after it)."""
        key = self._out.pop(tag, None)
        if key is None:
            return []
        return [delivery for _, delivery in self._waiting.pop(key, ())]

    def clear(self) -> None:
        """Forget everything (the connection is gone: SQS has the messages back)."""
        self._waiting.clear()
        self._out.clear()


class GivenBack:
    """How often this consumer gave each message back to SQS without a delivery, by SQS
    ``MessageId``: the messages of a group it received behind one that then waits in
    the queue (unrun), and the waits themselves (retries held in place).

    SQS counts each of those as a receive; taken off ``ApproximateReceiveCount``,
    the delivery count (and ``delivery_limit``) counts what it is meant to: the
    deliveries that ended in a crash or a hand-back. Kept for this consumer only
    (a message another worker receives next counts them), at most ``most`` messages.
    """

    def __init__(self, most: int = 10000) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._most = most

    def add(self, message_id: str | None) -> None:
        """One more receive of ``message_id`` that was no delivery."""
        if not message_id:
            return
        self._counts[message_id] = self._counts.pop(message_id, 0) + 1
        if len(self._counts) > self._most:
            self._counts.popitem(last=False)

    def discount(self, message_id: str | None, count: int | None) -> int | None:
        """Return receive count ``count`` of ``message_id`` less those that were no delivery."""
        if count is None or not message_id:
            return count
        return max(1, count - self._counts.get(message_id, 0))

    def forget(self, message_id: str | None) -> None:
        """``message_id`` is done (deleted from its queue)."""
        if message_id:
            self._counts.pop(message_id, None)
